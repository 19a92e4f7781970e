"""Full-text search, every test on real SQLite (FTS5 trigram) and real PostgreSQL (pg_trgm +
tsvector): the same queries, the same answers."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from alembic import command
from PIL import Image, ImageDraw, ImageFont
from sqlalchemy import text

from daemon.cli import main
from daemon.config import DatabaseSettings, OcrSettings
from daemon.hardware.providers import CPU
from daemon.ocr.rapid import RapidOcrEngine
from daemon.results import Line, PageResult
from daemon.store import migrate
from daemon.store.db import make_engine
from daemon.store.ledger import Ledger
from daemon.store.search import parse_query, snippet
from tests.support import claim_one

FONT = Path(__file__).parent / "fonts" / "DroidSansFallback-test-subset.ttf"
BOX = ((0.0, 0.0), (10.0, 0.0), (10.0, 5.0), (0.0, 5.0))


def page(*lines: str) -> PageResult:
    return PageResult(lines=tuple(Line(t, 0.9, BOX) for t in lines))


def store(ledger: Ledger, path: str, *pages: PageResult) -> str:
    digest = hashlib.sha256(path.encode()).hexdigest()
    registration = ledger.register(path, digest, 1)
    assert claim_one(ledger, registration.document_id, "w", 60) is not None
    assert ledger.complete(registration.document_id, "w", list(pages), 1.0, "cpu")
    return digest


def found(ledger: Ledger, query: str) -> list[tuple[str, int]]:
    return [(hit.path, hit.page_no) for hit in ledger.search(query)]


@pytest.fixture
def corpus(ledger: Ledger) -> Ledger:
    store(ledger, "/in/letter.png",
          page("Please deliver the parcel to the north gate",
               "Seven lighthouse keepers counted purple waves"))
    store(ledger, "/in/invoice.pdf",
          page("Invoice number 48213 due on 12 March 2026"),
          page("Total amount payable 1280 euros", "the gate is north of the lighthouse"))
    store(ledger, "/in/chinese.png", page("请把包裹送到北门", "七位灯塔守护者数紫色的浪"))
    store(ledger, "/in/japanese.png", page("東京駅で会いましょう"))
    return ledger


def test_words_parts_of_words_and_any_case(corpus: Ledger) -> None:
    assert found(corpus, "lighthouse") == found(corpus, "LightHouse")
    assert sorted(found(corpus, "lighthouse")) == [("/in/invoice.pdf", 2), ("/in/letter.png", 1)]
    assert found(corpus, "voic") == [("/in/invoice.pdf", 1)]  # inside a word
    assert found(corpus, "nothing like this") == []


def test_every_term_must_occur_on_the_page(corpus: Ledger) -> None:
    assert found(corpus, "march invoice") == [("/in/invoice.pdf", 1)]
    assert found(corpus, "invoice euros") == []  # on two different pages of one document
    assert sorted(found(corpus, "gate north")) == [("/in/invoice.pdf", 2), ("/in/letter.png", 1)]


def test_double_quotes_keep_a_phrase_together(corpus: Ledger) -> None:
    assert found(corpus, '"north gate"') == [("/in/letter.png", 1)]
    assert found(corpus, '"gate north"') == []
    assert found(corpus, '"north  gate') == [("/in/letter.png", 1)]  # unclosed, spaces folded


def test_chinese_and_japanese_substrings(corpus: Ledger) -> None:
    assert found(corpus, "包裹送到") == [("/in/chinese.png", 1)]  # trigram lookup
    assert found(corpus, "北门") == [("/in/chinese.png", 1)]  # two characters: scanned
    assert found(corpus, "门") == [("/in/chinese.png", 1)]
    assert found(corpus, "灯塔 包裹") == [("/in/chinese.png", 1)]
    assert found(corpus, "东门") == []
    assert found(corpus, "東京駅") == [("/in/japanese.png", 1)]
    assert corpus.search("包裹送到")[0].snippet == "请把[包裹送到]北门 七位灯塔守护者数紫色的浪"


def test_more_occurrences_rank_higher(ledger: Ledger) -> None:
    store(ledger, "/in/once.png", page("a report about the harbour and one lighthouse"))
    store(ledger, "/in/often.png",
          page("lighthouse lighthouse lighthouse", "the harbour lighthouse at night"))
    store(ledger, "/in/none.png", page("a report about the harbour"))
    hits = ledger.search("lighthouse")
    assert [h.path for h in hits] == ["/in/often.png", "/in/once.png"]
    assert hits[0].score > hits[1].score


def test_hits_carry_path_page_sha_and_a_marked_snippet(corpus: Ledger) -> None:
    [hit] = corpus.search("keepers")
    assert (hit.path, hit.page_no) == ("/in/letter.png", 1)
    assert hit.sha256 == hashlib.sha256(b"/in/letter.png").hexdigest()
    assert hit.snippet == ("…to the north gate Seven lighthouse [keepers] counted "
                           "purple waves")
    hits = {h.path: h.snippet for h in corpus.search("GATE north")}
    assert hits["/in/invoice.pdf"] == ("Total amount payable 1280 euros the [gate] is [north] "
                                       "of the lighthouse")


def test_snippet_windows_and_marks() -> None:
    long = "word " * 30 + "the Needle here " + "tail " * 30
    marked = snippet(long, "needle", width=10)
    assert marked == "…word the [Needle] here tail…"  # whole words at the edges
    assert snippet("no match at all", "zzz") == "no match at all"
    assert snippet("abc abc", ["abc"]) == "[abc] [abc]"
    assert snippet("x ab y", "ab abc") == "x [ab] y"  # longest term first, no double marks
    assert snippet("50% off_", "50% _") == "[50%] off[_]"


def test_limit_and_empty_queries(corpus: Ledger) -> None:
    assert len(corpus.search("e", limit=100)) == 3
    assert len(corpus.search("e", limit=2)) == 2
    assert corpus.search("lighthouse", limit=0) == []
    assert corpus.search("") == [] and corpus.search('  "" ') == []


HOSTILE = "He said \"stop\" (AND) -x * 50% a_b back\\slash NEAR(a b) col:val ^start it's"


HOSTILE_QUERIES: list[tuple[str, bool]] = [
    ('"stop"', True), ("(AND)", True), ("AND", True), ("OR", False), ("NEAR", True),
    ("-x", True), ("*", True), ("50%", True), ("a_b", True), ("\\", True),
    ("back\\slash", True), ("NEAR(a", True), ("col:val", True), ("^start", True),
    ("it's", True), ("'", True), ("''", False), ("%", True), ("_", True), ("5_%", False),
    ('said "stop', True), ('"', False), ('""""', False), ('stop"(AND', True),
    ("a%b", False), ("a_%", False), ("); DROP TABLE pages; --", False), ("\x00", False),
    ("st\x00op", True), (":limit", False), (":match x", False), ("{x}", False),
    ("NOT -nothing", False), ("x" * 5000, False), (" ".join(f"w{i}" for i in range(1000)), False),
]


