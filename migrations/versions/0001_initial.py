"""documents, their paths, and their pages

Revision ID: 0001
Revises:
Create Date: 2026-11-26
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "documents",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("size_bytes", sa.BigInteger, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("reason", sa.Text),
        sa.Column("next_attempt_at", TS),
        sa.Column("claimed_by", sa.String(200)),
        sa.Column("lease_until", TS),
        sa.Column("first_seen_at", TS, nullable=False),
        sa.Column("started_at", TS),
        sa.Column("finished_at", TS),
        sa.Column("page_count", sa.Integer),
        sa.Column("mean_confidence", sa.Float),
        sa.Column("ocr_seconds", sa.Float),
        sa.Column("provider", sa.String(32)),
        sa.UniqueConstraint("sha256", name="uq_documents_sha256"),
    )
    op.create_index("ix_documents_state", "documents", ["state"])
    op.create_table(
        "document_paths",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column(
            "document_id",
            sa.Integer,
            sa.ForeignKey("documents.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("path", sa.Text, nullable=False),
        sa.Column("first_seen_at", TS, nullable=False),
        sa.Column("last_seen_at", TS, nullable=False),
        sa.UniqueConstraint("document_id", "path", name="uq_document_paths_doc_path"),
    )
    op.create_index("ix_document_paths_document_id", "document_paths", ["document_id"])
    op.create_index("ix_document_paths_path", "document_paths", ["path"])
    op.create_table(
        "pages",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column(
            "document_id",
            sa.Integer,
            sa.ForeignKey("documents.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("page_no", sa.Integer, nullable=False),
        sa.Column("text", sa.Text, nullable=False),
        sa.Column("confidence", sa.Float),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("lines", sa.JSON, nullable=False),
        sa.UniqueConstraint("document_id", "page_no", name="uq_pages_doc_page"),
    )
    op.create_index("ix_pages_document_id", "pages", ["document_id"])


def downgrade() -> None:
    op.drop_table("pages")
    op.drop_table("document_paths")
    op.drop_table("documents")
