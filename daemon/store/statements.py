"""The statements of one document's way through the ledger (register, claim, store), for
both dialects, built once with bound parameters and run on a plain connection: building a
statement, its cache key and an ORM session cost the main process ~7x the database work itself
(measured: a claim 2.1 ms through the ORM, 0.3 ms so, on SQLite), and the daemon runs them for
every file. Those whose name ends in `_PG` are PostgreSQL's, `_SQLITE` SQLite's; the rest run
on both."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Float,
    Integer,
    Text,
    bindparam,
    cast,
    delete,
    func,
    insert,
    or_,
    select,
    true,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from daemon.files import PathStat
from daemon.store.models import Document, DocumentPath, PageRow, State

DELETE_REJECTED = delete(Document).where(Document.sha256 == bindparam("rejection"))
DOCUMENT_BY_HASH = select(Document.id, Document.state, Document.reason).where(
    Document.sha256 == bindparam("sha256"))
# PostgreSQL: the known document read under a share lock, so that a duplicate registered while
# its original is being stored waits for that transaction (its UPDATE holds the row) and sees
# it done, or makes the store wait and be among the paths it reads: without it, each side saw
# the other not yet, and the duplicate stayed in the inbox until a restart.
DOCUMENT_BY_HASH_PG = DOCUMENT_BY_HASH.with_for_update(read=True)
# A new document, or no row when its content is known: one statement where a lookup and an
# insert were two. On PostgreSQL it also clears the refusal of a file now read (a CTE): one
# round trip, not three.
INSERT_NEW_SQLITE = (sqlite_insert(Document).on_conflict_do_nothing(
    index_elements=[Document.sha256]).returning(Document.id))
# (its values named: as a CTE below an insert it would otherwise get anonymous parameters)
INSERT_NEW_PG = (postgresql_insert(Document).values(
    {column: bindparam(column) for column in ("sha256", "size_bytes", "state", "attempts",
                                              "first_seen_at")})
    .on_conflict_do_nothing(index_elements=[Document.sha256]).returning(Document.id))
INSERT_NEW_CLEARING_PG = INSERT_NEW_PG.add_cte(DELETE_REJECTED.cte("refusal_cleared"))
# PostgreSQL, a new file's whole registration in one autocommit statement (one round trip,
# not four: BEGIN, the document, its path, COMMIT): the refusal of the path cleared, the
# document inserted unless its content is known, and its path recorded with it. No row back:
# the content is known, and the transaction below takes over.
STAT_COLUMNS = ("st_size", "st_mtime_ns", "st_ctime_ns", "st_ino", "st_dev")
NEW_DOCUMENT_PG = INSERT_NEW_PG.cte("new_document")
SEEN_AT = bindparam("first_seen_at", type_=DateTime(timezone=True))
REGISTER_NEW_PG = (insert(DocumentPath).from_select(
    ["document_id", "path", "first_seen_at", "last_seen_at", *STAT_COLUMNS],
    select(NEW_DOCUMENT_PG.c.id, bindparam("path", type_=Text), SEEN_AT, SEEN_AT,
           *(bindparam(column, type_=BigInteger) for column in STAT_COLUMNS)))
    .returning(DocumentPath.document_id)
    .add_cte(DELETE_REJECTED.cte("refusal_cleared")).add_cte(NEW_DOCUMENT_PG))


def rows_given(alias: str, columns: Sequence[tuple[str, Any, Any]], **options: Any) -> Any:
    """PostgreSQL: rows sent as one array a column, unnested into a table named `alias`.
    Each column: its name (the array is bound as `{name}s`), the type of the array sent, and
    the type it is cast to."""
    return func.unnest(*(cast(bindparam(f"{name}s", type_=ARRAY(sent)), ARRAY(stored))
                         for name, sent, stored in columns)).table_valued(
        *(name for name, _, _ in columns), **options).render_derived(name=alias)


# PostgreSQL, the new files the watcher found ready together, all in one such statement:
# the files given as arrays, the first of each content (in the order given) inserted unless
# its content is known, its path recorded with it; each path so recorded comes back. Any
# other (a content already stored, a second file of one content) goes through `register`.
FILES_GIVEN = rows_given("file", (
    ("path", Text, Text), ("sha256", Text, Text), ("size_bytes", BigInteger, BigInteger),
    *((column, BigInteger, BigInteger) for column in STAT_COLUMNS)), with_ordinality="n")
FILES = select(FILES_GIVEN).cte("files")
FIRST_OF_EACH = (select(FILES).where(FILES.c.n.in_(
    select(func.min(FILES.c.n)).group_by(FILES.c.sha256))).cte("first_of_each"))
NEW_DOCUMENTS_PG = (postgresql_insert(Document).from_select(
    ["sha256", "size_bytes", "state", "attempts", "first_seen_at"],
    select(FIRST_OF_EACH.c.sha256, FIRST_OF_EACH.c.size_bytes,
           bindparam("state", type_=Text), bindparam("attempts", type_=Integer), SEEN_AT)
    .order_by(FIRST_OF_EACH.c.n))  # ids in the order the files came
    .on_conflict_do_nothing(index_elements=[Document.sha256])
    .returning(Document.id, Document.sha256).cte("new_documents"))
REGISTER_NEW_MANY_PG = (insert(DocumentPath).from_select(
    ["document_id", "path", "first_seen_at", "last_seen_at", *STAT_COLUMNS],
    select(NEW_DOCUMENTS_PG.c.id, FIRST_OF_EACH.c.path, SEEN_AT, SEEN_AT,
           *(FIRST_OF_EACH.c[column] for column in STAT_COLUMNS))
    .join_from(NEW_DOCUMENTS_PG, FIRST_OF_EACH,
               FIRST_OF_EACH.c.sha256 == NEW_DOCUMENTS_PG.c.sha256))
    .returning(DocumentPath.document_id, DocumentPath.path)
    .add_cte(delete(Document).where(Document.sha256 == func.any(
        bindparam("rejections", type_=ARRAY(Text)))).cte("refusals_cleared"))
    .add_cte(FILES).add_cte(FIRST_OF_EACH).add_cte(NEW_DOCUMENTS_PG))
# SQLite, the same in one transaction: the documents of a batch in one INSERT of many rows
# (SQLAlchemy's "insertmanyvalues"), a content already there skipped; its rows say which
INSERT_NEW_MANY_SQLITE = (sqlite_insert(Document).on_conflict_do_nothing(
    index_elements=[Document.sha256]).returning(Document.id, Document.sha256))
PATH_ID = select(DocumentPath.id).where(DocumentPath.document_id == bindparam("doc"),
                                         DocumentPath.path == bindparam("path"))
INSERT_PATH = insert(DocumentPath)
FAIL_REJECTED = (update(Document).where(Document.id == bindparam("doc"))
                  .values(state=State.FAILED, reason=bindparam("reason"),
                          finished_at=bindparam("now")))
KNOWN_PATH = (select(Document.id, Document.sha256, Document.state, Document.reason)
               .join(DocumentPath, DocumentPath.document_id == Document.id)
               .where(DocumentPath.path == bindparam("path"),
                      *(getattr(DocumentPath, name) == bindparam(name)
                        for name in STAT_COLUMNS))
               .limit(1))
KNOWN_PATHS = (select(DocumentPath.path, *(getattr(DocumentPath, name) for name in STAT_COLUMNS),
                       Document.id, Document.sha256, Document.state, Document.reason)
                .join(DocumentPath, DocumentPath.document_id == Document.id)
                .where(DocumentPath.path.in_(bindparam("paths", expanding=True))))
# The oldest due queued documents, `limit` at most: on PostgreSQL locked as they are chosen,
# skipping those another claimer holds (a CTE: chosen once, however the UPDATE is planned)
DUE = (select(Document.id)
        .where(Document.state == State.QUEUED,
               or_(Document.next_attempt_at.is_(None),
                   Document.next_attempt_at <= bindparam("now")),
               Document.id.not_in(bindparam("exclude", expanding=True)))
        .order_by(Document.id)
        .limit(bindparam("limit")))
CLAIM_VALUES = {"state": State.PROCESSING, "claimed_by": bindparam("worker"),
                 "lease_until": bindparam("lease_until"), "started_at": bindparam("now"),
                 "attempts": Document.attempts + 1}
CLAIM_RETURNS = (Document.id, Document.sha256, Document.attempts, Document.first_seen_at,
                  Document.size_bytes)
CLAIM_SQLITE = (update(Document)  # no row locks, one writer at a time
                 .where(Document.id.in_(DUE), Document.state == State.QUEUED)
                 .values(CLAIM_VALUES).returning(*CLAIM_RETURNS))
PICKED_PG = DUE.with_for_update(skip_locked=True).cte("picked")
CLAIM_PG = (update(Document)
             .where(Document.id == PICKED_PG.c.id, Document.state == State.QUEUED)
             .values(CLAIM_VALUES).returning(*CLAIM_RETURNS))
PATHS_OF = (select(DocumentPath.path).where(DocumentPath.document_id == bindparam("doc"))
             .order_by(DocumentPath.id))
PATHS_OF_EACH = (select(DocumentPath.document_id, DocumentPath.path)
                  .where(DocumentPath.document_id.in_(bindparam("docs", expanding=True)))
                  .order_by(DocumentPath.id))


def paths_array(document_id: Any) -> Any:
    """PostgreSQL: the paths of `document_id` (a column), in their order, as one array
    column: read in the statement that claims or stores the document, not in another."""
    return func.array(select(DocumentPath.path).where(DocumentPath.document_id == document_id)
                      .order_by(DocumentPath.id).scalar_subquery()).label("paths")


# the claims and their paths in one statement, one round trip (PostgreSQL: an UPDATE …
# RETURNING may be a CTE); the paths' subquery sees the rows committed before it, as the next
# statement would
CLAIMED_PG = CLAIM_PG.cte("claimed")
CLAIM_WITH_PATHS_PG = select(CLAIMED_PG, paths_array(CLAIMED_PG.c.id))
COMPLETE = (update(Document)
             .where(Document.id == bindparam("doc"), Document.state == State.PROCESSING,
                    Document.claimed_by == bindparam("worker"))
             .values(state=State.DONE, reason=None, page_count=bindparam("page_count"),
                     mean_confidence=bindparam("mean_confidence"),
                     ocr_seconds=bindparam("ocr_seconds"), provider=bindparam("provider"),
                     finished_at=bindparam("now"), claimed_by=None, lease_until=None,
                     next_attempt_at=None))
DELETE_PAGES = delete(PageRow).where(PageRow.document_id == bindparam("doc"))
INSERT_PAGES = insert(PageRow)
# PostgreSQL: a document stored in one autocommit statement, one round trip where the
# transaction took six: the conditional update (a CTE), its pages inserted from arrays only
# if it held, and its paths read beside them. A page already there (a document stored
# before) breaks the pages' unique key, and the whole statement with it: the transaction
# then runs as before, deleting the old pages first.
# (each column: its name, the array sent, the array it is cast to: lines go as JSON text)
PAGE_ARRAYS = (("page_no", Integer, Integer), ("text", Text, Text), ("folded", Text, Text),
                ("confidence", Float, Float), ("source", Text, Text), ("lines", Text, JSON))
HELD_PG = COMPLETE.returning(Document.id).cte("held")
PAGES_GIVEN = rows_given("page", PAGE_ARRAYS)
STORED_PG = (postgresql_insert(PageRow)
              .from_select(["document_id", *(name for name, _, _ in PAGE_ARRAYS)],
                           select(HELD_PG.c.id, *(PAGES_GIVEN.c[name]
                                                   for name, _, _ in PAGE_ARRAYS))
                           .select_from(HELD_PG.join(PAGES_GIVEN, true())))
              .cte("stored"))
# (the paths are read after its commit, in a statement of their own: `Ledger.complete`)
COMPLETE_PG = select(HELD_PG.c.id).add_cte(STORED_PG)


def stat_columns(stat: PathStat | None) -> dict[str, int | None]:
    """A new path row's stat columns: None each when it is recorded without its stat."""
    columns: dict[str, int | None] = dict.fromkeys(STAT_COLUMNS)
    if stat is not None:
        columns.update(stat.columns())
    return columns

