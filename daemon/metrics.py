"""Every metric of the daemon, in one registry, and the small HTTP server that exposes them.

Stages only observe the `Metrics` object they are handed; nothing here reads the environment.
GPU memory and utilisation are read from NVML when Prometheus scrapes, not polled, so a GPU-less
host simply has no `ocr_gpu_*` series. Throughput is computed at scrape time over a sliding
window, so it falls to zero when work stops instead of freezing at the last value.

Endpoints (one threaded server, bound to 127.0.0.1 unless configured):
  /metrics           Prometheus text (OpenMetrics when the scraper asks for it)
  /health, /health/  JSON from the `health` callable; 200 for "healthy"/"degraded", 503 else
  /ready             200 once `ready()` is true (models loaded, store open), 503 before
"""

from __future__ import annotations

import collections
import json
import logging
import socket
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Enum, Gauge, Histogram, Info
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from daemon.ocr.hardware import GpuInfo, NvmlReader, OpenClDevice
from daemon.ocr.providers import Fallback, ProviderChoice, add_fallback_listener

log = logging.getLogger(__name__)

PROVIDERS = ("cpu", "cuda", "tensorrt")
SESSION_STAGES = ("det", "cls", "rec")
STAGES = ("decode", "det", "cls", "rec", "store")
FILE_STATUSES = ("done", "failed", "duplicate", "retried", "quarantined")
HEALTHY_STATUSES = ("healthy", "degraded")

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
STAGE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800)


class GpuCollector(Collector):
    """`ocr_gpu_*` read from NVML at scrape time; yields no series when there is no GPU."""

    def __init__(self, read: Callable[[], list[GpuInfo]]) -> None:
        self._read = read

    def describe(self) -> Iterable[Metric]:
        return self._families()  # no samples: registering must not touch NVML

    def collect(self) -> Iterable[Metric]:
        try:
            gpus = self._read()
        except Exception:  # a scrape must never fail because of the GPU
            log.exception("reading GPU metrics failed")
            gpus = []
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
        gpu_reader: Callable[[], list[GpuInfo]] | None = None,
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
            states=list(PROVIDERS),
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
        self.queue_depth = Gauge("ocr_queue_depth", "Files waiting in the queue", registry=r)
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

        self._nvml: NvmlReader | None = None
        if gpu_reader is None:
            self._nvml = NvmlReader()
            gpu_reader = self._nvml.read
        r.register(GpuCollector(gpu_reader))

    def observe_pages(self, n: int) -> None:
        """`n` pages stored: counts them and feeds the throughput window."""
        if n <= 0:
            return
        self.pages_total.inc(n)
        self._pages.add(n)

    def set_provider(self, choice: ProviderChoice) -> None:
        """The start-up provider choice: every session stage, plus its fallbacks (call once)."""
        for stage in SESSION_STAGES:
            self.set_stage_provider(stage, choice.name)
        for reason in choice.fallbacks:
            self.provider_fallbacks_total.labels(reason).inc()

    def set_stage_provider(self, stage: str, provider: str) -> None:
        """What one stage's session really runs on (`providers.provider_name(session)`)."""
        if provider not in PROVIDERS:
            log.warning("unknown execution provider %r for stage %s", provider, stage)
            return
        self.execution_provider.labels(stage).state(provider)

    def record_fallback(self, event: Fallback) -> None:
        self.provider_fallbacks_total.labels(event.reason).inc()

    def watch_fallbacks(self) -> Callable[[], None]:
        """Count `create_session`'s silent fallbacks from now on; returns the unsubscriber."""
        return add_fallback_listener(self.record_fallback)

    def set_opencl_devices(self, devices: Iterable[OpenClDevice]) -> None:
        self.opencl_devices.clear()
        for d in devices:
            self.opencl_devices.labels(d.platform, d.device, d.type).set(1)

    def close(self) -> None:
        if self._nvml is not None:
            self._nvml.close()


# --- HTTP ---------------------------------------------------------------------------------

HEALTH_KEYS = ("status", "version", "gpu_available", "provider", "uptime", "queue_depth",
               "database")


