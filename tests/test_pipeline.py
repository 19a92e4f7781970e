"""The pipeline on real SQLite with the real engine; fake engines only for crashes and stalls."""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import onnxruntime as ort
import pytest
from prometheus_client import generate_latest

from daemon.config import Settings
from daemon.hardware.nvml import probe_nvml
from daemon.hardware.providers import CUDA_EP, choose_provider
from daemon.metrics import Metrics
from daemon.ocr import buckets
from daemon.ocr.batch import BatchEngine
from daemon.ocr.engines import OcrEngine
from daemon.pipeline import Pipeline
from daemon.results import Image, PageResult
from daemon.service import Service
from daemon.sizing import (
    DECODE_THREADS_MAX,
    GPU_BATCHES_IN_FLIGHT,
    PDF_PROCESSES_MAX,
    decode_threads,
    pdf_processes,
    store_threads,
)
from daemon.store.db import open_ledger
from tests.pages import SENTENCES, page_bytes, render_page, similarity, write_page
from tests.support import (
    LOST_GPU,
    DeviceEngine,
    SettingsFactory,
    gpu_service,
    mixed_pdf,
    pipeline_running,
    wait_until,
)


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


def test_a_large_jpegs_boxes_are_stored_in_the_files_pixels(
        service: Callable[..., Service]) -> None:
    """A JPEG over twice the engine's bound is read at half size (ocr.jpeg_scaled_decode):
    what is stored still says where the text is in the file, not in the smaller page."""
    svc = service()
    inbox = svc.settings.watch.path
    picture = render_page(["Boxes in the file pixels"], size=170, width=4400)
    ink = np.argwhere(np.asarray(picture.convert("L")) < 128)
    (top, left), (bottom, right) = ink.min(axis=0), ink.max(axis=0)
    temp = inbox / "photo.jpg.part"
    picture.save(temp, "JPEG", quality=92)
    temp.rename(inbox / "photo.jpg")
    assert wait_until(lambda: svc.ledger.counts()["done"] == 1)
    [page] = svc.ledger.find("x", [str(inbox / "photo.jpg")]).pages
    assert similarity(page.text, "Boxes in the file pixels") > 0.8
    corners = np.array([corner for line in page.lines for corner in line["box"]])
    (x0, y0), (x1, y1) = corners.min(axis=0), corners.max(axis=0)
    # DB boxes grow a little around the ink (unclip), never by half the page
    assert abs(x0 - left) < 60 and abs(x1 - right) < 60, (x0, x1, left, right)
    assert abs(y0 - top) < 60 and abs(y1 - bottom) < 60, (y0, y1, top, bottom)


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
    device = "cpu"

    def __init__(self) -> None:
        self.calls = 0

    def recognize(self, images: Sequence[Image]) -> list[PageResult]:
        self.calls += 1
        raise RuntimeError("CUDA failure 2: out of memory")

    def close(self) -> None:
        pass


class StallingEngine:
    provider = "cpu"
    device = "cpu"

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def recognize(self, images: Sequence[Image]) -> list[PageResult]:
        self.entered.set()
        self.release.wait(30)
        return [PageResult() for _ in images]

    def close(self) -> None:
        self.release.set()


def test_engine_errors_are_retried_then_failed(settings_factory: SettingsFactory) -> None:
    settings = settings_factory(queue={"max_attempts": 2, "retry_backoff_seconds": 0.2},
                                watch={"failed_dir": "failed"})
    engine = CrashingEngine()
    with pipeline_running(settings, engine) as (_, ledger, _):
        write_page(settings.watch.path / "a.png", SENTENCES[:1])
        assert wait_until(lambda: ledger.counts()["failed"] == 1, 20)
        assert engine.calls == 2
        failure = ledger.status()["failures"][0]
        assert failure["attempts"] == 2 and "out of memory" in failure["reason"]
        # moved after the failure is recorded: wait for it, do not race it
        assert wait_until((settings.watch.path / "failed" / "a.png.error.txt").exists, 10)


