"""document_events: what happened to a document, kept when the document row changes or goes

Each failure (with its reason and attempt), each operator `retry` (with the reason it had)
and `forget`. Keyed by the content's SHA-256, not a foreign key, so the history of a forgotten
document stays.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "document_events",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("event", sa.String(16), nullable=False),
        sa.Column("attempt", sa.Integer),
        sa.Column("detail", sa.Text),
    )
    op.create_index("ix_document_events_sha256", "document_events", ["sha256"])


def downgrade() -> None:
    op.drop_index("ix_document_events_sha256", table_name="document_events")
    op.drop_table("document_events")
