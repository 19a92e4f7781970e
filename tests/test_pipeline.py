"""The pipeline on real SQLite with the real engine; fake engines only for crashes and stalls."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable, Iterator, Sequence

import pytest

from daemon.config import Settings
from daemon.intake import Intake
from daemon.metrics import Metrics
from daemon.pipeline import Pipeline
from daemon.results import Image, PageResult
from daemon.service import Service
from daemon.store.db import open_ledger
from daemon.store.repository import Ledger
from daemon.watcher import Watcher
from tests.pages import SENTENCES, page_bytes, similarity, write_page

SettingsFactory = Callable[..., Settings]


def wait_until(predicate: Callable[[], bool], timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


@pytest.fixture
def service(settings_factory: SettingsFactory) -> Iterator[Callable[..., Service]]:
    started: list[Service] = []

    def make(**sections: dict[str, object]) -> Service:
        svc = Service(settings_factory(**sections))
        svc.start()
        started.append(svc)
        return svc

    yield make
    for svc in started:
        svc.stop()


def test_files_are_stored_deduplicated_and_moved(service: Callable[..., Service]) -> None:
    svc = service(watch={"after": "move", "done_dir": "done"})
    inbox = svc.settings.watch.path
    write_page(inbox / "one.png", SENTENCES[:2])
    write_page(inbox / "two.jpg", SENTENCES[2:4])
    ledger = svc.ledger
    assert wait_until(lambda: ledger.counts()["done"] == 2)
    # the move follows the commit of the text
    assert wait_until(lambda: (inbox / "done" / "one.png").exists())
    shutil.copy(inbox / "done" / "one.png", inbox / "again.png")  # same content, new name
    assert wait_until(lambda: not (inbox / "again.png").exists())
    assert ledger.counts() == {"queued": 0, "processing": 0, "done": 2, "failed": 0}
    doc = ledger.find("x", [str(inbox / "again.png")])
    assert similarity(doc.text, "\n".join(SENTENCES[:2])) > 0.9
    assert sorted(p.name for p in (inbox / "done").iterdir()) == ["again.png", "one.png",
                                                                   "two.jpg"]


def test_bad_file_is_quarantined_and_the_rest_goes_on(service: Callable[..., Service]) -> None:
    svc = service(watch={"failed_dir": "failed", "after": "delete"})
    inbox = svc.settings.watch.path
    (inbox / "broken.png").write_bytes(page_bytes(SENTENCES[:3])[:3000])  # truncated
    write_page(inbox / "good.png", SENTENCES[:1])
    ledger = svc.ledger
    assert wait_until(lambda: ledger.counts()["done"] == 1 and ledger.counts()["failed"] == 1)
    assert wait_until(lambda: not (inbox / "good.png").exists())  # after = delete
    sidecar = inbox / "failed" / "broken.png.error.txt"
    assert wait_until(sidecar.exists)
    assert "corrupt or truncated image" in sidecar.read_text()
    failure = ledger.status()["failures"][0]
    assert failure["path"].endswith("broken.png") and "corrupt" in failure["reason"]


class CrashingEngine:
    provider = "cpu"

    def __init__(self) -> None:
        self.calls = 0

    def recognize(self, images: Sequence[Image]) -> list[PageResult]:
        self.calls += 1
        raise RuntimeError("CUDA failure 2: out of memory")

    def close(self) -> None:
        pass


class StallingEngine:
    provider = "cpu"

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def recognize(self, images: Sequence[Image]) -> list[PageResult]:
        self.entered.set()
        self.release.wait(30)
        return [PageResult() for _ in images]

    def close(self) -> None:
        self.release.set()


def run_pipeline(settings: Settings, engine: object) -> tuple[Pipeline, Ledger, Watcher]:
    _, ledger = open_ledger(settings, migrate_now=True)
    metrics = Metrics("test")
    pipeline = Pipeline(settings, ledger, [engine], metrics, "cpu")  # type: ignore[list-item]
    pipeline.start()
    intake = Intake(settings, ledger, metrics, retry_db=pipeline.retry_db,
                    notify=pipeline.notify)
    watcher = Watcher(settings.watch, intake.take, intake.reject, tick_seconds=0.05)
    watcher.start()
    return pipeline, ledger, watcher


def test_engine_errors_are_retried_then_failed(settings_factory: SettingsFactory) -> None:
    settings = settings_factory(queue={"max_attempts": 2, "retry_backoff_seconds": 0.2},
                                watch={"failed_dir": "failed"})
    engine = CrashingEngine()
    pipeline, ledger, watcher = run_pipeline(settings, engine)
    try:
        write_page(settings.watch.path / "a.png", SENTENCES[:1])
        assert wait_until(lambda: ledger.counts()["failed"] == 1, 20)
        assert engine.calls == 2
        failure = ledger.status()["failures"][0]
        assert failure["attempts"] == 2 and "out of memory" in failure["reason"]
        assert (settings.watch.path / "failed" / "a.png.error.txt").exists()
    finally:
        watcher.stop()
        pipeline.stop(1)


def test_stop_hands_unfinished_work_back(settings_factory: SettingsFactory) -> None:
    settings = settings_factory()
    engine = StallingEngine()
    pipeline, ledger, watcher = run_pipeline(settings, engine)
    write_page(settings.watch.path / "a.png", SENTENCES[:1])
    assert engine.entered.wait(20)
    watcher.stop()
    assert ledger.counts()["processing"] == 1
    assert pipeline.stop(timeout=0.3) == 1
    assert ledger.counts() == {"queued": 1, "processing": 0, "done": 0, "failed": 0}
    assert ledger.find("x", [str(settings.watch.path / "a.png")]).attempts == 0


def mixed_pdf(specs: list[list[str] | None], scan_lines: list[str]) -> bytes:
    """Born-digital pages (their lines as a text layer) and, for None, a scanned page of
    `scan_lines` (an image rendered large enough to read at the daemon's defaults)."""
    import io

    import pypdfium2 as pdfium

    from tests.pages import render_page
    from tests.test_pdf import LETTER, _add_text

    scans = [render_page(scan_lines, size=44, width=1100) for s in specs if s is None]
    buffer = io.BytesIO()
    scans[0].save(buffer, "PDF", resolution=100, save_all=True, append_images=scans[1:])
    scan_doc = pdfium.PdfDocument(buffer.getvalue())
    pdf = pdfium.PdfDocument.new()
    used = 0
    for index, spec in enumerate(specs):
        if spec is None:
            pdf.import_pages(scan_doc, [used], index=index)
            used += 1
        else:
            page = pdf.new_page(*LETTER)
            _add_text(pdf, page, spec)
            page.close()
    out = io.BytesIO()
    pdf.save(out)
    pdf.close()
    scan_doc.close()
    return out.getvalue()


def test_twenty_page_mixed_pdf_is_stored_page_by_page(service: Callable[..., Service]) -> None:
    specs: list[list[str] | None] = [
        None if i % 4 == 0 else [f"Page {i} of the mixed document", f"line two of {i}"]
        for i in range(20)]
    svc = service()
    inbox = svc.settings.watch.path
    part = inbox / "mixed.pdf.part"
    part.write_bytes(mixed_pdf(specs, SENTENCES[:2]))
    part.rename(inbox / "mixed.pdf")
    ledger = svc.ledger
    assert wait_until(lambda: ledger.counts()["done"] == 1, 180)
    doc = ledger.find("x", [str(inbox / "mixed.pdf")])
    assert [p.page_no for p in doc.pages] == list(range(1, 21))
    for spec, page in zip(specs, doc.pages, strict=True):
        if spec is None:  # a scan: OCR'd
            assert page.source == "ocr"
            assert similarity(page.text, "\n".join(SENTENCES[:2])) > 0.9, page.text
        else:  # born-digital: its own text layer, exactly
            assert page.source == "text_layer"
            assert page.text == "\n".join(spec)
