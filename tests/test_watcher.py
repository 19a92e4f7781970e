"""The watcher on a real folder: settle, ignore rules, symlinks, rescan, observer choice."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
from watchdog.events import FileSystemEvent

from daemon import intake as intake_module
from daemon import watcher as watcher_module
from daemon.config import Settings, WatchSettings
from daemon.files import PathStat
from daemon.intake import Intake
from daemon.metrics import Metrics
from daemon.store.ledger import Ledger
from daemon.store.models import State
from daemon.store.outage import Outage
from daemon.store.records import NewFile, Registration
from daemon.watcher import Watcher, is_ignored, mount_fstype, needs_polling
from tests.support import looked_twice, paths_of


class Recorder:
    def __init__(self) -> None:
        self.ready: list[Path] = []
        self.rejected: dict[str, str] = {}
        self.changed = threading.Condition()

    def on_ready(self, path: Path) -> None:
        with self.changed:
            self.ready.append(path)
            self.changed.notify_all()

    def on_rejected(self, path: Path, reason: str) -> None:
        with self.changed:
            self.rejected[path.name] = reason
            self.changed.notify_all()

    def wait_for(self, predicate: object, timeout: float = 10.0) -> bool:
        with self.changed:
            return self.changed.wait_for(predicate, timeout)  # type: ignore[arg-type]


@pytest.fixture
def inbox(tmp_path: Path) -> Path:
    path = tmp_path / "inbox"
    path.mkdir()
    return path


def start(inbox: Path, **options: object) -> tuple[Watcher, Recorder]:
    recorder = Recorder()
    settings = WatchSettings(path=inbox, **{"settle_seconds": 0.3,  # type: ignore[arg-type]
                                            "rescan_interval_seconds": 0.5, **options})
    watcher = Watcher(settings, recorder.on_ready, recorder.on_rejected, tick_seconds=0.05)
    watcher.start()
    return watcher, recorder


@pytest.fixture
def running(inbox: Path) -> Iterator[tuple[Watcher, Recorder]]:
    watcher, recorder = start(inbox)
    yield watcher, recorder
    watcher.stop()


def test_existing_and_new_files_are_reported_once(inbox: Path) -> None:
    (inbox / "before.png").write_bytes(b"x" * 10)
    watcher, recorder = start(inbox)
    try:
        (inbox / "after.jpg").write_bytes(b"y" * 10)
        assert recorder.wait_for(lambda: len(recorder.ready) >= 2)
        assert looked_twice(watcher)  # two rescans later: still once each
        assert sorted(p.name for p in recorder.ready) == ["after.jpg", "before.png"]
    finally:
        watcher.stop()


def test_a_file_still_growing_is_not_ready(running: tuple[Watcher, Recorder],
                                           inbox: Path) -> None:
    _, recorder = running
    target = inbox / "slow.tif"
    with open(target, "wb") as handle:
        for _ in range(8):  # keeps growing for ~0.8 s, longer than settle_seconds
            handle.write(b"z" * 100)
            handle.flush()
            os.fsync(handle.fileno())
            last_write = time.monotonic()
            time.sleep(0.1)
            assert not recorder.ready
    assert recorder.wait_for(lambda: recorder.ready)
    assert time.monotonic() - last_write >= 0.25  # settle_seconds = 0.3, less one tick
    assert recorder.ready == [target]


def test_rewritten_file_is_reported_again(running: tuple[Watcher, Recorder],
                                          inbox: Path) -> None:
    _, recorder = running
    (inbox / "a.png").write_bytes(b"one")
    assert recorder.wait_for(lambda: len(recorder.ready) == 1)
    (inbox / "a.png").write_bytes(b"two, longer")
    assert recorder.wait_for(lambda: len(recorder.ready) == 2)


def test_a_replacement_with_the_same_size_and_mtime_is_reported_again(
    running: tuple[Watcher, Recorder], inbox: Path
) -> None:
    """`cp -p`, `touch -r` or an SMB client with coarse timestamps: new content, same size,
    inode and mtime. Only the ctime tells."""
    _, recorder = running
    target = inbox / "a.png"
    target.write_bytes(b"one")
    assert recorder.wait_for(lambda: len(recorder.ready) == 1)
    before = target.stat()
    with open(target, "r+b") as handle:  # same inode, same size
        handle.write(b"two")
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))  # same mtime
    after = target.stat()
    assert (after.st_size, after.st_ino, after.st_mtime_ns) == \
        (before.st_size, before.st_ino, before.st_mtime_ns)
    assert recorder.wait_for(lambda: len(recorder.ready) == 2)


@pytest.mark.parametrize("name", [".hidden.png", "x.png.part", "y.filepart", "z.tmp",
                                  "~$doc.png", "Thumbs.db", "notes.txt", "skip-me.png"])
def test_ignored_names(inbox: Path, name: str) -> None:
    watcher, recorder = start(inbox, ignore=("skip-*",))
    try:
        (inbox / name).write_bytes(b"data")
        (inbox / "real.png").write_bytes(b"data")
        assert recorder.wait_for(lambda: recorder.ready)
        assert looked_twice(watcher)
        assert [p.name for p in recorder.ready] == ["real.png"]
    finally:
        watcher.stop()


def test_symlinks_out_of_the_folder_and_loops_are_rejected(tmp_path: Path, inbox: Path) -> None:
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"secret")
    (inbox / "inside.png").write_bytes(b"fine")
    os.symlink(secret, inbox / "escape.png")
    os.symlink(inbox / "inside.png", inbox / "alias.png")
    os.symlink(inbox / "loop.png", inbox / "loop.png")
    os.symlink(tmp_path / "missing.png", inbox / "dangling.png")
    watcher, recorder = start(inbox)
    try:
        assert recorder.wait_for(lambda: len(recorder.rejected) == 3 and len(recorder.ready) == 2)
        assert recorder.rejected["escape.png"] == "symlink points outside the watched folder"
        assert recorder.rejected["loop.png"] == "symlink loop"
        assert recorder.rejected["dangling.png"] == "dangling symlink"
        assert sorted(p.name for p in recorder.ready) == ["alias.png", "inside.png"]
    finally:
        watcher.stop()


def test_directory_with_an_image_name_is_rejected(inbox: Path) -> None:
    (inbox / "folder.png").mkdir()
    watcher, recorder = start(inbox)
    try:
        assert recorder.wait_for(lambda: recorder.rejected)
        assert recorder.rejected == {"folder.png": "a directory, not a file"}
    finally:
        watcher.stop()


def test_recursive_skips_done_and_failed(inbox: Path) -> None:
    for sub in ("a", "done", "failed"):
        (inbox / sub).mkdir()
        (inbox / sub / f"{sub}.png").write_bytes(b"x")
    watcher, recorder = start(inbox, recursive=True, done_dir="done", failed_dir="failed")
    try:
        assert recorder.wait_for(lambda: recorder.ready)
        assert looked_twice(watcher)
        assert [p.name for p in recorder.ready] == ["a.png"]
    finally:
        watcher.stop()


def test_polling_observer_also_works(inbox: Path) -> None:
    """Polling reports no closes: a rewrite in place is seen by its modification."""
    watcher, recorder = start(inbox, observer="polling", poll_interval_seconds=0.2,
                              rescan_interval_seconds=3600)
    try:
        assert watcher.observer_kind.startswith("polling")
        (inbox / "p.png").write_bytes(b"x")
        assert recorder.wait_for(lambda: recorder.ready)
        (inbox / "p.png").write_bytes(b"new content")
        assert recorder.wait_for(lambda: len(recorder.ready) == 2)
    finally:
        watcher.stop()


def test_events_alone_report_new_renamed_copied_and_rewritten_files(inbox: Path) -> None:
    """With no rescan to fall back on, inotify's events alone report a file written in the
    folder, one renamed into it, one copied in many writes and a rewrite in place of the
    same size: each is nominated when it is closed or moved in."""
    watcher, recorder = start(inbox, observer="native", rescan_interval_seconds=3600)
    try:
        assert watcher.observer_kind.startswith("native")
        (inbox / "new.png").write_bytes(b"one")
        assert recorder.wait_for(lambda: len(recorder.ready) == 1)
        (inbox / ".moved.png.part").write_bytes(b"moved")
        os.rename(inbox / ".moved.png.part", inbox / "moved.png")
        assert recorder.wait_for(lambda: len(recorder.ready) == 2)
        with open(inbox / "copied.png", "wb") as handle:
            for _ in range(20):
                handle.write(b"c" * 4096)
        assert recorder.wait_for(lambda: len(recorder.ready) == 3)
        with open(inbox / "new.png", "r+b") as handle:
            handle.write(b"two")
        assert recorder.wait_for(lambda: len(recorder.ready) == 4)
        assert [p.name for p in recorder.ready] == ["new.png", "moved.png", "copied.png",
                                                    "new.png"]
    finally:
        watcher.stop()


def test_reading_a_file_raises_no_events(inbox: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The daemon reads every file four times: under inotify none of those opens and closes
    reaches the observer's threads, nor does each write a producer makes."""
    seen: list[tuple[str, str]] = []
    handle_event = watcher_module._Handler.on_any_event

    def recording(handler: object, event: FileSystemEvent) -> None:
        seen.append((event.event_type, os.path.basename(os.fsdecode(event.src_path))))
        handle_event(handler, event)  # type: ignore[arg-type]

    monkeypatch.setattr(watcher_module._Handler, "on_any_event", recording)
    watcher, recorder = start(inbox, observer="native", rescan_interval_seconds=3600)
    try:
        with open(inbox / "a.png", "wb") as handle:
            for _ in range(5):
                handle.write(b"a" * 4096)
        assert recorder.wait_for(lambda: len(recorder.ready) == 1)
        for _ in range(4):
            (inbox / "a.png").read_bytes()
        (inbox / "b.png").write_bytes(b"b")  # after the reads: its events come after theirs
        assert recorder.wait_for(lambda: len(recorder.ready) == 2)
        assert [kind for kind, name in seen if name == "a.png"] == ["created", "closed"]
    finally:
        watcher.stop()


