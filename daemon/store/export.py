"""`ocr-daemon export`: every stored document, for other tools, in constant memory.

Documents are read in id order, a batch at a time (keyset pagination: `id > last`), each batch
with its paths in one more query and its pages in runs of PAGE_BYTES at most (their sizes
asked first); nothing is held across runs, so 100k documents, or 200 of 500 pages, cost what
one run does. Read-only; kept apart from the ledger's writes.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, Text, cast, func, select

from daemon.results import join_pages
from daemon.store.models import Document, DocumentPath, PageRow, State

BATCH = 200  # documents a query reads (their rows, not their pages)
PAGE_BYTES = 16 << 20  # pages (text and lines) read at once at most, unless one document has more


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
            sizes: dict[int, int | None] = dict(connection.execute(
                select(PageRow.document_id, func.sum(func.length(PageRow.text)
                                                     + func.length(cast(PageRow.lines, Text))))
                .where(PageRow.document_id.in_(ids)).group_by(PageRow.document_id)).all())
            for chunk in _chunks(documents, sizes):
                pages = _pages_of(connection, [doc["id"] for doc in chunk])
                for doc in chunk:
                    yield _exported(doc, paths[doc["id"]], pages[doc["id"]])
            last = ids[-1]


def _chunks(documents: Sequence[Any], sizes: dict[int, int | None]) -> Iterator[list[Any]]:
    """The documents in runs whose pages (text and lines) come to PAGE_BYTES at most, or one
    document alone: 200 documents of 500 pages were held at once before."""
    chunk: list[Any] = []
    held = 0
    for doc in documents:
        size = int(sizes.get(doc["id"]) or 0)
        if chunk and held + size > PAGE_BYTES:
            yield chunk
            chunk, held = [], 0
        chunk.append(doc)
        held += size
    if chunk:
        yield chunk


def _pages_of(connection: Any, ids: list[int]) -> dict[int, list[dict[str, Any]]]:
    pages: dict[int, list[dict[str, Any]]] = {i: [] for i in ids}
    for row in connection.execute(
            select(PageRow.document_id, PageRow.page_no, PageRow.text,
                   PageRow.confidence, PageRow.source, PageRow.lines)
            .where(PageRow.document_id.in_(ids))
            .order_by(PageRow.document_id, PageRow.page_no)):
        pages[row.document_id].append({
            "page_no": row.page_no, "text": row.text, "confidence": row.confidence,
            "source": row.source, "lines": row.lines})
    return pages


def _exported(doc: Any, paths: list[str], mine: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "sha256": doc["sha256"],
        "paths": paths,
        "page_count": doc["page_count"],
        "mean_confidence": doc["mean_confidence"],
        "provider": doc["provider"],
        "ocr_seconds": doc["ocr_seconds"],
        "first_seen_at": _iso(doc["first_seen_at"]),
        "finished_at": _iso(doc["finished_at"]),
        "text": join_pages(page["text"] for page in mine),
        "pages": mine,
    }


def _iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    if value.tzinfo is None:  # SQLite hands back naive UTC
        return value.isoformat() + "Z"
    return value.isoformat()
