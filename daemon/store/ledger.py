"""The worker path through the ledger: what the daemon runs for each file. Register (one
file, or a watcher's batch together), look up what a path was, claim, renew leases, store the
text or record a failure, hand back, re-queue expired claims, and the worker rows.

Every state change is one short transaction. The OCR text and the `done` state are written in
the same transaction, so a crash at any point leaves either nothing or everything. Claims are
conditional updates (`WHERE state = 'queued'`), so of several workers or several daemons
sharing one PostgreSQL database exactly one gets a document; `claim_many` uses
`FOR UPDATE SKIP LOCKED` there so they do not queue up behind each other's row locks. The
statements themselves are in `daemon.store.statements`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Engine, delete, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import selectinload

from daemon.files import PathStat
from daemon.results import PageResult
from daemon.store.access import guarded, utcnow
from daemon.store.models import Document, DocumentEvent, DocumentPath, State, Worker
from daemon.store.operator import OperatorQueries
from daemon.store.records import (
    Claim,
    Expired,
    FailureResult,
    NewFile,
    Registration,
    WorkerBeat,
    as_utc,
    page_row,
    rejection_key,
)
from daemon.store.search import SearchQueries
from daemon.store.statements import (
    CLAIM_SQLITE,
    CLAIM_WITH_PATHS_PG,
    COMPLETE,
    COMPLETE_PG,
    DELETE_PAGES,
    DELETE_REJECTED,
    DOCUMENT_BY_HASH,
    DOCUMENT_BY_HASH_PG,
    FAIL_REJECTED,
    INSERT_NEW_CLEARING_PG,
    INSERT_NEW_MANY_SQLITE,
    INSERT_NEW_PG,
    INSERT_NEW_SQLITE,
    INSERT_PAGES,
    INSERT_PATH,
    KNOWN_PATH,
    KNOWN_PATHS,
    PAGE_ARRAYS,
    PATH_ID,
    PATHS_OF,
    PATHS_OF_EACH,
    REGISTER_NEW_MANY_PG,
    REGISTER_NEW_PG,
    STAT_COLUMNS,
    stat_columns,
)

# a worker row is removed once not seen for this many of its live periods (a lease each)
WORKER_ROWS_KEPT_LIVES = 5


@guarded
class Ledger(OperatorQueries, SearchQueries):
    """The ledger: what the daemon itself runs for each file (this module), the operator
    commands (`daemon.store.operator`) and search (`daemon.store.search`) on one database.
    Every public method raises the project's errors, never SQLAlchemy's (`guarded`)."""

    def __init__(self, engine: Engine, clock: Callable[[], datetime] | None = None, *,
                 host_clock: Callable[[], datetime] = utcnow) -> None:
        super().__init__(engine, clock, host_clock=host_clock)
        self._insert_new = INSERT_NEW_PG if self._postgresql else INSERT_NEW_SQLITE

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
        statement (`REGISTER_NEW_MANY_PG`), one round trip for all where each took one; on
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
            conn.execute(DELETE_REJECTED, [{"rejection": rejection_key(file.path)}
                                            for file in files])
            created = {sha256: document_id for document_id, sha256 in conn.execute(
                INSERT_NEW_MANY_SQLITE,
                [{"sha256": file.sha256, "size_bytes": file.size, "state": State.QUEUED,
                  "attempts": 0, "first_seen_at": now} for file in first.values()])}
            new = [file for file in first.values() if file.sha256 in created]
            if new:
                conn.execute(INSERT_PATH, [
                    {"document_id": created[file.sha256], "path": file.path,
                     "first_seen_at": now, "last_seen_at": now, **stat_columns(file.stat)}
                    for file in new])
        return {file.path: Registration(created[file.sha256], file.sha256, State.QUEUED, True,
                                        True, None) for file in new}

    def _register_new_many_pg(self, files: Sequence[NewFile]) -> dict[str, Registration]:
        stats = [stat_columns(file.stat) for file in files]
        with self._alone.connect() as conn:
            rows = conn.execute(REGISTER_NEW_MANY_PG, {
                "paths": [file.path for file in files],
                "sha256s": [file.sha256 for file in files],
                "size_bytess": [file.size for file in files],
                **{f"{column}s": [stat[column] for stat in stats]
                   for column in STAT_COLUMNS},
                "rejections": [rejection_key(file.path) for file in files],
                "state": State.QUEUED, "attempts": 0, "first_seen_at": self._clock()}).all()
        sha256 = {file.path: file.sha256 for file in files}
        return {row.path: Registration(row.document_id, sha256[row.path], State.QUEUED, True,
                                       True, None) for row in rows}

    def known_path(self, path: str, stat: PathStat) -> Registration | None:
        """The document `path` was registered for, if the file is still what was hashed then
        (a restart need not read it again); None when it changed or was never seen."""
        with self._alone.connect() as conn:
            row = conn.execute(KNOWN_PATH, {"path": path, **stat.columns()}).first()
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
            rows = conn.execute(KNOWN_PATHS, {"paths": list(found)}).all()
        for row in rows:
            stat = tuple(getattr(row, name) for name in STAT_COLUMNS)
            if None in stat:
                continue  # recorded without its stat: never taken as unchanged
            found[row.path].append((PathStat(*stat), Registration(
                row.id, row.sha256, row.state, False, False, row.reason)))
        return found

    def _register_new_pg(self, path: str, sha256: str, size: int, stat: PathStat | None,
                         rejection: str) -> Registration | None:
        """A new content in one statement (`REGISTER_NEW_PG`); None when it is known."""
        columns = stat_columns(stat)
        with self._alone.connect() as conn:
            document_id = conn.execute(REGISTER_NEW_PG, {
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
                new = conn.execute(INSERT_NEW_CLEARING_PG, {**row, "rejection": rejection}
                                   ).scalar()
            else:
                conn.execute(DELETE_REJECTED, {"rejection": rejection})
                new = conn.execute(self._insert_new, row).scalar()
            created = new is not None
            if new is not None:
                document_id, state, reason = new, State.QUEUED, None
            else:
                doc = conn.execute(DOCUMENT_BY_HASH_PG if self._postgresql
                                   else DOCUMENT_BY_HASH, {"sha256": sha256}).one()
                document_id, state, reason = doc.id, doc.state, doc.reason
            # a document created just now has no paths yet: one round trip fewer a new file
            known = None if created else conn.execute(
                PATH_ID, {"doc": document_id, "path": path}).scalar()
            columns = stat.columns() if stat is not None else {}
            if known is None:
                conn.execute(INSERT_PATH, {"document_id": document_id, "path": path,
                                            "first_seen_at": now, "last_seen_at": now,
                                            **columns})
            else:
                conn.execute(update(DocumentPath).where(DocumentPath.id == known)
                             .values(last_seen_at=now, **columns))
            if rejected is not None and state != State.FAILED:
                # in the same transaction: a claimer must never see it queued
                conn.execute(FAIL_REJECTED, {"doc": document_id, "reason": rejected,
                                              "now": now})
                state, reason = State.FAILED, rejected
            return Registration(document_id, sha256, state, created, known is None, reason)

    # -- claims ---------------------------------------------------------------------------

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
                rows = conn.execute(CLAIM_WITH_PATHS_PG, values).all()
                paths = {row.id: tuple(row.paths) for row in rows}
            else:
                rows = conn.execute(CLAIM_SQLITE, values).all()
                paths = {row.id: () for row in rows}
                if rows:
                    for doc, path in conn.execute(PATHS_OF_EACH, {"docs": list(paths)}):
                        paths[doc] += (path,)
        return [Claim(row.id, row.sha256, row.attempts, paths[row.id],
                      as_utc(row.first_seen_at) or row.first_seen_at, row.size_bytes)
                for row in sorted(rows, key=lambda row: row.id)]

    # -- outcomes -------------------------------------------------------------------------

    def complete(self, document_id: int, worker: str, pages: Sequence[PageResult],
                 ocr_seconds: float, provider: str, *, with_paths: bool = True
                 ) -> tuple[str, ...] | None:
        """Store every page and mark the document done, in one transaction; with
        `with_paths`, its paths then (for the after-action: a duplicate dropped while it was
        processed is among them); else ().

        None when this worker no longer holds the claim (its lease was taken back): the
        other holder stores the text, so nothing is written twice. The conditional update
        comes first, so on PostgreSQL it holds the row's lock while the pages go in. There
        it is one statement (`COMPLETE_PG`), one round trip, and the paths one more, unless
        the document has pages already.
        """
        scores = [line.score for page in pages for line in page.lines]
        outcome = {"doc": document_id, "worker": worker, "page_count": len(pages),
                   "mean_confidence": sum(scores) / len(scores) if scores else None,
                   "ocr_seconds": ocr_seconds, "provider": provider, "now": self._clock()}
        rows = [page_row(document_id, i + 1, page) for i, page in enumerate(pages)]
        if self._postgresql:
            arrays: dict[str, list[Any]] = {f"{name}s": [row[name] for row in rows]
                                            for name, _, _ in PAGE_ARRAYS}
            arrays["liness"] = [json.dumps(lines) for lines in arrays["liness"]]
            try:
                with self._alone.connect() as conn:
                    stored = conn.execute(COMPLETE_PG, {**outcome, **arrays}).first()
                    if stored is None:
                        return None
                    if not with_paths:
                        return ()
                    # read after the commit, in a statement of their own: the store's
                    # snapshot predates a duplicate that registered while it waited for that
                    # registration's share lock (`DOCUMENT_BY_HASH_PG`); now it is among them
                    return tuple(conn.execute(PATHS_OF, {"doc": document_id}).scalars().all())
            except IntegrityError:  # pages there from before: replaced below
                pass
        with self.engine.begin() as conn:
            held = conn.execute(COMPLETE, outcome)
            if held.rowcount != 1:
                return None
            conn.execute(DELETE_PAGES, {"doc": document_id})
            if rows:
                conn.execute(INSERT_PAGES, rows)
            if not with_paths:
                return ()
            return tuple(conn.execute(PATHS_OF, {"doc": document_id}).scalars().all())

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
                      ) -> list[Expired]:
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
            query = (select(Document).options(selectinload(Document.paths))
                     .where(Document.state == State.PROCESSING).with_for_update())
            if not all_processing:
                query = query.where(Document.lease_until < now)
            expired = []
            for doc in session.scalars(query).all():
                session.add(DocumentEvent(sha256=doc.sha256, at=now, event="expired",
                                          attempt=doc.attempts, detail=reason))
                doc.claimed_by = doc.lease_until = None
                why = reason
                if max_attempts is not None and doc.attempts >= max_attempts:
                    doc.state, doc.finished_at = State.FAILED, now
                    why = f"{reason}, {doc.attempts} times"
                else:
                    doc.state = State.QUEUED
                doc.reason = why
                expired.append(Expired(doc.sha256, doc.state, why,
                                       tuple(p.path for p in doc.paths)))
            return expired

    # -- workers --------------------------------------------------------------------------

    def beat(self, worker: WorkerBeat) -> int:
        """Record a worker's heartbeat; returns how many workers are live (seen within
        `live_seconds` of now). Rows not seen for WORKER_ROWS_KEPT_LIVES x `live_seconds`
        are removed: a killed daemon's row stayed listed for ever, and a crash loop added
        one a restart."""
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
            session.execute(delete(Worker).where(Worker.last_seen_at < now - timedelta(
                seconds=WORKER_ROWS_KEPT_LIVES * worker.live_seconds)))
            since = now - timedelta(seconds=worker.live_seconds)
            return int(session.scalar(select(func.count()).select_from(Worker)
                                      .where(Worker.last_seen_at >= since)) or 0)

    def worker_stopped(self, worker: str) -> None:
        with self._sessions.begin() as session:
            session.execute(delete(Worker).where(Worker.id == worker))

    def record_rejection(self, path: str, reason: str) -> Registration:
        """A file refused before its content was read (symlink out of the folder, unreadable,
        a directory with a file's name...). It has no content hash, so the row is keyed by a
        hash of its path: the same refusal is recorded once, and should the file become
        readable its real content gets a row of its own, which replaces this one."""
        return self.register(path, rejection_key(path), 0, rejected=reason)

