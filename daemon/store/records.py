"""The value types the ledger hands out and takes: what a registration, a claim, a stored
document, a search hit, a worker's beat are. Plain data, no SQL."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from daemon.files import PathStat
from daemon.results import PageResult, join_pages, lines_from_json, lines_json
from daemon.store.fold import fold

SHA256_RE = re.compile(r"^[0-9a-fA-F]{64}$")



def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(value: datetime | None) -> datetime | None:
    """SQLite hands timestamps back naive; they were written in UTC."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


@dataclass(frozen=True)
class Registration:
    document_id: int
    sha256: str
    state: str
    created: bool
    path_added: bool
    reason: str | None = None  # why it failed, when it did


@dataclass(frozen=True)
class NewFile:
    """A file hashed for `Ledger.register_many`: its path, content and what it was then."""

    path: str
    sha256: str
    size: int
    stat: PathStat | None


@dataclass(frozen=True)
class Claim:
    document_id: int
    sha256: str
    attempts: int
    paths: tuple[str, ...]
    first_seen_at: datetime
    size_bytes: int = 0


@dataclass(frozen=True)
class StoredPage:
    page_no: int
    text: str
    confidence: float | None
    source: str
    lines: list[dict[str, Any]]

    def result(self) -> PageResult:
        """The page as OCR gave it (what the outputs are made from)."""
        source: Literal["ocr", "text_layer"] = ("text_layer" if self.source == "text_layer"
                                                else "ocr")
        return PageResult(lines=lines_from_json(self.lines), source=source)


@dataclass(frozen=True)
class StoredDocument:
    id: int
    sha256: str
    state: str
    reason: str | None
    paths: tuple[str, ...]
    pages: tuple[StoredPage, ...]
    attempts: int
    mean_confidence: float | None

    @property
    def text(self) -> str:
        return join_pages(page.text for page in self.pages)


@dataclass(frozen=True)
class SearchHit:
    path: str
    sha256: str
    page_no: int
    snippet: str  # the matches marked: [match]
    score: float  # higher is better; comparable within one result list only


@dataclass(frozen=True)
class WorkerBeat:
    id: str
    host: str
    pid: int
    provider: str
    devices: str
    documents_held: int
    pages_per_second: float
    live_seconds: float  # a worker not seen for this long counts as gone


@dataclass(frozen=True)
class Retried:
    document_id: int
    sha256: str
    paths: tuple[str, ...]
    reason: str | None  # why it had failed
    rejected: bool = False  # refused before it was read: left failed, to be read again


@dataclass(frozen=True)
class Expired:
    """A claim whose worker died or hung: queued again, or failed for good (its attempts used
    up) with its paths, to quarantine."""

    sha256: str
    state: str  # queued or failed
    reason: str
    paths: tuple[str, ...]


@dataclass(frozen=True)
class FailureResult:
    state: str  # queued (will be retried) or failed
    attempts: int
    paths: tuple[str, ...]


def rejection_key(path: str) -> str:
    """The row of a file refused before its content was read is keyed by its path."""
    return hashlib.sha256(f"rejected:{path}".encode()).hexdigest()


def page_row(document_id: int, page_no: int, page: PageResult) -> dict[str, Any]:
    """The `pages` row of one page, as `statements.INSERT_PAGES` takes it."""
    return {"document_id": document_id, "page_no": page_no, "text": page.text,
            "folded": fold(page.text), "confidence": page.confidence, "source": page.source,
            "lines": lines_json(page.lines)}
