"""Metrics over real HTTP: a MetricsServer on an ephemeral port, scraped with urllib and parsed
with prometheus_client's own parser. The server's other endpoints: tests/test_http.py."""

from __future__ import annotations

from typing import Any

import onnxruntime as ort
import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from daemon.config import Settings
from daemon.hardware import providers
from daemon.hardware.nvml import GpuInfo, NvmlReader
from daemon.hardware.opencl import probe_opencl
from daemon.hardware.providers import CPU_EP, CUDA_EP, ProviderChoice
from daemon.hardware.sessions import create_session, provider_name
from daemon.http import MetricsServer
from daemon.metrics import Metrics
from daemon.service import count_fallbacks
from tests.conftest import ServerFactory
from tests.support import get

EXPECTED_FAMILIES = {
    "ocr_build_info",  # the text format names an Info family after its sample
    "ocr_execution_provider",
    "ocr_provider_fallbacks",
    "ocr_opencl_devices",
    "ocr_files",
    "ocr_pages",
    "ocr_queue_depth",
    "ocr_queue_capacity",
    "ocr_queue_bytes",
    "ocr_workers",
    "ocr_batch_size",
    "ocr_stage_seconds",
    "ocr_file_latency_seconds",
    "ocr_throughput_pages_per_second",
    "ocr_device_pages",
    "ocr_device_batches",
    "ocr_device_up",
}
GPU_FAMILIES = {"ocr_gpu_memory_used_bytes", "ocr_gpu_memory_total_bytes",
                "ocr_gpu_utilization_ratio"}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def scrape(server: MetricsServer) -> dict[str, list[Sample]]:
    status, content_type, text = get(server, "/metrics")
    assert status == 200 and content_type.startswith("text/plain")
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def value(samples: list[Sample], name: str, **labels: str) -> float:
    found = [s.value for s in samples if s.name == name and s.labels == labels]
    assert len(found) == 1, (name, labels, samples)
    return found[0]


def test_every_metric_is_exposed_with_its_value_and_no_created(serve: ServerFactory) -> None:
    clock = Clock()
    metrics = Metrics("1.2.3", gpu_reader=list, clock=clock)
    server = serve(metrics)
    assert server.port != 0

    metrics.files_total.labels("done").inc(2)
    metrics.files_total.labels("failed").inc()
    metrics.queue_depth.set(3)
    metrics.queue_capacity.set(32)
    metrics.batch_size.observe(4)
    metrics.batch_size.observe(8)
    metrics.stage_seconds.labels("det").observe(0.02)
    metrics.stage_seconds.labels("rec").observe(0.3)
    metrics.file_latency_seconds.observe(1.5)
    clock.now += 10
    metrics.observe_pages(7)
    metrics.observe_pages(0)  # ignored
    metrics.device_pages_total.labels("1").inc(5)
    metrics.device_batches_total.labels("1", "ok").inc()
    metrics.device_up.labels("0").set(0)

    families = scrape(server)
    assert set(families) == EXPECTED_FAMILIES  # no GPU here: no ocr_gpu_*
    assert not [s for samples in families.values() for s in samples
                if s.name.endswith("_created")]

    assert value(families["ocr_build_info"], "ocr_build_info", version="1.2.3") == 1
    files = families["ocr_files"]
    assert value(files, "ocr_files_total", status="done") == 2
    assert value(files, "ocr_files_total", status="failed") == 1
    assert value(files, "ocr_files_total", status="duplicate") == 0
    assert value(families["ocr_pages"], "ocr_pages_total") == 7
    assert value(families["ocr_queue_depth"], "ocr_queue_depth") == 3
    assert value(families["ocr_queue_capacity"], "ocr_queue_capacity") == 32
    batch = families["ocr_batch_size"]
    assert value(batch, "ocr_batch_size_count") == 2
    assert value(batch, "ocr_batch_size_sum") == 12
    assert value(batch, "ocr_batch_size_bucket", le="4.0") == 1
    stages = families["ocr_stage_seconds"]
    for stage in ("decode", "det", "cls", "rec", "store"):
        expected = 1 if stage in ("det", "rec") else 0
        assert value(stages, "ocr_stage_seconds_count", stage=stage) == expected
    assert value(stages, "ocr_stage_seconds_sum", stage="rec") == pytest.approx(0.3)
    assert value(families["ocr_file_latency_seconds"], "ocr_file_latency_seconds_count") == 1
    # 7 pages in the first 10 s of uptime
    throughput = families["ocr_throughput_pages_per_second"]
    assert value(throughput, "ocr_throughput_pages_per_second") == pytest.approx(0.7)
    assert value(families["ocr_device_pages"], "ocr_device_pages_total", device="1") == 5
    assert value(families["ocr_device_batches"], "ocr_device_batches_total", device="1",
                 outcome="ok") == 1
    assert value(families["ocr_device_up"], "ocr_device_up", device="0") == 0