def test_network_and_fuse_mounts_choose_polling(tmp_path: Path) -> None:
    mounts = tmp_path / "mounts"
    mounts.write_text(
        "/dev/sda1 / ext4 rw 0 0\n"
        "server:/export /mnt/scans nfs4 rw 0 0\n"
        "sshfs#u@h: /mnt/fuse fuse.sshfs rw 0 0\n"
    )
    assert mount_fstype(Path("/mnt/scans/inbox"), mounts) == "nfs4"
    assert mount_fstype(Path("/mnt/fuse"), mounts) == "fuse.sshfs"
    assert mount_fstype(Path("/mnt/scansX"), mounts) == "ext4"
    assert needs_polling("nfs4") and needs_polling("fuse.sshfs") and needs_polling("cifs")
    assert not needs_polling("ext4") and not needs_polling("xfs") and not needs_polling(None)


def test_is_ignored() -> None:
    assert is_ignored("a.part", ["*.part"]) and not is_ignored("a.png", ["*.part"])


def test_recursive_move_without_done_dir_skips_the_default_done_folder(inbox: Path) -> None:
    """`after = "move"` with no done_dir moves files to inbox/done: never taken in again."""
    (inbox / "done").mkdir()
    (inbox / "done" / "old.png").write_bytes(b"x")
    (inbox / "new.png").write_bytes(b"y")
    watcher, recorder = start(inbox, recursive=True, after="move")
    try:
        assert recorder.wait_for(lambda: recorder.ready)
        assert looked_twice(watcher)
        assert [p.name for p in recorder.ready] == ["new.png"]
    finally:
        watcher.stop()


