"""The ledger and text store: the only module that writes to the ledger.

It is longer than our ~400-line habit on purpose (~860): every statement that changes the
ledger, and the queries the daemon runs, search alike, are in this one file, so a reviewer
audits them (and their two dialects) in one place; `export` reads in bulk on its own
(`daemon.store.export`), the query language and snippets are in `daemon.store.search`, the
folding in `daemon.store.fold`. The operator commands and worker rows could move out next.

Every state change is one short transaction. The OCR text and the `done` state are written in
the same transaction, so a crash at any point leaves either nothing or everything.
Claims are conditional updates (`WHERE state = 'queued'`), so of several workers or several
daemons sharing one PostgreSQL database exactly one gets a document; `claim_many` uses
`FOR UPDATE SKIP LOCKED` there so they do not queue up behind each other's row locks.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Engine,
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
    text,
    true,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, selectinload, sessionmaker

from daemon.errors import NotFoundError
from daemon.results import PageResult, join_pages, lines_json
from daemon.store.fold import fold
from daemon.store.models import (
    Document,
    DocumentEvent,
    DocumentPath,
    PageRow,
    State,
    Worker,
)
from daemon.store.search import parse_query, snippet

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
class PathStat:
    """What a file was when it was hashed. Equal again later (ctime included: any write or
    rename changes it) means the same content, so it is not read again."""

    size: int
    mtime_ns: int
    ctime_ns: int
    ino: int
    dev: int

    @classmethod
    def of(cls, info: os.stat_result) -> PathStat:
        return cls(info.st_size, info.st_mtime_ns, info.st_ctime_ns, _signed(info.st_ino),
                   _signed(info.st_dev))

    def columns(self) -> dict[str, int]:
        return {"st_size": self.size, "st_mtime_ns": self.mtime_ns,
                "st_ctime_ns": self.ctime_ns, "st_ino": self.ino, "st_dev": self.dev}


def _signed(value: int) -> int:
    """A 64-bit unsigned inode or device number as the signed BIGINT the database holds."""
    return value - (1 << 64) if value >= 1 << 63 else value


def _stat_columns(stat: PathStat | None) -> dict[str, int | None]:
    """A new path row's stat columns: None each when it is recorded without its stat."""
    columns: dict[str, int | None] = dict.fromkeys(_STAT_COLUMNS)
    if stat is not None:
        columns.update(stat.columns())
    return columns


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
class FailureResult:
    state: str  # queued (will be retried) or failed
    attempts: int
    paths: tuple[str, ...]


def rejection_key(path: str) -> str:
    """The row of a file refused before its content was read is keyed by its path."""
    return hashlib.sha256(f"rejected:{path}".encode()).hexdigest()


def page_row(document_id: int, page_no: int, page: PageResult) -> dict[str, Any]:
    """The `pages` row of one page, as `_INSERT_PAGES` takes it."""
    return {"document_id": document_id, "page_no": page_no, "text": page.text,
            "folded": fold(page.text), "confidence": page.confidence, "source": page.source,
            "lines": lines_json(page.lines)}


# The statements of one document's way through (register, claim, store), built once with
# bound parameters and run on a plain connection: building a statement, its cache key and an
# ORM session cost the main process ~7x the database work itself (measured: a claim 2.1 ms
# through the ORM, 0.3 ms so, on SQLite), and the daemon runs them for every file.
_DELETE_REJECTED = delete(Document).where(Document.sha256 == bindparam("rejection"))
_DOCUMENT_BY_HASH = select(Document.id, Document.state, Document.reason).where(
    Document.sha256 == bindparam("sha256"))
# A new document, or no row when its content is known: one statement where a lookup and an
# insert were two. On PostgreSQL it also clears the refusal of a file now read (a CTE): one
# round trip, not three.
_INSERT_NEW_SQLITE = (sqlite_insert(Document).on_conflict_do_nothing(
    index_elements=[Document.sha256]).returning(Document.id))
# (its values named: as a CTE below an insert it would otherwise get anonymous parameters)
_INSERT_NEW_PG = (postgresql_insert(Document).values(
    {column: bindparam(column) for column in ("sha256", "size_bytes", "state", "attempts",
                                              "first_seen_at")})
    .on_conflict_do_nothing(index_elements=[Document.sha256]).returning(Document.id))
_INSERT_NEW_CLEARING_PG = _INSERT_NEW_PG.add_cte(_DELETE_REJECTED.cte("refusal_cleared"))
# PostgreSQL, a new file's whole registration in one autocommit statement (one round trip,
# not four: BEGIN, the document, its path, COMMIT): the refusal of the path cleared, the
# document inserted unless its content is known, and its path recorded with it. No row back:
# the content is known, and the transaction below takes over.
_STAT_COLUMNS = ("st_size", "st_mtime_ns", "st_ctime_ns", "st_ino", "st_dev")
_NEW_DOCUMENT_PG = _INSERT_NEW_PG.cte("new_document")
_SEEN_AT = bindparam("first_seen_at", type_=DateTime(timezone=True))
_REGISTER_NEW_PG = (insert(DocumentPath).from_select(
    ["document_id", "path", "first_seen_at", "last_seen_at", *_STAT_COLUMNS],
    select(_NEW_DOCUMENT_PG.c.id, bindparam("path", type_=Text), _SEEN_AT, _SEEN_AT,
           *(bindparam(column, type_=BigInteger) for column in _STAT_COLUMNS)))
    .returning(DocumentPath.document_id)
    .add_cte(_DELETE_REJECTED.cte("refusal_cleared")).add_cte(_NEW_DOCUMENT_PG))


