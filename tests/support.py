"""Helpers the test modules share (no test module imports another): waiting for a condition,
and claiming through the ledger's one claim path the way a test needs it."""

from __future__ import annotations

import time
from collections.abc import Callable

from sqlalchemy import select

from daemon.store.ledger import Ledger
from daemon.store.models import Document, State
from daemon.store.records import Claim


def wait_until(predicate: Callable[[], object], timeout: float, interval: float = 0.05) -> bool:
    """Poll `predicate` until it is true or `timeout` seconds pass; its last answer."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return bool(predicate())
        time.sleep(interval)


def claim_one(ledger: Ledger, document_id: int, worker: str = "w", lease_seconds: float = 60
          ) -> Claim | None:
    """Claim this one document through `claim_many` (the daemon's only claim path), every
    other queued document excluded; None when it is not due or someone else has it."""
    with ledger.engine.connect() as conn:
        others = list(conn.scalars(select(Document.id).where(
            Document.state == State.QUEUED, Document.id != document_id)))
    claims = ledger.claim_many(worker, lease_seconds, 1, others)
    assert not claims or claims[0].document_id == document_id
    return claims[0] if claims else None


def claim_next(ledger: Ledger, worker: str = "w", lease_seconds: float = 60,
               exclude: list[int] | None = None) -> Claim | None:
    """The oldest due queued document, as the pipeline's claim of one slot takes it."""
    claims = ledger.claim_many(worker, lease_seconds, 1, exclude or [])
    return claims[0] if claims else None


def paths_of(ledger: Ledger, document_id: int) -> tuple[str, ...]:
    """Every path the ledger knows the document under, in the order they were recorded."""
    from daemon.store.models import DocumentPath

    with ledger.engine.connect() as conn:
        return tuple(conn.scalars(select(DocumentPath.path).where(
            DocumentPath.document_id == document_id).order_by(DocumentPath.id)))
