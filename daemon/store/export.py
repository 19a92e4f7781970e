"""`ocr-daemon export`: every stored document, for other tools, in constant memory.

Documents are read in id order, a batch at a time (keyset pagination: `id > last`), each batch
with its paths and pages in two more queries; nothing is held across batches, so 100k
documents cost what one batch does. Read-only; kept apart from the ledger's writes.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, select

from daemon.results import join_pages
from daemon.store.models import Document, DocumentPath, PageRow, State

BATCH = 200


def iter_documents(engine: Engine, since: datetime | None = None) -> Iterator[dict[str, Any]]:
    """Each done document (finished at or after `since`), as one JSON-ready dict. `since` is
    compared in UTC: SQLite keeps timestamps as naive UTC text, and an offset left on the
    bound value was dropped there, not applied (a `+01:00` bound missed an hour)."""
    if since is not None:
        since = since.astimezone(UTC) if since.tzinfo else since.replace(tzinfo=UTC)
    last = 0
    with engine.connect() as connection:
        while True:
            query = (select(Document.__table__)
                     .where(Document.state == State.DONE, Document.id > last)
                     .order_by(Document.id).limit(BATCH))
            if since is not None:
                query = query.where(Document.finished_at >= since)
            documents = connection.execute(query).mappings().all()
            if not documents:
                return
            ids = [doc["id"] for doc in documents]
            paths: dict[int, list[str]] = {i: [] for i in ids}
            for row in connection.execute(
                    select(DocumentPath.document_id, DocumentPath.path)
                    .where(DocumentPath.document_id.in_(ids)).order_by(DocumentPath.id)):
                paths[row.document_id].append(row.path)
            pages: dict[int, list[dict[str, Any]]] = {i: [] for i in ids}
            for row in connection.execute(
                    select(PageRow.document_id, PageRow.page_no, PageRow.text,
                           PageRow.confidence, PageRow.source, PageRow.lines)
                    .where(PageRow.document_id.in_(ids))
                    .order_by(PageRow.document_id, PageRow.page_no)):
                pages[row.document_id].append({
                    "page_no": row.page_no, "text": row.text, "confidence": row.confidence,
                    "source": row.source, "lines": row.lines})
            for doc in documents:
                mine = pages[doc["id"]]
                yield {
                    "sha256": doc["sha256"],
                    "paths": paths[doc["id"]],
                    "page_count": doc["page_count"],
                    "mean_confidence": doc["mean_confidence"],
                    "provider": doc["provider"],
                    "ocr_seconds": doc["ocr_seconds"],
                    "first_seen_at": _iso(doc["first_seen_at"]),
                    "finished_at": _iso(doc["finished_at"]),
                    "text": join_pages(page["text"] for page in mine),
                    "pages": mine,
                }
            last = ids[-1]


def _iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    if value.tzinfo is None:  # SQLite hands back naive UTC
        return value.isoformat() + "Z"
    return value.isoformat()
