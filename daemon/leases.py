"""A worker's leases (DESIGN.md, "Leases"): the heartbeat that renews the lease of every
document it holds, its row in `workers` (what `ocr-daemon status` lists), and the
housekeeping that re-queues other workers' expired claims. The claim loop calls `due` between
claims; a claim found lost stops that document's work here (`Outcomes.lost`)."""

from __future__ import annotations

import logging
import os
import socket
import time

from daemon.config import Settings
from daemon.errors import StoreError
from daemon.inflight import InFlight, InFlightTable
from daemon.metrics import Metrics
from daemon.outcomes import Outcomes
from daemon.store.ledger import Ledger
from daemon.store.models import State
from daemon.store.outage import Outage
from daemon.store.records import Expired, WorkerBeat

log = logging.getLogger("daemon.pipeline")
HOUSEKEEPING_SECONDS = 10.0  # how often expired leases are looked for


class Leases:
    def __init__(self, settings: Settings, ledger: Ledger, metrics: Metrics,
                 table: InFlightTable, outcomes: Outcomes, outage: Outage, *, worker_id: str,
                 provider: str, devices: str) -> None:
        self.settings = settings
        self.ledger = ledger
        self.metrics = metrics
        self.table = table
        self.outcomes = outcomes
        self.outage = outage
        self.worker_id = worker_id
        self.provider = provider
        self.devices = devices
        self.pages_done = 0  # recognised by this worker, for the pages/s of its row
        self._beat_pages = 0
        self._beat_at = time.monotonic()
        self._next_heartbeat = self._next_housekeeping = 0.0

    @property
    def heartbeat_seconds(self) -> float:
        """Every third of a lease: two beats may be missed before another worker may take it."""
        return max(0.5, self.settings.queue.lease_seconds / 3)

    def due(self) -> None:
        """The heartbeat and the housekeeping, each when its time has come."""
        if time.monotonic() >= self._next_heartbeat:
            self.heartbeat()
            self._next_heartbeat = time.monotonic() + self.heartbeat_seconds
        if time.monotonic() >= self._next_housekeeping:
            self.requeue_expired()
            self._next_housekeeping = time.monotonic() + HOUSEKEEPING_SECONDS

    def heartbeat(self) -> None:
        """Renew the lease of every document this worker holds (being decoded, queued for
        OCR or in it): a live worker never loses a claim to the housekeeping of another,
        however long a document takes. A claim found lost anyway (a database away longer than
        a lease) stops that document's work here: the worker that has it now stores it,
        once."""
        held = self.table.held()
        stuck = self._stuck(held)
        try:
            renewed = self.ledger.renew(self.worker_id, [i for i in held if i not in stuck],
                                        self.settings.queue.lease_seconds)
            self._beat(len(held))
            self.outage.up()
        except StoreError as exc:
            self.outage.down(exc)
            return
        for document_id, doc in held.items():
            if document_id in stuck:
                self.outcomes.fail(doc, stuck[document_id], permanent=False)
            elif document_id not in renewed:
                self.outcomes.lost(doc)

    def _stuck(self, held: dict[int, InFlight]) -> dict[int, str]:
        """The documents inside a decoder or engine call that has lasted past
        `queue.stuck_seconds` (one that never returns), and why: their leases are not
        renewed, and their attempt fails (retried later, or failed for good after
        `queue.max_attempts`), so that neither this worker nor another waits on them."""
        reasons: dict[int, str] = {}
        for call in self.table.stuck_calls(self.settings.queue.stuck_seconds):
            for doc in call.docs:
                if doc.claim.document_id in held:
                    reasons[doc.claim.document_id] = (
                        f"no progress for {call.seconds():.0f}s: its {call.what} call never "
                        f"returned (queue.stuck_seconds = {self.settings.queue.stuck_seconds:g})")
        for document_id, reason in reasons.items():
            log.error("%s stuck: %s", held[document_id].path or
                      held[document_id].claim.sha256[:12], reason)
        return reasons

    def _beat(self, held: int) -> None:
        """This worker's row for `ocr-daemon status`; `ocr_workers` from all live rows."""
        now = time.monotonic()
        rate = (self.pages_done - self._beat_pages) / max(1e-9, now - self._beat_at)
        self._beat_at, self._beat_pages = now, self.pages_done
        live = self.ledger.beat(WorkerBeat(
            self.worker_id, socket.gethostname(), os.getpid(), self.provider, self.devices,
            held, rate, live_seconds=3 * self.heartbeat_seconds))
        self.metrics.workers.set(live)

    def requeue_expired(self) -> None:
        try:
            requeued = self.ledger.requeue_stale(max_attempts=self.settings.queue.max_attempts)
            self.outage.up()
        except StoreError as exc:
            self.outage.down(exc)
            return
        self.expired(requeued)

    def expired(self, claims: list[Expired], why: str = "whose lease ran out") -> None:
        """Claims taken back: those queued again said, those failed for good quarantined (they
        skipped quarantine and the error sidecar)."""
        queued = sum(1 for claim in claims if claim.state == State.QUEUED)
        if queued:
            log.info("re-queued %d documents %s", queued, why)
        for claim in claims:
            if claim.state == State.FAILED:
                log.error("failed %s: %s", claim.paths[-1] if claim.paths else claim.sha256,
                          claim.reason)
                self.outcomes.failed_for_good(claim.sha256, claim.reason, claim.paths)
