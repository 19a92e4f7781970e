"""Operator commands: `retry` and `forget`, on the ledger (both backends) and against a
running pipeline; a re-dropped failed file says how to retry it."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from daemon.cli import main
from daemon.config import load_settings
from daemon.errors import ExitCode, NotFoundError
from daemon.results import Image, Line, PageResult
from daemon.store.ledger import Ledger
from tests.pages import SENTENCES, write_page
from tests.support import (
    SettingsFactory,
    claim_next,
    claim_one,
    pipeline_running,
    wait_until,
)

ONE_PAGE = [PageResult(lines=(Line("a lighthouse keeper", 0.9,
                                   ((0, 0), (9, 0), (9, 9), (0, 9))),))]


def failed_document(ledger: Ledger, path: str, sha256: str, reason: str = "engine broke"
                    ) -> int:
    doc = ledger.register(path, sha256, 10).document_id
    assert claim_one(ledger, doc, "w", 60) is not None
    ledger.fail(doc, reason, permanent=True, max_attempts=3, backoff_seconds=0)
    return doc


def test_retry_requeues_failed_documents_and_keeps_the_reason(ledger: Ledger) -> None:
    doc = failed_document(ledger, "/in/a.png", "a" * 64, "CUDA out of memory")
    done = ledger.register("/in/b.png", "b" * 64, 10).document_id
    assert claim_one(ledger, done, "w", 60) is not None
    assert ledger.complete(done, "w", ONE_PAGE, 0.1, "cpu")

    [retried] = ledger.retry([doc, done])  # the done one is left alone
    assert (retried.document_id, retried.reason, retried.rejected) == (
        doc, "CUDA out of memory", False)
    found = ledger.find("a" * 64)
    assert (found.state, found.attempts, found.reason) == ("queued", 0, None)
    assert ledger.find("b" * 64).state == "done"
    assert [(e["event"], e["detail"]) for e in ledger.history("a" * 64)] == [
        ("failed", "CUDA out of memory"), ("retry", "CUDA out of memory")]
    assert ledger.retry([doc]) == []  # queued now: nothing to retry
    claim = claim_next(ledger, "w2", 60)
    assert claim is not None and claim.document_id == doc and claim.attempts == 1


def test_retry_all_takes_every_failed_one(ledger: Ledger) -> None:
    ids = [failed_document(ledger, f"/in/{n}.png", str(n) * 64) for n in range(3)]
    assert sorted(r.document_id for r in ledger.retry()) == ids
    assert ledger.counts()["queued"] == 3 and ledger.counts()["failed"] == 0


def test_a_refused_file_is_not_queued_by_retry(ledger: Ledger) -> None:
    """A file refused before it was read has no content hash: queuing its row would only
    fail again ('content changed'); retry leaves it to be read again by the caller."""
    ledger.record_rejection("/in/locked.png", "permission denied")
    [retried] = ledger.retry()
    assert retried.rejected
    assert ledger.counts()["failed"] == 1


def test_forget_removes_the_document_and_its_text(ledger: Ledger) -> None:
    doc = ledger.register("/in/b.png", "b" * 64, 10).document_id
    assert claim_one(ledger, doc, "w", 60) is not None
    assert ledger.complete(doc, "w", ONE_PAGE, 0.1, "cpu")
    assert ledger.search("lighthouse")
    assert ledger.forget(doc)
    with pytest.raises(NotFoundError):
        ledger.find("b" * 64)
    assert ledger.search("lighthouse") == []
    assert ledger.counts()["done"] == 0
    assert [e["event"] for e in ledger.history("b" * 64)] == ["forget"]
    assert not ledger.forget(doc)
    # the same content seen again is a new document, OCR'd again
    assert ledger.register("/in/b.png", "b" * 64, 10).created


# -- the commands against a running daemon -------------------------------------------------


class FlakyEngine:
    """Fails while `broken` is set, then reads every page as one line."""

    provider = "cpu"
    device = "cpu"

    def __init__(self) -> None:
        self.broken = threading.Event()
        self.broken.set()

    def recognize(self, images: Sequence[Image]) -> list[PageResult]:
        if self.broken.is_set():
            raise RuntimeError("CUDA failure 2: out of memory")
        return [ONE_PAGE[0] for _ in images]

    def close(self) -> None:
        pass


@pytest.fixture
def cli(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
        ) -> Iterator[Callable[..., tuple[int, str]]]:
    config = tmp_path / "config.toml"
    config.write_text(
        f'[watch]\npath = "{tmp_path / "inbox"}"\nfailed_dir = "failed"\n'
        f'[database]\nurl = "sqlite:///{tmp_path / "ocr.db"}"\n')

    def run(*args: str) -> tuple[int, str]:
        """`--config-max-bytes N` (not a real flag): run with watch.max_file_bytes = N."""
        capsys.readouterr()
        arguments = list(args)
        if "--config-max-bytes" in arguments:
            at = arguments.index("--config-max-bytes")
            limit = arguments[at + 1]
            del arguments[at : at + 2]
            monkeypatch.setenv("OCR_DAEMON_WATCH__MAX_FILE_BYTES", limit)
        try:
            code = main([*arguments, "--config", str(config)])
        finally:
            monkeypatch.delenv("OCR_DAEMON_WATCH__MAX_FILE_BYTES", raising=False)
        out, err = capsys.readouterr()
        return code, out + err

    yield run


def test_retry_and_forget_while_the_daemon_runs(
        settings_factory: SettingsFactory, cli: Callable[..., tuple[int, str]],
        caplog: pytest.LogCaptureFixture) -> None:
    settings = settings_factory(queue={"max_attempts": 1}, watch={"failed_dir": "failed"})
    inbox = settings.watch.path
    engine = FlakyEngine()
    with pipeline_running(settings, engine) as (_, ledger, _):
        write_page(inbox / "a.png", SENTENCES[:1])
        assert wait_until(lambda: ledger.counts()["failed"] == 1, 20)
        assert wait_until((inbox / "failed" / "a.png").exists, 10)

        # the same content dropped again: not OCR'd, and the log says how to retry it
        with caplog.at_level(logging.WARNING, logger="daemon.intake"):
            (inbox / "again.png").write_bytes((inbox / "failed" / "a.png").read_bytes())
            assert wait_until(lambda: "failed before" in caplog.text, 10)
        assert "out of memory" in caplog.text and "ocr-daemon retry" in caplog.text

        assert cli("retry", str(inbox / "nothing.png"))[0] == ExitCode.NOT_FOUND
        assert cli("retry")[0] == ExitCode.USAGE
        engine.broken.clear()
        code, out = cli("retry", str(inbox / "again.png"))
        assert code == 0, out
        assert "re-queued" in out and "out of memory" in out and "1 document re-queued" in out
        # read from where the failure moved it
        assert wait_until(lambda: ledger.counts()["done"] == 1, 20)
        code, out = cli("retry", "--failed")
        assert code == ExitCode.ERROR and "0 documents re-queued" in out
        code, out = cli("retry", str(inbox / "again.png"))
        assert code == ExitCode.ERROR and "done, not failed" in out

        code, out = cli("forget", str(inbox / "again.png"))
        assert code == 0 and "forgot" in out and "1 pages of text" in out
        assert ledger.counts() == {"queued": 0, "processing": 0, "done": 0, "failed": 0}
        assert cli("forget", str(inbox / "again.png"))[0] == ExitCode.NOT_FOUND


def test_retry_reads_a_refused_file_again(settings_factory: SettingsFactory,
                                          cli: Callable[..., tuple[int, str]]) -> None:
    """Refused before it was read (over watch.max_file_bytes): retried under the same limit it
    is still refused; the operator raises the limit (daemon restarted) and retries: the command
    reads it, the daemon OCRs it, the refusal's row gives way to the content's."""
    small = settings_factory(watch={"failed_dir": "failed", "max_file_bytes": 1000})
    inbox = small.watch.path
    engine = FlakyEngine()
    engine.broken.clear()
    with pipeline_running(small, engine) as (_, ledger, _):
        write_page(inbox / "big.png", SENTENCES[:1])
        assert wait_until(lambda: ledger.counts()["failed"] == 1, 20)
        assert "max_file_bytes" in (ledger.status()["failures"][0]["reason"] or "")
        code, out = cli("retry", "--failed", "--config-max-bytes", "1000")
        assert code == ExitCode.ERROR and "still refused" in out, out
    moving = settings_factory(watch={"failed_dir": "failed"})
    with pipeline_running(moving, engine) as (_, ledger, _):
        code, out = cli("retry", "--failed")
        assert code == 0 and "read now, re-queued" in out, out
        assert wait_until(lambda: ledger.counts()["done"] == 1, 20)
        assert ledger.counts()["failed"] == 0


def test_status_and_search_show_names_escaped(cli: Callable[..., tuple[int, str]],
                                              tmp_path: Path) -> None:
    """A producer's file name with a colour escape and a newline forged a second "failed"
    line in `status`; one with an OSC title sequence and a clear-screen reached the terminal
    through `search`. Both print names with their control characters escaped."""
    from daemon.store.db import open_ledger

    settings = load_settings(None, watch={"path": tmp_path / "inbox"},
                             database={"url": f"sqlite:///{tmp_path / 'ocr.db'}"})
    _, ledger = open_ledger(settings, migrate_now=True)
    forged = "/in/a\x1b[31mred.png\nfailed  /in/forged.png: nothing"
    ledger.record_rejection(forged, "permission denied")
    titled = "/in/\x1b]0;owned\x07\x1b[2Jscan.png"
    doc = ledger.register(titled, "b" * 64, 10).document_id
    assert claim_one(ledger, doc) is not None
    box = ((0.0, 0.0), (1.0, 0.0), (1.0, 1.0), (0.0, 1.0))
    assert ledger.complete(doc, "w", [PageResult(lines=(Line("lighthouse", 0.9, box),))], 0.1,
                           "cpu")
    ledger.close()
    code, out = cli("status")
    assert code == 0 and "\x1b" not in out
    assert [line for line in out.splitlines() if line.startswith("failed")] == [
        "failed  /in/a\\x1b[31mred.png\\nfailed  /in/forged.png: nothing: permission denied"]
    code, out = cli("search", "lighthouse")
    assert code == 0 and "\x1b" not in out and "\x07" not in out
    assert out.splitlines() == ["/in/\\x1b]0;owned\\x07\\x1b[2Jscan.png\tpage 1\t[lighthouse]"]


def test_retry_reads_a_file_from_a_failed_folder_outside_the_inbox(
        settings_factory: SettingsFactory, cli: Callable[..., tuple[int, str]],
        tmp_path: Path) -> None:
    """With `watch.failed_dir` absolute and outside the watched folder, a retried document
    "vanished before it was read" three times and ended failed, its file still there: the
    pipeline read only beneath the watched folder."""
    elsewhere = tmp_path / "failed-elsewhere"
    settings = settings_factory(queue={"max_attempts": 1},
                                watch={"failed_dir": str(elsewhere)})
    engine = FlakyEngine()
    with pipeline_running(settings, engine) as (_, ledger, _):
        write_page(settings.watch.path / "a.png", SENTENCES[:1])
        assert wait_until(lambda: ledger.counts()["failed"] == 1, 20)
        assert wait_until((elsewhere / "a.png").exists, 10)
        engine.broken.clear()
        code, out = cli("retry", "--failed")
        assert code == 0, out
        assert wait_until(lambda: ledger.counts()["done"] == 1, 20), ledger.status()
        assert ledger.counts()["failed"] == 0
