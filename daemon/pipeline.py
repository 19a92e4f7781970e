"""claim -> decode -> batch -> OCR -> store: the flow and nothing else.

Four kinds of thread, each a `while running` loop around one blocking get:
- the claim loop takes a queue slot, then a document from the ledger (`queued -> processing`):
  when every slot is taken, files wait in the folder and nothing grows; between claims it
  keeps the leases (`daemon.leases`: the heartbeat, the worker row, others' expired claims);
- the decode pool reads a claimed document, checks its hash and decodes it into pages;
- one OCR loop per engine collects pages across documents (`batch.max_pages` or
  `batch.max_wait_ms`, whichever comes first) and recognises them;
- the store loops take each document whose last page is recognised to `daemon.outcomes`.
What is held is in `daemon.inflight` (its slots and progress clock); how a document's work
ends, stored or failed, in `daemon.outcomes`; how many threads of each, in `daemon.sizing`;
a database outage is waited out by `daemon.store.outage`. What is held in memory is bounded
by bytes (`daemon.budget`).
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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from daemon.budget import ByteBudget
from daemon.config import Settings
from daemon.documents.decode import iter_pages
from daemon.documents.pdf_workers import PdfWorkers
from daemon.errors import DocumentError, StoreError
from daemon.failover import Devices
from daemon.files import LeadsOutside, is_within, path_of, read_beneath, unreadable
from daemon.inflight import InFlight, InFlightTable, PageTask
from daemon.leases import Leases
from daemon.metrics import Metrics
from daemon.ocr.engines import OcrEngine
from daemon.ocr.models import page_bound
from daemon.outcomes import Outcomes
from daemon.results import PageResult
from daemon.sizing import decode_threads, pdf_processes, store_threads
from daemon.store.ledger import Ledger
from daemon.store.outage import Outage
from daemon.store.records import Claim

log = logging.getLogger("daemon.pipeline")

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


class Pipeline:
    def __init__(self, settings: Settings, ledger: Ledger, engines: list[OcrEngine],
                 metrics: Metrics, provider: str, outage: Outage | None = None) -> None:
        self.settings = settings
        self.ledger = ledger
        self.engines = engines
        self.metrics = metrics
        self.provider = provider
        self.outage = outage or Outage(ledger)
        # unique per process: two containers with one hostname and PID 1 must not share a claim
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self.root = settings.watch.path.resolve()
        # where a claimed file is read from: the watched folder, and the failed folder where a
        # failed file waits for `ocr-daemon retry` when that is elsewhere (an absolute one)
        failed = settings.watch.failed_dir
        self._roots = [self.root] + ([(self.root / failed).resolve()] if failed is not None
                                     and not is_within((self.root / failed).resolve(),
                                                       self.root) else [])
        capacity = settings.queue.capacity
        self._budget = ByteBudget(settings.queue.memory_budget_bytes, metrics.queue_bytes.set)
        self.table = InFlightTable(capacity, metrics.queue_depth.set, self._budget.release_raw)
        self.outcomes = Outcomes(settings, ledger, metrics, self.table, self.outage,
                                 worker_id=self.worker_id, provider=provider)
        self.leases = Leases(settings, ledger, metrics, self.table, self.outcomes, self.outage,
                             worker_id=self.worker_id, provider=provider,
                             devices=",".join(sorted({engine.device for engine in engines})))
        self._pages: queue.Queue[PageTask] = queue.Queue(
            maxsize=max(2, settings.batch.max_pages * len(engines) * 2))
        # documents whose every page is recognised, for the store loops: no more than the
        # slots, as each holds one
        self._to_store: queue.Queue[InFlight] = queue.Queue()
        self._store_threads = store_threads(settings, provider, postgresql=ledger.postgresql)
        self._running = threading.Event()
        self._accepting = threading.Event()
        self._threads: list[threading.Thread] = []
        self._decode_pool = ThreadPoolExecutor(decode_threads(settings, provider),
                                               thread_name_prefix="decode")
        self.devices = Devices(engines, metrics)
        self._bound = page_bound(settings.ocr)  # large JPEGs are decoded no larger than this
        processes = pdf_processes(settings, provider)
        self._pdf_workers = PdfWorkers(processes) if processes else None
        self.metrics.queue_capacity.set(capacity)

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
        self.table.changed.set()

    def stop(self, timeout: float) -> int:
        """Stop claiming, give the documents in flight `timeout` seconds to finish, hand the
        rest back to the ledger. Returns how many were handed back."""
        self._accepting.clear()
        self.outage.stop()  # an outcome waiting for the database gives up: the lease hands
        self.table.changed.set()  # its document back
        deadline = time.monotonic() + timeout
        while self.inflight_count() and time.monotonic() < deadline:
            time.sleep(0.05)
        handed_back = 0
        for doc in self.table.held().values():
            if not doc.stop():  # being stored: it ends as it will; else its pages are dropped
                continue
            try:
                if self.ledger.release(doc.claim.document_id, self.worker_id):
                    handed_back += 1
            except StoreError as exc:  # the lease runs out and it is requeued anyway
                log.warning("could not hand back document %s: %s", doc.claim.sha256[:12], exc)
        self._running.clear()
        with contextlib.suppress(StoreError):  # else the row goes stale: not live
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

    @property
    def database_ok(self) -> bool:
        return self.outage.ok

    def seconds_since_progress(self) -> float:
        return self.table.seconds_since_progress()

    @property
    def stuck(self) -> bool:
        """Work in flight and no progress for queue.stuck_seconds: a loop alive but hung (a
        decoder or an engine call that never returns) is reported, not hidden."""
        return self.table.stuck(self.settings.queue.stuck_seconds)

    def inflight_count(self) -> int:
        return self.table.count()

    def stuck_calls(self) -> list[dict[str, object]]:
        """The decoder and engine calls under way past `queue.stuck_seconds`, and the
        documents they hold, for /health: one hung call is shown while the rest flow."""
        return [{"call": call.what, "seconds": round(call.seconds(), 1),
                 "documents": [str(doc.path or doc.claim.sha256) for doc in call.docs]}
                for call in self.table.stuck_calls(self.settings.queue.stuck_seconds)]

    @property
    def every_ocr_loop_stuck(self) -> bool:
        """Every OCR loop inside a call past `queue.stuck_seconds`: nothing can be read."""
        stuck = {call.what for call in self.table.stuck_calls(
            self.settings.queue.stuck_seconds)}
        loops = {thread.name for thread in self._threads if thread.name.startswith("ocr-")}
        return bool(loops) and loops <= stuck

    # -- claiming -------------------------------------------------------------------------

    def _claim_loop(self) -> None:
        while self._running.is_set():
            if not self._accepting.is_set():
                time.sleep(0.05)
                continue
            self.leases.due()
            if not self.table.take_slot(timeout=0.2):
                continue  # the queue is full
            slots = self._gather_slots()
            if not self._accepting.is_set():  # stopping, while it gathered
                self.table.give_slots(slots)
                continue
            for claim in self._claim(slots):
                self._decode_pool.submit(self._decode, self.table.add(claim))

    def _gather_slots(self) -> int:
        """The slots to claim for, one taken: with the others free now, and with enough
        documents in flight still to recognise to keep the engines busy meanwhile (twice
        CLAIM_BATCH), those that free within CLAIM_GATHER_SECONDS too, CLAIM_BATCH at most."""
        slots = 1
        while slots < CLAIM_BATCH and self.table.take_slot():
            slots += 1
        if slots == CLAIM_BATCH or self.table.ahead_of_the_engines() < 2 * CLAIM_BATCH:
            return slots
        deadline = time.monotonic() + CLAIM_GATHER_SECONDS
        while slots < CLAIM_BATCH and self._accepting.is_set():
            left = deadline - time.monotonic()
            if left <= 0 or not self.table.take_slot(timeout=left):
                break
            slots += 1
        return slots

    def _claim(self, slots: int) -> list[Claim]:
        """The next queued documents for the `slots` just taken, oldest first; the slots left
        over given back. None at all (after waiting for news a while) when none is queued or
        the database is away."""
        exclude = list(self.table.held())
        try:
            claims = self.ledger.claim_many(self.worker_id, self.settings.queue.lease_seconds,
                                            slots, exclude)
            self.outage.up()
        except BaseException as exc:
            self.table.give_slots(slots)
            if not isinstance(exc, StoreError):
                raise
            self.outage.down(exc)
            return []
        self.table.give_slots(slots - len(claims))
        if not claims:
            self.table.changed.wait(0.5)
            self.table.changed.clear()
        return claims

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
            since, call.since = call.since, None  # waiting for memory is no hang
            try:
                if not budget.acquire_page(peak, cancelled):
                    raise _Cancelled()
            finally:
                call.since = since
            reserved += peak

        try:
            if not budget.acquire_raw(doc.claim.size_bytes, cancelled):
                return  # stopping (the claim is handed back) or failed already
            raw = doc.claim.size_bytes
            start = time.perf_counter()
            with self.table.calling("decode", (doc,)) as call:
                data, path = self._read_verified(doc.claim)
            doc.path = path
            if self.settings.watch.output_pdf != "none":  # made from these bytes, once stored
                with doc.lock:
                    if not doc.failed:  # else removed already: the budget goes back below
                        doc.data, doc.data_budget, raw = data, raw, 0
            count = 0
            pages = iter_pages(data, self.settings.ocr, reserve, bound=self._bound,
                               pdf_workers=self._pdf_workers)
            while True:
                with self.table.calling("decode", (doc,)) as call:
                    page = next(pages, None)
                if page is None:
                    break
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
            self.outcomes.fail(doc, exc.reason, permanent=exc.permanent)
        except Exception as exc:  # a decoder bug must not take the daemon down
            log.exception("decoding %s crashed", doc.claim.sha256[:12])
            self.outcomes.fail(doc, f"decoder crashed: {type(exc).__name__}: {exc}", permanent=True)
        finally:
            budget.release_raw(raw)
            budget.release_page(reserved)  # a page reserved but never decoded

    def _read_verified(self, claim: Claim) -> tuple[bytes, Path]:
        """The claimed content, read from one of its paths and checked against its hash."""
        reasons = []
        for recorded in reversed(claim.paths):
            path = path_of(recorded)
            root = next((r for r in self._roots if is_within(path, r, strictly=True)), None)
            if root is None:
                continue
            try:  # one descriptor, links followed only inside the folder: read, hashed, decoded
                data, _ = read_beneath(path, root, self.settings.watch.max_file_bytes)
            except LeadsOutside:
                continue
            except (DocumentError, OSError) as exc:  # a DocumentError: grew past the limit
                reasons.append(unreadable(exc))
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
                self.table.progressed()
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
        docs = list({id(task.doc): task.doc for task in batch}.values())
        with self.table.calling(threading.current_thread().name, docs):
            outcome = self.devices.run(engine, images)
        if isinstance(outcome, Exception) and len(batch) > 1:
            # one page may be at fault: each alone, so that only its own document fails
            log.warning("retrying the %d pages of a failed batch one by one", len(batch))
            for task in batch:
                self._recognize(engine, [task])
            return
        self.table.progressed()
        for task in batch:  # the engine is done with the pages
            self._budget.release_page(task.nbytes)
        if isinstance(outcome, Exception):
            for doc in {id(t.doc): t.doc for t in batch}.values():
                self.outcomes.fail(doc, f"OCR engine error: {type(outcome).__name__}: {outcome}",
                           permanent=False)
            return
        results, used = outcome
        self.leases.pages_done += len(batch)
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
            self.outcomes.finish(doc)


class _Cancelled(Exception):
    """Decoding stopped while waiting for memory: the document failed or the daemon stops."""