def _rows_given(alias: str, columns: Sequence[tuple[str, Any, Any]], **options: Any) -> Any:
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
_FILES_GIVEN = _rows_given("file", (
    ("path", Text, Text), ("sha256", Text, Text), ("size_bytes", BigInteger, BigInteger),
    *((column, BigInteger, BigInteger) for column in _STAT_COLUMNS)), with_ordinality="n")
_FILES = select(_FILES_GIVEN).cte("files")
_FIRST_OF_EACH = (select(_FILES).where(_FILES.c.n.in_(
    select(func.min(_FILES.c.n)).group_by(_FILES.c.sha256))).cte("first_of_each"))
_NEW_DOCUMENTS_PG = (postgresql_insert(Document).from_select(
    ["sha256", "size_bytes", "state", "attempts", "first_seen_at"],
    select(_FIRST_OF_EACH.c.sha256, _FIRST_OF_EACH.c.size_bytes,
           bindparam("state", type_=Text), bindparam("attempts", type_=Integer), _SEEN_AT)
    .order_by(_FIRST_OF_EACH.c.n))  # ids in the order the files came
    .on_conflict_do_nothing(index_elements=[Document.sha256])
    .returning(Document.id, Document.sha256).cte("new_documents"))
_REGISTER_NEW_MANY_PG = (insert(DocumentPath).from_select(
    ["document_id", "path", "first_seen_at", "last_seen_at", *_STAT_COLUMNS],
    select(_NEW_DOCUMENTS_PG.c.id, _FIRST_OF_EACH.c.path, _SEEN_AT, _SEEN_AT,
           *(_FIRST_OF_EACH.c[column] for column in _STAT_COLUMNS))
    .join_from(_NEW_DOCUMENTS_PG, _FIRST_OF_EACH,
               _FIRST_OF_EACH.c.sha256 == _NEW_DOCUMENTS_PG.c.sha256))
    .returning(DocumentPath.document_id, DocumentPath.path)
    .add_cte(delete(Document).where(Document.sha256 == func.any(
        bindparam("rejections", type_=ARRAY(Text)))).cte("refusals_cleared"))
    .add_cte(_FILES).add_cte(_FIRST_OF_EACH).add_cte(_NEW_DOCUMENTS_PG))
# SQLite, the same in one transaction: the documents of a batch in one INSERT of many rows
# (SQLAlchemy's "insertmanyvalues"), a content already there skipped; its rows say which
_INSERT_NEW_MANY_SQLITE = (sqlite_insert(Document).on_conflict_do_nothing(
    index_elements=[Document.sha256]).returning(Document.id, Document.sha256))
_PATH_ID = select(DocumentPath.id).where(DocumentPath.document_id == bindparam("doc"),
                                         DocumentPath.path == bindparam("path"))
_INSERT_PATH = insert(DocumentPath)
_FAIL_REJECTED = (update(Document).where(Document.id == bindparam("doc"))
                  .values(state=State.FAILED, reason=bindparam("reason"),
                          finished_at=bindparam("now")))
_KNOWN_PATH = (select(Document.id, Document.sha256, Document.state, Document.reason)
               .join(DocumentPath, DocumentPath.document_id == Document.id)
               .where(DocumentPath.path == bindparam("path"),
                      *(getattr(DocumentPath, name) == bindparam(name)
                        for name in _STAT_COLUMNS))
               .limit(1))
_KNOWN_PATHS = (select(DocumentPath.path, *(getattr(DocumentPath, name) for name in _STAT_COLUMNS),
                       Document.id, Document.sha256, Document.state, Document.reason)
                .join(DocumentPath, DocumentPath.document_id == Document.id)
                .where(DocumentPath.path.in_(bindparam("paths", expanding=True))))
# The oldest due queued documents, `limit` at most: on PostgreSQL locked as they are chosen,
# skipping those another claimer holds (a CTE: chosen once, however the UPDATE is planned)
_DUE = (select(Document.id)
        .where(Document.state == State.QUEUED,
               or_(Document.next_attempt_at.is_(None),
                   Document.next_attempt_at <= bindparam("now")),
               Document.id.not_in(bindparam("exclude", expanding=True)))
        .order_by(Document.id)
        .limit(bindparam("limit")))
_CLAIM_VALUES = {"state": State.PROCESSING, "claimed_by": bindparam("worker"),
                 "lease_until": bindparam("lease_until"), "started_at": bindparam("now"),
                 "attempts": Document.attempts + 1}
_CLAIM_RETURNS = (Document.id, Document.sha256, Document.attempts, Document.first_seen_at,
                  Document.size_bytes)
_CLAIM_SQLITE = (update(Document)  # no row locks, one writer at a time
                 .where(Document.id.in_(_DUE), Document.state == State.QUEUED)
                 .values(_CLAIM_VALUES).returning(*_CLAIM_RETURNS))
_PICKED_PG = _DUE.with_for_update(skip_locked=True).cte("picked")
_CLAIM_PG = (update(Document)
             .where(Document.id == _PICKED_PG.c.id, Document.state == State.QUEUED)
             .values(_CLAIM_VALUES).returning(*_CLAIM_RETURNS))
