"""pages.folded: the page text folded for search (Traditional/Simplified Chinese, full/half
width, case: daemon/store/fold.py); the indexes move to it

SQLite: the FTS5 trigram table indexes `folded` (external content, kept in step by triggers).
PostgreSQL: the pg_trgm GIN index is on `folded`; `text_tsv` (ranking) stays on the text.
Existing pages are folded here, in batches.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-27
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from daemon.store.fold import fold

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BATCH = 500

SQLITE_DROP_TEXT_INDEX = [
    "DROP TRIGGER IF EXISTS pages_fts_update",
    "DROP TRIGGER IF EXISTS pages_fts_delete",
    "DROP TRIGGER IF EXISTS pages_fts_insert",
    "DROP TABLE IF EXISTS pages_fts",
]


def _sqlite_index(column: str) -> list[str]:
    return [
        f"CREATE VIRTUAL TABLE pages_fts USING fts5({column}, content='pages', "
        "content_rowid='id', tokenize='trigram')",
        f"""CREATE TRIGGER pages_fts_insert AFTER INSERT ON pages BEGIN
            INSERT INTO pages_fts(rowid, {column}) VALUES (new.id, new.{column});
        END""",
        f"""CREATE TRIGGER pages_fts_delete AFTER DELETE ON pages BEGIN
            INSERT INTO pages_fts(pages_fts, rowid, {column})
            VALUES ('delete', old.id, old.{column});
        END""",
        f"""CREATE TRIGGER pages_fts_update AFTER UPDATE OF {column} ON pages BEGIN
            INSERT INTO pages_fts(pages_fts, rowid, {column})
            VALUES ('delete', old.id, old.{column});
            INSERT INTO pages_fts(rowid, {column}) VALUES (new.id, new.{column});
        END""",
        "INSERT INTO pages_fts(pages_fts) VALUES ('rebuild')",
    ]


def _run(statements: list[str]) -> None:
    for statement in statements:
        op.execute(statement)


def _backfill() -> None:
    bind = op.get_bind()
    last = 0
    while True:
        rows = bind.execute(sa.text("SELECT id, text FROM pages WHERE id > :last ORDER BY id "
                                    "LIMIT :n"), {"last": last, "n": BATCH}).all()
        if not rows:
            return
        bind.execute(sa.text("UPDATE pages SET folded = :folded WHERE id = :id"),
                     [{"id": row.id, "folded": fold(row.text)} for row in rows])
        last = rows[-1].id


def upgrade() -> None:
    dialect = op.get_bind().dialect.name
    if dialect == "sqlite":
        _run(SQLITE_DROP_TEXT_INDEX)
    op.add_column("pages", sa.Column("folded", sa.Text, nullable=True))
    _backfill()
    if dialect == "sqlite":
        _run(_sqlite_index("folded"))
    elif dialect == "postgresql":
        _run(["CREATE INDEX ix_pages_folded_trgm ON pages USING gin (folded gin_trgm_ops)",
              "DROP INDEX IF EXISTS ix_pages_text_trgm"])


def downgrade() -> None:
    dialect = op.get_bind().dialect.name
    if dialect == "sqlite":
        _run(SQLITE_DROP_TEXT_INDEX)
    elif dialect == "postgresql":
        _run(["CREATE INDEX ix_pages_text_trgm ON pages USING gin (text gin_trgm_ops)",
              "DROP INDEX IF EXISTS ix_pages_folded_trgm"])
    with op.batch_alter_table("pages") as batch:
        batch.drop_column("folded")
    if dialect == "sqlite":
        _run(_sqlite_index("text"))
