"""The operator commands' side of the ledger: retry and forget, the history of a document,
counts and status, and finding a document by hash or path (`ocr-daemon retry|forget|status|
text`). Not on the daemon's path for a file; `export` reads in bulk on its own
(`daemon.store.export`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.orm import selectinload

from daemon.errors import NotFoundError
from daemon.store.access import Access
from daemon.store.models import Document, DocumentEvent, DocumentPath, PageRow, State, Worker
from daemon.store.records import (
    SHA256_RE,
    Retried,
    StoredDocument,
    StoredPage,
    as_utc,
    rejection_key,
)


class OperatorQueries(Access):
    # -- operator commands ----------------------------------------------------------------

    def retry(self, document_ids: Sequence[int] | None = None) -> list[Retried]:
        """Failed documents back to `queued` (all of them with None), attempts reset; the
        reason each had goes to the history. A document in any other state is left alone.
        A running daemon claims them at its next look (within a second)."""
        now = self._clock()
        with self._sessions.begin() as session:
            query = (select(Document).options(selectinload(Document.paths))
                     .where(Document.state == State.FAILED).order_by(Document.id)
                     .with_for_update())
            if document_ids is not None:
                query = query.where(Document.id.in_(list(document_ids)))
            retried = []
            for doc in session.scalars(query).all():
                paths = tuple(p.path for p in doc.paths)
                # refused before it was read: no content to queue; the caller reads it again
                rejected = any(doc.sha256 == rejection_key(path) for path in paths)
                retried.append(Retried(doc.id, doc.sha256, paths, doc.reason, rejected))
                if rejected:
                    continue
                session.add(DocumentEvent(sha256=doc.sha256, at=now, event="retry",
                                          attempt=doc.attempts, detail=doc.reason))
                doc.state, doc.attempts, doc.reason = State.QUEUED, 0, None
                doc.next_attempt_at = doc.finished_at = None
                doc.claimed_by = doc.lease_until = None
            return retried

    def forget(self, document_id: int) -> bool:
        """Remove a document, its paths and its text (history kept). False when it is gone
        already. A daemon processing it finds the claim gone and stores nothing."""
        now = self._clock()
        with self._sessions.begin() as session:
            doc = session.get(Document, document_id, with_for_update=True)
            if doc is None:
                return False
            session.add(DocumentEvent(sha256=doc.sha256, at=now, event="forget",
                                      attempt=doc.attempts, detail=f"was {doc.state}"))
            session.execute(delete(Document).where(Document.id == document_id))
            return True

    def history(self, sha256: str) -> list[dict[str, Any]]:
        with self._sessions() as session:
            events = session.scalars(select(DocumentEvent)
                                     .where(DocumentEvent.sha256 == sha256)
                                     .order_by(DocumentEvent.id)).all()
            return [{"at": (as_utc(e.at) or e.at).isoformat(), "event": e.event,
                     "attempt": e.attempt, "detail": e.detail} for e in events]

    def workers(self, live_seconds: float | None = None) -> list[dict[str, Any]]:
        """The daemons' rows; with `live_seconds` (a lease: three missed heartbeats), each
        says whether it is `alive`: a row not seen for longer is a daemon gone (killed, its
        host down), whose held documents return to the queue as their leases run out."""
        now = self._clock()
        listed = []
        with self._sessions() as session:
            for w in session.scalars(select(Worker).order_by(Worker.host, Worker.id)):
                seen = (now - (as_utc(w.last_seen_at) or w.last_seen_at)).total_seconds()
                listed.append({
                    "id": w.id, "host": w.host, "pid": w.pid, "provider": w.provider,
                    "devices": w.devices, "documents_held": w.documents_held,
                    "pages_per_second": round(w.pages_per_second, 2),
                    "started_at": (as_utc(w.started_at) or w.started_at).isoformat(),
                    "seconds_since_heartbeat": round(seen, 1),
                    "alive": live_seconds is None or seen <= live_seconds,
                })
        return listed

    # -- reading --------------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        with self._sessions() as session:
            rows = session.execute(select(Document.state, func.count()).group_by(Document.state))
            found = {state: int(n) for state, n in rows}
        return {state: found.get(state, 0) for state in State.ALL}

    def status(self, failures: int = 20, live_seconds: float | None = None) -> dict[str, Any]:
        with self._sessions() as session:
            failed = session.scalars(
                select(Document)
                .options(selectinload(Document.paths))
                .where(Document.state == State.FAILED)
                .order_by(Document.finished_at.desc(), Document.id.desc())
                .limit(failures)
            ).all()
            pages = session.scalar(select(func.count()).select_from(PageRow)) or 0
            failure_list = [
                {"path": d.paths[-1].path if d.paths else None, "sha256": d.sha256,
                 "reason": d.reason, "attempts": d.attempts}
                for d in failed
            ]
        return {"documents": self.counts(), "pages": int(pages), "failures": failure_list,
                "workers": self.workers(live_seconds)}

    def find(self, ref: str, candidates: Sequence[str] = ()) -> StoredDocument:
        """A document by SHA-256, or by any path it arrived under (`candidates` are the
        spellings of the path the caller tried: as given, absolute, resolved)."""
        with self._sessions() as session:
            query = select(Document).options(selectinload(Document.paths),
                                             selectinload(Document.pages))
            doc = None
            if SHA256_RE.match(ref):
                doc = session.scalars(query.where(Document.sha256 == ref.lower())).first()
            if doc is None and candidates:
                path_row = session.scalars(
                    select(DocumentPath)
                    .where(DocumentPath.path.in_(list(candidates)))
                    .order_by(DocumentPath.last_seen_at.desc(), DocumentPath.id.desc())
                    .limit(1)
                ).first()
                if path_row is not None:
                    doc = session.scalars(
                        query.where(Document.id == path_row.document_id)).first()
            if doc is None:
                raise NotFoundError(f"no document for {ref!r}")
            return StoredDocument(
                id=doc.id, sha256=doc.sha256, state=doc.state, reason=doc.reason,
                paths=tuple(p.path for p in doc.paths),
                pages=tuple(StoredPage(p.page_no, p.text, p.confidence, p.source, p.lines)
                            for p in doc.pages),
                attempts=doc.attempts, mean_confidence=doc.mean_confidence,
            )