def health_document(
    *,
    status: str,
    version: str,
    gpu_available: bool,
    provider: str,
    uptime: float,
    queue_depth: int,
    database: str,
    **extra: Any,
) -> dict[str, Any]:
    """The /health body with every agreed key, so the service cannot forget one.

    `status` is "healthy", "degraded" (working, but e.g. on the CPU after a GPU fallback or
    with retries piling up) or "unhealthy" (workers dead, database unreachable); `uptime` is
    in seconds; `database` is e.g. "ok" or the last error.
    """
    if status not in (*HEALTHY_STATUSES, "unhealthy"):
        raise ValueError(f"health status must be healthy, degraded or unhealthy: {status!r}")
    return {
        "status": status,
        "version": version,
        "gpu_available": gpu_available,
        "provider": provider,
        "uptime": round(uptime, 3),
        "queue_depth": queue_depth,
        "database": database,
        **extra,
    }


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self,
        address: tuple[str, int],
        metrics: Metrics,
        health: Callable[[], dict[str, Any]],
        ready: Callable[[], bool],
    ) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.metrics = metrics
        self.health = health
        self.ready = ready
        super().__init__(address, _Handler)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
            self._send(HTTPStatus.OK, encoder(self.server.metrics.registry), content_type)
        elif path in ("/health", "/health/"):
            self._health()
        elif path in ("/ready", "/ready/"):
            ok = self._call_ready()
            status = HTTPStatus.OK if ok else HTTPStatus.SERVICE_UNAVAILABLE
            self._json(status, {"ready": ok})
        else:
            self._json(HTTPStatus.NOT_FOUND, {"error": f"no such path: {path}"})

    def _health(self) -> None:
        try:
            body = dict(self.server.health())
        except Exception as exc:  # a health check that crashes says "unhealthy", not 500
            log.exception("health callable failed")
            body = {"status": "unhealthy", "error": str(exc)}
        ok = body.get("status") in HEALTHY_STATUSES
        self._json(HTTPStatus.OK if ok else HTTPStatus.SERVICE_UNAVAILABLE, body)

    def _call_ready(self) -> bool:
        try:
            return bool(self.server.ready())
        except Exception:
            log.exception("ready callable failed")
            return False

    def _json(self, status: HTTPStatus, body: dict[str, Any]) -> None:
        data = json.dumps(body, default=str).encode()
        self._send(status, data, "application/json")

    def _send(self, status: HTTPStatus, data: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)


class MetricsServer:
    """One small threaded HTTP server for /metrics, /health and /ready."""

    def __init__(
        self,
        metrics: Metrics,
        host: str = "127.0.0.1",
        port: int = 9464,
        health: Callable[[], dict[str, Any]] | None = None,
        ready: Callable[[], bool] | None = None,
    ) -> None:
        self._metrics = metrics
        self._host = host
        self._requested_port = port
        self._health = health or (lambda: {"status": "healthy", "version": metrics.version})
        self._ready = ready or (lambda: True)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def host(self) -> str:
        return self._host

    @property
    def port(self) -> int:
        """The bound port (the ephemeral one when started with port 0)."""
        if self._server is None:
            return self._requested_port
        return int(self._server.server_address[1])

    def start(self) -> None:
        if self._server is not None:
            return
        self._server = _Server((self._host, self._requested_port), self._metrics, self._health,
                               self._ready)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.2},
            name="metrics-http",
            daemon=True,
        )
        self._thread.start()
        log.info("Metrics and health listening on http://%s:%d", self._host, self.port)

    def stop(self, timeout: float = 5.0) -> None:
        server, thread = self._server, self._thread
        if server is None:
            return
        server.shutdown()  # waits for serve_forever to notice, at most one poll_interval (0.2 s)
        server.server_close()
        if thread is not None:
            thread.join(timeout)
        self._server = self._thread = None

    def __enter__(self) -> MetricsServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _client_host(host: str) -> str:
    """Where to reach a server bound to `host`: a wildcard bind is reached on loopback."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "::1"
    return host


def check_health(host: str, port: int, timeout: float = 3.0) -> bool:
    """True when the daemon at host:port answers /health as "healthy" or "degraded".

    "degraded" counts as alive (e.g. running on the CPU after a GPU fallback, or the database
    slow): the daemon still makes progress, and a container restart would not fix it. Anything
    else — unreachable, timeout, HTTP error, "unhealthy", a body that is not our JSON — is False.
    """
    target = _client_host(host)
    if ":" in target:
        target = f"[{target}]"
    try:
        with urllib.request.urlopen(f"http://{target}:{port}/health", timeout=timeout) as resp:
            body = json.loads(resp.read())
    except (OSError, ValueError):  # URLError, HTTPError (503) and timeouts are OSErrors
        return False
    return isinstance(body, dict) and body.get("status") in HEALTHY_STATUSES