def test_settling_is_timed_when_each_file_is_checked(inbox: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Taking a file in (hashing it) runs inside the watcher's pass: a file first looked at
    after a slow one in the same pass must still be watched for settle_seconds from then."""
    monkeypatch.setattr(watcher_module, "PASS_SECONDS", 60.0)  # the pass goes on past big.png
    monkeypatch.setattr(watcher_module, "TAKE_BATCH", 1)  # big.png taken in before late.png
    now = [0.0]
    ready: list[str] = []

    def slow_take_in(path: Path) -> None:
        ready.append(path.name)
        now[0] += 5.0  # hashing a big file took five seconds

    settings = WatchSettings(path=inbox, settle_seconds=1.0)
    watcher = Watcher(settings, slow_take_in, lambda _p, _r: None, clock=lambda: now[0])
    watcher._running.set()  # driven by hand, no threads: the clock is ours
    (inbox / "big.png").write_bytes(b"a" * 100)
    watcher.scan()
    watcher._check_pending()  # big.png: first look
    now[0] = 1.0
    (inbox / "late.png").write_bytes(b"b" * 100)
    watcher.scan()  # late.png nominated at 1.0
    now[0] = 1.05
    watcher._check_pending()  # big.png settled, taken in (until 6.05); late.png: first look
    assert ready == ["big.png"]
    now[0] += 0.05
    watcher._check_pending()  # late.png has been looked at for 0.05 s only
    assert ready == ["big.png"]
    now[0] += 1.0
    watcher._check_pending()
    assert ready == ["big.png", "late.png"]


def hand_driven(inbox: Path, take_in: Callable[[Path], None], now: list[float],
                names: list[str], look_up: Callable[[Sequence[Path]], None] | None = None
                ) -> Watcher:
    """A watcher driven by hand on the clock `now[0]`, no threads, settling in 0.25 s: `names`
    written into `inbox`, scanned and looked at once (no time passes)."""
    settings = WatchSettings(path=inbox, settle_seconds=0.25)
    watcher = Watcher(settings, take_in, lambda _p, _r: None, clock=lambda: now[0],
                      look_up=look_up)
    watcher._running.set()
    for name in names:
        (inbox / name).write_bytes(name.encode())
    watcher.scan()
    watcher._check_pending()
    return watcher


def test_a_pass_over_the_backlog_gives_way_to_a_file_an_event_names(inbox: Path) -> None:
    """A restart's backlog (files a scan found) is taken in half a second a pass. A file an
    event names ends the pass (once it has had PASS_FLOOR); the next looks at it first, and
    its backlog stops when the file can be ready, so the pass after takes it in: after its
    settle time, not after two passes over the backlog. Driven by hand on the watcher's
    clock."""
    now = [0.0]
    taken: list[str] = []
    watcher: Watcher

    def take_in(path: Path) -> None:  # a ledger look-up of 20 ms a file
        taken.append(path.name)
        now[0] += 0.02
        if len(taken) == 1:  # an event names a new file meanwhile
            (inbox / "new.png").write_bytes(b"new")
            watcher._nominate(str(inbox / "new.png"))

    watcher = hand_driven(inbox, take_in, now, [f"old{n:03}.png" for n in range(300)])
    now[0] = 1.0
    watcher._check_pending()  # the backlog settled: taken in until PASS_FLOOR, past the event
    assert len(taken) == 3  # 60 ms: not 1 (no floor), not 25 (the whole 0.5 s)
    watcher._check_pending()  # new.png's first look; then the backlog for its 0.25 s
    assert "new.png" not in taken
    assert len(taken) == 3 + 13  # not 25
    before = len(taken)
    watcher._check_pending()  # new.png first, settled
    assert taken[before] == "new.png"
    for _ in range(20):  # the files of a batch a pass ended in were put back: none is lost
        now[0] += 1.0
        watcher._check_pending()
    assert sorted(taken) == sorted(["new.png", *(f"old{n:03}.png" for n in range(300))])


def test_files_ready_together_are_looked_up_at_once_before_each_is_taken_in(
        inbox: Path) -> None:
    """The ready files of a pass go to `look_up` together, TAKE_BATCH at most, before
    `on_ready` takes each in: the intake looks a batch up in the ledger in one round trip. A
    file an event named is taken in with the others it named, before the backlog's. Should
    `look_up` fail, each file is taken in all the same."""
    now = [0.0]
    calls: list[tuple[str, ...]] = []
    fail = [False]

    def look_up(paths: Sequence[Path]) -> None:
        calls.append(("look_up", *(path.name for path in paths)))
        if fail[0]:
            raise RuntimeError("the ledger is away")

    def take_in(path: Path) -> None:
        calls.append(("take", path.name))

    names = [f"old{n:03}.png" for n in range(100)]
    watcher = hand_driven(inbox, take_in, now, names, look_up=look_up)
    (inbox / "new.png").write_bytes(b"new")
    watcher._nominate(str(inbox / "new.png"))
    now[0] = 0.1
    watcher._check_pending()  # new.png's first look; the backlog is not ready yet
    assert calls == []
    now[0] = 1.0
    watcher._check_pending()
    batches = [call[1:] for call in calls if call[0] == "look_up"]
    assert [len(batch) for batch in batches] == [1, 64, 36] and batches[0] == ("new.png",)
    assert sorted(batches[1] + batches[2]) == names
    assert calls == [call for batch in batches  # each batch looked up, then taken in
                     for call in [("look_up", *batch), *(("take", name) for name in batch)]]
    calls.clear()
    fail[0] = True
    (inbox / "late.png").write_bytes(b"late")
    watcher._nominate(str(inbox / "late.png"))
    watcher._check_pending()
    now[0] = 2.0
    watcher._check_pending()
    assert calls == [("look_up", "late.png"), ("take", "late.png")]


class CountingLedger:
    """The calls to a real ledger's register_many (the files' names), failing the first
    `fail` of them."""

    def __init__(self, ledger: Ledger, fail: int = 0) -> None:
        self.calls: list[list[str]] = []
        self.fail = fail
        self.register_many = ledger.register_many
        ledger.register_many = self._register_many  # type: ignore[method-assign]

    def _register_many(self, files: Sequence[NewFile]) -> list[Registration]:
        self.calls.append([Path(file.path).name for file in files])
        if len(self.calls) <= self.fail:
            raise RuntimeError("not today")
        return self.register_many(files)


def intake_pass(ledger: Ledger, inbox: Path, names: list[str], *, fail: int = 0,
                notified: list[int] | None = None
                ) -> tuple[CountingLedger, Watcher, list[float]]:
    """A watcher driven by hand (`hand_driven`) taking files in through a real intake on
    `ledger`: `names` written beside what `inbox` holds, all taken in by one pass. Returns
    the ledger's counter, the watcher and its clock."""
    counting = CountingLedger(ledger, fail)
    settings = Settings(watch={"path": inbox}, database={"url": "sqlite://"})
    intake = Intake(settings, ledger, Metrics("test"), outage=Outage(ledger),
                    notify=lambda: notified.append(1) if notified is not None else None)
    now = [0.0]
    watcher = hand_driven(inbox, intake.take, now, names, look_up=intake.look_up)
    now[0] = 1.0
    watcher._check_pending()
    return counting, watcher, now


