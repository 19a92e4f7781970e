"""Every metric of the daemon, in one registry (served by `daemon.http`).

Stages only observe the `Metrics` object they are handed; nothing here reads the environment
or imports the engine or the hardware probes: the service hands in readers. GPU memory and
utilisation are read (from NVML, by the reader the service passes) when Prometheus scrapes, not
polled, so a GPU-less host simply has no `ocr_gpu_*` series. Throughput is computed at scrape
time over a sliding window, so it falls to zero when work stops instead of freezing at the last
value.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Enum, Gauge, Histogram, Info
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from daemon.config import PROVIDER_NAMES

log = logging.getLogger(__name__)

T = TypeVar("T")

SESSION_STAGES = ("det", "cls", "rec")
STAGES = ("decode", "det", "cls", "rec", "store")
FILE_STATUSES = ("done", "failed", "duplicate", "retried", "quarantined", "error")

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
STAGE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800)


class GpuReading(Protocol):
    """One GPU as the collector needs it (`daemon.hardware.nvml.GpuInfo` is one)."""

    @property
    def index(self) -> int: ...
    @property
    def memory_used_bytes(self) -> int: ...
    @property
    def memory_total_bytes(self) -> int: ...
    @property
    def utilization_ratio(self) -> float | None: ...


class OpenClReading(Protocol):
    """One OpenCL device as the metrics name it (`daemon.hardware.opencl.OpenClDevice`)."""

    @property
    def platform(self) -> str: ...
    @property
    def device(self) -> str: ...
    @property
    def type(self) -> str: ...


def read_for_scrape(read: Callable[[], Iterable[T]], what: str) -> list[T]:
    """What `read` gives, or nothing (logged): a scrape must never fail because of it."""
    try:
        return list(read())
    except Exception:
        log.exception("reading %s failed", what)
        return []


class GpuCollector(Collector):
    """`ocr_gpu_*` read from NVML at scrape time; yields no series when there is no GPU."""

    def __init__(self, read: Callable[[], Iterable[GpuReading]]) -> None:
        self._read = read

    def describe(self) -> Iterable[Metric]:
        return self._families()  # no samples: registering must not touch NVML

    def collect(self) -> Iterable[Metric]:
        gpus = read_for_scrape(self._read, "GPU metrics")
        if not gpus:
            return []
        used, total, util = self._families()
        for gpu in gpus:
            label = [str(gpu.index)]
            used.add_metric(label, gpu.memory_used_bytes)
            total.add_metric(label, gpu.memory_total_bytes)
            if gpu.utilization_ratio is not None:
                util.add_metric(label, gpu.utilization_ratio)
        return [used, total, util]

    @staticmethod
    def _families() -> list[GaugeMetricFamily]:
        return [
            GaugeMetricFamily(
                "ocr_gpu_memory_used_bytes", "GPU memory in use (NVML)", labels=["gpu"]
            ),
            GaugeMetricFamily(
                "ocr_gpu_memory_total_bytes", "GPU memory in total (NVML)", labels=["gpu"]
            ),
            GaugeMetricFamily(
                "ocr_gpu_utilization_ratio",
                "GPU busy fraction over NVML's last sample period",
                labels=["gpu"],
            ),
        ]


@dataclass(frozen=True)
class ShapeWarmth:
    """One GPU engine's warm-up as the collector needs it: shapes warm of those to warm, and
    each warm shape's session build and first-run (cuDNN planning) seconds."""

    device: str
    warm: int
    shapes: int
    seconds: Sequence[tuple[str, tuple[int, ...], float, float]] = ()  # model, shape, build, run


class WarmupCollector(Collector):
    """`ocr_warmup_*` read at scrape time from the engines (a GPU warms its shapes while the
    daemon serves); no series on the CPU, which warms none."""

    def __init__(self) -> None:
        self.read: Callable[[], Iterable[ShapeWarmth]] = list

    def describe(self) -> Iterable[Metric]:
        return self._families()

    def collect(self) -> Iterable[Metric]:
        engines = read_for_scrape(self.read, "the warm-up")
        if not engines:
            return []
        warm, shapes, seconds = self._families()
        for engine in engines:
            warm.add_metric([engine.device], engine.warm)
            shapes.add_metric([engine.device], engine.shapes)
            for model, shape, build, run in engine.seconds:
                label = "x".join(map(str, shape))
                seconds.add_metric([engine.device, model, label, "build"], build)
                seconds.add_metric([engine.device, model, label, "first_run"], run)
        return [warm, shapes, seconds]

    @staticmethod
    def _families() -> list[GaugeMetricFamily]:
        return [
            GaugeMetricFamily("ocr_warmup_shapes_warm",
                              "Input shapes whose session is built and planned", labels=["device"]),
            GaugeMetricFamily("ocr_warmup_shapes", "Input shapes the warm-up builds",
                              labels=["device"]),
            GaugeMetricFamily(
                "ocr_warmup_shape_seconds",
                "Seconds a warm shape's session took to build and its first run to plan",
                labels=["device", "model", "shape", "phase"]),
        ]


