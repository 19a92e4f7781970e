"""The ledger against real SQLite and real PostgreSQL (each test runs on both)."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import make_url

from daemon.config import DatabaseSettings
from daemon.errors import ConfigError, NotFoundError
from daemon.files import PathStat
from daemon.results import Line, PageResult
from daemon.store import db as db_module
from daemon.store import migrate
from daemon.store.db import make_engine
from daemon.store.ledger import Ledger
from daemon.store.models import State
from daemon.store.records import NewFile, Registration
from tests.support import claim_next, claim_one, paths_of, wait_until


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def page(*texts: str) -> PageResult:
    box = ((0.0, 0.0), (10.0, 0.0), (10.0, 5.0), (0.0, 5.0))
    return PageResult(lines=tuple(Line(t, 0.9, box) for t in texts))


def test_same_content_under_two_names_is_one_document(ledger: Ledger) -> None:
    first = ledger.register("/in/a.png", sha("x"), 1)
    second = ledger.register("/in/b.png", sha("x"), 1)
    again = ledger.register("/in/a.png", sha("x"), 1)
    assert first.created and not second.created
    assert second.document_id == first.document_id and second.path_added
    assert not again.path_added
    assert ledger.counts()[State.QUEUED] == 1


def test_a_new_file_is_registered_in_as_few_statements_as_can_be(ledger: Ledger) -> None:
    """Registering is the watcher's share of the GIL, a round trip a statement on PostgreSQL:
    there a new document, its path and the clearing of a refusal of that path are one
    statement; on SQLite the document is one insert (none when its content is known) and a
    new document has no paths to look up. Its path is recorded all the same."""
    from sqlalchemy import event

    statements: list[str] = []

    def count(_conn: object, _cursor: object, statement: str, *_args: object) -> None:
        statements.append(statement.split()[0])

    ledger._clock()  # on PostgreSQL the server's clock, read once a minute: not counted
    event.listen(ledger.engine, "before_cursor_execute", count)
    try:
        first = ledger.register("/in/new.png", sha("new"), 1)
        assert statements == (["WITH"] if ledger.engine.dialect.name == "postgresql"
                              else ["DELETE", "INSERT", "INSERT"])
    finally:
        event.remove(ledger.engine, "before_cursor_execute", count)
    assert first.created and first.path_added
    assert paths_of(ledger, first.document_id) == ("/in/new.png",)
    assert not ledger.register("/in/new.png", sha("new"), 1).path_added


def test_a_path_is_known_while_its_file_is_what_was_hashed(ledger: Ledger) -> None:
    """What a file was when it was registered (its stat) is kept with its path, new content
    or known: while the file still matches, a restart finds its document without reading
    it; any change, and it is read again."""
    stat = PathStat(10, 2, 3, 4, 5)
    first = ledger.register("/in/a.png", sha("a"), 10, stat=stat)
    again = ledger.register("/in/b.png", sha("a"), 10, stat=PathStat(10, 6, 7, 8, 5))
    assert first.created and not again.created
    known = ledger.known_path("/in/a.png", stat)
    assert known is not None and (known.document_id, known.sha256) == (first.document_id,
                                                                      sha("a"))
    assert ledger.known_path("/in/b.png", PathStat(10, 6, 7, 8, 5)) is not None
    assert ledger.known_path("/in/a.png", PathStat(10, 2, 9, 4, 5)) is None  # rewritten
    assert ledger.known_path("/in/c.png", stat) is None  # never seen


def test_a_batch_of_paths_is_looked_up_at_once(ledger: Ledger) -> None:
    """known_paths answers for many paths in one query what known_path answers for one: for
    each path, the stat it was hashed at with its document (a path rewritten with new
    content: a row each); nothing for a path never seen, or recorded without its stat."""
    stat = PathStat(10, 2, 3, 4, 5)
    first = ledger.register("/in/a.png", sha("a"), 10, stat=stat)
    rewritten = PathStat(11, 6, 7, 4, 5)
    second = ledger.register("/in/a.png", sha("a2"), 11, stat=rewritten)
    other = ledger.register("/in/b.png", sha("b"), 10, stat=PathStat(10, 8, 9, 10, 5))
    ledger.register("/in/nostat.png", sha("c"), 10)
    found = ledger.known_paths(["/in/a.png", "/in/b.png", "/in/c.png", "/in/nostat.png"])
    assert set(found) == {"/in/a.png", "/in/b.png", "/in/c.png", "/in/nostat.png"}
    assert {(was, known.document_id) for was, known in found["/in/a.png"]} == {
        (stat, first.document_id), (rewritten, second.document_id)}
    [(was, known)] = found["/in/b.png"]
    assert was == PathStat(10, 8, 9, 10, 5) and known == ledger.known_path("/in/b.png", was)
    assert known.document_id == other.document_id and known.sha256 == sha("b")
    assert found["/in/c.png"] == [] and found["/in/nostat.png"] == []
    assert ledger.known_paths([]) == {}


def test_files_found_together_are_registered_as_each_would_be(ledger: Ledger) -> None:
    """register_many gives each file what register would have: new contents queued with
    their path and stat (in the order given), a second file of one content and a file of a
    content already stored as duplicates, a path refused before read now with its refusal
    cleared, a known path of a known content not added again."""
    stored = ledger.register("/in/old.png", sha("old"), 5)
    ledger.record_rejection("/in/refused.png", "permission denied")
    known = ledger.register("/in/known.png", sha("known"), 5)
    stat = PathStat(10, 2, 3, 4, 5)
    files = [NewFile("/in/b.png", sha("b"), 10, stat),
             NewFile("/in/a.png", sha("a"), 11, PathStat(11, 6, 7, 8, 5)),
             NewFile("/in/b-again.png", sha("b"), 10, PathStat(10, 9, 9, 9, 5)),
             NewFile("/in/old-again.png", sha("old"), 5, None),
             NewFile("/in/refused.png", sha("r"), 12, None),
             NewFile("/in/known.png", sha("known"), 5, None)]
    got = ledger.register_many(files)
    assert [(r.sha256, r.created, r.path_added, r.state) for r in got] == [
        (sha("b"), True, True, State.QUEUED), (sha("a"), True, True, State.QUEUED),
        (sha("b"), False, True, State.QUEUED), (sha("old"), False, True, State.QUEUED),
        (sha("r"), True, True, State.QUEUED), (sha("known"), False, False, State.QUEUED)]
    b, a, b_again, old_again, refused, known_again = got
    assert b.document_id < a.document_id < refused.document_id  # claimed in the order found
    assert b_again.document_id == b.document_id and old_again.document_id == stored.document_id
    assert known_again.document_id == known.document_id
    assert ledger.counts()[State.FAILED] == 0  # the refusal is gone
    assert ledger.known_path("/in/b.png", stat) == Registration(
        b.document_id, sha("b"), State.QUEUED, False, False, None)
    assert paths_of(ledger, b.document_id) == ("/in/b.png", "/in/b-again.png")
    assert ledger.known_path("/in/a.png", PathStat(11, 6, 7, 8, 5)) is not None
    assert ledger.register_many([]) == []


def test_new_files_are_registered_in_one_transaction_on_sqlite(tmp_path: Path) -> None:
    """SQLite: the new contents of a batch in one transaction of three statements (refusals
    cleared, documents, paths), where each file took a transaction of three."""
    engine = make_engine(DatabaseSettings(url=f"sqlite:///{tmp_path / 'ledger.db'}"))
    migrate.upgrade(engine)
    ledger = Ledger(engine)
    sent: list[str] = []
    commits: list[int] = []
    event.listen(engine, "before_cursor_execute",
                 lambda _c, _cur, statement, *_: sent.append(statement.split()[0]))
    event.listen(engine, "commit", lambda _c: commits.append(1))
    try:
        got = ledger.register_many([NewFile(f"/in/new{n}.png", sha(f"new{n}"), 1, None)
                                    for n in range(8)])
        assert all(r.created for r in got) and len({r.document_id for r in got}) == 8
        assert sent == ["DELETE", "INSERT", "INSERT"] and len(commits) == 1
    finally:
        engine.dispose()


def test_a_refused_file_read_later_leaves_no_refusal(ledger: Ledger) -> None:
    """A file refused before it was read (unreadable, say) and read once that was mended:
    its content is queued and the refusal's row is gone; another path's refusal stays."""
    ledger.record_rejection("/in/a.png", "permission denied")
    ledger.record_rejection("/in/b.png", "permission denied")
    assert ledger.counts()[State.FAILED] == 2
    registration = ledger.register("/in/a.png", sha("a"), 1)
    assert registration.created and registration.state == State.QUEUED
    assert ledger.counts()[State.FAILED] == 1
    assert [f["reason"] for f in ledger.status()["failures"]] == ["permission denied"]
    again = ledger.register("/in/b.png", sha("a"), 1)  # known content, its refusal cleared too
    assert not again.created and again.document_id == registration.document_id
    assert ledger.counts()[State.FAILED] == 0


def test_racing_registrations_of_one_content_make_one_document(ledger: Ledger) -> None:
    """Two daemons (or a watcher and `ocr-daemon retry`) registering the same content at the
    same moment under different names: one document, created once, with both paths."""
    barrier = threading.Barrier(6)
    results: list[Any] = []

    def register(i: int) -> None:
        barrier.wait()
        results.append(ledger.register(f"/in/copy-{i}.png", sha("same"), 1))

    threads = [threading.Thread(target=register, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 6 and sum(r.created for r in results) == 1
    assert len({r.document_id for r in results}) == 1
    assert sorted(paths_of(ledger, results[0].document_id)) == [
        f"/in/copy-{i}.png" for i in range(6)]
    assert ledger.counts()[State.QUEUED] == 1


def test_only_one_worker_gets_a_claim(ledger: Ledger) -> None:
    """Four workers race `claim_many`, the daemon's one claim path, for one document."""
    doc = ledger.register("/in/a.png", sha("a"), 1)
    results: list[object] = []
    barrier = threading.Barrier(4)

    def grab(i: int) -> None:
        barrier.wait()
        results.extend(ledger.claim_many(f"w{i}", 60, 1))

    threads = [threading.Thread(target=grab, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [getattr(r, "document_id", None) for r in results] == [doc.document_id]


def test_claim_next_skips_excluded_and_takes_oldest(ledger: Ledger) -> None:
    a = ledger.register("/in/a.png", sha("a"), 1)
    b = ledger.register("/in/b.png", sha("b"), 1)
    claim = claim_next(ledger, "w", 60, exclude=[a.document_id])
    assert claim is not None and claim.document_id == b.document_id
    assert claim.paths == ("/in/b.png",) and claim.attempts == 1
    claim = claim_next(ledger, "w", 60)
    assert claim is not None and claim.document_id == a.document_id
    assert claim_next(ledger, "w", 60) is None


def test_complete_stores_pages_and_done_together(ledger: Ledger) -> None:
    reg = ledger.register("/in/a.png", sha("a"), 1)
    claim = claim_next(ledger, "w", 60)
    assert claim is not None
    assert ledger.complete(reg.document_id, "w", [page("hello", "world"), page("two")], 1.5,
                           "cpu")
    stored = ledger.find(sha("a"))
    assert stored.state == State.DONE
    assert [p.text for p in stored.pages] == ["hello\nworld", "two"]
    assert stored.pages[0].lines[0]["box"][2] == [10.0, 5.0]
    assert stored.mean_confidence == pytest.approx(0.9)


def test_complete_gives_the_paths_known_as_it_stores(ledger: Ledger) -> None:
    """For the after-action: a copy of the same content dropped while the document was
    processed is among them."""
    reg = ledger.register("/in/a.png", sha("a"), 1)
    claim = claim_next(ledger, "w", 60)
    assert claim is not None and claim.paths == ("/in/a.png",)
    ledger.register("/in/copy of a.png", sha("a"), 1)
    assert ledger.complete(reg.document_id, "w", [page("x")], 1.0, "cpu") == (
        "/in/a.png", "/in/copy of a.png")
    other = ledger.register("/in/b.png", sha("b"), 1)  # "keep": no paths asked for, none read
    assert claim_next(ledger, "w", 60) is not None
    assert ledger.complete(other.document_id, "w", [page("y")], 1.0, "cpu",
                           with_paths=False) == ()
    assert ledger.find(sha("b")).state == State.DONE


def test_lines_are_stored_rounded_in_their_order(ledger: Ledger) -> None:
    """Scores to 5 places and box corners to 0.1 px, numpy's float32 as the engine gives
    them or Python's floats, each line with its own text, score and box."""
    corners = ((1.04, 2.06), (30.25, 2.0), (30.0, 9.96), (1.0, 9.0))
    lines = (Line("first", 0.9123456, corners),  # type: ignore[arg-type]
             Line("second", float(np.float32(0.5)),
                  tuple((np.float32(x + 100), np.float32(y)) for x, y in corners)),  # type: ignore[arg-type]
             Line("", 1.0, ((0.0, 0.0),) * 4))  # type: ignore[arg-type]
    reg = ledger.register("/in/a.png", sha("a"), 1)
    assert claim_next(ledger, "w", 60) is not None
    assert ledger.complete(reg.document_id, "w", [PageResult(lines=lines), PageResult()], 1.0,
                           "cpu")
    stored = ledger.find(sha("a")).pages
    assert stored[0].lines == [
        {"text": "first", "score": 0.91235,
         "box": [[1.0, 2.1], [30.2, 2.0], [30.0, 10.0], [1.0, 9.0]]},
        {"text": "second", "score": 0.5,
         "box": [[101.0, 2.1], [130.2, 2.0], [130.0, 10.0], [101.0, 9.0]]},
        {"text": "", "score": 1.0, "box": [[0.0, 0.0]] * 4}]
    assert stored[1].lines == []


def test_a_document_stored_again_has_only_its_new_pages(ledger: Ledger) -> None:
    """A document stored once and claimed again (put back by hand here: no command does it
    today) is stored with its new pages only. On PostgreSQL the one-statement store meets the
    old pages' unique key and gives way to the transaction that deletes them first."""
    reg = ledger.register("/in/a.png", sha("a"), 1)
    assert claim_next(ledger, "w", 60) is not None
    assert ledger.complete(reg.document_id, "w", [page("one"), page("two")], 1.0, "cpu")
    with ledger.engine.begin() as conn:
        conn.execute(text("UPDATE documents SET state = 'processing', claimed_by = 'w2' "
                          "WHERE id = :id"), {"id": reg.document_id})
    assert ledger.complete(reg.document_id, "w2", [page("again")], 2.0, "cpu") == (
        "/in/a.png",)
    stored = ledger.find(sha("a"))
    assert stored.state == State.DONE
    assert [p.text for p in stored.pages] == ["again"]


def test_complete_refused_without_the_claim(ledger: Ledger) -> None:
    reg = ledger.register("/in/a.png", sha("a"), 1)
    assert claim_next(ledger, "w1", 60) is not None
    assert ledger.complete(reg.document_id, "w2", [page("x")], 1.0, "cpu") is None
    assert ledger.find(sha("a")).pages == ()


def test_transient_failure_is_retried_with_backoff_then_fails(ledger: Ledger) -> None:
    now = [datetime(2026, 1, 1, tzinfo=UTC)]
    timed = Ledger(ledger.engine, clock=lambda: now[0])
    reg = timed.register("/in/a.png", sha("a"), 1)
    assert claim_next(timed, "w", 60) is not None
    outcome = timed.fail(reg.document_id, "busy", permanent=False, max_attempts=2,
                         backoff_seconds=10)
    assert outcome.state == State.QUEUED
    assert claim_next(timed, "w", 60) is None  # not due yet
    now[0] += timedelta(seconds=11)
    assert claim_next(timed, "w", 60) is not None
    outcome = timed.fail(reg.document_id, "busy again", permanent=False, max_attempts=2,
                         backoff_seconds=10)
    assert outcome.state == State.FAILED and outcome.attempts == 2
    assert timed.status()["failures"][0] == {
        "path": "/in/a.png", "sha256": sha("a"), "reason": "busy again", "attempts": 2}


def test_permanent_failure_fails_at_once(ledger: Ledger) -> None:
    reg = ledger.register("/in/a.png", sha("a"), 1)
    claim_next(ledger, "w", 60)
    outcome = ledger.fail(reg.document_id, "corrupt", permanent=True, max_attempts=5,
                          backoff_seconds=1)
    assert outcome.state == State.FAILED


def test_release_and_stale_leases_requeue(ledger: Ledger) -> None:
    now = [datetime(2026, 1, 1, tzinfo=UTC)]
    timed = Ledger(ledger.engine, clock=lambda: now[0])
    a = timed.register("/in/a.png", sha("a"), 1)
    b = timed.register("/in/b.png", sha("b"), 1)
    claim_one(timed, a.document_id, "w", 60)
    claim_one(timed, b.document_id, "w", 600)
    assert timed.release(a.document_id, "w")
    assert timed.find(sha("a")).attempts == 0  # a hand-back is not an attempt
    now[0] += timedelta(seconds=120)
    claim_one(timed, a.document_id, "w", 60)
    now[0] += timedelta(seconds=120)
    assert len(timed.requeue_stale()) == 1  # a's lease ran out, b's did not
    assert timed.counts() == {"queued": 1, "processing": 1, "done": 0, "failed": 0}
    assert len(timed.requeue_stale(all_processing=True)) == 1


def test_find_by_any_path_or_sha(ledger: Ledger) -> None:
    reg = ledger.register("/in/a.png", sha("a"), 1)
    ledger.register("/in/copy.png", sha("a"), 1)
    assert ledger.find("whatever", ["/in/copy.png"]).id == reg.document_id
    assert ledger.find(sha("a").upper()).id == reg.document_id
    with pytest.raises(NotFoundError):
        ledger.find("/in/none.png", ["/in/none.png"])


def test_search_finds_pages_with_snippets(ledger: Ledger) -> None:
    for name, texts in {"a": ["alpha beta", "gamma"], "b": ["delta 50% off"]}.items():
        reg = ledger.register(f"/in/{name}.png", sha(name), 1)
        claim_one(ledger, reg.document_id, "w", 60)
        ledger.complete(reg.document_id, "w", [page(t) for t in texts], 1.0, "cpu")
    hits = ledger.search("GAMMA")
    assert [(h.path, h.page_no) for h in hits] == [("/in/a.png", 2)]
    assert [h.path for h in ledger.search("50%")] == ["/in/b.png"]
    assert ledger.search("5_%") == []  # LIKE wildcards are taken literally


def test_rejection_recorded_once(ledger: Ledger) -> None:
    first = ledger.record_rejection("/in/link.png", "symlink points outside the watched folder")
    again = ledger.record_rejection("/in/link.png", "symlink points outside the watched folder")
    assert first.path_added and not again.path_added
    assert ledger.counts()[State.FAILED] == 1
    assert ledger.status()["failures"][0]["reason"].startswith("symlink")


@pytest.mark.parametrize("url", ["mysql+pymysql://ocr@db/ocr", "mssql+pyodbc://ocr@db"])
def test_a_database_other_than_sqlite_or_postgresql_is_refused_at_start(url: str) -> None:
    """The ledger's statements (upserts, full-text search, migrations) are written for
    SQLite and PostgreSQL: anything else stops start-up naming the setting."""
    with pytest.raises(ConfigError, match=r"database\.url: .* is not supported"):
        make_engine(DatabaseSettings(url=url))


def test_migrations_are_found_installed_or_from_a_source_tree() -> None:
    from daemon.store.migrate import head_revision, migrations_dir

    assert (migrations_dir() / "env.py").is_file()
    assert head_revision() is not None


def test_a_rejection_is_recorded_failed_in_one_transaction(ledger: Ledger) -> None:
    """A claimer must never see a refused file's row as queued, even for a moment."""
    from sqlalchemy import event

    states: list[str] = []

    def on_commit(connection: object) -> None:
        states.append("commit")

    event.listen(ledger.engine, "commit", on_commit)
    try:
        registration = ledger.record_rejection("/in/link.png", "symlink points outside")
    finally:
        event.remove(ledger.engine, "commit", on_commit)
    assert states == ["commit"]
    assert registration.state == State.FAILED and registration.created
    assert claim_next(ledger, "w", 60) is None
    assert ledger.status()["failures"][0]["reason"] == "symlink points outside"
    again = ledger.record_rejection("/in/link.png", "symlink points outside")
    assert not again.path_added and again.state == State.FAILED


@pytest.mark.parametrize("limit", [1, 3])
def test_racing_claimers_take_each_document_once(ledger: Ledger, limit: int) -> None:
    """Choosing the rows and claiming them are one statement (UPDATE … WHERE id IN (SELECT
    …), on PostgreSQL the choice a CTE): eight workers claiming one, or three, at a time
    race for twenty documents and take each exactly once, with its path (SQLite has no row
    locks; PostgreSQL skips the locked ones)."""
    ids = [ledger.register(f"/in/{n}.png", sha(str(n)), 1).document_id for n in range(20)]
    barrier = threading.Barrier(8)
    taken: list[tuple[int, tuple[str, ...]]] = []

    def grab(i: int) -> None:
        barrier.wait()
        while claims := ledger.claim_many(f"w{i}", 60, limit):
            taken.extend((claim.document_id, claim.paths) for claim in claims)

    threads = [threading.Thread(target=grab, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(taken) == [(doc, (f"/in/{n}.png",)) for n, doc in enumerate(ids)]
    assert all(ledger.find(sha(str(n))).attempts == 1 for n in range(20))


def test_a_claim_of_several_takes_the_oldest_due_with_their_paths(ledger: Ledger) -> None:
    """claim_many: the oldest due documents, `limit` at most, oldest first, each with all of
    its paths; the excluded ones left."""
    ids = [ledger.register(f"/in/{n}.png", sha(str(n)), 1).document_id for n in range(5)]
    ledger.register("/in/copy of 1.png", sha("1"), 1)
    claims = ledger.claim_many("w", 60, 3, exclude=[ids[0]])
    assert [claim.document_id for claim in claims] == ids[1:4]
    assert [claim.paths for claim in claims] == [
        ("/in/1.png", "/in/copy of 1.png"), ("/in/2.png",), ("/in/3.png",)]
    assert all(claim.attempts == 1 and claim.sha256 == sha(str(n + 1))
               for n, claim in enumerate(claims))
    assert [claim.document_id for claim in ledger.claim_many("w", 60, 10)] == [ids[0], ids[4]]
    assert ledger.claim_many("w", 60, 10) == []
    assert ledger.counts()[State.PROCESSING] == 5


# -- leases that live (issue: N daemons, one database) ---------------------------------------


def test_a_late_failure_from_a_worker_that_lost_its_lease_changes_nothing(
        ledger: Ledger) -> None:
    now = [datetime(2026, 1, 1, tzinfo=UTC)]
    timed = Ledger(ledger.engine, clock=lambda: now[0])
    doc = timed.register("/in/a.png", sha("a"), 1).document_id
    assert claim_next(timed, "slow", 60) is not None
    now[0] += timedelta(seconds=61)
    assert len(timed.requeue_stale()) == 1  # its lease ran out
    assert claim_next(timed, "fast", 60) is not None
    assert timed.complete(doc, "fast", [page("stored by fast")], 0.1, "cpu")
    late = timed.fail(doc, "engine error", permanent=True, max_attempts=3, backoff_seconds=0,
                      worker="slow")
    assert late is None
    found = timed.find(sha("a"))
    assert (found.state, found.text, found.reason) == ("done", "stored by fast", None)


def test_the_heartbeat_renews_only_what_a_worker_holds(ledger: Ledger) -> None:
    now = [datetime(2026, 1, 1, tzinfo=UTC)]
    timed = Ledger(ledger.engine, clock=lambda: now[0])
    a = timed.register("/in/a.png", sha("a"), 1).document_id
    b = timed.register("/in/b.png", sha("b"), 1).document_id
    assert claim_one(timed, a, "w1", 60) is not None
    assert claim_one(timed, b, "w2", 60) is not None
    for _ in range(5):  # five minutes of a slow document, renewed every 50 s
        now[0] += timedelta(seconds=50)
        assert timed.renew("w1", [a, b], 60) == {a}  # b is not w1's to renew
        assert timed.renew("w2", [b], 60) == {b}
        assert len(timed.requeue_stale()) == 0
    now[0] += timedelta(seconds=61)  # w2 stops renewing (died)
    assert timed.renew("w1", [a], 60) == {a}
    assert len(timed.requeue_stale()) == 1
    assert timed.renew("w2", [b], 60) == set()  # lost: its work must stop
    assert timed.find(sha("a")).attempts == 1


def test_lease_expiries_count_as_attempts(ledger: Ledger) -> None:
    """A document that kills or hangs its worker every time ends failed, not looping."""
    now = [datetime(2026, 1, 1, tzinfo=UTC)]
    timed = Ledger(ledger.engine, clock=lambda: now[0])
    doc = timed.register("/in/a.png", sha("a"), 1).document_id
    for attempt in (1, 2, 3):
        claim = claim_next(timed, f"w{attempt}", 60)
        assert claim is not None and claim.attempts == attempt
        now[0] += timedelta(seconds=61)
        assert len(timed.requeue_stale(max_attempts=3)) == 1
    found = timed.find(sha("a"))
    assert found.state == "failed" and "lease ran out" in (found.reason or "")
    assert [e["event"] for e in timed.history(sha("a"))] == ["expired"] * 3
    assert claim_next(timed, "w4", 60) is None
    assert doc == found.id


def _kill_backends(url: str) -> int:
    """End every other server session on the database, as a server restart does."""
    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            return len(connection.execute(text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()")).all())
    finally:
        admin.dispose()


@pytest.mark.postgres
def test_lookups_and_claims_skip_the_transaction_round_trips(
        pg_url: str, tmp_path: Path) -> None:
    """On PostgreSQL a path lookup, a new file's registration (or several new files'), a claim
    with its paths and a document's storing (one statement each) run in autocommit: no BEGIN
    and no COMMIT or ROLLBACK, each a round trip, while a known content's registration,
    several statements that belong together, keeps them. Read off libpq's trace of what the
    client sent."""
    engine = make_engine(DatabaseSettings(url=pg_url))
    migrate.upgrade(engine)
    engine.dispose()
    trace = (tmp_path / "trace").open("w")

    connections: list[Any] = []

    @event.listens_for(engine, "connect")
    def traced(dbapi_connection: Any, _record: object) -> None:
        dbapi_connection.pgconn.trace(trace.fileno())
        connections.append(dbapi_connection.pgconn)

    def sent(action: Callable[[], object]) -> list[str]:
        """The commands `action` sent: a statement by its Sync, a simple query by its verb."""
        start = (tmp_path / "trace").stat().st_size
        action()
        for pgconn in connections:  # libpq flushes its trace when it stops
            pgconn.untrace()
            pgconn.trace(trace.fileno())
        with (tmp_path / "trace").open() as lines:
            lines.seek(start)
            found = [line.rstrip("\n").split("\t")[3:5] for line in lines if "\tF\t" in line]
        return [query.strip(' "').split()[0] if kind == "Query" else kind for kind, query in
                ([*part, ""][:2] for part in found) if kind in ("Query", "Sync")]

    ledger = Ledger(engine)
    try:
        ledger._clock()  # the server's clock read once (a round trip a minute), not counted
        stat = PathStat(1, 2, 3, 4, 5)
        assert sent(lambda: ledger.known_path("/in/a.png", stat)) == ["Sync"]
        # a new content: one statement; a known one tries it, then takes the transaction
        assert sent(lambda: ledger.register("/in/a.png", sha("a"), 1, stat=stat)) == ["Sync"]
        assert sent(lambda: ledger.known_path("/in/a.png", stat)) == ["Sync"]
        assert sent(lambda: ledger.register("/in/b.png", sha("a"), 1, stat=stat)) == [
            "Sync", "BEGIN", "Sync", "Sync", "Sync", "Sync", "COMMIT"]
        # the new contents of a batch: one statement for them all
        assert sent(lambda: ledger.register_many([
            NewFile(f"/in/new{n}.png", sha(f"new{n}"), 1, stat) for n in range(8)])) == ["Sync"]
        claims: list[Any] = []
        assert sent(lambda: claims.append(claim_next(ledger, "w", 60))) == ["Sync"]
        assert claims[0] is not None and claims[0].paths == ("/in/a.png", "/in/b.png")
        # the text and done in one statement; the paths for the after-action in one more,
        # read after that commit (a duplicate registered meanwhile is among them)
        assert sent(lambda: ledger.complete(claims[0].document_id, "w", [page("x")], 1.0,
                                            "cpu")) == ["Sync", "Sync"]
    finally:
        engine.dispose()
        trace.close()


@pytest.mark.postgres
def test_a_pooled_connection_is_pinged_only_after_an_idle_spell(
        pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A busy daemon's connections go back to work without a round trip; one that waited in
    the pool past PING_AFTER_IDLE_SECONDS, which the server may have closed meanwhile, is
    pinged, and replaced if it is dead, before the ledger uses it."""
    dialect = make_url(pg_url).get_dialect()
    real_ping = dialect.do_ping
    pings: list[str] = []

    def counted(self: object, connection: object) -> bool:
        try:
            alive: bool = real_ping(self, connection)
        except Exception:  # what psycopg raises for a session the server ended
            pings.append("raised")
            raise
        pings.append("alive" if alive else "dead")
        return alive

    monkeypatch.setattr(dialect, "do_ping", counted)
    engine = make_engine(DatabaseSettings(url=pg_url))
    migrate.upgrade(engine)
    ledger = Ledger(engine)
    try:
        ledger.register("/in/a.png", sha("a"), 1)
        ledger.counts()
        ledger.counts()
        assert pings == []  # used within the last seconds: not pinged
        assert _kill_backends(pg_url) >= 1  # the pooled connection is dead now
        monkeypatch.setattr(db_module, "PING_AFTER_IDLE_SECONDS", 0.0)
        assert ledger.counts()[State.QUEUED] == 1  # no error: replaced before use
        assert pings[0] in ("raised", "dead") and pings[1:] == []  # then a new connection
    finally:
        engine.dispose()


def test_a_dead_workers_row_is_shown_gone_then_removed(ledger: Ledger) -> None:
    """After `kill -9` its row stayed listed for ever with the documents it held, and a crash
    loop added a row a restart. Past a lease without a heartbeat a row is shown gone; past
    WORKER_ROWS_KEPT_LIVES leases the next heartbeat of any daemon removes it."""
    from daemon.store.ledger import WORKER_ROWS_KEPT_LIVES
    from daemon.store.records import WorkerBeat

    now = [datetime(2026, 12, 6, 12, 0, tzinfo=UTC)]
    timed = Ledger(ledger.engine, clock=lambda: now[0])
    lease = 60.0

    def beat(worker: str) -> int:
        return timed.beat(WorkerBeat(worker, "host", 1, "cpu", "cpu", 3, 1.0,
                                     live_seconds=lease))

    assert beat("killed") == 1
    now[0] += timedelta(seconds=30)
    assert beat("alive") == 2
    assert {w["id"]: w["alive"] for w in timed.workers(lease)} == {"killed": True,
                                                                    "alive": True}
    now[0] += timedelta(seconds=40)  # "killed" silent 70 s: more than a lease
    assert beat("alive") == 1
    assert {w["id"]: w["alive"] for w in timed.workers(lease)} == {"killed": False,
                                                                    "alive": True}
    assert {w["id"]: w["alive"] for w in timed.status(live_seconds=lease)["workers"]} == {
        "killed": False, "alive": True}
    now[0] += timedelta(seconds=WORKER_ROWS_KEPT_LIVES * lease)
    beat("alive")
    assert [w["id"] for w in timed.workers(lease)] == ["alive"]


@pytest.mark.postgres
def test_a_duplicate_registered_while_its_original_is_stored_is_seen(pg_url: str) -> None:
    """PostgreSQL: a duplicate registered at the moment its original was stored was seen by
    neither side: the registration read the state (processing) without a lock, the store
    then read the paths before the new one was committed, and the duplicate stayed in the
    inbox until a restart. Now the registration's read holds a share lock: the store waits
    for it and finds the new path among the document's."""
    from sqlalchemy import event, text

    engine = make_engine(DatabaseSettings(url=pg_url))
    migrate.upgrade(engine)
    ledger = Ledger(engine)
    paused, go = threading.Event(), threading.Event()

    def pause_after_the_state_is_read(_conn: Any, _cursor: Any, statement: str,
                                      *_args: Any) -> None:
        if threading.current_thread().name == "registering" and \
                "documents.state, documents.reason" in statement and not paused.is_set():
            paused.set()
            go.wait(10)

    try:
        original = ledger.register("/in/a.png", sha("a"), 1)
        assert claim_one(ledger, original.document_id, "w", 60) is not None
        event.listen(engine, "after_cursor_execute", pause_after_the_state_is_read)
        registered: list[Registration] = []
        stored: list[tuple[str, ...] | None] = []
        registering = threading.Thread(name="registering", target=lambda: registered.append(
            ledger.register("/in/a-copy.png", sha("a"), 1)))
        registering.start()
        assert paused.wait(10)  # it has read the state, and not yet added its path
        storing = threading.Thread(target=lambda: stored.append(ledger.complete(
            original.document_id, "w", [page("text")], 1.0, "cpu", with_paths=True)))
        storing.start()

        def store_waits_or_is_done() -> bool:
            with engine.connect() as probe:
                waiting = probe.execute(text(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                    "AND datname = current_database()")).scalar()
            return bool(waiting) or not storing.is_alive()

        assert wait_until(store_waits_or_is_done, 10)
        go.set()
        registering.join(10)
        storing.join(10)
        [registration], [paths] = registered, stored
        assert registration.state == "done" or "/in/a-copy.png" in (paths or ()), (
            registration, paths)
    finally:
        go.set()
        event.remove(engine, "after_cursor_execute", pause_after_the_state_is_read)
        engine.dispose()


@pytest.mark.postgres
def test_leases_are_timed_by_the_servers_clock_not_each_hosts(pg_url: str) -> None:
    """Daemons on two hosts whose clocks are 70 s apart: the one behind wrote leases that
    had run out by the other's clock, which took its documents while it was alive. On
    PostgreSQL the ledger's clock is the server's (each host's offset measured)."""
    from datetime import UTC, datetime, timedelta

    engine = make_engine(DatabaseSettings(url=pg_url))
    migrate.upgrade(engine)
    try:
        behind = Ledger(engine, host_clock=lambda: datetime.now(UTC) - timedelta(seconds=70))
        right = Ledger(engine)
        doc = behind.register("/in/a.png", sha("a"), 1)
        assert claim_one(behind, doc.document_id, "live", 60) is not None  # a 60 s lease
        assert right.requeue_stale() == []  # not run out: taken by nobody
        assert right.find(sha("a")).state == "processing"
    finally:
        engine.dispose()