def test_new_files_found_ready_together_are_registered_at_once(
        inbox: Path, ledger: Ledger) -> None:
    """The new files of a watcher's batch are hashed, then registered in one call to the
    ledger (on PostgreSQL one statement), each as it would have been alone: new contents
    queued and the pipeline woken for each, a second file of one content and a file of a
    content already queued recorded as duplicates."""
    known = ledger.register(str(inbox / "earlier.png"), hashlib.sha256(b"known").hexdigest(), 5)
    (inbox / "copy-of-known.png").write_bytes(b"known")
    (inbox / "copy-of-new03.png").write_bytes(b"new03.png")
    notified: list[int] = []
    names = [f"new{n:02}.png" for n in range(10)]
    counting, _, _ = intake_pass(ledger, inbox, names, notified=notified)
    assert [sorted(call) for call in counting.calls] == [
        sorted([*names, "copy-of-known.png", "copy-of-new03.png"])]
    assert len(notified) == 10
    assert ledger.counts()[State.QUEUED] == 11
    assert paths_of(ledger, known.document_id) == (str(inbox / "earlier.png"),
                                                  str(inbox / "copy-of-known.png"))
    new03 = ledger.known_path(str(inbox / "new03.png"),
                              PathStat.of((inbox / "new03.png").stat()))
    assert new03 is not None
    assert set(paths_of(ledger, new03.document_id)) == {str(inbox / "new03.png"),
                                                       str(inbox / "copy-of-new03.png")}


