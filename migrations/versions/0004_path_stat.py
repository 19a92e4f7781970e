"""document_paths remember what the file was when it was hashed (size, mtime, ctime, inode,
device): at a restart a file that still matches is not read and hashed again

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-27
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COLUMNS = ("st_size", "st_mtime_ns", "st_ctime_ns", "st_ino", "st_dev")


def upgrade() -> None:
    with op.batch_alter_table("document_paths") as batch:
        for name in COLUMNS:
            batch.add_column(sa.Column(name, sa.BigInteger, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("document_paths") as batch:
        for name in COLUMNS:
            batch.drop_column(name)