_PATHS_OF = (select(DocumentPath.path).where(DocumentPath.document_id == bindparam("doc"))
             .order_by(DocumentPath.id))
_PATHS_OF_EACH = (select(DocumentPath.document_id, DocumentPath.path)
                  .where(DocumentPath.document_id.in_(bindparam("docs", expanding=True)))
                  .order_by(DocumentPath.id))


def _paths_array(document_id: Any) -> Any:
    """PostgreSQL: the paths of `document_id` (a column), in their order, as one array
    column: read in the statement that claims or stores the document, not in another."""
    return func.array(select(DocumentPath.path).where(DocumentPath.document_id == document_id)
                      .order_by(DocumentPath.id).scalar_subquery()).label("paths")


# the claims and their paths in one statement, one round trip (PostgreSQL: an UPDATE …
# RETURNING may be a CTE); the paths' subquery sees the rows committed before it, as the next
# statement would
_CLAIMED_PG = _CLAIM_PG.cte("claimed")
_CLAIM_WITH_PATHS_PG = select(_CLAIMED_PG, _paths_array(_CLAIMED_PG.c.id))
_COMPLETE = (update(Document)
             .where(Document.id == bindparam("doc"), Document.state == State.PROCESSING,
                    Document.claimed_by == bindparam("worker"))
             .values(state=State.DONE, reason=None, page_count=bindparam("page_count"),
                     mean_confidence=bindparam("mean_confidence"),
                     ocr_seconds=bindparam("ocr_seconds"), provider=bindparam("provider"),
                     finished_at=bindparam("now"), claimed_by=None, lease_until=None,
                     next_attempt_at=None))
_DELETE_PAGES = delete(PageRow).where(PageRow.document_id == bindparam("doc"))
_INSERT_PAGES = insert(PageRow)
# PostgreSQL: a document stored in one autocommit statement, one round trip where the
# transaction took six: the conditional update (a CTE), its pages inserted from arrays only
# if it held, and its paths read beside them. A page already there (a document stored
# before) breaks the pages' unique key, and the whole statement with it: the transaction
# then runs as before, deleting the old pages first.
# (each column: its name, the array sent, the array it is cast to: lines go as JSON text)
_PAGE_ARRAYS = (("page_no", Integer, Integer), ("text", Text, Text), ("folded", Text, Text),
                ("confidence", Float, Float), ("source", Text, Text), ("lines", Text, JSON))
_HELD_PG = _COMPLETE.returning(Document.id).cte("held")
_PAGES_GIVEN = _rows_given("page", _PAGE_ARRAYS)
_STORED_PG = (postgresql_insert(PageRow)
              .from_select(["document_id", *(name for name, _, _ in _PAGE_ARRAYS)],
                           select(_HELD_PG.c.id, *(_PAGES_GIVEN.c[name]
                                                   for name, _, _ in _PAGE_ARRAYS))
                           .select_from(_HELD_PG.join(_PAGES_GIVEN, true())))
              .cte("stored"))
_COMPLETE_PG = select(_HELD_PG.c.id, _paths_array(_HELD_PG.c.id)).add_cte(_STORED_PG)