@pytest.mark.parametrize(("wait", "sizes"), [(3600.0, [6]), (0.0, [1, 1, 1, 1, 1, 1])])
def test_a_hashed_file_waits_for_the_rest_of_its_batch_only_so_long(
        inbox: Path, ledger: Ledger, monkeypatch: pytest.MonkeyPatch, wait: float,
        sizes: list[int]) -> None:
    """Files hashed in a batch are registered together, unless the first has waited
    REGISTER_WAIT: then those hashed so far are registered before the next file is read (a
    batch of large files must not keep the first from the pipeline while the rest are)."""
    monkeypatch.setattr(intake_module, "REGISTER_WAIT", wait)
    counting, _, _ = intake_pass(ledger, inbox, [f"file{n}.png" for n in range(6)])
    assert [len(call) for call in counting.calls] == sizes
    assert ledger.counts()[State.QUEUED] == 6


def test_files_that_could_not_be_registered_are_taken_in_on_the_next_rescan(
        inbox: Path, ledger: Ledger) -> None:
    """Should registering a batch fail for a reason the database's retries do not wait out,
    its files are not lost: the watcher looks at them again on its next rescan."""
    names = [f"file{n}.png" for n in range(3)]
    counting, watcher, now = intake_pass(ledger, inbox, names, fail=1)
    assert len(counting.calls) == 1 and ledger.counts()[State.QUEUED] == 0
    watcher.scan()
    watcher._check_pending()  # the first look
    now[0] = 2.0
    watcher._check_pending()
    assert [sorted(call) for call in counting.calls] == [names, names]
    assert ledger.counts()[State.QUEUED] == 3


