"""queue -> batch -> OCR -> store.

Documents are claimed from the ledger (`queued -> processing`) only while the bounded
in-memory queue has room: when it is full, files wait in the folder and nothing grows.
A claimed document is read and hash-checked, decoded into pages by the CPU pool, its pages
batched across documents by the OCR workers (`batch.max_pages` or `batch.max_wait_ms`,
whichever comes first), and stored — text and `done` in one transaction — as soon as its last
page is recognised. Failures are recorded with their reason; transient ones are retried later.
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import shutil
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

from sqlalchemy.exc import OperationalError, SQLAlchemyError

from daemon.config import Settings
from daemon.errors import DocumentError
from daemon.metrics import Metrics
from daemon.ocr.decode import iter_pages
from daemon.ocr.types import OcrEngine, Page, PageResult
from daemon.sidecar import write_sidecars
from daemon.store.models import State
from daemon.store.repository import Claim, Ledger

log = logging.getLogger("daemon.pipeline")
T = TypeVar("T")

HASH_CHUNK = 1 << 20


def sha256_file(path: Path, max_bytes: int) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            size += len(chunk)
            if size > max_bytes:
                raise DocumentError(f"file is larger than watch.max_file_bytes={max_bytes}")
            digest.update(chunk)
    return digest.hexdigest(), size


def path_key(path: Path) -> str:
    """How paths are recorded: absolute, symlinks not resolved (the name the file came as)."""
    return os.path.abspath(path)


@dataclass
class InFlight:
    claim: Claim
    path: Path | None = None
    total: int | None = None
    results: dict[int, PageResult] = field(default_factory=dict)
    failed: bool = False
    finished: bool = False
    ocr_seconds: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def complete(self) -> bool:
        return self.total is not None and len(self.results) == self.total


@dataclass(frozen=True)
class PageTask:
    doc: InFlight
    page: Page


class Pipeline:
    def __init__(self, settings: Settings, ledger: Ledger, engines: list[OcrEngine],
                 metrics: Metrics, provider: str) -> None:
        self.settings = settings
        self.ledger = ledger
        self.engines = engines
        self.metrics = metrics
        self.provider = provider
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}"
        self.root = settings.watch.path.resolve()
        capacity = settings.queue.capacity
        self._slots = threading.BoundedSemaphore(capacity)
        self._pages: queue.Queue[PageTask] = queue.Queue(
            maxsize=max(2, settings.batch.max_pages * len(engines) * 2))
        self._inflight: dict[int, InFlight] = {}
        self._inflight_lock = threading.Lock()
        self._wake = threading.Event()
        self._running = threading.Event()
        self._accepting = threading.Event()
        self._threads: list[threading.Thread] = []
        self._decode_pool = ThreadPoolExecutor(settings.batch.decode_threads,
                                               thread_name_prefix="decode")
        self.database_ok = True
        self.metrics.queue_capacity.set(capacity)

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        self._running.set()
        self._accepting.set()
        self._threads.append(threading.Thread(target=self._dispatch_loop, name="dispatch",
                                              daemon=True))
        for i, engine in enumerate(self.engines):
            self._threads.append(threading.Thread(target=self._ocr_loop, args=(engine,),
                                                  name=f"ocr-{i}", daemon=True))
        for thread in self._threads:
            thread.start()

    def notify(self) -> None:
        """Something was queued in the ledger: look now rather than at the next poll."""
        self._wake.set()

    def stop(self, timeout: float) -> int:
        """Stop claiming, give the documents in flight `timeout` seconds to finish, hand the
        rest back to the ledger. Returns how many were handed back."""
        self._accepting.clear()
        self._wake.set()
        deadline = time.monotonic() + timeout
        while self.inflight_count() and time.monotonic() < deadline:
            time.sleep(0.05)
        handed_back = 0
        with self._inflight_lock:
            leftovers = list(self._inflight.values())
        for doc in leftovers:
            with doc.lock:
                if doc.finished:
                    continue
                doc.failed = True  # workers drop its pages
            try:
                if self.ledger.release(doc.claim.document_id, self.worker_id):
                    handed_back += 1
            except SQLAlchemyError as exc:  # the lease runs out and it is requeued anyway
                log.warning("could not hand back document %s: %s", doc.claim.sha256[:12], exc)
        self._running.clear()
        # Idle loops notice within one poll timeout. A worker inside a native OCR call cannot
        # be interrupted: its pages were handed back above, so it is not waited for.
        grace = time.monotonic() + 1.0
        for thread in self._threads:
            thread.join(max(0.0, grace - time.monotonic()))
        self._decode_pool.shutdown(wait=False, cancel_futures=True)
        busy = [thread.name for thread in self._threads if thread.is_alive()]
        if busy:
            log.warning("%s still inside the OCR engine at the stop timeout; its work was "
                        "handed back", ", ".join(busy))
            return handed_back  # closing an engine under a running inference is unsafe
        for engine in {id(e): e for e in self.engines}.values():
            engine.close()
        return handed_back

    @property
    def alive(self) -> bool:
        """Every loop running (for the systemd watchdog)."""
        return bool(self._threads) and all(thread.is_alive() for thread in self._threads)

    def threads_alive(self) -> bool:
        """Any loop still running (a stop waits for them)."""
        return any(thread.is_alive() for thread in self._threads)

    def inflight_count(self) -> int:
        with self._inflight_lock:
            return len(self._inflight)

    # -- claiming -------------------------------------------------------------------------

    def _dispatch_loop(self) -> None:
        next_housekeeping = 0.0
        while self._running.is_set():
            if not self._accepting.is_set():
                time.sleep(0.05)
                continue
            try:
                if time.monotonic() >= next_housekeeping:
                    requeued = self.ledger.requeue_stale()
                    if requeued:
                        log.info("re-queued %d documents whose lease ran out", requeued)
                    next_housekeeping = time.monotonic() + 10
                if not self._slots.acquire(timeout=0.2):
                    continue
                claim = self._claim()
                self.database_ok = True
            except SQLAlchemyError as exc:
                self._database_down(exc)
                continue
            if claim is None:
                self._slots.release()
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            doc = InFlight(claim)
            with self._inflight_lock:
                self._inflight[claim.document_id] = doc
                self.metrics.queue_depth.set(len(self._inflight))
            self._decode_pool.submit(self._decode, doc)

    def _claim(self) -> Claim | None:
        try:
            with self._inflight_lock:
                exclude = list(self._inflight)
            return self.ledger.claim_next(self.worker_id, self.settings.queue.lease_seconds,
                                          exclude)
        except BaseException:
            self._slots.release()
            raise

    def _database_down(self, exc: Exception) -> None:
        if self.database_ok:
            log.error("database unavailable, retrying: %s", str(exc).splitlines()[0])
        self.database_ok = False
        time.sleep(1.0)

    # -- decoding -------------------------------------------------------------------------

    def _decode(self, doc: InFlight) -> None:
        try:
            start = time.perf_counter()
            data, path = self._read_verified(doc.claim)
            doc.path = path
            count = 0
            for page in iter_pages(data, self.settings.ocr):
                if doc.failed:
                    return
                count += 1
                if page.text_layer is not None:
                    self._add_result(doc, page.index, page.text_layer)
                else:
                    self._put_page(PageTask(doc, page))
            if count == 0:
                raise DocumentError("no pages in the document")
            self.metrics.stage_seconds.labels(stage="decode").observe(
                time.perf_counter() - start)
            with doc.lock:
                doc.total = count
                ready = doc.complete and not doc.failed
            if ready:
                self._finish(doc)
        except DocumentError as exc:
            self._fail(doc, exc.reason, permanent=exc.permanent)
        except Exception as exc:  # a decoder bug must not take the daemon down
            log.exception("decoding %s crashed", doc.claim.sha256[:12])
            self._fail(doc, f"decoder crashed: {type(exc).__name__}: {exc}", permanent=True)

    def _read_verified(self, claim: Claim) -> tuple[bytes, Path]:
        """The claimed content, read from one of its paths and checked against its hash."""
        reasons = []
        for recorded in reversed(claim.paths):
            path = Path(recorded)
            if not self._inside_root(path):
                continue
            try:
                with open(path, "rb") as handle:
                    data = handle.read(self.settings.watch.max_file_bytes + 1)
            except FileNotFoundError:
                reasons.append("vanished before it was read")
                continue
            except PermissionError:
                reasons.append("permission denied")
                continue
            except IsADirectoryError:
                reasons.append("is a directory")
                continue
            except OSError as exc:
                reasons.append(f"read error: {exc.strerror}")
                continue
            if hashlib.sha256(data).hexdigest() == claim.sha256:
                return data, path
            reasons.append("content changed after it was queued (the new content is "
                           "queued separately)")
        reason = reasons[-1] if reasons else "no path inside the watched folder holds it"
        raise DocumentError(f"cannot read the file: {reason}",
                            permanent="changed" in reason or not reasons)

    def _inside_root(self, path: Path) -> bool:
        try:
            resolved = path.resolve()
        except (OSError, RuntimeError):
            return False
        return resolved == self.root or self.root in resolved.parents

    def _put_page(self, task: PageTask) -> None:
        while self._running.is_set() and not task.doc.failed:
            try:
                self._pages.put(task, timeout=0.2)
                return
            except queue.Full:
                continue

    # -- OCR ------------------------------------------------------------------------------

    def _collect(self) -> list[PageTask]:
        try:
            first = self._pages.get(timeout=0.2)
        except queue.Empty:
            return []
        batch = [first]
        deadline = time.monotonic() + self.settings.batch.max_wait_ms / 1000
        while len(batch) < self.settings.batch.max_pages:
            remaining = deadline - time.monotonic()
            try:
                batch.append(self._pages.get(timeout=max(0.0, remaining)) if remaining > 0
                             else self._pages.get_nowait())
            except queue.Empty:
                break
        return [task for task in batch if not task.doc.failed]

    def _ocr_loop(self, engine: OcrEngine) -> None:
        while self._running.is_set():
            batch = self._collect()
            if not batch:
                continue
            images = [task.page.image for task in batch if task.page.image is not None]
            start = time.perf_counter()
            try:
                results = engine.recognize(images)
            except Exception as exc:
                log.exception("OCR failed on a batch of %d pages", len(batch))
                for doc in {id(t.doc): t.doc for t in batch}.values():
                    self._fail(doc, f"OCR engine error: {type(exc).__name__}: {exc}",
                               permanent=False)
                continue
            seconds = time.perf_counter() - start
            self.metrics.batch_size.observe(len(batch))
            for stage in ("det", "cls", "rec"):
                spent = sum(r.timings.get(stage, 0.0) for r in results)
                if spent:
                    self.metrics.stage_seconds.labels(stage=stage).observe(spent)
            for task, result in zip(batch, results, strict=True):
                with task.doc.lock:
                    task.doc.ocr_seconds += seconds / len(batch)
                self._add_result(task.doc, task.page.index, result)

    def _add_result(self, doc: InFlight, index: int, result: PageResult) -> None:
        with doc.lock:
            if doc.failed:
                return
            doc.results[index] = result
            ready = doc.complete
        if ready:
            self._finish(doc)

    # -- outcomes -------------------------------------------------------------------------

    def _finish(self, doc: InFlight) -> None:
        with doc.lock:
            if doc.finished or doc.failed:
                return
            doc.finished = True
        pages = [doc.results[i] for i in sorted(doc.results)]
        start = time.perf_counter()
        try:
            stored = self.retry_db(lambda: self.ledger.complete(
                doc.claim.document_id, self.worker_id, pages, doc.ocr_seconds, self.provider))
        except _Stopped:
            self._forget(doc)
            return
        self.metrics.stage_seconds.labels(stage="store").observe(time.perf_counter() - start)
        self._forget(doc)
        if not stored:
            log.warning("lost the claim on %s before storing; another worker has it",
                        doc.claim.sha256[:12])
            return
        latency = (datetime.now(UTC) - doc.claim.first_seen_at).total_seconds()
        self.metrics.files_total.labels(status="done").inc()
        self.metrics.observe_pages(len(pages))
        self.metrics.file_latency_seconds.observe(max(0.0, latency))
        log.info("done %s: %d page%s, %d lines, %.2fs after it was seen",
                 doc.path or doc.claim.paths[-1], len(pages), "" if len(pages) == 1 else "s",
                 sum(len(p.lines) for p in pages), latency)
        # Sidecars (watch.sidecar): after the text is stored, before the file is moved.
        write_sidecars(self.settings, doc.path or Path(doc.claim.paths[-1]), pages,
                       doc.claim.sha256)
        self._after_done(doc.claim)

    def _fail(self, doc: InFlight, reason: str, *, permanent: bool) -> None:
        with doc.lock:
            if doc.finished or doc.failed:
                return
            doc.failed = True
        try:
            outcome = self.retry_db(lambda: self.ledger.fail(
                doc.claim.document_id, reason, permanent=permanent,
                max_attempts=self.settings.queue.max_attempts,
                backoff_seconds=self.settings.queue.retry_backoff_seconds))
        except _Stopped:
            self._forget(doc)
            return
        self._forget(doc)
        where = doc.path or (doc.claim.paths[-1] if doc.claim.paths else doc.claim.sha256)
        if outcome.state == State.QUEUED:
            self.metrics.files_total.labels(status="retried").inc()
            log.warning("retrying %s later (attempt %d of %d): %s", where, outcome.attempts,
                        self.settings.queue.max_attempts, reason)
            return
        self.metrics.files_total.labels(status="failed").inc()
        log.error("failed %s: %s", where, reason)
        for recorded in outcome.paths:
            quarantine(Path(recorded), reason, self.settings, self.root,
                       sha256=doc.claim.sha256)

    def _forget(self, doc: InFlight) -> None:
        with self._inflight_lock:
            if self._inflight.pop(doc.claim.document_id, None) is not None:
                self._slots.release()
            self.metrics.queue_depth.set(len(self._inflight))
        self._wake.set()

    def retry_db(self, action: Callable[[], T]) -> T:
        """Run a ledger write, waiting out a database outage (with backoff) rather than
        losing the result. Gives up only when the daemon is stopping."""
        delay = 0.5
        while True:
            try:
                result = action()
                self.database_ok = True
                return result
            except OperationalError as exc:
                self._database_down(exc)
                if not self._running.is_set() or not self._accepting.is_set():
                    raise _Stopped() from exc
                time.sleep(delay)
                delay = min(delay * 2, 10.0)

    def _after_done(self, claim: Claim) -> None:
        for recorded in claim.paths:
            self.after_done_path(Path(recorded), claim.sha256)

    def after_done_path(self, path: Path, sha256: str) -> None:
        """keep, move to the done folder, or delete `path` — only if it still holds the
        stored content (a new file may have taken the name meanwhile)."""
        after = self.settings.watch.after
        if after == "keep" or not path.is_file() or not self._inside_root(path):
            return
        try:
            digest, _ = sha256_file(path, self.settings.watch.max_file_bytes)
        except (OSError, DocumentError):
            return
        if digest != sha256:
            return
        try:
            if after == "delete":
                path.unlink()
            else:
                folder = done_folder(self.settings, self.root)
                if not folder_is_safe(folder, self.settings.watch.done_dir, self.root):
                    return
                move_into(path, folder)
        except OSError as exc:
            log.warning("could not %s %s after processing: %s", after, path, exc)


class Intake:
    """The watcher's side of the ledger: hash a ready file and record it as queued."""

    def __init__(self, settings: Settings, ledger: Ledger, pipeline: Pipeline,
                 metrics: Metrics) -> None:
        self.settings = settings
        self.ledger = ledger
        self.pipeline = pipeline
        self.metrics = metrics
        self.root = settings.watch.path.resolve()

    def take(self, path: Path) -> None:
        key = path_key(path)
        try:
            digest, size = sha256_file(path, self.settings.watch.max_file_bytes)
        except FileNotFoundError:
            return  # gone before we got to it: nothing to record
        except DocumentError as exc:
            self.reject(path, exc.reason)
            return
        except PermissionError:
            self.reject(path, "permission denied: the daemon's user cannot read it")
            return
        except OSError as exc:
            self.reject(path, f"cannot read: {exc.strerror}")
            return
        registration = self.pipeline.retry_db(lambda: self.ledger.register(key, digest, size))
        if registration.created:
            log.info("seen %s (%d bytes, sha256 %s)", key, size, digest[:12])
            self.pipeline.notify()
        elif registration.state == State.DONE and registration.path_added:
            log.info("seen %s: same content as an already stored document (sha256 %s)",
                     key, digest[:12])
            self.metrics.files_total.labels(status="duplicate").inc()
            self.pipeline.after_done_path(path, digest)
        elif registration.path_added:
            log.info("seen %s: same content as a document already %s (sha256 %s)", key,
                     registration.state, digest[:12])
            self.metrics.files_total.labels(status="duplicate").inc()

    def reject(self, path: Path, reason: str) -> None:
        key = path_key(path)
        registration = self.pipeline.retry_db(lambda: self.ledger.record_rejection(key, reason))
        if not registration.path_added:
            return
        log.error("failed %s: %s", key, reason)
        self.metrics.files_total.labels(status="failed").inc()
        quarantine(path, reason, self.settings, self.root)