def test_throughput_is_a_sliding_window(serve: ServerFactory) -> None:
    clock = Clock()
    metrics = Metrics("1", gpu_reader=list, clock=clock, throughput_window_seconds=60)
    server = serve(metrics)

    def rate() -> float:
        samples = scrape(server)["ocr_throughput_pages_per_second"]
        return value(samples, "ocr_throughput_pages_per_second")

    clock.now += 10
    metrics.observe_pages(30)
    clock.now += 40
    metrics.observe_pages(30)
    clock.now += 10  # 60 s up: both in the window
    assert rate() == pytest.approx(1.0)
    clock.now += 30  # the first 30 pages left the window
    assert rate() == pytest.approx(0.5)
    clock.now += 120
    assert rate() == 0
    assert value(scrape(server)["ocr_pages"], "ocr_pages_total") == 60  # the counter keeps all


def test_provider_and_fallbacks(serve: ServerFactory) -> None:
    metrics = Metrics("1", gpu_reader=list)
    server = serve(metrics)
    choice = ProviderChoice("cuda", fallbacks=("tensorrt_not_in_build",))
    metrics.set_provider(choice.name, choice.fallbacks)
    metrics.set_stage_provider("rec", "cpu")

    families = scrape(server)
    enum = families["ocr_execution_provider"]
    for stage, provider in (("det", "cuda"), ("cls", "cuda"), ("rec", "cpu")):
        for state in ("cpu", "cuda", "tensorrt"):
            got = value(enum, "ocr_execution_provider", stage=stage,
                        ocr_execution_provider=state)
            assert got == (1 if state == provider else 0)
    fallbacks = families["ocr_provider_fallbacks"]
    assert value(fallbacks, "ocr_provider_fallbacks_total", reason="tensorrt_not_in_build") == 1


@pytest.mark.skipif(CUDA_EP in ort.get_available_providers(),
                    reason="onnxruntime-gpu is installed here: CUDA is not dropped")
def test_silent_fallback_from_a_real_session_is_counted(serve: ServerFactory) -> None:
    metrics = Metrics("1", gpu_reader=list)
    server = serve(metrics)
    stop_watching = count_fallbacks(metrics)
    ocr = Settings().ocr
    choice = ProviderChoice("cuda", ort_providers=(CUDA_EP, CPU_EP))
    try:
        session = create_session(providers.probe_model_path(), choice, ocr)
    finally:
        stop_watching()
    metrics.set_stage_provider("cls", provider_name(session))

    families = scrape(server)
    fallbacks = families["ocr_provider_fallbacks"]
    assert value(fallbacks, "ocr_provider_fallbacks_total", reason="cuda_dropped") == 1
    enum = families["ocr_execution_provider"]
    assert value(enum, "ocr_execution_provider", stage="cls", ocr_execution_provider="cpu") == 1


def test_gpu_series_come_from_the_reader_at_scrape_time(serve: ServerFactory) -> None:
    gpus: list[GpuInfo] = []
    metrics = Metrics("1", gpu_reader=lambda: list(gpus))
    server = serve(metrics)
    assert not GPU_FAMILIES & set(scrape(server))

    gpus.append(GpuInfo(0, "NVIDIA H100 80GB HBM3", "GPU-a", 80 * 2**30, 3 * 2**30, 0.42))
    gpus.append(GpuInfo(1, "NVIDIA H100 80GB HBM3", "GPU-b", 80 * 2**30, 2**30, None))
    families = scrape(server)
    assert value(families["ocr_gpu_memory_total_bytes"], "ocr_gpu_memory_total_bytes",
                 gpu="0") == 80 * 2**30
    assert value(families["ocr_gpu_memory_used_bytes"], "ocr_gpu_memory_used_bytes",
                 gpu="1") == 2**30
    util = families["ocr_gpu_utilization_ratio"]
    assert value(util, "ocr_gpu_utilization_ratio", gpu="0") == pytest.approx(0.42)
    assert [s for s in util if s.labels == {"gpu": "1"}] == []  # unsupported: no sample


def test_no_nvml_library_means_no_gpu_series(
    serve: ServerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pynvml

    def missing(name: str, *args: Any, **kwargs: Any) -> Any:
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(pynvml, "nvmlLib", None)
    monkeypatch.setattr(pynvml, "CDLL", missing)
    reader = NvmlReader()  # the real one, as the service passes it
    server = serve(Metrics("1", gpu_reader=reader.read))
    assert not GPU_FAMILIES & set(scrape(server))
    assert not GPU_FAMILIES & set(scrape(server))
    reader.close()


def test_opencl_devices_are_reported(serve: ServerFactory) -> None:
    metrics = Metrics("1", gpu_reader=list)
    server = serve(metrics)
    report = probe_opencl()
    metrics.set_opencl_devices(report.devices)

    samples = scrape(server)["ocr_opencl_devices"]
    assert samples and len(samples) == len(report.devices)
    assert {s.labels["type"] for s in samples} >= {"cpu"}
    assert all(s.value == 1 for s in samples)
    assert any("Portable Computing Language" in s.labels["platform"] for s in samples)


def test_openmetrics_is_negotiated_without_created(serve: ServerFactory) -> None:
    metrics = Metrics("1", gpu_reader=list)
    metrics.files_total.labels("done").inc()
    server = serve(metrics)
    status, content_type, text = get(server, "/metrics",
                                     accept="application/openmetrics-text; version=1.0.0")
    assert status == 200 and content_type.startswith("application/openmetrics-text")
    assert text.rstrip().endswith("# EOF")
    assert "_created" not in text