def test_stop_hands_unfinished_work_back(settings_factory: SettingsFactory) -> None:
    settings = settings_factory()
    engine = StallingEngine()
    with pipeline_running(settings, engine) as (pipeline, ledger, watcher):
        write_page(settings.watch.path / "a.png", SENTENCES[:1])
        assert engine.entered.wait(20)
        watcher.stop()
        assert ledger.counts()["processing"] == 1
        assert pipeline.stop(timeout=0.3) == 1
        assert ledger.counts() == {"queued": 1, "processing": 0, "done": 0, "failed": 0}
        assert ledger.find("x", [str(settings.watch.path / "a.png")]).attempts == 0


@pytest.mark.parametrize("pdf_processes", [0, 1], ids=["in-process", "pdf-worker"])
def test_twenty_page_mixed_pdf_is_stored_page_by_page(service: Callable[..., Service],
                                                      pdf_processes: int) -> None:
    specs: list[list[str] | None] = [
        None if i % 4 == 0 else [f"Page {i} of the mixed document", f"line two of {i}"]
        for i in range(20)]
    svc = service(batch={"pdf_processes": pdf_processes})
    assert svc.components is not None
    assert (svc.components.pipeline._pdf_workers is not None) == bool(pdf_processes)
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


# -- several OCR devices: spread and failover (stand-in engines; the real ones need GPUs) ----