def test_user_input_is_text_not_syntax(ledger: Ledger) -> None:
    """Quotes group a phrase; everything else is searched for literally, never parsed."""
    store(ledger, "/in/hostile.png", page(HOSTILE))
    store(ledger, "/in/plain.png", page("nothing special here"))
    for query, matches in HOSTILE_QUERIES:
        expected = [("/in/hostile.png", 1)] if matches else []
        assert found(ledger, query) == expected, query
    assert found(ledger, "NOT") == [("/in/plain.png", 1)]  # in "nothing": a word, not NOT
    assert ledger.counts()["done"] == 2  # and the tables are all still there


def test_parse_query() -> None:
    assert parse_query('Big  "north gate" big -x "open') == ["Big", "north gate", "-x", "open"]
    assert parse_query('""  ') == []
    assert len(parse_query(" ".join(map(str, range(100))))) == 32


def test_index_follows_updates_deletes_and_migration(db_url: str) -> None:
    """Pages stored before 0002 are indexed (and folded, 0006); the index follows every later
    change; the migrations downgrade and upgrade again."""
    engine = make_engine(DatabaseSettings(url=db_url))
    try:
        migrate.upgrade(engine, "0001")
        with engine.begin() as connection:  # a page as revision 0001 stored it
            connection.execute(text(
                "INSERT INTO documents (id, sha256, size_bytes, state, attempts, first_seen_at)"
                " VALUES (1, :sha, 1, 'done', 1, CURRENT_TIMESTAMP)"), {"sha": "0" * 64})
            connection.execute(text(
                "INSERT INTO document_paths (document_id, path, first_seen_at, last_seen_at) "
                "VALUES (1, '/in/old.png', CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"))
            connection.execute(text(
                "INSERT INTO pages (document_id, page_no, text, source, lines) "
                "VALUES (1, 1, 'stored before search existed, 台灣', 'ocr', '[]')"))
        migrate.upgrade(engine)
        ledger = Ledger(engine)
        assert found(ledger, "before search") == [("/in/old.png", 1)]
        assert found(ledger, "台湾") == [("/in/old.png", 1)]  # folded by the migration
        store(ledger, "/in/new.png", page("stored after"))
        with engine.begin() as connection:
            # as the daemon writes a page: its text and the folded twin search reads
            connection.execute(text("UPDATE pages SET text = 'rewritten lighthouse', "
                                    "folded = 'rewritten lighthouse' "
                                    "WHERE text = 'stored after'"))
        assert found(ledger, "stored after") == [] and found(ledger, "lighthouse") == [
            ("/in/new.png", 1)]
        with engine.begin() as connection:
            connection.execute(text("DELETE FROM documents WHERE id IN "
                                    "(SELECT document_id FROM document_paths "
                                    "WHERE path = '/in/old.png')"))
        assert found(ledger, "stored") == []
        config = migrate._alembic_config()
        with engine.begin() as connection:
            config.attributes["connection"] = connection
            command.downgrade(config, "0001")
        assert migrate.current_revision(engine) == "0001"
        migrate.upgrade(engine)
        assert found(ledger, "lighthouse") == [("/in/new.png", 1)]
    finally:
        engine.dispose()


