"""`ocr-daemon export`: what other tools get, in id order, filtered by time, in constant
memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from daemon.cli import main
from daemon.config import DatabaseSettings
from daemon.results import Line, PageResult, join_pages
from daemon.store import migrate
from daemon.store.db import make_engine
from daemon.store.ledger import Ledger
from daemon.store.models import Document, DocumentPath, PageRow
from tests.support import claim_one

REPO = Path(__file__).resolve().parent.parent
BOX = ((0.0, 0.0), (10.0, 0.0), (10.0, 5.0), (0.0, 5.0))


def store(ledger: Ledger, path: str, sha: str, *texts: str) -> None:
    doc = ledger.register(path, sha, 10).document_id
    assert claim_one(ledger, doc, "w", 60) is not None
    pages = [PageResult(lines=(Line(text, 0.75, BOX),)) for text in texts]
    assert ledger.complete(doc, "w", pages, 0.5, "cuda")


def test_export_jsonl_txt_and_since(db_url: str, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    engine = make_engine(DatabaseSettings(url=db_url))
    migrate.upgrade(engine)
    now = [datetime(2026, 11, 1, tzinfo=UTC)]
    ledger = Ledger(engine, clock=lambda: now[0])
    store(ledger, "/in/old.png", "a" * 64, "an old page")
    now[0] += timedelta(days=10)
    store(ledger, "/in/new.pdf", "b" * 64, "first page", "台灣的發票")
    failed = ledger.register("/in/bad.png", "c" * 64, 10).document_id
    claim_one(ledger, failed, "w", 60)
    ledger.fail(failed, "corrupt", permanent=True, max_attempts=1, backoff_seconds=0)
    engine.dispose()
    monkeypatch.setenv("OCR_DAEMON_DATABASE__URL", db_url)

    assert main(["export"]) == 0
    out, err = capsys.readouterr()
    documents = [json.loads(line) for line in out.splitlines()]
    assert [d["sha256"] for d in documents] == ["a" * 64, "b" * 64]  # the failed one is not
    new = documents[1]
    assert new["paths"] == ["/in/new.pdf"] and new["provider"] == "cuda"
    assert new["text"] == join_pages(["first page", "台灣的發票"])
    assert [p["page_no"] for p in new["pages"]] == [1, 2]
    assert new["pages"][1]["lines"][0]["text"] == "台灣的發票"
    assert new["pages"][1]["lines"][0]["score"] == 0.75
    assert new["finished_at"].startswith("2026-11-11")
    assert "2 documents exported" in err

    assert main(["export", "--since", "2026-11-05"]) == 0
    out, _ = capsys.readouterr()
    assert [json.loads(line)["sha256"] for line in out.splitlines()] == ["b" * 64]
    assert main(["export", "--format", "txt", "--since", "2026-11-05T00:00:00+00:00"]) == 0
    out, _ = capsys.readouterr()
    assert out.startswith(f"==> /in/new.pdf ({'b' * 64}) <==\nfirst page")
    with pytest.raises(SystemExit):
        main(["export", "--since", "last tuesday"])


EXPORT_AND_PEAK = (
    "import sys\n"
    "from pathlib import Path\n"
    "from daemon.cli import main\n"
    "code = main(['export'])\n"
    "peak = [l for l in Path('/proc/self/status').read_text().splitlines()\n"
    "        if l.startswith('VmHWM:')][0].split()[1]\n"
    "print('PEAK', peak, file=sys.stderr)\n"
    "raise SystemExit(code)\n"
)


def _export_peak_rss(db_url: str) -> tuple[int, int]:
    """Peak RSS (kB, the process's own VmHWM: ru_maxrss would count the forking parent) and
    bytes written of `ocr-daemon export` in a process of its own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OCR_DAEMON_")}
    env["OCR_DAEMON_DATABASE__URL"] = db_url
    env["PYTHONPATH"] = str(REPO)
    with subprocess.Popen([sys.executable, "-c", EXPORT_AND_PEAK], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        written = sum(len(chunk) for chunk in iter(lambda: proc.stdout.read(1 << 20), b""))
        err = proc.stderr.read().decode()
    assert proc.returncode == 0, err
    peak = int(err.split("PEAK")[1].split()[0])
    return peak, written


def bulk_documents(url: str, first: int, count: int) -> None:
    """`count` done documents of one ~2 kB page each, written straight into the tables."""
    engine = make_engine(DatabaseSettings(url=url))
    migrate.upgrade(engine)
    now = datetime(2026, 11, 1, tzinfo=UTC)
    text = "lighthouse keepers count the purple waves " * 48
    lines = [{"text": text[:80], "score": 0.9, "box": [[0, 0], [1, 0], [1, 1], [0, 1]]}] * 24
    ids = range(first, first + count)
    with engine.begin() as connection:
        connection.execute(Document.__table__.insert(), [
            {"id": i, "sha256": f"{i:064x}", "size_bytes": 1, "state": "done", "attempts": 1,
             "first_seen_at": now, "finished_at": now, "page_count": 1} for i in ids])
        connection.execute(DocumentPath.__table__.insert(), [
            {"document_id": i, "path": f"/in/{i}.png", "first_seen_at": now,
             "last_seen_at": now} for i in ids])
        connection.execute(PageRow.__table__.insert(), [
            {"document_id": i, "page_no": 1, "text": text, "confidence": 0.9, "source": "ocr",
             "lines": lines} for i in ids])
    engine.dispose()


def test_export_of_10000_documents_runs_in_constant_memory(tmp_path: Path) -> None:
    """Peak RSS exporting 10,000 documents (~50 MB of JSON) is that of exporting 1,000."""
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    bulk_documents(url, 1, 1000)
    small_rss, small_out = _export_peak_rss(url)
    bulk_documents(url, 1001, 9000)
    large_rss, large_out = _export_peak_rss(url)
    print(f"export peak RSS: 1,000 documents {small_rss / 1024:.1f} MB "
          f"({small_out / 1e6:.1f} MB out); 10,000: {large_rss / 1024:.1f} MB "
          f"({large_out / 1e6:.1f} MB out)")
    assert large_out > 9 * small_out
    assert large_rss - small_rss < 8 * 1024, (small_rss, large_rss)  # kB: +72 MB out, ~0 in


def test_since_honours_the_utc_offset(ledger: Ledger) -> None:
    """A document finished at 17:26:47Z is found by a bound 47 s before it written in
    +01:00, and not by one 13 s after it written in -01:00 (on SQLite the offset was
    dropped: the first missed it and the second found it)."""
    from daemon.store.export import iter_documents

    finished = datetime(2026, 12, 6, 17, 26, 47, tzinfo=UTC)
    timed = Ledger(ledger.engine, clock=lambda: finished)
    store(timed, "/in/a.png", "a" * 64, "text")
    before = datetime.fromisoformat("2026-12-06T18:26:00+01:00")  # 17:26:00Z
    after = datetime.fromisoformat("2026-12-06T16:27:00-01:00")  # 17:27:00Z
    assert [d["sha256"] for d in iter_documents(ledger.engine, before)] == ["a" * 64]
    assert list(iter_documents(ledger.engine, after)) == []
    naive = datetime(2026, 12, 6, 17, 26)  # no zone: UTC, as `--since` documents
    assert len(list(iter_documents(ledger.engine, naive))) == 1


def test_export_holds_pages_a_run_of_bytes_at_a_time(ledger: Ledger,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """200 documents of up to 500 pages, lines and all, were read at once. Pages are read in
    runs of PAGE_BYTES (one document alone when it has more), and the export is the same."""
    from sqlalchemy import event

    from daemon.store import export

    for n in range(6):
        store(ledger, f"/in/{n}.png", f"{n}" * 64, *[f"page {p} of {n} " * 20 for p in range(3)])
    whole = list(export.iter_documents(ledger.engine))
    monkeypatch.setattr(export, "PAGE_BYTES", 1500)  # about one document's pages
    page_queries: list[int] = []

    def count(_conn: object, _cursor: object, statement: str, *_args: object) -> None:
        if statement.lstrip().startswith("SELECT pages.document_id, pages.page_no"):
            page_queries.append(1)

    event.listen(ledger.engine, "before_cursor_execute", count)
    try:
        assert list(export.iter_documents(ledger.engine)) == whole
    finally:
        event.remove(ledger.engine, "before_cursor_execute", count)
    assert len(whole) == 6 and len(page_queries) >= 3  # in runs, not all six at once