class Ledger:
    def __init__(self, engine: Engine, clock: Callable[[], datetime] = utcnow) -> None:
        self.engine = engine
        self._sessions = sessionmaker(engine, expire_on_commit=False)
        # Statements that stand alone (a lookup; a claim, one atomic UPDATE, then its paths):
        # on PostgreSQL in autocommit, without a BEGIN and a COMMIT or ROLLBACK round trip
        # each (known_path 0.45 -> 0.31 ms CPU, 0.9 -> 0.4 ms wall on a local server). On
        # SQLite switching costs more than it saves.
        self._postgresql = engine.dialect.name == "postgresql"  # else SQLite (make_engine)
        self._alone = (engine.execution_options(isolation_level="AUTOCOMMIT")
                       if self._postgresql else engine)
        self._insert_new = _INSERT_NEW_PG if self._postgresql else _INSERT_NEW_SQLITE
        self._clock = clock

    # -- intake ---------------------------------------------------------------------------

    def register(self, path: str, sha256: str, size: int, *, rejected: str | None = None,
                 stat: PathStat | None = None) -> Registration:
        """Record that `path` holds content `sha256` (and, with `stat`, what the file was when
        hashed); create a queued document if it is new (failed, with the reason `rejected`,
        for a file refused before it was read)."""
        rejection = rejection_key(path)
        if self._postgresql and rejected is None and sha256 != rejection:
            try:
                new = self._register_new_pg(path, sha256, size, stat, rejection)
            except IntegrityError:  # as below: the transaction's retries take over
                new = None
            if new is not None:
                return new
        for _ in range(3):  # the same path recorded at the same moment by another daemon
            try:
                return self._register_once(path, sha256, size, rejected, stat, rejection)
            except IntegrityError:
                continue
        return self._register_once(path, sha256, size, rejected, stat, rejection)

    def register_many(self, files: Sequence[NewFile]) -> list[Registration]:
        """`register` for each of `files` (paths not refused), a registration each in their
        order. The new contents among them are registered together: on PostgreSQL in one
        statement (`_REGISTER_NEW_MANY_PG`), one round trip for all where each took one; on
        SQLite in one transaction. The rest, and all of them should that fail, as `register`
        does."""
        done: dict[str, Registration] = {}
        if len(files) > 1:
            try:
                done = (self._register_new_many_pg(files) if self._postgresql
                        else self._register_new_many_sqlite(files))
            except IntegrityError:  # as in `register`: one at a time below
                done = {}
        return [done.get(file.path) or self.register(file.path, file.sha256, file.size,
                                                     stat=file.stat) for file in files]

    def _register_new_many_sqlite(self, files: Sequence[NewFile]) -> dict[str, Registration]:
        """One transaction and three statements for the new contents of `files` where each
        took a transaction of three: the CPU of the watcher's thread, a commit a file."""
        first: dict[str, NewFile] = {}
        for file in files:
            first.setdefault(file.sha256, file)
        now = self._clock()
        with self.engine.begin() as conn:
            conn.execute(_DELETE_REJECTED, [{"rejection": rejection_key(file.path)}
                                            for file in files])
            created = {sha256: document_id for document_id, sha256 in conn.execute(
                _INSERT_NEW_MANY_SQLITE,
                [{"sha256": file.sha256, "size_bytes": file.size, "state": State.QUEUED,
                  "attempts": 0, "first_seen_at": now} for file in first.values()])}
            new = [file for file in first.values() if file.sha256 in created]
            if new:
                conn.execute(_INSERT_PATH, [
                    {"document_id": created[file.sha256], "path": file.path,
                     "first_seen_at": now, "last_seen_at": now, **_stat_columns(file.stat)}
                    for file in new])
        return {file.path: Registration(created[file.sha256], file.sha256, State.QUEUED, True,
                                        True, None) for file in new}

    def _register_new_many_pg(self, files: Sequence[NewFile]) -> dict[str, Registration]:
        stats = [_stat_columns(file.stat) for file in files]
        with self._alone.connect() as conn:
            rows = conn.execute(_REGISTER_NEW_MANY_PG, {
                "paths": [file.path for file in files],
                "sha256s": [file.sha256 for file in files],
                "size_bytess": [file.size for file in files],
                **{f"{column}s": [stat[column] for stat in stats]
                   for column in _STAT_COLUMNS},
                "rejections": [rejection_key(file.path) for file in files],
                "state": State.QUEUED, "attempts": 0, "first_seen_at": self._clock()}).all()
        sha256 = {file.path: file.sha256 for file in files}
        return {row.path: Registration(row.document_id, sha256[row.path], State.QUEUED, True,
                                       True, None) for row in rows}

    def known_path(self, path: str, stat: PathStat) -> Registration | None:
        """The document `path` was registered for, if the file is still what was hashed then
        (a restart need not read it again); None when it changed or was never seen."""
        with self._alone.connect() as conn:
            row = conn.execute(_KNOWN_PATH, {"path": path, **stat.columns()}).first()
        if row is None:
            return None
        return Registration(row.id, row.sha256, row.state, False, False, row.reason)

    def known_paths(self, paths: Sequence[str]) -> dict[str, list[tuple[PathStat, Registration]]]:
        """For each of `paths`, what `known_path` would say for each stat it was hashed at, in
        one query (a path with no row: an empty list): the watcher looks a batch of ready files
        up at once, a round trip for them all rather than one each."""
        found: dict[str, list[tuple[PathStat, Registration]]] = {path: [] for path in paths}
        if not paths:
            return found
        with self._alone.connect() as conn:
            rows = conn.execute(_KNOWN_PATHS, {"paths": list(found)}).all()
        for row in rows:
            stat = tuple(getattr(row, name) for name in _STAT_COLUMNS)
            if None in stat:
                continue  # recorded without its stat: never taken as unchanged
            found[row.path].append((PathStat(*stat), Registration(
                row.id, row.sha256, row.state, False, False, row.reason)))
        return found

    def _register_new_pg(self, path: str, sha256: str, size: int, stat: PathStat | None,
                         rejection: str) -> Registration | None:
        """A new content in one statement (`_REGISTER_NEW_PG`); None when it is known."""
        columns = _stat_columns(stat)
        with self._alone.connect() as conn:
            document_id = conn.execute(_REGISTER_NEW_PG, {
                "sha256": sha256, "size_bytes": size, "state": State.QUEUED, "attempts": 0,
                "first_seen_at": self._clock(), "path": path, "rejection": rejection,
                **columns}).scalar()
        if document_id is None:
            return None
        return Registration(document_id, sha256, State.QUEUED, True, True, None)

    def _register_once(self, path: str, sha256: str, size: int, rejected: str | None,
                       stat: PathStat | None, rejection: str) -> Registration:
        now = self._clock()
        with self.engine.begin() as conn:
            row = {"sha256": sha256, "size_bytes": size, "state": State.QUEUED, "attempts": 0,
                   "first_seen_at": now}
            if sha256 == rejection:  # a refusal itself
                new = conn.execute(self._insert_new, row).scalar()
            elif self._postgresql:  # the file may have been refused once, and is read now
                new = conn.execute(_INSERT_NEW_CLEARING_PG, {**row, "rejection": rejection}
                                   ).scalar()
            else:
                conn.execute(_DELETE_REJECTED, {"rejection": rejection})
                new = conn.execute(self._insert_new, row).scalar()
            created = new is not None
            if new is not None:
                document_id, state, reason = new, State.QUEUED, None
            else:
                doc = conn.execute(_DOCUMENT_BY_HASH, {"sha256": sha256}).one()
                document_id, state, reason = doc.id, doc.state, doc.reason
            # a document created just now has no paths yet: one round trip fewer a new file
            known = None if created else conn.execute(
                _PATH_ID, {"doc": document_id, "path": path}).scalar()
            columns = stat.columns() if stat is not None else {}
            if known is None:
                conn.execute(_INSERT_PATH, {"document_id": document_id, "path": path,
                                            "first_seen_at": now, "last_seen_at": now,
                                            **columns})
            else:
                conn.execute(update(DocumentPath).where(DocumentPath.id == known)
                             .values(last_seen_at=now, **columns))
            if rejected is not None and state != State.FAILED:
                # in the same transaction: a claimer must never see it queued
                conn.execute(_FAIL_REJECTED, {"doc": document_id, "reason": rejected,
                                              "now": now})
                state, reason = State.FAILED, rejected
            return Registration(document_id, sha256, state, created, known is None, reason)

    # -- claims ---------------------------------------------------------------------------

    def claim(self, document_id: int, worker: str, lease_seconds: float) -> Claim | None:
        """queued -> processing for this worker, if nobody else got it first and it is due."""
        now = self._clock()
        with self._sessions.begin() as session:
            result = session.execute(
                update(Document)
                .where(Document.id == document_id, Document.state == State.QUEUED,
                       or_(Document.next_attempt_at.is_(None), Document.next_attempt_at <= now))
                .values(state=State.PROCESSING, claimed_by=worker,
                        lease_until=now + timedelta(seconds=lease_seconds), started_at=now,
                        attempts=Document.attempts + 1)
                .execution_options(synchronize_session=False)
            )
            if result.rowcount != 1:  # type: ignore[attr-defined]
                return None
            return self._claim_of(session, document_id)

    def claim_next(self, worker: str, lease_seconds: float, exclude: Sequence[int] = ()
                   ) -> Claim | None:
        """Claim the oldest due queued document (`claim_many` of one); None when none is."""
        claims = self.claim_many(worker, lease_seconds, 1, exclude)
        return claims[0] if claims else None

    def claim_many(self, worker: str, lease_seconds: float, limit: int,
                   exclude: Sequence[int] = ()) -> list[Claim]:
        """Claim the oldest `limit` due queued documents at most, oldest first, in one
        statement: `UPDATE … WHERE id IN (SELECT … LIMIT n) RETURNING …` on SQLite (one
        writer at a time), so no other worker can take a row between the choice and the
        claim, and the claims come back without reading the rows again; then their paths,
        all in one query. On PostgreSQL one statement in autocommit: the rows chosen and
        locked in a CTE (`FOR UPDATE SKIP LOCKED`), the UPDATE joining it as another, each
        claim's paths read beside it. A pipeline
        with several free slots claims for them at once: the claim loop's statements (and
        round trips, and share of the GIL) a document fall with the documents a claim."""
        now = self._clock()
        values = {"now": now, "exclude": list(exclude), "worker": worker, "limit": limit,
                  "lease_until": now + timedelta(seconds=lease_seconds)}
        with self._alone.begin() as conn:
            if self._postgresql:
                rows = conn.execute(_CLAIM_WITH_PATHS_PG, values).all()
                paths = {row.id: tuple(row.paths) for row in rows}
            else:
                rows = conn.execute(_CLAIM_SQLITE, values).all()
                paths = {row.id: () for row in rows}
                if rows:
                    for doc, path in conn.execute(_PATHS_OF_EACH, {"docs": list(paths)}):
                        paths[doc] += (path,)
        return [Claim(row.id, row.sha256, row.attempts, paths[row.id],
                      as_utc(row.first_seen_at) or row.first_seen_at, row.size_bytes)
                for row in sorted(rows, key=lambda row: row.id)]

    @staticmethod
    def _claim_of(session: Session, document_id: int) -> Claim:
        doc = session.get_one(Document, document_id, options=[selectinload(Document.paths)],
                              populate_existing=True)
        return Claim(doc.id, doc.sha256, doc.attempts, tuple(p.path for p in doc.paths),
                     as_utc(doc.first_seen_at) or doc.first_seen_at, doc.size_bytes)

    # -- outcomes -------------------------------------------------------------------------

    def complete(self, document_id: int, worker: str, pages: Sequence[PageResult],
                 ocr_seconds: float, provider: str, *, with_paths: bool = True
                 ) -> tuple[str, ...] | None:
        """Store every page and mark the document done, in one transaction; with
        `with_paths`, its paths then (for the after-action: a duplicate dropped while it was
        processed is among them), read in the same transaction rather than another; else ().

        None when this worker no longer holds the claim (its lease was taken back): the
        other holder stores the text, so nothing is written twice. The conditional update
        comes first, so on PostgreSQL it holds the row's lock while the pages go in. There
        it is one statement (`_COMPLETE_PG`), one round trip, unless the document has pages
        already.
        """
        scores = [line.score for page in pages for line in page.lines]
        outcome = {"doc": document_id, "worker": worker, "page_count": len(pages),
                   "mean_confidence": sum(scores) / len(scores) if scores else None,
                   "ocr_seconds": ocr_seconds, "provider": provider, "now": self._clock()}
        rows = [page_row(document_id, i + 1, page) for i, page in enumerate(pages)]
        if self._postgresql:
            arrays: dict[str, list[Any]] = {f"{name}s": [row[name] for row in rows]
                                            for name, _, _ in _PAGE_ARRAYS}
            arrays["liness"] = [json.dumps(lines) for lines in arrays["liness"]]
            try:
                with self._alone.connect() as conn:
                    stored = conn.execute(_COMPLETE_PG, {**outcome, **arrays}).first()
            except IntegrityError:  # pages there from before: replaced below
                pass
            else:
                if stored is None:
                    return None
                return tuple(stored.paths) if with_paths else ()
        with self.engine.begin() as conn:
            held = conn.execute(_COMPLETE, outcome)
            if held.rowcount != 1:
                return None
            conn.execute(_DELETE_PAGES, {"doc": document_id})
            if rows:
                conn.execute(_INSERT_PAGES, rows)
            if not with_paths:
                return ()
            return tuple(conn.execute(_PATHS_OF, {"doc": document_id}).scalars().all())

    def fail(self, document_id: int, reason: str, *, permanent: bool, max_attempts: int,
             backoff_seconds: float, worker: str | None = None) -> FailureResult | None:
        """Record a failure: retried later with exponential backoff, or failed for good.

        With `worker`, only while that worker holds the claim: None when it no longer does (its
        lease ran out and another worker has the document, or has finished it), so a late
        failure changes nothing."""
        now = self._clock()
        with self._sessions.begin() as session:
            doc = session.scalars(
                select(Document).options(selectinload(Document.paths))
                .where(Document.id == document_id).with_for_update()
            ).first()
            if doc is None:
                return None
            if worker is not None and (doc.state != State.PROCESSING
                                       or doc.claimed_by != worker):
                return None
            retry = not permanent and doc.attempts < max_attempts
            doc.reason = reason
            doc.claimed_by = None
            doc.lease_until = None
            if retry:
                doc.state = State.QUEUED
                delay = backoff_seconds * (2 ** max(0, doc.attempts - 1))
                doc.next_attempt_at = now + timedelta(seconds=delay)
            else:
                doc.state = State.FAILED
                doc.finished_at = now
                doc.next_attempt_at = None
            session.add(DocumentEvent(sha256=doc.sha256, at=now, event="failed",
                                      attempt=doc.attempts, detail=reason))
            return FailureResult(doc.state, doc.attempts, tuple(p.path for p in doc.paths))

    def release(self, document_id: int, worker: str) -> bool:
        """Hand a claimed document back (graceful stop): queued again, attempt not counted."""
        with self._sessions.begin() as session:
            result = session.execute(
                update(Document)
                .where(Document.id == document_id, Document.state == State.PROCESSING,
                       Document.claimed_by == worker)
                .values(state=State.QUEUED, claimed_by=None, lease_until=None,
                        attempts=Document.attempts - 1)
                .execution_options(synchronize_session=False)
            )
            return bool(result.rowcount == 1)  # type: ignore[attr-defined]

    def renew(self, worker: str, document_ids: Sequence[int], lease_seconds: float
              ) -> set[int]:
        """The heartbeat: extend the lease of each document `worker` still holds. Returns the
        ids renewed; the others were lost (expired and taken back): their work must stop."""
        if not document_ids:
            return set()
        now = self._clock()
        with self._sessions.begin() as session:
            return set(session.scalars(
                update(Document)
                .where(Document.id.in_(list(document_ids)),
                       Document.state == State.PROCESSING, Document.claimed_by == worker)
                .values(lease_until=now + timedelta(seconds=lease_seconds))
                .returning(Document.id)
                .execution_options(synchronize_session=False)).all())

    def requeue_stale(self, *, all_processing: bool = False, max_attempts: int | None = None
                      ) -> int:
        """Rows left in `processing` by a dead worker go back to `queued`.

        `all_processing` at start-up of the only daemon on an embedded database; otherwise
        only rows whose lease has run out (another live daemon may hold the others). An expiry
        counts as an attempt, with the reason recorded: with `max_attempts`, a document that
        has used them all (one that kills or hangs its worker each time) ends `failed` rather
        than looping.
        """
        now = self._clock()
        reason = ("the daemon stopped or died while processing it" if all_processing
                  else "its lease ran out (the worker died or hung)")
        with self._sessions.begin() as session:
            query = select(Document).where(Document.state == State.PROCESSING).with_for_update()
            if not all_processing:
                query = query.where(Document.lease_until < now)
            stale = session.scalars(query).all()
            for doc in stale:
                session.add(DocumentEvent(sha256=doc.sha256, at=now, event="expired",
                                          attempt=doc.attempts, detail=reason))
                doc.claimed_by = doc.lease_until = None
                doc.reason = reason
                if max_attempts is not None and doc.attempts >= max_attempts:
                    doc.state, doc.finished_at = State.FAILED, now
                    doc.reason = f"{reason}, {doc.attempts} times"
                else:
                    doc.state = State.QUEUED
            return len(stale)

    # -- operator commands ----------------------------------------------------------------

    def retry(self, document_ids: Sequence[int] | None = None) -> list[Retried]:
        """Failed documents back to `queued` (all of them with None), attempts reset; the
        reason each had goes to the history. A document in any other state is left alone.
        A running daemon claims them at its next look (within a second)."""
        now = self._clock()
        with self._sessions.begin() as session:
            query = (select(Document).options(selectinload(Document.paths))
                     .where(Document.state == State.FAILED).order_by(Document.id)
                     .with_for_update())
            if document_ids is not None:
                query = query.where(Document.id.in_(list(document_ids)))
            retried = []
            for doc in session.scalars(query).all():
                paths = tuple(p.path for p in doc.paths)
                # refused before it was read: no content to queue; the caller reads it again
                rejected = any(doc.sha256 == rejection_key(path) for path in paths)
                retried.append(Retried(doc.id, doc.sha256, paths, doc.reason, rejected))
                if rejected:
                    continue
                session.add(DocumentEvent(sha256=doc.sha256, at=now, event="retry",
                                          attempt=doc.attempts, detail=doc.reason))
                doc.state, doc.attempts, doc.reason = State.QUEUED, 0, None
                doc.next_attempt_at = doc.finished_at = None
                doc.claimed_by = doc.lease_until = None
            return retried

    def forget(self, document_id: int) -> bool:
        """Remove a document, its paths and its text (history kept). False when it is gone
        already. A daemon processing it finds the claim gone and stores nothing."""
        now = self._clock()
        with self._sessions.begin() as session:
            doc = session.get(Document, document_id, with_for_update=True)
            if doc is None:
                return False
            session.add(DocumentEvent(sha256=doc.sha256, at=now, event="forget",
                                      attempt=doc.attempts, detail=f"was {doc.state}"))
            session.execute(delete(Document).where(Document.id == document_id))
            return True

    # -- workers --------------------------------------------------------------------------

    def beat(self, worker: WorkerBeat) -> int:
        """Record a worker's heartbeat; returns how many workers are live (seen within
        `live_seconds` of now)."""
        now = self._clock()
        with self._sessions.begin() as session:
            row = session.get(Worker, worker.id)
            if row is None:
                row = Worker(id=worker.id, started_at=now)
                session.add(row)
            row.host, row.pid, row.provider = worker.host, worker.pid, worker.provider
            row.devices, row.documents_held = worker.devices, worker.documents_held
            row.pages_per_second, row.last_seen_at = worker.pages_per_second, now
            session.flush()
            since = now - timedelta(seconds=worker.live_seconds)
            return int(session.scalar(select(func.count()).select_from(Worker)
                                      .where(Worker.last_seen_at >= since)) or 0)

    def worker_stopped(self, worker: str) -> None:
        with self._sessions.begin() as session:
            session.execute(delete(Worker).where(Worker.id == worker))

    def workers(self) -> list[dict[str, Any]]:
        now = self._clock()
        with self._sessions() as session:
            rows = session.scalars(select(Worker).order_by(Worker.host, Worker.id)).all()
            return [{
                "id": w.id, "host": w.host, "pid": w.pid, "provider": w.provider,
                "devices": w.devices, "documents_held": w.documents_held,
                "pages_per_second": round(w.pages_per_second, 2),
                "started_at": (as_utc(w.started_at) or w.started_at).isoformat(),
                "seconds_since_heartbeat": round(
                    (now - (as_utc(w.last_seen_at) or w.last_seen_at)).total_seconds(), 1),
            } for w in rows]

    def paths_of(self, document_id: int) -> tuple[str, ...]:
        """Every path the document is known under now (more may have come while it was
        processed: a duplicate dropped meanwhile, a move recorded)."""
        with self._alone.connect() as conn:
            return tuple(conn.execute(_PATHS_OF, {"doc": document_id}).scalars().all())

    def history(self, sha256: str) -> list[dict[str, Any]]:
        with self._sessions() as session:
            events = session.scalars(select(DocumentEvent)
                                     .where(DocumentEvent.sha256 == sha256)
                                     .order_by(DocumentEvent.id)).all()
            return [{"at": (as_utc(e.at) or e.at).isoformat(), "event": e.event,
                     "attempt": e.attempt, "detail": e.detail} for e in events]

    def record_rejection(self, path: str, reason: str) -> Registration:
        """A file refused before its content was read (symlink out of the folder, unreadable,
        a directory with a file's name...). It has no content hash, so the row is keyed by a
        hash of its path: the same refusal is recorded once, and should the file become
        readable its real content gets a row of its own, which replaces this one."""
        return self.register(path, rejection_key(path), 0, rejected=reason)

    # -- reading --------------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        with self._sessions() as session:
            rows = session.execute(select(Document.state, func.count()).group_by(Document.state))
            found = {state: int(n) for state, n in rows}
        return {state: found.get(state, 0) for state in State.ALL}

    def status(self, failures: int = 20) -> dict[str, Any]:
        with self._sessions() as session:
            failed = session.scalars(
                select(Document)
                .options(selectinload(Document.paths))
                .where(Document.state == State.FAILED)
                .order_by(Document.finished_at.desc(), Document.id.desc())
                .limit(failures)
            ).all()
            pages = session.scalar(select(func.count()).select_from(PageRow)) or 0
            failure_list = [
                {"path": d.paths[-1].path if d.paths else None, "sha256": d.sha256,
                 "reason": d.reason, "attempts": d.attempts}
                for d in failed
            ]
        return {"documents": self.counts(), "pages": int(pages), "failures": failure_list,
                "workers": self.workers()}

    def find(self, ref: str, candidates: Sequence[str] = ()) -> StoredDocument:
        """A document by SHA-256, or by any path it arrived under (`candidates` are the
        spellings of the path the caller tried: as given, absolute, resolved)."""
        with self._sessions() as session:
            query = select(Document).options(selectinload(Document.paths),
                                             selectinload(Document.pages))
            doc = None
            if SHA256_RE.match(ref):
                doc = session.scalars(query.where(Document.sha256 == ref.lower())).first()
            if doc is None and candidates:
                path_row = session.scalars(
                    select(DocumentPath)
                    .where(DocumentPath.path.in_(list(candidates)))
                    .order_by(DocumentPath.last_seen_at.desc(), DocumentPath.id.desc())
                    .limit(1)
                ).first()
                if path_row is not None:
                    doc = session.scalars(
                        query.where(Document.id == path_row.document_id)).first()
            if doc is None:
                raise NotFoundError(f"no document for {ref!r}")
            return StoredDocument(
                id=doc.id, sha256=doc.sha256, state=doc.state, reason=doc.reason,
                paths=tuple(p.path for p in doc.paths),
                pages=tuple(StoredPage(p.page_no, p.text, p.confidence, p.source, p.lines)
                            for p in doc.pages),
                attempts=doc.attempts, mean_confidence=doc.mean_confidence,
            )

    def search(self, query: str, limit: int = 20) -> list[SearchHit]:
        """Pages containing every term of `query` (see `parse_query`), best first.

        A term matches wherever it occurs, case-insensitively, inside words too and in
        scripts written without spaces (Chinese, Japanese). Ranking: bm25 on SQLite; on
        PostgreSQL `ts_rank` (whole-word occurrences) plus trigram word similarity. Scores
        are higher-is-better but not comparable between the two backends.
        """
        terms = parse_query(query)
        if not terms or limit < 1:
            return []
        sql, params = (_sqlite_search if self.engine.dialect.name == "sqlite"
                       else _postgresql_search)([fold(term) for term in terms])
        params["limit"] = limit
        with self._sessions() as session:
            rows = session.execute(text(sql), params).all()
            paths: dict[int, str] = {}
            for document_id, path in session.execute(
                select(DocumentPath.document_id, DocumentPath.path)
                .where(DocumentPath.document_id.in_({r[0] for r in rows}))
                .order_by(DocumentPath.id)
            ):
                paths.setdefault(document_id, path)
        return [SearchHit(paths.get(doc_id, "?"), sha, page_no, snippet(page_text, terms),
                          round(float(score), 6))
                for doc_id, page_no, page_text, sha, score in rows]


