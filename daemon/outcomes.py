"""How a document's work ends: stored (its text and `done` in one transaction, then its
outputs and the after-action on each of its paths), failed (retried later, or failed for good
and quarantined, where `ocr-daemon retry` will find it), or, when the ledger refuses the
outcome itself, counted and left to the claim's lease. Each ending frees the document's slot.

Not the OCR loops' work: the pipeline's store loops call `finish`, so a slow database or a
searchable PDF (139 ms for a 300-dpi A4 page in a grey LZW TIFF, decoded and compressed
again) never keeps the engines from their next batch.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

from daemon.config import Settings
from daemon.errors import StoreError
from daemon.files import after_done, path_key, path_of, quarantine, resolves_within
from daemon.inflight import InFlight, InFlightTable
from daemon.metrics import Metrics
from daemon.outputs import wanted as outputs_wanted
from daemon.outputs import write_outputs
from daemon.results import PageResult
from daemon.store.ledger import Ledger
from daemon.store.models import State
from daemon.store.outage import GaveUp, Outage

log = logging.getLogger("daemon.pipeline")
T = TypeVar("T")


def where(doc: InFlight) -> object:
    """The document as a log line names it: the path it was read from, else its last known
    path, else its hash."""
    return doc.path or (doc.claim.paths[-1] if doc.claim.paths else doc.claim.sha256)


class Outcomes:
    def __init__(self, settings: Settings, ledger: Ledger, metrics: Metrics,
                 table: InFlightTable, outage: Outage, *, worker_id: str, provider: str) -> None:
        self.settings = settings
        self.ledger = ledger
        self.metrics = metrics
        self.table = table
        self.outage = outage
        self.worker_id = worker_id
        self.provider = provider
        self.root = settings.watch.path.resolve()

    def finish(self, doc: InFlight) -> None:
        """Every page is recognised: store the text, then the outputs and after-actions."""
        if not doc.finish():
            return
        pages = [doc.results[i] for i in sorted(doc.results)]
        start = time.perf_counter()
        written = self._record(doc, lambda: self.ledger.complete(
            doc.claim.document_id, self.worker_id, pages, doc.ocr_seconds, self.provider,
            with_paths=self.settings.watch.after != "keep" or outputs_wanted(self.settings)),
            storing=True)
        if written is None:
            return
        [paths] = written
        self.metrics.stage_seconds.labels(stage="store").observe(time.perf_counter() - start)
        self.table.remove(doc, keep_data=True)  # the slot is free; the bytes go with the PDF
        try:
            self._stored(doc, pages, paths)
        finally:
            self.table.drop_data(doc)

    def _stored(self, doc: InFlight, pages: list[PageResult], paths: tuple[str, ...] | None
                ) -> None:
        """What follows the text stored: the log line and metrics, the outputs, the
        after-action on each path."""
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
        # Outputs (sidecars, searchable PDF): after the text is stored, before the files are
        # moved; for every path of the document in the folder (its duplicates too), from the
        # bytes the pipeline read (one content, one sha256)
        if outputs_wanted(self.settings):
            source = doc.path or path_of(doc.claim.paths[-1])
            for path in [source, *(p for p in map(path_of, paths) if p != source)]:
                if path == source or self._beside_in_the_folder(path):
                    write_outputs(self.settings, path, pages, doc.claim.sha256, self.root,
                                  doc.data)
        # the paths in the ledger as the text was stored, not only those known at claim
        # time: a duplicate dropped while the document was processed is moved too (with
        # "keep" none are read, and after_done leaves every file where it is)
        for recorded in paths or doc.claim.paths:
            after_done(path_of(recorded), doc.claim.sha256, self.settings, self.root)

    def _beside_in_the_folder(self, path: Path) -> bool:
        """A duplicate's path that gets outputs: a file there now, in the watched folder and
        not in its done or failed folder (a recorded path may be where a file used to be)."""
        skipped = [(self.root / folder).resolve() for folder in (
            self.settings.watch.done_folder, self.settings.watch.failed_dir) if folder]
        return (os.path.isfile(path) and resolves_within(path.parent, self.root)
                and not any(resolves_within(path.parent, folder) for folder in skipped))

    def fail(self, doc: InFlight, reason: str, *, permanent: bool) -> None:
        """Record a failure: retried later (transient, attempts left) or failed for good and
        quarantined."""
        if not doc.stop():
            return
        written = self._record(doc, lambda: self.ledger.fail(
            doc.claim.document_id, reason, permanent=permanent,
            max_attempts=self.settings.queue.max_attempts,
            backoff_seconds=self.settings.queue.retry_backoff_seconds,
            worker=self.worker_id), storing=False)
        if written is None:
            return
        [outcome] = written
        self.table.remove(doc)
        if outcome is None:  # another worker holds it now (our lease ran out): its say
            log.warning("lost the claim on %s before recording its failure (%s); another "
                        "worker has it", doc.path or doc.claim.sha256[:12], reason)
            return
        if outcome.state == State.QUEUED:
            self.metrics.files_total.labels(status="retried").inc()
            log.warning("retrying %s later (attempt %d of %d): %s", where(doc),
                        outcome.attempts, self.settings.queue.max_attempts, reason)
            return
        log.error("failed %s: %s", where(doc), reason)
        self.failed_for_good(doc.claim.sha256, reason, outcome.paths)

    def failed_for_good(self, sha256: str, reason: str, paths: Sequence[str]) -> None:
        """A document failed for good (by this worker, or by a lease that ran out once too
        often): counted, and its files quarantined with their reason, where `ocr-daemon
        retry` reads them from."""
        self.metrics.files_total.labels(status="failed").inc()
        for recorded in paths:
            moved = quarantine(path_of(recorded), reason, self.settings, self.root,
                               sha256=sha256)
            if moved is not None:
                self._record_path(moved, sha256)

    def lost(self, doc: InFlight) -> None:
        """Its lease ran out and another worker may have it: its work stops here, nothing is
        recorded."""
        if doc.stop():
            log.warning("lost the claim on %s (its lease ran out): its work stops here",
                        doc.path or doc.claim.sha256[:12])
            self.table.remove(doc)

    def _record(self, doc: InFlight, action: Callable[[], T], *, storing: bool
                ) -> tuple[T] | None:
        """The outcome written through the outage policy, its result in a 1-tuple (None is a
        result: the claim was lost). None when it was not written: the daemon stops while
        the database is away (the lease hands the document back), or the ledger refused it
        (`_refused`); the slot is freed then."""
        try:
            return (self.outage.retry(action),)
        except GaveUp:
            self.table.remove(doc)
        except Exception as exc:
            self._refused(doc, exc, storing=storing)
        return None

    def _record_path(self, path: Path, sha256: str) -> None:
        try:
            self.ledger.register(path_key(path), sha256, 0)
        except StoreError as exc:
            log.warning("could not record that %s is now at %s: %s", sha256[:12], path, exc)

    def _refused(self, doc: InFlight, exc: Exception, *, storing: bool) -> None:
        """The ledger refused an outcome with something other than an outage (a constraint,
        a pool timeout, a bug): logged with the file and counted; text that cannot be stored
        fails the attempt (transient: retried, then failed after queue.max_attempts, never
        looping); the slot is freed and the loop lives on. A failure that cannot be recorded
        is left to the claim's lease."""
        what = "store the text of" if storing else "record the failure of"
        log.error("could not %s %s: %s: %s", what, where(doc), type(exc).__name__,
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
                            type(again).__name__, where(doc))
        self.table.remove(doc)