def test_a_new_drop_is_served_before_the_startup_backlog(inbox: Path) -> None:
    """A restart over a large kept inbox: taking each file in costs something (here 2 ms, a
    ledger look-up), but a file dropped meanwhile is taken in before the backlog is through."""
    for n in range(3000):
        (inbox / f"old{n:04}.png").write_bytes(b"x")
    recorder = Recorder()
    slow_ready = recorder.on_ready

    def on_ready(path: Path) -> None:
        time.sleep(0.002)  # the cost of one taking-in, not a wait for something
        slow_ready(path)

    settings = WatchSettings(path=inbox, settle_seconds=0.3, rescan_interval_seconds=600)
    watcher = Watcher(settings, on_ready, recorder.on_rejected, tick_seconds=0.05)
    watcher.start()
    try:
        assert recorder.wait_for(lambda: len(recorder.ready) >= 100, 30)  # backlog under way
        (inbox / "new.png").write_bytes(b"new")
        assert recorder.wait_for(lambda: inbox / "new.png" in recorder.ready, 30)
        with recorder.changed:
            backlog_done = len(recorder.ready) - 1
        assert backlog_done < 3000, "the new file waited for the whole backlog"
        assert recorder.wait_for(lambda: len(recorder.ready) == 3001, 60)
    finally:
        watcher.stop()


def test_a_watcher_stopped_during_a_batch_takes_no_more_of_it_in(inbox: Path) -> None:
    """Stopped while it takes a batch in, the watcher takes in no more of it: the rest wait,
    as they were, rather than delay the stop by a batch of hashing and registering."""
    now = [0.0]
    taken: list[str] = []
    watcher: Watcher

    def take_in(path: Path) -> None:
        taken.append(path.name)
        watcher._running.clear()  # what stop() does first

    watcher = hand_driven(inbox, take_in, now, [f"f{n}.png" for n in range(10)])
    now[0] = 1.0
    watcher._check_pending()
    assert len(taken) == 1
    assert sorted(Path(key).name for key in watcher._pending) == sorted(
        f"f{n}.png" for n in range(10) if f"f{n}.png" not in taken)
    assert not set(watcher._pending) & set(watcher._handled)  # to be taken in after all


def test_a_fifo_swapped_in_after_the_stat_does_not_block_the_watcher(tmp_path: Path) -> None:
    """The settle check's last step opened the file with a blocking open(): a FIFO swapped in
    after its stat said "a regular file" blocked the watcher thread for ever (no writer ever
    comes). It opens as every read does now (`open_beneath`, non-blocking) and refuses it."""
    import os
    import threading

    inbox = (tmp_path / "inbox").resolve()
    inbox.mkdir()
    regular = inbox / "was-a-file.png"
    regular.write_bytes(b"x")
    looked = os.stat(regular)
    regular.unlink()
    os.mkfifo(regular)  # swapped in after the stat below was taken
    watcher = Watcher(WatchSettings(path=inbox, settle_seconds=0.0), lambda _p: None,
                      lambda _p, _r: None)
    verdict: list[str | None] = []
    original = watcher_module._stat_or_reason
    watcher_module._stat_or_reason = lambda _path, follow_symlinks: looked  # type: ignore[assignment]
    try:
        settle = threading.Thread(target=lambda: verdict.append(watcher._settle(
            regular, PathStat.of(looked), 0.0, 100.0)), daemon=True)
        settle.start()
        settle.join(10)
    finally:
        watcher_module._stat_or_reason = original
        if settle.is_alive():  # let the old blocking open return, for the test's sake
            with open(os.open(regular, os.O_WRONLY | os.O_NONBLOCK), "wb"):
                pass
    assert verdict == ["not a regular file"]