# -- search -------------------------------------------------------------------------------

TRIGRAM = 3  # shortest term the trigram indexes can look up; shorter ones are scanned

def _like_pattern(term: str) -> str:
    return "%" + term.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def _fts5_string(term: str) -> str:
    """An FTS5 string literal: the trigram tokenizer matches it as a plain substring."""
    return '"' + term.replace('"', '""') + '"'


_SEARCH_COLUMNS = "p.document_id, p.page_no, p.text, d.sha256"
_SEARCH_ORDER = "ORDER BY score DESC, d.id DESC, p.page_no LIMIT :limit"


def _sqlite_search(terms: Sequence[str]) -> tuple[str, dict[str, Any]]:
    """FTS5 MATCH for the terms of three characters or more (bm25 ranks); LIKE for shorter
    ones, which trigrams cannot look up."""
    long_terms = [t for t in terms if len(t) >= TRIGRAM]
    params: dict[str, Any] = {}
    where = []
    for i, term in enumerate(t for t in terms if len(t) < TRIGRAM):
        params[f"like{i}"] = _like_pattern(term)
        where.append(f"p.folded LIKE :like{i} ESCAPE '\\'")
    if long_terms:
        params["match"] = " ".join(_fts5_string(t) for t in long_terms)
        where.insert(0, "pages_fts MATCH :match")
        source = ("pages_fts JOIN pages p ON p.id = pages_fts.rowid "
                  "JOIN documents d ON d.id = p.document_id")
        score = "-bm25(pages_fts)"
    else:
        source = "pages p JOIN documents d ON d.id = p.document_id"
        score = "0.0"
    sql = (f"SELECT {_SEARCH_COLUMNS}, {score} AS score FROM {source} "
           f"WHERE {' AND '.join(where)} {_SEARCH_ORDER}")
    return sql, params


def _postgresql_search(terms: Sequence[str]) -> tuple[str, dict[str, Any]]:
    """LIKE per folded term on the folded text (served by the pg_trgm GIN index, any script);
    ranked by ts_rank on the `simple` tsvector plus how well the query's trigrams match the
    best part of the page."""
    params: dict[str, Any] = {"query": " ".join(terms)}
    where, tsqueries = [], []
    for i, term in enumerate(terms):
        params[f"like{i}"] = _like_pattern(term)
        params[f"term{i}"] = term
        where.append(f"p.folded LIKE :like{i} ESCAPE '\\'")
        tsqueries.append(f"phraseto_tsquery('simple', :term{i})")
    score = (f"ts_rank(p.text_tsv, {' || '.join(tsqueries)}) "
             "+ word_similarity(:query, p.folded)")
    sql = (f"SELECT {_SEARCH_COLUMNS}, {score} AS score "
           "FROM pages p JOIN documents d ON d.id = p.document_id "
           f"WHERE {' AND '.join(where)} {_SEARCH_ORDER}")
    return sql, params
