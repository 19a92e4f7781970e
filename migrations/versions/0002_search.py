"""full-text search over page text

SQLite: an FTS5 table with the trigram tokenizer over `pages.text` (external content: the
text is not stored twice), kept in step by triggers. Trigrams match any substring of three or
more characters, so Chinese and Japanese (no spaces between words) and word parts are found.

PostgreSQL: pg_trgm's GIN index serves the substring match (`ILIKE`, any script), and a stored
`tsvector` column with the language-neutral `simple` configuration feeds `ts_rank`, so pages
where the query words occur as whole words, and often, rank first.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26
"""

import sqlite3
from collections.abc import Sequence

from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SQLITE_UP = [
    "CREATE VIRTUAL TABLE pages_fts USING fts5("
    "text, content='pages', content_rowid='id', tokenize='trigram')",
    # The 'delete' command of an external-content table needs the old text to remove its
    # trigrams; cascaded deletes (documents -> pages) fire these triggers too.
    """CREATE TRIGGER pages_fts_insert AFTER INSERT ON pages BEGIN
        INSERT INTO pages_fts(rowid, text) VALUES (new.id, new.text);
    END""",
    """CREATE TRIGGER pages_fts_delete AFTER DELETE ON pages BEGIN
        INSERT INTO pages_fts(pages_fts, rowid, text) VALUES ('delete', old.id, old.text);
    END""",
    """CREATE TRIGGER pages_fts_update AFTER UPDATE OF text ON pages BEGIN
        INSERT INTO pages_fts(pages_fts, rowid, text) VALUES ('delete', old.id, old.text);
        INSERT INTO pages_fts(rowid, text) VALUES (new.id, new.text);
    END""",
    "INSERT INTO pages_fts(pages_fts) VALUES ('rebuild')",  # pages stored before 0002
]

SQLITE_DOWN = [
    "DROP TRIGGER IF EXISTS pages_fts_update",
    "DROP TRIGGER IF EXISTS pages_fts_delete",
    "DROP TRIGGER IF EXISTS pages_fts_insert",
    "DROP TABLE IF EXISTS pages_fts",
]

POSTGRESQL_UP = [
    # A trusted extension since PostgreSQL 13: the database owner may create it.
    "CREATE EXTENSION IF NOT EXISTS pg_trgm",
    "CREATE INDEX ix_pages_text_trgm ON pages USING gin (text gin_trgm_ops)",
    # Generated, so existing rows are filled now and new ones by PostgreSQL itself.
    "ALTER TABLE pages ADD COLUMN text_tsv tsvector "
    "GENERATED ALWAYS AS (to_tsvector('simple'::regconfig, text)) STORED",
]

POSTGRESQL_DOWN = [
    "ALTER TABLE pages DROP COLUMN IF EXISTS text_tsv",
    "DROP INDEX IF EXISTS ix_pages_text_trgm",
    # pg_trgm stays: it may have been there before, and other schemas may use it.
]


def _run(statements: list[str]) -> None:
    for statement in statements:
        op.execute(statement)


def upgrade() -> None:
    dialect = op.get_bind().dialect.name
    if dialect == "sqlite":
        if sqlite3.sqlite_version_info < (3, 34, 0):
            raise RuntimeError(
                f"SQLite {sqlite3.sqlite_version} has no FTS5 trigram tokenizer; "
                "search needs SQLite 3.34 or newer (Python's sqlite3 module is linked to it)")
        _run(SQLITE_UP)
    elif dialect == "postgresql":
        _run(POSTGRESQL_UP)


def downgrade() -> None:
    dialect = op.get_bind().dialect.name
    if dialect == "sqlite":
        _run(SQLITE_DOWN)
    elif dialect == "postgresql":
        _run(POSTGRESQL_DOWN)
