"""claim -> decode -> batch -> OCR -> store: the flow and nothing else.

Four kinds of thread, each a `while running` loop around one blocking get:
- the claim loop takes a queue slot, then a document from the ledger (`queued -> processing`):
  when every slot is taken, files wait in the folder and nothing grows; it also renews the
  leases of everything held (the heartbeat) and re-queues others' expired ones;
- the decode pool reads a claimed document, checks its hash and decodes it into pages;
- one OCR loop per engine collects pages across documents (`batch.max_pages` or
  `batch.max_wait_ms`, whichever comes first) and recognises them;
- the store loops take each document whose last page is recognised: its text and `done` in
  one transaction, then its files' sidecars, searchable PDF and after-action (`daemon.files`).
  Not the OCR loops' work: a slow database or a searchable PDF (139 ms for a 300-dpi A4 page
  in a grey LZW TIFF, decoded and compressed again) would keep them from feeding the GPU.
Failures are recorded with their reason; transient ones are retried later.
What is held in memory is bounded by bytes (`daemon.budget`).

Well over our ~400-line habit (~620): the loops, the heartbeat and the outcomes share one
in-flight table, its locks, its slot and byte accounting; kept in one file, that discipline is
read in one place. The next split: the outcomes (store, fail, after-actions) to a module of
their own, taking the in-flight table with them.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import queue
import secrets
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError, SQLAlchemyError

from daemon.budget import ByteBudget
from daemon.config import Settings
from daemon.devices import Devices
from daemon.documents.decode import iter_pages
from daemon.documents.pdf_workers import PdfWorkers
from daemon.errors import DocumentError
from daemon.files import (
    LeadsOutside,
    after_done,
    quarantine,
    read_beneath,
    write_searchable_pdf,
    write_sidecars,
)
from daemon.metrics import Metrics
from daemon.ocr.engines import OcrEngine
from daemon.ocr.models import page_bound
from daemon.results import Page, PageResult
from daemon.store.models import State
from daemon.store.repository import Claim, Ledger, WorkerBeat

log = logging.getLogger("daemon.pipeline")
T = TypeVar("T")

HOUSEKEEPING_SECONDS = 10.0  # how often expired leases are looked for
# documents claimed in one statement at most, as many as slots are free: a burst, or a
# restart's backlog, is claimed in a few statements (and round trips), not one a document
CLAIM_BATCH = 8
# With twice CLAIM_BATCH documents or more in flight still to recognise, a freed slot waits
# this long at most for more to free before they are claimed together: a full pipeline frees a
# slot a stored document, and claimed one by one each cost a statement (a round trip, the
# claim loop's CPU) for a document the engines would not reach before those ahead anyway.
# Twice: slots free at the pace documents are read, so gathering CLAIM_BATCH of them takes at
# most half the time the engines need for the documents ahead, whatever that pace.
CLAIM_GATHER_SECONDS = 0.05
# Memory decoding a page takes at its peak, per byte of the decoded page: Pillow holds RGBX (4
# bytes a pixel), numpy's view costs a copy of its bytes (3), the BGR page itself (3); pdfium's
# BGRx render and its conversion are less. Reserved before, trimmed to the page after.
DECODE_PEAK = 10 / 3
DECODE_THREADS_MAX = 16  # "auto" on a GPU provider: one per usable core, at most this many
PDF_PROCESSES_MAX = 8
PDF_PROCESSES_MIN_CORES = 4
STORE_THREADS_POSTGRESQL = 4  # store loops on PostgreSQL: its round trips overlap (store_threads)


def decode_threads(settings: Settings, provider: str) -> int:
    """Decoding threads: as configured, or for "auto" two on the CPU provider (inference uses
    the cores there) and one per usable core on a GPU provider. There decoding is the largest
    host stage (a 300-dpi page is 20-120 ms, a 600-dpi photo 150 ms) and runs outside the GIL,
    so two threads alone would hold a 16-core GPU host to ~10-50 pages/s."""
    threads = settings.batch.decode_threads
    if threads != "auto":
        return threads
    if provider == "cpu":
        return 2
    return max(2, min(len(os.sched_getaffinity(0)), DECODE_THREADS_MAX))


def pdf_processes(settings: Settings, provider: str) -> int:
    """PDF worker processes: as configured, or for "auto" one per decoding thread (at most
    PDF_PROCESSES_MAX: ~60 MB each) on a GPU provider with PDF_PROCESSES_MIN_CORES or more,
    else none. In one process pdfium renders one page at a time: a 300-dpi A4 scan in a PDF
    takes ~54 ms, so a daemon read at most ~18 such pages/s whatever its cores. A worker
    costs ~10-30% more per page (the page travels through shared memory): on 2 cores the
    whole daemon read 14.0 PDF pages/s in-process against 12.0 in workers
    (benchmarks/host_ceiling.py --a4-pdf 40), so below 4 cores the lock is not what limits."""
    processes = settings.batch.pdf_processes
    if processes != "auto":
        return processes
    if provider == "cpu" or len(os.sched_getaffinity(0)) < PDF_PROCESSES_MIN_CORES:
        return 0
    return min(decode_threads(settings, provider), PDF_PROCESSES_MAX)


def store_threads(settings: Settings, provider: str) -> int:
    """Store loops: one for the ledger alone on SQLite (a receipt's text is ~0.5 ms there,
    and it takes one writer at a time); STORE_THREADS_POSTGRESQL on PostgreSQL, where a
    store is six round trips in one transaction, so one loop stores at most ~1 / (6 x the
    round trip) documents a second: with the server 10.8 ms away one loop held the daemon to
    14.4 receipts/s, four let it reach 28 (benchmarks/NOTES.md). As many as the decoding
    threads, if more, when searchable PDFs are written, each of which reads its file again:
    3-6 ms a receipt or a 300-dpi A4 page whose JPEG, PNG or one-strip G4 TIFF goes in as it
    is; 82 ms the A4 page as a G4 TIFF in strips and 139 ms as a grey LZW one (decoded, their
    pixels compressed again)."""
    ledger = STORE_THREADS_POSTGRESQL if make_url(settings.database.url).get_backend_name() \
        == "postgresql" else 1
    if settings.watch.output_pdf == "none":
        return ledger
    return max(ledger, decode_threads(settings, provider))


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
    nbytes: int = 0  # of the memory budget, given back once the engine is done with it


class Pipeline:
    def __init__(self, settings: Settings, ledger: Ledger, engines: list[OcrEngine],
                 metrics: Metrics, provider: str) -> None:
        self.settings = settings
        self.ledger = ledger
        self.engines = engines
        self.metrics = metrics
        self.provider = provider
        # unique per process: two containers with one hostname and PID 1 must not share a claim
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self.root = settings.watch.path.resolve()
        capacity = settings.queue.capacity
        self._slots = threading.BoundedSemaphore(capacity)
        self._pages: queue.Queue[PageTask] = queue.Queue(
            maxsize=max(2, settings.batch.max_pages * len(engines) * 2))
        self._inflight: dict[int, InFlight] = {}
        # documents whose every page is recognised, for the store loops: no more than the
        # slots, as each holds one
        self._to_store: queue.Queue[InFlight] = queue.Queue()
        self._store_threads = store_threads(settings, provider)
        self._inflight_lock = threading.Lock()
        self._wake = threading.Event()
        self._running = threading.Event()
        self._accepting = threading.Event()
        self._threads: list[threading.Thread] = []
        self._decode_pool = ThreadPoolExecutor(decode_threads(settings, provider),
                                               thread_name_prefix="decode")
        self.devices = Devices(engines, metrics)
        self._budget = ByteBudget(settings.queue.memory_budget_bytes, metrics.queue_bytes.set)
        self._bound = page_bound(settings.ocr)  # large JPEGs are decoded no larger than this
        processes = pdf_processes(settings, provider)
        self._pdf_workers = PdfWorkers(processes) if processes else None
        self.database_ok = True
        self.metrics.queue_capacity.set(capacity)
        self._progress_at = time.monotonic()
        self._pages_done = self._beat_pages = 0
        self._beat_at = time.monotonic()

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        self._running.set()
        self._accepting.set()
        self._threads.append(threading.Thread(target=self._claim_loop, name="claim",
                                              daemon=True))
        for i, engine in enumerate(self.engines):
            self._threads.append(threading.Thread(target=self._ocr_loop, args=(engine,),
                                                  name=f"ocr-{i}", daemon=True))
        for i in range(self._store_threads):
            self._threads.append(threading.Thread(target=self._store_loop, name=f"store-{i}",
                                                  daemon=True))
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
        with contextlib.suppress(SQLAlchemyError):  # else the row goes stale: not live
            self.ledger.worker_stopped(self.worker_id)
        # Idle loops notice within one poll timeout. A worker inside a native OCR call cannot
        # be interrupted: its pages were handed back above, so it is not waited for.
        grace = time.monotonic() + 1.0
        for thread in self._threads:
            thread.join(max(0.0, grace - time.monotonic()))
        self._decode_pool.shutdown(wait=False, cancel_futures=True)
        if self._pdf_workers is not None:
            self._pdf_workers.close()
        busy = [thread.name for thread in self._threads if thread.is_alive()]
        if busy:
            log.warning("%s still busy at the stop timeout (inside the OCR engine, or writing "
                        "a stored document's files); the work not stored was handed back",
                        ", ".join(busy))
        if any(name.startswith("ocr-") for name in busy):
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

    def progressed(self) -> None:
        """A page decoded or recognised, a document stored or failed."""
        self._progress_at = time.monotonic()

    def seconds_since_progress(self) -> float:
        return time.monotonic() - self._progress_at

    @property
    def stuck(self) -> bool:
        """Work in flight and no progress for queue.stuck_seconds: a loop alive but hung (a
        decoder or an engine call that never returns) is reported, not hidden."""
        return (self.inflight_count() > 0
                and self.seconds_since_progress() > self.settings.queue.stuck_seconds)

    def inflight_count(self) -> int:
        with self._inflight_lock:
            return len(self._inflight)

    # -- claiming -------------------------------------------------------------------------

    def _claim_loop(self) -> None:
        next_housekeeping = next_heartbeat = 0.0
        heartbeat = self._heartbeat_seconds
        while self._running.is_set():
            if not self._accepting.is_set():
                time.sleep(0.05)
                continue
            if time.monotonic() >= next_heartbeat:
                self._heartbeat()
                next_heartbeat = time.monotonic() + heartbeat
            if time.monotonic() >= next_housekeeping:
                self._requeue_expired()
                next_housekeeping = time.monotonic() + HOUSEKEEPING_SECONDS
            if not self._slots.acquire(timeout=0.2):
                continue  # the queue is full
            slots = self._gather_slots()
            if not self._accepting.is_set():  # stopping, while it gathered
                self._release(slots)
                continue
            for claim in self._claim(slots):
                doc = InFlight(claim)
                with self._inflight_lock:
                    if not self._inflight:  # time idle before this is not stuck time
                        self._progress_at = time.monotonic()
                    self._inflight[claim.document_id] = doc
                    self.metrics.queue_depth.set(len(self._inflight))
                self._decode_pool.submit(self._decode, doc)

    def _gather_slots(self) -> int:
        """The slots to claim for, one taken: with the others free now, and with enough
        documents in flight still to recognise to keep the engines busy meanwhile (twice
        CLAIM_BATCH), those that free within CLAIM_GATHER_SECONDS too, CLAIM_BATCH at most."""
        slots = 1
        while slots < CLAIM_BATCH and self._slots.acquire(blocking=False):
            slots += 1
        if slots == CLAIM_BATCH or self._ahead_of_the_engines() < 2 * CLAIM_BATCH:
            return slots
        deadline = time.monotonic() + CLAIM_GATHER_SECONDS
        while slots < CLAIM_BATCH and self._accepting.is_set():
            left = deadline - time.monotonic()
            if left <= 0 or not self._slots.acquire(timeout=left):
                break
            slots += 1
        return slots

    def _ahead_of_the_engines(self) -> int:
        """Documents in flight with pages still to decode or recognise (not only to store)."""
        with self._inflight_lock:
            return sum(1 for doc in self._inflight.values() if not doc.complete)

    def _claim(self, slots: int) -> list[Claim]:
        """The next queued documents for the `slots` just taken, oldest first; the slots left
        over given back. None at all (after waiting for news a while) when none is queued or
        the database is away."""
        with self._inflight_lock:
            exclude = list(self._inflight)
        try:
            claims = self.ledger.claim_many(self.worker_id, self.settings.queue.lease_seconds,
                                            slots, exclude)
            self.database_ok = True
        except BaseException as exc:
            self._release(slots)
            if not isinstance(exc, SQLAlchemyError):
                raise
            self._database_down(exc)
            return []
        self._release(slots - len(claims))
        if not claims:
            self._wake.wait(0.5)
            self._wake.clear()
        return claims

    def _release(self, slots: int) -> None:
        for _ in range(slots):
            self._slots.release()

    @property
    def _heartbeat_seconds(self) -> float:
        return max(0.5, self.settings.queue.lease_seconds / 3)

    def _heartbeat(self) -> None:
        """Renew the lease of every document this worker holds (being decoded, queued for
        OCR or in it), every third of a lease: a live worker never loses a claim to the
        housekeeping of another, however long a document takes. A claim found lost anyway
        (a database away longer than a lease) stops that document's work here: the worker
        that has it now stores it, once."""
        with self._inflight_lock:
            held = dict(self._inflight)
        try:
            renewed = self.ledger.renew(self.worker_id, list(held),
                                        self.settings.queue.lease_seconds)
            self._beat(len(held))
            self.database_ok = True
        except SQLAlchemyError as exc:
            self._database_down(exc)
            return
        for document_id, doc in held.items():
            if document_id in renewed:
                continue
            with doc.lock:
                if doc.finished or doc.failed:
                    continue
                doc.failed = True  # its pages are dropped, nothing is stored
            log.warning("lost the claim on %s (its lease ran out): its work stops here",
                        doc.path or doc.claim.sha256[:12])
            self._forget(doc)

    def _beat(self, held: int) -> None:
        """This worker's row for `ocr-daemon status`; `ocr_workers` from all live rows."""
        now = time.monotonic()
        rate = (self._pages_done - self._beat_pages) / max(1e-9, now - self._beat_at)
        self._beat_at, self._beat_pages = now, self._pages_done
        live = self.ledger.beat(WorkerBeat(
            self.worker_id, socket.gethostname(), os.getpid(), self.provider,
            ",".join(sorted({engine.device for engine in self.engines})), held, rate,
            live_seconds=3 * self._heartbeat_seconds))
        self.metrics.workers.set(live)

    def _requeue_expired(self) -> None:
        try:
            requeued = self.ledger.requeue_stale(max_attempts=self.settings.queue.max_attempts)
            self.database_ok = True
        except SQLAlchemyError as exc:
            self._database_down(exc)
            return
        if requeued:
            log.info("re-queued %d documents whose lease ran out", requeued)

    def _database_down(self, exc: Exception) -> None:
        if self.database_ok:
            log.error("database unavailable, retrying: %s", str(exc).splitlines()[0])
        self.database_ok = False
        time.sleep(1.0)

    # -- decoding -------------------------------------------------------------------------

    def _decode(self, doc: InFlight) -> None:
        """Read, check and decode one document into the page queue, within the memory budget:
        its raw bytes are held until its last page is decoded, each page until it is OCR'd."""
        budget = self._budget
        raw = reserved = 0

        def cancelled() -> bool:
            return doc.failed or not self._running.is_set()

        def reserve(nbytes: int) -> None:  # before each page is decoded: its peak
            nonlocal reserved
            peak = int(nbytes * DECODE_PEAK)
            if not budget.acquire_page(peak, cancelled):
                raise _Cancelled()
            reserved += peak

        try:
            if not budget.acquire_raw(doc.claim.size_bytes, cancelled):
                return  # stopping (the claim is handed back) or failed already
            raw = doc.claim.size_bytes
            start = time.perf_counter()
            data, path = self._read_verified(doc.claim)
            doc.path = path
            count = 0
            for page in iter_pages(data, self.settings.ocr, reserve, bound=self._bound,
                                   pdf_workers=self._pdf_workers):
                held = min(reserved, page.image.nbytes if page.image is not None else 0)
                budget.release_page(reserved - held)  # the decoder's scratch is gone
                reserved = 0
                if doc.failed:
                    budget.release_page(held)
                    return
                count += 1
                if page.text_layer is not None:
                    self._add_result(doc, page.index, page.text_layer)
                else:
                    self._put_page(PageTask(doc, page, held))
            if count == 0:
                raise DocumentError("no pages in the document")
            self.metrics.stage_seconds.labels(stage="decode").observe(
                time.perf_counter() - start)
            with doc.lock:
                doc.total = count
                ready = doc.complete and not doc.failed
            if ready:
                self._to_store.put(doc)
        except _Cancelled:
            pass
        except DocumentError as exc:
            self._fail(doc, exc.reason, permanent=exc.permanent)
        except Exception as exc:  # a decoder bug must not take the daemon down
            log.exception("decoding %s crashed", doc.claim.sha256[:12])
            self._fail(doc, f"decoder crashed: {type(exc).__name__}: {exc}", permanent=True)
        finally:
            budget.release_raw(raw)
            budget.release_page(reserved)  # a page reserved but never decoded

    def _read_verified(self, claim: Claim) -> tuple[bytes, Path]:
        """The claimed content, read from one of its paths and checked against its hash."""
        reasons = []
        for recorded in reversed(claim.paths):
            path = Path(recorded)
            try:  # one descriptor, links followed only inside the folder: read, hashed, decoded
                data, _ = read_beneath(path, self.root, self.settings.watch.max_file_bytes)
            except LeadsOutside:
                continue
            except DocumentError as exc:  # grew past max_file_bytes: not what was queued
                reasons.append(exc.reason)
                continue
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

    def _put_page(self, task: PageTask) -> None:
        while self._running.is_set() and not task.doc.failed:
            try:
                self._pages.put(task, timeout=0.2)
                self.progressed()
                return
            except queue.Full:
                continue
        self._budget.release_page(task.nbytes)

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
        for task in batch:
            if task.doc.failed:  # its document failed meanwhile: dropped
                self._budget.release_page(task.nbytes)
        return [task for task in batch if not task.doc.failed]

    def _ocr_loop(self, engine: OcrEngine) -> None:
        while self._running.is_set():
            if not self.devices.in_service(engine):  # the other devices take the work
                time.sleep(0.2)
                continue
            batch = self._collect()
            if batch:
                self._recognize(engine, batch)

    def _recognize(self, engine: OcrEngine, batch: list[PageTask]) -> None:
        images = [task.page.image for task in batch if task.page.image is not None]
        start = time.perf_counter()
        outcome = self.devices.run(engine, images)
        if isinstance(outcome, Exception) and len(batch) > 1:
            # one page may be at fault: each alone, so that only its own document fails
            log.warning("retrying the %d pages of a failed batch one by one", len(batch))
            for task in batch:
                self._recognize(engine, [task])
            return
        self.progressed()
        for task in batch:  # the engine is done with the pages
            self._budget.release_page(task.nbytes)
        if isinstance(outcome, Exception):
            for doc in {id(t.doc): t.doc for t in batch}.values():
                self._fail(doc, f"OCR engine error: {type(outcome).__name__}: {outcome}",
                           permanent=False)
            return
        results, used = outcome
        self._pages_done += len(batch)
        seconds = time.perf_counter() - start
        self.metrics.batch_size.observe(len(batch))
        self.metrics.device_pages_total.labels(used.device).inc(len(batch))
        for stage in ("det", "cls", "rec"):
            spent = sum(r.timings.get(stage, 0.0) for r in results)
            if spent:
                self.metrics.stage_seconds.labels(stage=stage).observe(spent)
        for task, result in zip(batch, results, strict=True):
            with task.doc.lock:
                task.doc.ocr_seconds += seconds / len(batch)
            self._add_result(task.doc, task.page.index, result.scaled(*task.page.scale))

    # -- outcomes -------------------------------------------------------------------------

    def _add_result(self, doc: InFlight, index: int, result: PageResult) -> None:
        with doc.lock:
            if doc.failed:
                return
            doc.results[index] = result
            ready = doc.complete
        if ready:
            self._to_store.put(doc)

    def _store_loop(self) -> None:
        while self._running.is_set():
            try:
                doc = self._to_store.get(timeout=0.2)
            except queue.Empty:
                continue
            self._finish(doc)

    def _finish(self, doc: InFlight) -> None:
        with doc.lock:
            if doc.finished or doc.failed:
                return
            doc.finished = True
        pages = [doc.results[i] for i in sorted(doc.results)]
        start = time.perf_counter()
        try:
            paths = self.retry_db(lambda: self.ledger.complete(
                doc.claim.document_id, self.worker_id, pages, doc.ocr_seconds, self.provider,
                with_paths=self.settings.watch.after != "keep"))
        except _Stopped:
            self._forget(doc)
            return
        except Exception as exc:
            self._outcome_crashed(doc, exc, storing=True)
            return
        self.metrics.stage_seconds.labels(stage="store").observe(time.perf_counter() - start)
        self._forget(doc)
        if paths is None:
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
        source = doc.path or Path(doc.claim.paths[-1])
        write_sidecars(self.settings, source, pages, doc.claim.sha256)
        write_searchable_pdf(self.settings, source, pages, doc.claim.sha256, self.root)
        # the paths in the ledger as the text was stored, not only those known at claim
        # time: a duplicate dropped while the document was processed is moved too (with
        # "keep" none are read, and after_done leaves every file where it is)
        for recorded in paths or doc.claim.paths:
            after_done(Path(recorded), doc.claim.sha256, self.settings, self.root)

    def _fail(self, doc: InFlight, reason: str, *, permanent: bool) -> None:
        with doc.lock:
            if doc.finished or doc.failed:
                return
            doc.failed = True
        try:
            outcome = self.retry_db(lambda: self.ledger.fail(
                doc.claim.document_id, reason, permanent=permanent,
                max_attempts=self.settings.queue.max_attempts,
                backoff_seconds=self.settings.queue.retry_backoff_seconds,
                worker=self.worker_id))
        except _Stopped:
            self._forget(doc)
            return
        except Exception as exc:
            self._outcome_crashed(doc, exc, storing=False)
            return
        self._forget(doc)
        if outcome is None:  # another worker holds it now (our lease ran out): its say
            log.warning("lost the claim on %s before recording its failure (%s); another "
                        "worker has it", doc.path or doc.claim.sha256[:12], reason)
            return
        where = doc.path or (doc.claim.paths[-1] if doc.claim.paths else doc.claim.sha256)
        if outcome.state == State.QUEUED:
            self.metrics.files_total.labels(status="retried").inc()
            log.warning("retrying %s later (attempt %d of %d): %s", where, outcome.attempts,
                        self.settings.queue.max_attempts, reason)
            return
        self.metrics.files_total.labels(status="failed").inc()
        log.error("failed %s: %s", where, reason)
        for recorded in outcome.paths:
            moved = quarantine(Path(recorded), reason, self.settings, self.root,
                               sha256=doc.claim.sha256)
            if moved is not None:  # where `ocr-daemon retry` will read it from
                self._record_path(moved, doc)

    def _record_path(self, path: Path, doc: InFlight) -> None:
        try:
            self.ledger.register(os.path.abspath(path), doc.claim.sha256, 0)
        except SQLAlchemyError as exc:
            log.warning("could not record that %s is now at %s: %s", doc.claim.sha256[:12],
                        path, str(exc).splitlines()[0])

    def _outcome_crashed(self, doc: InFlight, exc: Exception, *, storing: bool) -> None:
        """The ledger refused an outcome with something other than an outage (a DataError, a
        pool timeout, a bug): logged with the file and counted; text that cannot be stored
        fails the attempt (transient: retried, then failed after queue.max_attempts, never
        looping); the slot is freed and the loop lives on. A failure that cannot be recorded
        is left to the claim's lease."""
        where = doc.path or (doc.claim.paths[-1] if doc.claim.paths else doc.claim.sha256)
        what = "store the text of" if storing else "record the failure of"
        log.error("could not %s %s: %s: %s", what, where, type(exc).__name__,
                  str(exc).splitlines()[0] if str(exc) else "", exc_info=exc)
        self.metrics.files_total.labels(status="error").inc()
        if storing:
            reason = f"could not store the text: {type(exc).__name__}: {exc}".splitlines()[0]
            try:
                self.ledger.fail(doc.claim.document_id, reason[:500], permanent=False,
                                 max_attempts=self.settings.queue.max_attempts,
                                 backoff_seconds=self.settings.queue.retry_backoff_seconds,
                                 worker=self.worker_id)
            except Exception as again:
                log.warning("could not record that either (%s): the lease hands %s back",
                            type(again).__name__, where)
        self._forget(doc)

    def _forget(self, doc: InFlight) -> None:
        self.progressed()
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


class _Cancelled(Exception):
    """Decoding stopped while waiting for memory: the document failed or the daemon stops."""


class _Stopped(Exception):
    """The daemon is stopping while the database is away; the lease will hand the work back."""