def test_every_gpu_is_warmed_up_once(
        settings_factory: SettingsFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each GPU's engine runs its warm-up (cuDNN plans, arena growth), once however many
    workers share it: not only the first GPU's."""
    engines = [DeviceEngine("0"), DeviceEngine("1"), DeviceEngine("2")]
    svc = gpu_service(settings_factory(), engines)
    try:
        assert len(svc.components.pipeline.engines) == 3 * GPU_BATCHES_IN_FLIGHT
        assert wait_until(lambda: svc.health()["warmup"]["state"] == "done", 10)
        assert [engine.warmups for engine in engines] == [1, 1, 1]
    finally:
        svc.stop()


class SlowToWarm(DeviceEngine):
    """A GPU whose warm-up takes as long as the test lets it (51 shapes at seconds each)."""

    def __init__(self, device: str) -> None:
        super().__init__(device, delay=0.0)
        self.release = threading.Event()

    def warmup(self) -> dict[str, float]:
        self.release.wait(60)
        return super().warmup()


def test_a_page_dropped_at_start_is_stored_before_the_warm_up_ends(
        settings_factory: SettingsFactory) -> None:
    """The daemon took no file until every shape was warm (51 shapes, 0.7-3.7 s each on an
    H100): it serves once the models are loaded now, warming beside the work, and the
    warm-up still completes."""
    engine = SlowToWarm("0")
    svc = gpu_service(settings_factory(), [engine])
    try:
        assert svc.health()["warmup"]["state"] == "warming"
        (svc.settings.watch.path / "a.png").write_bytes(page_bytes(["early page"]))
        assert wait_until(lambda: svc.ledger.counts()["done"] == 1, 20)
        assert svc.health()["warmup"]["state"] == "warming"  # it is still warming
        engine.release.set()
        assert wait_until(lambda: svc.health()["warmup"]["state"] == "done", 10)
        assert engine.warmups == 1
        assert "shapes" not in svc.health()["warmup"]  # a stand-in engine has no shapes
    finally:
        engine.release.set()
        svc.stop()


class WarmingEngine(DeviceEngine):
    """A GPU engine's warm-up as the service reads it: 2 of 3 shapes warm."""

    def warm_shapes_count(self) -> tuple[int, int]:
        return 2, 3

    def warm_seconds(self) -> list[tuple[str, tuple[int, ...], float, float]]:
        return [("rec", (8, 48, 320, 3), 0.5, 1.25), ("det", (1, 960, 960, 3), 0.75, 2.5)]


def test_the_warm_up_is_exported_as_metrics(settings_factory: SettingsFactory) -> None:
    """How far each GPU's warm-up got, and each warm shape's build and first-run seconds."""
    svc = gpu_service(settings_factory(), [WarmingEngine("0")])
    try:
        text = generate_latest(svc.metrics.registry).decode()
        assert 'ocr_warmup_shapes_warm{device="0"} 2.0' in text
        assert 'ocr_warmup_shapes{device="0"} 3.0' in text
        assert ('ocr_warmup_shape_seconds{device="0",model="rec",phase="first_run",'
                'shape="8x48x320x3"} 1.25') in text
        assert ('ocr_warmup_shape_seconds{device="0",model="det",phase="build",'
                'shape="1x960x960x3"} 0.75') in text
        assert svc.health()["warmup"]["shapes_warm"] == 2
    finally:
        svc.stop()


def test_work_is_spread_over_every_device(settings_factory: SettingsFactory,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    engines = [DeviceEngine("0"), DeviceEngine("1")]
    svc = gpu_service(settings_factory(batch={"max_pages": 2}), engines)
    try:
        # a loop per batch in flight on each device
        assert len(svc.components.pipeline.engines) == 2 * GPU_BATCHES_IN_FLIGHT
        for n in range(16):
            (svc.settings.watch.path / f"p{n}.png").write_bytes(page_bytes([f"page {n}"]))
        assert wait_until(lambda: svc.ledger.counts()["done"] == 16)
        assert engines[0].pages > 0 and engines[1].pages > 0
        assert engines[0].pages + engines[1].pages == 16
        health = svc.health()
        assert health["status"] == "healthy"
        assert [d["state"] for d in health["devices"]] == ["ok", "ok"]
    finally:
        svc.stop()


def test_a_lost_gpu_fails_over_to_the_others_and_shows_in_health(
    settings_factory: SettingsFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    lost, good = DeviceEngine("0", lost=True), DeviceEngine("1")
    svc = gpu_service(settings_factory(batch={"max_pages": 2}), [lost, good])
    try:
        # which loop takes a batch is the scheduler's choice: pages are dropped, a few at a
        # time, until the lost device has been handed DEVICE_FAILURES batches (40 at most)
        dropped = 0
        while dropped < 40 and not svc.components.pipeline.devices.degraded:
            for n in range(dropped, dropped + 4):
                (svc.settings.watch.path / f"p{n}.png").write_bytes(page_bytes([f"page {n}"]))
            dropped += 4
            assert wait_until(lambda done=dropped: svc.ledger.counts()["done"] == done)
        counts = svc.ledger.counts()
        assert counts["failed"] == 0 and counts["queued"] == 0
        stored = [svc.ledger.find("x", [str(svc.settings.watch.path / f"p{n}.png")])
                  for n in range(dropped)]
        assert {doc.text for doc in stored} == {"read on device 1"}
        assert all(doc.attempts == 1 for doc in stored)  # failed over, not retried
        health = svc.health()
        assert health["status"] == "degraded"
        states = {d["device"]: d["state"] for d in health["devices"]}
        assert states == {"0": "failed", "1": "ok"}
        failed = next(d for d in health["devices"] if d["device"] == "0")
        assert "fallen off the bus" in str(failed["last_error"])
    finally:
        svc.stop()


def test_every_device_failing_is_unhealthy(settings_factory: SettingsFactory,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    engines = [DeviceEngine("0", lost=True), DeviceEngine("1", lost=True)]
    settings = settings_factory(queue={"max_attempts": 1}, batch={"max_pages": 1})
    svc = gpu_service(settings, engines)
    try:
        for n in range(6):
            (svc.settings.watch.path / f"p{n}.png").write_bytes(page_bytes([f"page {n}"]))
        assert wait_until(lambda: svc.ledger.counts()["failed"] == 6)
        assert svc.health()["status"] == "unhealthy"
        # a page no device reads is the page's fault: no device was taken out for it
        assert [d["state"] for d in svc.health()["devices"]] == ["ok", "ok"]
    finally:
        svc.stop()


class OnDevice:
    """A real engine under a device label of its own: two engines on one GPU taken for two
    GPUs, so that spread and failover run on real sessions where only one GPU is at hand."""

    thread_safe = True

    def __init__(self, engine: OcrEngine, device: str) -> None:
        self.engine = engine
        self.device = device
        self.lost = False
        self.pages = 0
        self._lock = threading.Lock()

    @property
    def provider(self) -> str:
        return self.engine.provider

    def recognize(self, images: Sequence[Image]) -> list[PageResult]:
        if self.lost:
            raise RuntimeError(LOST_GPU)
        results = self.engine.recognize(images)
        with self._lock:
            self.pages += len(images)
        return results

    def warmup(self) -> dict[str, float]:
        return self.engine.warmup()

    def close(self) -> None:
        self.engine.close()


def two_engines_share_and_fail_over(engines: list[OnDevice], settings: Settings,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    svc = gpu_service(settings, engines)  # type: ignore[arg-type]
    inbox = svc.settings.watch.path

    def text(n: int) -> str:
        return f"Invoice {n} paid in full\n{SENTENCES[n % len(SENTENCES)]}"

    def drop(first: int, count: int) -> None:
        for n in range(first, first + count):
            (inbox / f"p{n}.png").write_bytes(page_bytes(text(n).split("\n")))
        assert wait_until(lambda: svc.ledger.counts()["done"] == first + count, 120)

    def states() -> dict[str, str]:
        return {d["device"]: d["state"] for d in svc.health()["devices"]}

    try:
        drop(0, 8)
        assert engines[0].pages > 0 and engines[1].pages > 0  # both took batches
        engines[1].lost = True
        read = engines[1].pages
        dropped = 8
        # until the lost one has failed batches enough to be taken out (which loop takes a
        # batch is the loops' race): every page is stored all the same
        while states()["1"] == "ok" and dropped < 48:
            drop(dropped, 4)
            dropped += 4
        assert states() == {"0": "ok", "1": "failed"}
        assert svc.health()["status"] == "degraded"
        assert engines[1].pages == read
        counts = svc.ledger.counts()
        assert counts["failed"] == 0 and counts["queued"] == 0
        for n in range(dropped):
            doc = svc.ledger.find("x", [str(inbox / f"p{n}.png")])
            assert similarity(doc.text, text(n)) > 0.9, doc.text
            assert doc.attempts == 1  # failed over, not retried
    finally:
        svc.stop()


@pytest.mark.gpu
@pytest.mark.skipif(not (CUDA_EP in ort.get_available_providers() and probe_nvml().gpus),
                    reason="needs an NVIDIA GPU and onnxruntime-gpu")
def test_on_a_gpu_two_engines_share_the_work_and_a_lost_one_fails_over(
        settings_factory: SettingsFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two batch engines on one GPU, each its own sessions, both reading at once; then one
    lost: its batches are read by the other. Shapes are taken at their first batch (no
    warm-up: seconds, not a minute, on a GPU)."""
    monkeypatch.setattr(buckets, "REC_WIDTHS", (160, 320, 640, 960))
    settings = settings_factory(ocr={"provider": "cuda", "warmup_seconds": 0},
                                batch={"max_pages": 2})
    choice = choose_provider(settings)
    engines = [OnDevice(BatchEngine(settings.ocr, choice, max_pages=2), label)
               for label in ("0", "1")]
    assert engines[0].provider == "cuda"
    two_engines_share_and_fail_over(engines, settings, monkeypatch)


class DyingEngine(DeviceEngine):
    """Raises what no `except Exception` catches: the OCR loop that called it ends."""

    def recognize(self, images: Sequence[Image]) -> list[PageResult]:
        raise SystemExit("an OCR loop ends")


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_dead_ocr_loop_is_unhealthy(settings_factory: SettingsFactory,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    settings = settings_factory(batch={"stop_timeout_seconds": 0.5})
    svc = gpu_service(settings, [DyingEngine("0")])
    try:
        assert svc.health()["status"] == "healthy"
        (svc.settings.watch.path / "a.png").write_bytes(page_bytes(["page"]))
        assert wait_until(lambda: svc.health()["status"] == "unhealthy", 30)
        assert svc.components is not None and not svc.components.pipeline.alive
    finally:
        svc.stop()


class HungEngine(DeviceEngine):
    """A GPU call that never returns (a driver hang): the loop is alive, nothing moves."""

    def __init__(self, device: str) -> None:
        super().__init__(device)
        self.release = threading.Event()

    def recognize(self, images: Sequence[Image]) -> list[PageResult]:
        self.release.wait(60)
        return super().recognize(images)


def test_a_hung_loop_is_unhealthy_and_recovers(settings_factory: SettingsFactory,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Alive is not enough: work waiting with no progress for queue.stuck_seconds makes
    /health unhealthy (and stops the systemd watchdog ping); progress makes it healthy."""
    settings = settings_factory(queue={"stuck_seconds": 1.0})
    engine = HungEngine("0")
    svc = gpu_service(settings, [engine])
    try:
        assert svc.components is not None
        assert wait_until(lambda: svc.health()["status"] == "healthy", 10)
        (svc.settings.watch.path / "a.png").write_bytes(page_bytes(["page"]))
        assert wait_until(lambda: svc.health()["status"] == "unhealthy", 30)
        assert svc.components.pipeline.alive  # every thread alive, and yet
        assert svc.health()["stalled_seconds"] >= 1.0  # past stuck_seconds, to 0.1 s
        engine.release.set()
        assert wait_until(lambda: svc.ledger.counts()["done"] == 1, 30)
        assert svc.health()["status"] == "healthy"
        assert svc.health()["stalled_seconds"] == 0.0
    finally:
        engine.release.set()
        svc.stop()


def test_a_document_slower_than_its_lease_is_stored_once(
        settings_factory: SettingsFactory, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """A 1.5 s lease and an engine that takes 4 s a page: the heartbeat keeps the claim, the
    housekeeping never takes it back, the page is read once and stored once."""
    settings = settings_factory(queue={"lease_seconds": 1.5})
    engine = DeviceEngine("0", delay=4.0)
    monkeypatch.setattr("daemon.leases.HOUSEKEEPING_SECONDS", 0.2)
    svc = gpu_service(settings, [engine])
    try:
        with caplog.at_level(logging.INFO):
            (svc.settings.watch.path / "slow.png").write_bytes(page_bytes(["slow page"]))
            assert wait_until(lambda: svc.ledger.counts()["done"] == 1, 30)
        assert engine.pages == 1
        assert svc.ledger.find("x", [str(svc.settings.watch.path / "slow.png")]).attempts == 1
        assert "lost the claim" not in caplog.text and "re-queued" not in caplog.text
    finally:
        svc.stop()


def test_worker_ids_are_unique_per_process_and_pipeline(
        settings_factory: SettingsFactory) -> None:
    """Two containers with the same hostname and PID 1 must not share a claim."""
    settings = settings_factory()
    _, ledger = open_ledger(settings, migrate_now=True)
    ids = {Pipeline(settings, ledger, [DeviceEngine("0")], Metrics("t"),  # type: ignore[list-item]
                    "cpu").worker_id for _ in range(3)}
    assert len(ids) == 3


def test_auto_decode_threads_use_every_core_on_a_gpu_provider(
        settings_factory: SettingsFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Decoding is the largest host stage of the GPU path and runs outside the GIL: two
    threads would hold a 16-core GPU host to a fraction of its GPU. On the CPU provider the
    cores belong to inference. PDF pages render in as many processes (at most 8) from 4
    cores on: pdfium draws one page at a time per process."""
    from daemon import sizing

    settings = settings_factory()
    assert settings.batch.decode_threads == "auto"
    cores = set(range(12))
    monkeypatch.setattr(sizing, "usable_cores", lambda: len(cores))
    assert decode_threads(settings, "cpu") == 2
    assert decode_threads(settings, "cuda") == 12
    _, ledger = open_ledger(settings, migrate_now=True)
    pipeline = Pipeline(settings, ledger, [DeviceEngine("0")], Metrics("t"),  # type: ignore[list-item]
                        "cuda")
    assert pipeline._decode_pool._max_workers == 12
    assert pipeline._pdf_workers is not None and pipeline._pdf_workers.processes == 8
    pipeline._pdf_workers.close()
    cores = set(range(96))
    assert decode_threads(settings, "tensorrt") == DECODE_THREADS_MAX
    assert pdf_processes(settings, "cuda") == PDF_PROCESSES_MAX  # ~60 MB each
    cores = {0, 1, 2, 3}
    assert pdf_processes(settings, "cuda") == 4
    cores = {0}
    assert decode_threads(settings, "cuda") == 2
    assert pdf_processes(settings, "cuda") == 0  # below 4 cores pdfium's lock does not limit
    assert decode_threads(settings_factory(batch={"decode_threads": 3}), "cuda") == 3
    assert pdf_processes(settings, "cpu") == 0  # the CPU provider's cores run inference
    assert pdf_processes(settings_factory(batch={"pdf_processes": 3}), "cpu") == 3


def test_health_reuses_a_recent_database_check(service: Callable[..., Service]) -> None:
    """Docker, systemd and any client may ask /health often: one SELECT per couple of seconds,
    not one per request."""
    from sqlalchemy import event

    from daemon.store.outage import CHECK_SECONDS

    svc = service()
    assert svc.components is not None
    checks: list[str] = []
    event.listen(svc.components.ledger.engine, "before_cursor_execute",
                 lambda _c, _cur, statement, *_a: checks.append(statement))
    start = time.monotonic()
    for _ in range(20):
        assert svc.health()["database"] == "ok"
    assert wait_until(lambda: checks.count("SELECT 1") >= 1, 5)  # probed beside /health
    if time.monotonic() - start < CHECK_SECONDS:  # (always, unless this host crawls)
        assert checks.count("SELECT 1") == 1
    # and once the check is older than that, the next request checks again
    assert wait_until(lambda: (svc.health(), checks.count("SELECT 1") >= 2)[1], 10)


def test_an_outcome_the_ledger_refuses_fails_the_attempt_not_the_loop(
    settings_factory: SettingsFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only a database outage was waited out: any other error while storing (a DataError, a
    pool timeout, a bug) killed the OCR loop. Now it costs one attempt, then the document is
    stored on the next, and the loop lives on."""
    from sqlalchemy.exc import DataError

    settings = settings_factory(queue={"max_attempts": 3, "retry_backoff_seconds": 0.1})
    engine = DeviceEngine("cpu", delay=0.0)
    with pipeline_running(settings, engine) as (pipeline, ledger, _):
        real_complete = ledger.complete
        refusals = []

        def refuse_once(*args: object, **kwargs: object) -> bool:
            if not refusals:
                refusals.append(1)
                raise DataError("INSERT INTO pages ...", {}, ValueError("a NUL in the text"))
            return real_complete(*args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(ledger, "complete", refuse_once)
        write_page(settings.watch.path / "a.png", SENTENCES[:1])
        assert wait_until(lambda: ledger.counts()["done"] == 1, 30)
        doc = ledger.find("x", [str(settings.watch.path / "a.png")])
        assert refusals == [1] and doc.attempts == 2 and doc.text == "read on device cpu"
        assert pipeline.alive and pipeline.inflight_count() == 0
        registry = pipeline.metrics.registry
        assert registry.get_sample_value("ocr_files_total", {"status": "error"}) == 1


def test_a_slow_store_does_not_hold_up_the_ocr_loop(
    settings_factory: SettingsFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The one OCR loop reads the next document's page while the first document's text is
    still being stored (a slow database, a searchable PDF being written): storing is the
    store loop's work, not the loop that feeds the GPU. Both are stored once, in the end."""
    settings = settings_factory()
    engine = DeviceEngine("cpu", delay=0.0)
    with pipeline_running(settings, engine) as (pipeline, ledger, _):
        try:
            real_complete = ledger.complete
            storing, go_on = threading.Event(), threading.Event()

            def slow_complete(*args: object, **kwargs: object) -> bool:
                storing.set()
                assert go_on.wait(30)
                return real_complete(*args, **kwargs)  # type: ignore[arg-type]

            monkeypatch.setattr(ledger, "complete", slow_complete)
            write_page(settings.watch.path / "a.png", ["first"])
            assert storing.wait(30)
            write_page(settings.watch.path / "b.png", ["second"])
            assert wait_until(lambda: engine.pages == 2, 30)  # while a.png is being stored
            assert ledger.counts()["done"] == 0
            go_on.set()
            assert wait_until(lambda: ledger.counts()["done"] == 2, 30)
            assert engine.pages == 2 and pipeline.alive
        finally:
            go_on.set()


def test_store_loops_are_one_for_the_ledger_and_more_for_searchable_pdfs(
        settings_factory: SettingsFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """SQLite: one store loop for the ledger; PostgreSQL: several, their round trips
    overlapping; with searchable PDFs, as many as the decoding threads if more."""
    monkeypatch.setattr("os.sched_getaffinity", lambda _pid: set(range(12)))
    settings = settings_factory()
    assert store_threads(settings, "cuda", postgresql=False) == 1
    pdfs = settings_factory(watch={"output_pdf": "pdf",
                                   "output_dir": str(settings.watch.path.parent / "pdf")})
    assert store_threads(pdfs, "cuda", postgresql=False) == decode_threads(pdfs, "cuda") == 12
    assert store_threads(pdfs, "cpu", postgresql=False) == 2
    postgresql = {"url": "postgresql+psycopg://ocr@db/ocr"}
    assert store_threads(settings_factory(database=postgresql), "cuda", postgresql=True) == 4
    assert store_threads(settings_factory(database=postgresql, watch=pdfs.watch.model_dump()),
                         "cpu", postgresql=True) == 4


class PoisonEngine(DeviceEngine):
    """Raises on any batch holding a black page, as an engine bug or a bad page does."""

    def __init__(self) -> None:
        super().__init__("cpu", delay=0.0)
        self.batches: list[int] = []

    def recognize(self, images: Sequence[Image]) -> list[PageResult]:
        self.batches.append(len(images))
        if any(int(image.max()) == 0 for image in images):
            raise RuntimeError("the engine cannot take this page")
        return super().recognize(images)


def test_a_page_that_breaks_the_engine_fails_only_its_document(
    settings_factory: SettingsFactory,
) -> None:
    """The batch is retried page by page: the neighbours of a bad page are stored at their
    first attempt, only the bad page's document fails."""
    from PIL import Image as PILImage

    settings = settings_factory(queue={"max_attempts": 1},
                                batch={"max_pages": 4, "max_wait_ms": 3000})
    engine = PoisonEngine()
    with pipeline_running(settings, engine) as (pipeline, ledger, _):
        inbox = settings.watch.path
        staging = inbox.parent / "staging"
        staging.mkdir()
        for n in range(3):
            write_page(staging / f"good{n}.png", [f"page {n}"])
        PILImage.new("RGB", (200, 100), "black").save(staging / "black.png")
        for path in staging.iterdir():  # all four at once: one batch
            path.rename(inbox / path.name)
        assert wait_until(lambda: sum(ledger.counts().values()) == 4 and
                          ledger.counts()["done"] + ledger.counts()["failed"] == 4, 30)
        assert ledger.counts()["done"] == 3 and ledger.counts()["failed"] == 1
        assert "cannot take this page" in ledger.status()["failures"][0]["reason"]
        assert engine.batches[0] == 4  # they did arrive together
        assert pipeline.alive


class HangsOnOnePage(DeviceEngine):
    """Hangs on a page WIDTH pixels wide (a driver hang on one input), reads the rest."""

    WIDTH = 1999

    def __init__(self, device: str) -> None:
        super().__init__(device, delay=0.0)
        self.release = threading.Event()

    def recognize(self, images: Sequence[Image]) -> list[PageResult]:
        if any(image.shape[1] == self.WIDTH for image in images):
            self.release.wait(60)
        return super().recognize(images)


def test_one_hung_call_is_shown_and_its_document_let_go_while_the_rest_flow(
        settings_factory: SettingsFactory) -> None:
    """With several OCR loops and one call that never returns, /health stayed healthy while
    other files flowed, the document stayed `processing` and its lease was renewed, so no
    daemon could take it. Now the call is shown (degraded, with the document's path), its
    lease is not renewed and its attempt fails; the other files are stored meanwhile."""
    settings = settings_factory(queue={"stuck_seconds": 1.0, "lease_seconds": 3.0,
                                       "max_attempts": 1}, batch={"max_pages": 1})
    engine = HangsOnOnePage("0")
    svc = gpu_service(settings, [engine])
    inbox = settings.watch.path
    try:
        assert wait_until(lambda: svc.health()["status"] == "healthy", 10)
        (inbox / "hung.png").write_bytes(page_bytes(["never read"], width=HangsOnOnePage.WIDTH))
        assert wait_until(lambda: svc.ledger.counts()["processing"] == 1, 20)
        for n in range(10):
            (inbox / f"ok{n}.png").write_bytes(page_bytes([f"page {n}"]))
        assert wait_until(lambda: svc.ledger.counts()["done"] == 10, 30), svc.ledger.status()
        assert wait_until(lambda: svc.health()["stuck"] != [], 10)
        health = svc.health()
        assert health["status"] == "degraded", health
        [stuck] = health["stuck"]
        assert stuck["documents"] == [str(inbox / "hung.png")] and stuck["seconds"] >= 1.0
        assert wait_until(lambda: svc.ledger.counts()["failed"] == 1, 10)
        failed = svc.ledger.find("x", [str(inbox / "hung.png")])
        assert failed.state == "failed" and "never returned" in (failed.reason or "")
        engine.release.set()  # the call returns at last: nothing is stored for it
        assert wait_until(lambda: svc.health()["status"] == "healthy", 10), svc.health()
        assert svc.ledger.counts() == {"queued": 0, "processing": 0, "done": 10, "failed": 1}
    finally:
        engine.release.set()
        svc.stop()


def test_a_black_holed_database_shows_unreachable_without_holding_health() -> None:
    """With the server black-holed, each /health waited out the probe's connect (5 s a
    request). The probe runs beside /health now: every answer comes at once, and a probe
    unanswered past PROBE_SECONDS says unreachable."""
    from daemon.store.outage import PROBE_SECONDS, Outage

    release = threading.Event()

    class BlackHoled:
        def ping(self) -> None:
            release.wait(30)

    outage = Outage(BlackHoled())  # type: ignore[arg-type]
    try:
        answers = []
        deadline = time.monotonic() + PROBE_SECONDS + 3
        while time.monotonic() < deadline and (not answers or answers[-1][0]):
            start = time.monotonic()
            answers.append((outage.reachable(), time.monotonic() - start))
            time.sleep(0.1)
        assert answers[-1][0] is False  # unreachable, once the probe overran
        assert max(seconds for _, seconds in answers) < 0.5  # and every answer at once
    finally:
        release.set()
