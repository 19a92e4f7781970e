"""Notice files in the watched folder once they are completely written.

watchdog's native observer (inotify) where the file system delivers events, a polling observer
on network and FUSE file systems (read from the mount table) or when configured. Events only
nominate candidates: a file is *ready* when its size and mtime have been stable for
`settle_seconds` and it can be opened for reading. A periodic full rescan catches whatever the
events missed (overflowed inotify queue, files present before start).

Security: a symlink is followed only when it resolves inside the watched folder; anything else
is reported as rejected and never opened.
"""

from __future__ import annotations

import errno
import fnmatch
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from watchdog.events import (
    DirCreatedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserver

from daemon.config import DEFAULT_IGNORES, WatchSettings
from daemon.files import LeadsOutside, PathStat, is_within, open_beneath, unreadable

log = logging.getLogger("daemon.watcher")

NETWORK_FS = {
    "nfs", "nfs4", "cifs", "smb", "smb3", "smbfs", "ncpfs", "afs", "9p", "ceph", "glusterfs",
    "lustre", "gpfs", "davfs", "sshfs", "fuse", "fuseblk", "virtiofs", "vboxsf", "prl_fs",
}


PASS_SECONDS = 0.5  # of one pass's look at files a scan found (events go first)
PASS_FLOOR = 0.05  # ...and at least this, whatever events come: the backlog goes on
TAKE_BATCH = 64  # ready files taken in together at most: one ledger lookup for them all

# The events asked of the observer: those that nominate a file, and the directory ones a
# recursive watch needs to follow new folders. By default watchdog takes every inotify event,
# and its threads spent more of the main process's time than the watcher itself: every open
# and close without a write (the daemon's own four reads of each file among them: settling,
# hashing, decoding, the after-action's check) and a modification event for every write a
# producer makes (a copy in 64 KiB writes: one each). Under inotify a file written is
# nominated when it is closed, so modifications are not asked for (a rewrite in place closes
# too; the rescan is there for what events miss). Other observers report no closes: they keep
# modifications.
EVENTS_INOTIFY = (FileCreatedEvent, FileClosedEvent, FileMovedEvent, DirCreatedEvent,
                  DirMovedEvent)
EVENTS_OTHER = (FileCreatedEvent, FileModifiedEvent, FileMovedEvent, DirCreatedEvent,
                DirMovedEvent)


@dataclass(frozen=True)
class _Ready:
    """A file found ready in a pass, and the look it settled from (put back as it was should
    the pass end before it is taken in)."""

    key: str
    path: Path
    previous: PathStat | None
    since: float


def mount_fstype(path: Path, mounts_file: Path = Path("/proc/mounts")) -> str | None:
    """File system type of the mount holding `path` (longest matching mount point)."""
    try:
        lines = mounts_file.read_text().splitlines()
    except OSError:
        return None
    target = str(path.resolve())
    best, best_type = "", None
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        if (target == point or target.startswith(point.rstrip("/") + "/")) and len(point) >= len(
            best
        ):
            best, best_type = point, fields[2]
    return best_type


def needs_polling(fstype: str | None) -> bool:
    if fstype is None:
        return False
    return fstype in NETWORK_FS or fstype.startswith("fuse.") or fstype.startswith("nfs")


def is_ignored(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


class _Handler(FileSystemEventHandler):
    def __init__(self, nominate: Callable[[str], None]) -> None:
        self._nominate = nominate

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.is_directory:
            return
        if event.event_type in ("created", "modified", "closed"):
            self._nominate(os.fsdecode(event.src_path))
        elif event.event_type == "moved":
            self._nominate(os.fsdecode(event.dest_path))


class Watcher:
    """Calls `on_ready(path)` once per new or changed file, `on_rejected(path, reason)` for
    files it refuses to read. Both run on the watcher's own thread: `on_ready` may block
    (backpressure from a full queue); files simply wait in the folder meanwhile. With
    `look_up`, the files found ready together (up to TAKE_BATCH) are handed to it at once
    before `on_ready` is called for each: the intake looks them up in the ledger in one round
    trip. What `look_up` returns, if anything, is called once `on_ready` has been for each
    file of the batch (the intake registers the new ones together); the files it returns,
    which could not be taken in, are looked at again on the next rescan, as is a file whose
    `on_ready` raised."""

    def __init__(
        self,
        settings: WatchSettings,
        on_ready: Callable[[Path], None],
        on_rejected: Callable[[Path, str], None],
        *,
        tick_seconds: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
        look_up: Callable[[Sequence[Path]], Callable[[], Sequence[Path]] | None] | None = None,
    ) -> None:
        self.settings = settings
        self._look_up = look_up
        self._clock = clock
        self.root = settings.path.resolve()
        self._on_ready = on_ready
        self._on_rejected = on_rejected
        self._tick = tick_seconds
        self._patterns = DEFAULT_IGNORES + tuple(settings.ignore)
        self._skip_dirs = {
            (self.root / d).resolve()
            for d in (settings.done_folder, settings.failed_dir, settings.output_dir) if d
        }
        self._lock = threading.Lock()
        self._pending: dict[str, tuple[PathStat | None, float]] = {}
        self._handled: dict[str, PathStat] = {}
        self._urgent: set[str] = set()  # nominated by an event: looked at before scan finds
        self._running = threading.Event()
        self._thread: threading.Thread | None = None
        self._observer: BaseObserver | None = None
        self.observer_kind = "none"
        self.scans = 0  # full scans of the folder finished
        # the last scan after which a pass of the loop ended with nothing left settling: every
        # file that scan saw had been reported, refused or ignored by then
        self.quiet_after_scan = -1

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self._observer = self._make_observer()
        events = EVENTS_INOTIFY if _is_inotify(self._observer) else EVENTS_OTHER
        self._observer.schedule(_Handler(self._nominate), str(self.root),
                                recursive=self.settings.recursive, event_filter=list(events))
        self._observer.start()
        self._running.set()
        self._thread = threading.Thread(target=self._loop, name="watcher", daemon=True)
        self._thread.start()
        log.info("watching %s (%s observer, settle %.1fs, rescan every %.0fs)", self.root,
                 self.observer_kind, self.settings.settle_seconds,
                 self.settings.rescan_interval_seconds)

    def stop(self, timeout: float = 5.0) -> None:
        self._running.clear()
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout)
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return bool(self._thread and self._thread.is_alive() and self._observer
                    and self._observer.is_alive())

    def _make_observer(self) -> BaseObserver:
        mode = self.settings.observer
        fstype = mount_fstype(self.root)
        if mode == "polling" or (mode == "auto" and needs_polling(fstype)):
            self.observer_kind = f"polling ({fstype or 'configured'})"
            return PollingObserver(timeout=self.settings.poll_interval_seconds)
        self.observer_kind = f"native ({fstype or 'unknown fs'})"
        return Observer()

    # -- candidates -----------------------------------------------------------------------

    def _nominate(self, raw: str) -> None:
        path = Path(raw)
        if not self._wanted(path):
            return
        with self._lock:
            self._pending.setdefault(str(path), (None, self._clock()))
            self._urgent.add(str(path))

    def _wanted(self, path: Path) -> bool:
        if is_ignored(path.name, self._patterns):
            return False
        if path.suffix.lower() not in self.settings.extensions:
            return False
        try:
            relative = path.relative_to(self.root)
        except ValueError:
            return False
        if any(is_ignored(part, self._patterns) for part in relative.parts[:-1]):
            return False
        if not self.settings.recursive and len(relative.parts) != 1:
            return False
        return not any(parent in self._skip_dirs for parent in path.parents)

    def scan(self) -> int:
        """Nominate every file in the folder not already handled in its current form."""
        count = 0
        for path in self._walk():
            snap = _snapshot(path)
            key = str(path)
            with self._lock:
                if snap is not None and self._handled.get(key) == snap:
                    continue
                if key not in self._pending:
                    self._pending[key] = (None, self._clock())
                    count += 1
        with self._lock:  # forget files that are gone, so a new file of that name counts
            for key in [k for k in self._handled if not os.path.lexists(k)]:
                del self._handled[key]
        return count

    def _walk(self) -> Iterator[Path]:
        stack = [self.root]
        while stack:
            folder = stack.pop()
            try:
                entries = list(os.scandir(folder))
            except OSError as exc:
                log.warning("cannot list %s: %s", folder, exc)
                continue
            for entry in entries:
                path = Path(entry.path)
                try:
                    is_dir = entry.is_dir(follow_symlinks=False)
                except OSError:
                    continue
                if is_dir:
                    if self.settings.recursive and path.resolve() not in self._skip_dirs and \
                            not is_ignored(entry.name, self._patterns):
                        stack.append(path)
                    elif not self.settings.recursive and self._wanted(path):
                        self._on_rejected_once(path, unreadable(IsADirectoryError()))
                    continue
                if self._wanted(path):
                    yield path

    def _on_rejected_once(self, path: Path, reason: str) -> None:
        snap = PathStat(0, 0, 0, -1, 0)  # no file has it: a refusal recorded once
        with self._lock:
            if self._handled.get(str(path)) == snap:
                return
            self._handled[str(path)] = snap
        self._on_rejected(path, reason)

    # -- the loop -------------------------------------------------------------------------

    def _loop(self) -> None:
        self.scan()
        self.scans += 1
        next_scan = time.monotonic() + self.settings.rescan_interval_seconds
        while self._running.is_set():
            try:
                if time.monotonic() >= next_scan:
                    self.scan()
                    self.scans += 1
                    next_scan = time.monotonic() + self.settings.rescan_interval_seconds
                self._check_pending()
                with self._lock:
                    if not self._pending:
                        self.quiet_after_scan = self.scans
            except Exception:  # one bad file must never stop the watcher
                log.exception("watcher loop error")
            time.sleep(self._tick)

    def _check_pending(self) -> None:
        """One pass over the files waiting to settle: those an event named first, then those a
        scan found, for at most PASS_SECONDS: a restart's scan of a large kept inbox must not
        keep a new drop waiting behind it; the rest wait for the next pass. While a file an
        event named is still settling, only until it can be ready, and a file an event names
        meanwhile ends it: such a file is looked at as soon as it can be, not after the rest
        of a pass over the backlog. The backlog gets PASS_FLOOR a pass at least, so a steady
        stream of new drops slows it but never stops it.

        Files found ready are taken in together, up to TAKE_BATCH at a time (`look_up` sees
        them all first), the ones an event named before the backlog's. The pass may end
        between two files of a batch of the backlog: the rest wait, settled, for the next."""
        with self._lock:
            items = sorted(self._pending.items(), key=lambda item: item[0] not in self._urgent)
        started = self._clock()
        until: float | None = None  # for the files a scan found, once the urgent ones are done
        floor = 0.0  # ...and at least until then, whatever events come
        named = 0  # the files events had named then

        def over() -> bool:  # the pass's time for the backlog is up
            now = self._clock()
            return until is not None and (
                now > until or (len(self._urgent) != named and now > floor))

        ready: list[_Ready] = []
        for key, (previous, since) in items:
            if not self._running.is_set():
                break
            if key not in self._urgent:
                if until is None:
                    self._take_in(ready)  # the files events named, before the backlog
                    floor = self._clock() + PASS_FLOOR
                    until = started + PASS_SECONDS
                    with self._lock:
                        named = len(self._urgent)
                        ready_at = [self._pending[k][1] for k in self._urgent
                                    if k in self._pending]
                    if ready_at:  # the soonest an event's file can be ready, PASS_FLOOR at least
                        soonest = min(ready_at) + self.settings.settle_seconds
                        until = min(until, max(floor, soonest))
                if over():
                    break
            path = Path(key)
            # the time of this file's check, not of the pass: taking files in (hashing) runs
            # inside the pass, and a stale time made a file first seen late in a long pass
            # "settled" after one tick
            verdict = self._settle(path, previous, since, self._clock())
            if verdict is None:
                continue
            with self._lock:
                self._pending.pop(key, None)
                self._urgent.discard(key)
            if verdict == "vanished":
                continue
            if verdict != "ready":
                self._on_rejected_once(path, verdict)
                continue
            snap = _snapshot(path)
            if snap is None:
                continue
            with self._lock:
                if self._handled.get(key) == snap:
                    continue
                self._handled[key] = snap
            ready.append(_Ready(key, path, previous, since))
            if len(ready) >= TAKE_BATCH:
                self._take_in(ready, over)
        self._take_in(ready, over)

    def _take_in(self, ready: list[_Ready], over: Callable[[], bool] | None = None) -> None:
        """`on_ready` for each file of `ready` (emptied), `look_up` for them all first. Once
        `over()` (after one file at least), or once the watcher stops, the files not taken in
        yet go back to wait, as they were, for the next pass."""
        batch = list(ready)
        ready.clear()
        if not batch or not self._running.is_set():
            self._put_back(batch)
            return
        taken: Callable[[], Sequence[Path]] | None = None
        if self._look_up is not None:
            try:
                taken = self._look_up([file.path for file in batch])
            except Exception:  # each is then looked up on its own
                log.exception("could not look up %d files at once", len(batch))
        try:
            for n, file in enumerate(batch):
                if not self._running.is_set() or (over is not None and n and over()):
                    self._put_back(batch[n:])
                    return
                try:
                    self._on_ready(file.path)
                except Exception:
                    log.exception("could not take in %s", file.path)
                    with self._lock:  # try again on the next rescan
                        self._handled.pop(file.key, None)
        finally:
            if taken is not None:
                self._end_batch(batch, taken)

    def _end_batch(self, batch: list[_Ready], taken: Callable[[], Sequence[Path]]) -> None:
        """`taken`, and the files it could not take in tried again on the next rescan: all of
        the batch should it raise (those never taken in are not handled anyway)."""
        try:
            again = {str(path) for path in taken()}
        except Exception:
            log.exception("could not take in %d files", len(batch))
            again = {str(file.path) for file in batch}
        with self._lock:
            for file in batch:
                if str(file.path) in again:
                    self._handled.pop(file.key, None)

    def _put_back(self, files: list[_Ready]) -> None:
        with self._lock:
            for file in files:
                self._handled.pop(file.key, None)
                self._pending.setdefault(file.key, (file.previous, file.since))

    def _settle(self, path: Path, previous: PathStat | None, since: float, now: float
                ) -> str | None:
        """'ready', 'vanished', a rejection reason, or None (not yet: still settling)."""
        link = _stat_or_reason(path, follow_symlinks=False)
        if isinstance(link, str):
            return link
        if stat.S_ISLNK(link.st_mode):
            reason = self._symlink_problem(path)
            if reason:
                return reason
        st = _stat_or_reason(path, follow_symlinks=True)
        if isinstance(st, str):
            return st
        if not stat.S_ISREG(st.st_mode):
            return unreadable(IsADirectoryError() if stat.S_ISDIR(st.st_mode)
                              else OSError(errno.EINVAL, "not a regular file"))
        current = PathStat.of(st)
        if current != previous:
            with self._lock:
                if str(path) in self._pending:
                    self._pending[str(path)] = (current, now)
            return None
        if now - since < self.settings.settle_seconds:
            return None
        try:  # as every read of it will: one component at a time, never blocking on a FIFO
            os.close(open_beneath(path, self.root))
        except FileNotFoundError:
            return "vanished"
        except OSError as exc:
            return unreadable(exc)
        return "ready"

    def _symlink_problem(self, path: Path) -> str | None:
        try:
            target = path.resolve(strict=True)
        except FileNotFoundError:
            return "dangling symlink"
        except (RuntimeError, OSError):
            return unreadable(OSError(errno.ELOOP, "symlink loop"))
        if not is_within(target, self.root):
            return unreadable(LeadsOutside(path))
        return None


def _is_inotify(observer: BaseObserver) -> bool:
    try:
        from watchdog.observers.inotify import InotifyObserver
    except Exception:  # not Linux, or no inotify in its C library
        return False
    return isinstance(observer, InotifyObserver)


def _stat_or_reason(path: Path, *, follow_symlinks: bool) -> os.stat_result | str:
    """The file's stat, or why there is none: 'vanished' or a reason to reject it."""
    try:
        return path.stat(follow_symlinks=follow_symlinks)
    except FileNotFoundError:
        return "vanished"
    except OSError as exc:
        return f"cannot stat: {exc.strerror}"


def _snapshot(path: Path) -> PathStat | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return PathStat.of(st)