class PageWindow:
    """Pages done in the last `window` seconds, for a throughput that decays to zero."""

    def __init__(self, window: float, clock: Callable[[], float]) -> None:
        self._window = window
        self._clock = clock
        self._started = clock()
        self._events: collections.deque[tuple[float, int]] = collections.deque()
        self._lock = threading.Lock()

    def add(self, pages: int) -> None:
        with self._lock:
            self._events.append((self._clock(), pages))
            self._trim()

    def rate(self) -> float:
        """Pages per second over the window (over the uptime while that is shorter)."""
        with self._lock:
            self._trim()
            span = min(self._window, max(self._clock() - self._started, 1.0))
            return sum(n for _, n in self._events) / span

    def _trim(self) -> None:
        horizon = self._clock() - self._window
        while self._events and self._events[0][0] < horizon:
            self._events.popleft()


class Metrics:
    """The daemon's metrics. One per process; built by the service, handed to every stage."""

    def __init__(
        self,
        version: str,
        *,
        gpu_reader: Callable[[], Iterable[GpuReading]] = list,
        throughput_window_seconds: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        # `_created` series double the series count and nothing here reads them.
        prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]
        self.version = version
        self.registry = CollectorRegistry()
        r = self.registry

        self.build_info = Info("ocr_build", "ocr-daemon build", registry=r)
        self.build_info.info({"version": version})
        self.execution_provider = Enum(
            "ocr_execution_provider",
            "onnxruntime execution provider each OCR stage runs on",
            ["stage"],
            states=list(PROVIDER_NAMES),
            registry=r,
        )
        self.provider_fallbacks_total = Counter(
            "ocr_provider_fallbacks",
            "GPU execution providers that did not come up or were dropped for the CPU",
            ["reason"],
            registry=r,
        )
        self.opencl_devices = Gauge(
            "ocr_opencl_devices",
            "OpenCL devices found (onnxruntime cannot use them; reported only)",
            ["platform", "device", "type"],
            registry=r,
        )
        self.files_total = Counter(
            "ocr_files", "Files finished, by outcome", ["status"], registry=r
        )
        for status in FILE_STATUSES:
            self.files_total.labels(status)
        self.pages_total = Counter("ocr_pages", "Pages recognised and stored", registry=r)
        # per OCR device: "cpu", or the CUDA device number (after CUDA_VISIBLE_DEVICES; NVML's
        # `gpu` label of ocr_gpu_* counts by PCI bus and may differ)
        self.device_pages_total = Counter(
            "ocr_device_pages", "Pages recognised, by the OCR device that ran them", ["device"],
            registry=r,
        )
        self.device_batches_total = Counter(
            "ocr_device_batches", "OCR batches run, by device and outcome (ok, failed)",
            ["device", "outcome"], registry=r,
        )
        self.device_up = Gauge(
            "ocr_device_up", "1 while the OCR device is in service, 0 once taken out",
            ["device"], registry=r,
        )
        self.queue_depth = Gauge("ocr_queue_depth", "Files waiting in the queue", registry=r)
        self.workers = Gauge(
            "ocr_workers", "Live daemons seen in the ledger (heartbeats), this one included",
            registry=r)
        self.queue_bytes = Gauge(
            "ocr_queue_bytes", "Bytes of files being decoded and of decoded pages held "
            "(bounded by queue.memory_budget_bytes)", registry=r)
        self.queue_capacity = Gauge(
            "ocr_queue_capacity", "Capacity of the in-memory queue", registry=r
        )
        self.batch_size = Histogram(
            "ocr_batch_size", "Pages per OCR batch", buckets=BATCH_BUCKETS, registry=r
        )
        self.stage_seconds = Histogram(
            "ocr_stage_seconds",
            "Time per pipeline stage and batch",
            ["stage"],
            buckets=STAGE_BUCKETS,
            registry=r,
        )
        for stage in STAGES:
            self.stage_seconds.labels(stage)
        self.file_latency_seconds = Histogram(
            "ocr_file_latency_seconds",
            "Time from a file being seen to its text being stored",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self._pages = PageWindow(throughput_window_seconds, clock)
        self.throughput_pages_per_second = Gauge(
            "ocr_throughput_pages_per_second",
            f"Pages per second over the last {throughput_window_seconds:g} s",
            registry=r,
        )
        self.throughput_pages_per_second.set_function(self._pages.rate)
        r.register(GpuCollector(gpu_reader))
        self.warmup = WarmupCollector()  # the service hands it its reader once engines exist
        r.register(self.warmup)

    def observe_pages(self, n: int) -> None:
        """`n` pages stored: counts them and feeds the throughput window."""
        if n <= 0:
            return
        self.pages_total.inc(n)
        self._pages.add(n)

    def set_provider(self, name: str, fallbacks: Iterable[str] = ()) -> None:
        """The start-up provider choice: every session stage, plus its fallbacks (call once)."""
        for stage in SESSION_STAGES:
            self.set_stage_provider(stage, name)
        for reason in fallbacks:
            self.record_fallback(reason)

    def set_stage_provider(self, stage: str, provider: str) -> None:
        """What one stage's session really runs on."""
        if provider not in PROVIDER_NAMES:
            log.warning("unknown execution provider %r for stage %s", provider, stage)
            return
        self.execution_provider.labels(stage).state(provider)

    def record_fallback(self, reason: str) -> None:
        """A GPU provider that did not come up, or a session that fell back to the CPU."""
        self.provider_fallbacks_total.labels(reason).inc()

    def set_opencl_devices(self, devices: Iterable[OpenClReading]) -> None:
        self.opencl_devices.clear()
        for d in devices:
            self.opencl_devices.labels(d.platform, d.device, d.type).set(1)
