"""Tables. Documents are keyed by the SHA-256 of their content; a document may have arrived
under several paths; its pages hold the text, mean confidence and the lines with boxes."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


class Base(DeclarativeBase):
    pass


class State:
    QUEUED = "queued"
    PROCESSING = "processing"
    DONE = "done"
    FAILED = "failed"
    ALL = (QUEUED, PROCESSING, DONE, FAILED)


class Document(Base):
    __tablename__ = "documents"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    sha256: Mapped[str] = mapped_column(String(64), unique=True)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    state: Mapped[str] = mapped_column(String(16), index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    reason: Mapped[str | None] = mapped_column(Text)
    next_attempt_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    claimed_by: Mapped[str | None] = mapped_column(String(200))
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    first_seen_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    page_count: Mapped[int | None] = mapped_column(Integer)
    mean_confidence: Mapped[float | None] = mapped_column(Float)
    ocr_seconds: Mapped[float | None] = mapped_column(Float)
    provider: Mapped[str | None] = mapped_column(String(32))

    paths: Mapped[list[DocumentPath]] = relationship(
        back_populates="document", cascade="all, delete-orphan", order_by="DocumentPath.id"
    )
    pages: Mapped[list[PageRow]] = relationship(
        back_populates="document", cascade="all, delete-orphan", order_by="PageRow.page_no"
    )


class DocumentPath(Base):
    __tablename__ = "document_paths"
    __table_args__ = (UniqueConstraint("document_id", "path", name="uq_document_paths_doc_path"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    document_id: Mapped[int] = mapped_column(
        ForeignKey("documents.id", ondelete="CASCADE"), index=True
    )
    path: Mapped[str] = mapped_column(Text, index=True)
    first_seen_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    last_seen_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    # what the file was when it was hashed: a restart does not hash a file that still matches
    st_size: Mapped[int | None] = mapped_column(BigInteger)
    st_mtime_ns: Mapped[int | None] = mapped_column(BigInteger)
    st_ctime_ns: Mapped[int | None] = mapped_column(BigInteger)
    st_ino: Mapped[int | None] = mapped_column(BigInteger)
    st_dev: Mapped[int | None] = mapped_column(BigInteger)

    document: Mapped[Document] = relationship(back_populates="paths")


class PageRow(Base):
    __tablename__ = "pages"
    __table_args__ = (
        UniqueConstraint("document_id", "page_no", name="uq_pages_doc_page"),
        Index("ix_pages_document_id", "document_id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    document_id: Mapped[int] = mapped_column(ForeignKey("documents.id", ondelete="CASCADE"))
    page_no: Mapped[int] = mapped_column(Integer)  # 1-based
    text: Mapped[str] = mapped_column(Text)
    folded: Mapped[str | None] = mapped_column(Text)  # `text` folded for search (store/fold.py)
    confidence: Mapped[float | None] = mapped_column(Float)
    source: Mapped[str] = mapped_column(String(16))  # "ocr" | "text_layer"
    lines: Mapped[list[dict[str, Any]]] = mapped_column(JSON)

    document: Mapped[Document] = relationship(back_populates="pages")


class DocumentEvent(Base):
    """History: failures, operator retries and forgets. By content hash, not a foreign key:
    it outlives a forgotten document."""

    __tablename__ = "document_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    event: Mapped[str] = mapped_column(String(16))  # failed | retry | forget
    attempt: Mapped[int | None] = mapped_column(Integer)
    detail: Mapped[str | None] = mapped_column(Text)


class Worker(Base):
    """A running daemon's heartbeat row (removed when it stops cleanly)."""

    __tablename__ = "workers"

    id: Mapped[str] = mapped_column(String(200), primary_key=True)  # the claims' worker id
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    provider: Mapped[str] = mapped_column(String(32))
    devices: Mapped[str] = mapped_column(String(200))
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    last_seen_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    documents_held: Mapped[int] = mapped_column(Integer)
    pages_per_second: Mapped[float] = mapped_column(Float)