# -- the command line ---------------------------------------------------------------------


@pytest.fixture
def cli(corpus: Ledger, db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> Iterator[Callable[..., tuple[int, str, str]]]:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OCR_DAEMON_DATABASE__URL", db_url)

    def run(*args: str) -> tuple[int, str, str]:
        code = main(["search", *args])
        out, err = capsys.readouterr()
        return code, out, err

    yield run


def test_cli_text_json_and_exit_codes(cli: Callable[..., tuple[int, str, str]]) -> None:
    run = cli
    code, out, _ = run("包裹送到")
    assert code == 0
    assert out == "/in/chinese.png\tpage 1\t请把[包裹送到]北门 七位灯塔守护者数紫色的浪\n"
    code, out, _ = run("lighthouse", "--json", "--limit", "1")
    [hit] = json.loads(out)
    assert code == 0 and set(hit) == {"path", "sha256", "page_no", "snippet", "score"}
    assert "[lighthouse]" in hit["snippet"]
    assert run("(unmatched \" AND *")[0] == 1
    code, out, err = run('""')
    assert code == 1 and out == "" and "empty" in err
    with pytest.raises(SystemExit) as exit_:
        run("x", "--limit", "0")
    assert exit_.value.code == 2


# -- a real page: Chinese rendered, OCR'd, stored, found -----------------------------------


@pytest.fixture(scope="module")
def chinese_page() -> PageResult:
    font = ImageFont.truetype(str(FONT), 48)
    image = Image.new("RGB", (900, 260), "white")
    draw = ImageDraw.Draw(image)
    draw.text((60, 50), "请把包裹送到北门", fill="black", font=font)
    draw.text((60, 140), "七位灯塔守护者数紫色的浪", fill="black", font=font)
    bgr = np.ascontiguousarray(np.asarray(image)[:, :, ::-1])
    engine = RapidOcrEngine(OcrSettings(lang="ch"), CPU)
    try:
        [result] = engine.recognize([bgr])
    finally:
        engine.close()
    return result


def test_ocr_chinese_then_search(ledger: Ledger, chinese_page: PageResult) -> None:
    assert "包裹送到北门" in chinese_page.text, chinese_page.text
    store(ledger, "/in/scan.png", chinese_page)
    store(ledger, "/in/other.png", page("送货 to the east gate"))
    assert found(ledger, "包裹送到北门") == [("/in/scan.png", 1)]
    assert found(ledger, "北门") == [("/in/scan.png", 1)]
    assert found(ledger, "灯塔") == [("/in/scan.png", 1)]
    assert ledger.search("送到北门")[0].snippet.startswith("请把包裹[送到北门]")


# -- one script for matching, the page as stored for showing -------------------------------


def test_fold_keeps_the_length_and_joins_the_forms() -> None:
    from daemon.store.fold import fold

    for text_, want in [("台灣的發票", "台湾的发票"), ("发票", "发票"), ("臺北", "台北"),
                        ("ＡＢＣ１２３ Invoice", "abc123 invoice"), ("Straße ﬁ ㍿", "straße ﬁ ㍿")]:
        assert fold(text_) == want and len(fold(text_)) == len(text_)


def test_chinese_search_across_scripts_and_widths(ledger: Ledger) -> None:
    store(ledger, "/in/taiwan.png", page("歡迎來到台灣 這是統一發票"))
    store(ledger, "/in/mainland.png", page("这是增值税发票 请保留"))
    store(ledger, "/in/wide.png", page("型号 ＡＢＣ１２３ 已发货"))
    assert found(ledger, "台湾") == [("/in/taiwan.png", 1)]  # Simplified finds Traditional
    assert sorted(found(ledger, "發票")) == [("/in/mainland.png", 1), ("/in/taiwan.png", 1)]
    assert found(ledger, "增值稅") == [("/in/mainland.png", 1)]  # Traditional finds Simplified
    assert found(ledger, "abc123") == [("/in/wide.png", 1)]  # half width finds full width
    assert found(ledger, "ＡＢＣ") == [("/in/wide.png", 1)]
    assert found(ledger, "台") == [("/in/taiwan.png", 1)]  # one character: the LIKE path
    [hit] = ledger.search("台湾")
    assert hit.snippet == "歡迎來到[台灣] 這是統一發票"  # shown as stored, the match marked