class _Stopped(Exception):
    """The daemon is stopping while the database is away; the lease will hand the work back."""


def done_folder(settings: Settings, root: Path) -> Path:
    return root / (settings.watch.done_folder or Path("done"))


def folder_is_safe(folder: Path, configured: Path | None, root: Path) -> bool:
    """A done/failed folder configured inside the watched folder must still be inside it once
    resolved: anyone who can write to the inbox could replace it with a link elsewhere."""
    if configured is not None and configured.is_absolute():
        return True  # the operator chose a place outside; it is not the producers' to change
    try:
        resolved = folder.resolve()
    except (OSError, RuntimeError):
        resolved = folder
    if root in resolved.parents:
        return True
    log.error("not moving files into %s: it resolves to %s, outside the watched folder",
              folder, resolved)
    return False


def write_sidecar(target: Path, text: str) -> Path:
    """`NAME.error.txt` beside `target`, created new: never through a link planted there,
    never over an existing file."""
    n = 0
    while True:
        sidecar = target.with_name(f"{target.name}.error{f'.{n}' if n else ''}.txt")
        try:
            fd = os.open(sidecar, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        except FileExistsError:
            n += 1
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        return sidecar


def move_into(path: Path, folder: Path) -> Path:
    """Move `path` into `folder` without overwriting anything there. Moves the name only:
    a symlink is moved as a link, its target is never touched."""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / path.name
    n = 1
    while target.exists() or target.is_symlink():
        target = folder / f"{path.stem}.{n}{path.suffix}"
        n += 1
    shutil.move(str(path), str(target))
    return target


def quarantine(path: Path, reason: str, settings: Settings, root: Path,
               sha256: str | None = None) -> None:
    """Move a failed file to `watch.failed_dir` with a sidecar saying why, when configured.
    With `sha256`, only while `path` still holds that content: a file rewritten since is new
    content of its own, not the failure."""
    if settings.watch.failed_dir is None or not (path.is_file() or path.is_symlink()):
        return
    if sha256 is not None and not path.is_symlink():
        try:
            digest, _ = sha256_file(path, settings.watch.max_file_bytes)
        except (OSError, DocumentError):
            digest = sha256  # unreadable or too large: it is the failure, move it
        if digest != sha256:
            log.info("not moving %s to the failed folder: it holds new content now", path)
            return
    try:
        relative_ok = path.parent.resolve() == root or root in path.parent.resolve().parents
        if not relative_ok:
            return
        folder = root / settings.watch.failed_dir
        if not folder_is_safe(folder, settings.watch.failed_dir, root):
            return
        target = move_into(path, folder)
        write_sidecar(target, f"{path}\n{reason}\n")
    except OSError as exc:
        log.warning("could not move %s to the failed folder: %s", path, exc)
