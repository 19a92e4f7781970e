"""Build everything from Settings; start store -> metrics -> workers -> watcher, stop in
reverse (producers before consumers, so nothing new is taken in while work is finishing)."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import FrameType
from typing import Any

from PIL import Image as PILImage

from daemon import __version__, sdnotify
from daemon.config import NVIDIA_PROVIDERS, Settings
from daemon.errors import ExitCode, Interrupted
from daemon.hardware.nvml import NvmlReader, NvmlReport, probe_nvml
from daemon.hardware.opencl import OpenClReport, probe_opencl
from daemon.hardware.providers import ProviderChoice, choose_provider
from daemon.hardware.sessions import add_fallback_listener
from daemon.http import MetricsServer, health_document
from daemon.intake import Intake
from daemon.metrics import Metrics, ShapeWarmth
from daemon.ocr.engines import OcrEngine, build_engines, worker_count
from daemon.pipeline import Pipeline
from daemon.store.db import lock_single_daemon, open_ledger
from daemon.store.ledger import Ledger
from daemon.store.outage import Outage
from daemon.watcher import Watcher

log = logging.getLogger("daemon.service")


@dataclass(frozen=True)
class Hardware:
    """What start-up found, for the provider choice, /health and the metrics."""

    choice: ProviderChoice
    nvml: NvmlReport | None  # None: not probed (FORCE_CPU)
    opencl: OpenClReport | None  # None: not probed (FORCE_CPU, or an NVIDIA GPU was found)


@dataclass(frozen=True)
class Components:
    """Everything a running daemon is made of, built complete before anything starts."""

    ledger: Ledger
    outage: Outage
    hardware: Hardware
    pipeline: Pipeline
    watcher: Watcher
    server: MetricsServer | None  # None when metrics.enabled = false


def count_fallbacks(metrics: Metrics) -> Callable[[], None]:
    """Count every session that falls back to the CPU from now on; returns the unsubscriber."""
    return add_fallback_listener(lambda event: metrics.record_fallback(event.reason))


def probe_hardware(settings: Settings) -> Hardware:
    """NVML and OpenCL once, then the provider choice. FORCE_CPU skips every probe (a broken
    driver or ICD cannot hurt a CPU deployment)."""
    nvml = opencl = None
    if not settings.cpu_only:
        nvml = probe_nvml()
        if not nvml.gpus:
            opencl = probe_opencl()
    return Hardware(choose_provider(settings, nvml=nvml, opencl=opencl), nvml, opencl)


ProbeHardware = Callable[[Settings], Hardware]
BuildEngines = Callable[[Settings, ProviderChoice, int], list[OcrEngine]]


class Service:
    """The daemon. `probe` and `build` find the hardware and build the engines; tests and
    stand-in daemons hand in their own (engines that crash, stall or name their device)."""

    def __init__(self, settings: Settings, *, probe: ProbeHardware = probe_hardware,
                 build: BuildEngines = build_engines) -> None:
        self.settings = settings
        self._probe = probe
        self._build = build
        self.started = time.monotonic()
        self.stop_requested = threading.Event()
        self._signals = 0
        self._nvml = NvmlReader()
        self.metrics = Metrics(__version__, gpu_reader=self._nvml.read)
        self.components: Components | None = None
        self.ready = False
        self.warmup: dict[str, Any] = {"state": "not started"}
        self._stack = contextlib.ExitStack()  # what has started, stopped in reverse

    @property
    def ledger(self) -> Ledger:
        if self.components is None:
            raise RuntimeError("the service has not started")
        return self.components.ledger

    # -- start ----------------------------------------------------------------------------

    def start(self) -> None:
        settings, stack = self.settings, self._stack
        PILImage.MAX_IMAGE_PIXELS = settings.ocr.max_image_pixels
        stack.callback(self._nvml.close)
        _, ledger = open_ledger(settings, migrate_now=settings.database.migrate_on_start)
        stack.callback(ledger.close)
        lock = lock_single_daemon(ledger.engine)  # before anything is re-queued as left over
        if lock is not None:
            stack.callback(os.close, lock)
        outage = Outage(ledger)
        expired = ledger.requeue_stale(all_processing=not ledger.postgresql,
                                       max_attempts=settings.queue.max_attempts)

        hardware = self._probe(settings)
        self.metrics.set_provider(hardware.choice.name, hardware.choice.fallbacks)
        if hardware.opencl is not None:
            self.metrics.set_opencl_devices(hardware.opencl.devices)
        stack.callback(count_fallbacks(self.metrics))
        workers = worker_count(settings, hardware.choice)
        sdnotify.extend_timeout(300)  # model loading and bucket warm-up (TensorRT builds)
        engines = self._engines(hardware.choice, workers)

        pipeline = Pipeline(settings, ledger, engines, self.metrics, hardware.choice.name,
                            outage)
        pipeline.leases.expired(expired, "left in processing by an earlier run")
        intake = Intake(settings, ledger, self.metrics, outage=outage, notify=pipeline.notify)
        watcher = Watcher(settings.watch, intake.take, intake.reject, look_up=intake.look_up)
        server = (MetricsServer(self.metrics, settings.metrics.host, settings.metrics.port,
                                self.health, self.is_ready)
                  if settings.metrics.enabled else None)
        self.components = Components(ledger, outage, hardware, pipeline, watcher, server)

        if server is not None:
            server.start()
            stack.callback(server.stop)
            log.info("metrics on http://%s:%s/metrics", settings.metrics.host, server.port)
        self.metrics.warmup.read = lambda: self._warmth(pipeline)
        pipeline.start()
        stack.callback(self._stop_pipeline, pipeline)
        self._warm_up(engines)
        watcher.start()
        stack.callback(watcher.stop)
        self.ready = True
        sdnotify.ready(f"watching {watcher.root}")
        log.info("ocr-daemon %s ready: provider %s (%s), %d worker%s, database %s", __version__,
                 hardware.choice.name, hardware.choice.reason, workers,
                 "" if workers == 1 else "s", ledger.url)

    def _engines(self, choice: ProviderChoice, workers: int) -> list[OcrEngine]:
        start = time.perf_counter()
        engines = self._build(self.settings, choice, workers)
        for stage in ("det", "cls", "rec"):
            self.metrics.set_stage_provider(stage, engines[0].provider)
        log.info("models loaded in %.1fs", time.perf_counter() - start)
        return engines

    @staticmethod
    def _warmth(pipeline: Pipeline | None) -> list[ShapeWarmth]:
        """Each GPU engine's warm-up (those with a session a shape)."""
        if pipeline is None:
            return []
        out = []
        for engine in {id(e): e for e in pipeline.engines}.values():
            count = getattr(engine, "warm_shapes_count", None)
            if count is not None:
                warm, shapes = count()
                if shapes:
                    seconds: list[tuple[str, tuple[int, ...], float, float]] = getattr(
                        engine, "warm_seconds", list)()
                    out.append(ShapeWarmth(str(engine.device), warm, shapes, seconds))
        return out

    @classmethod
    def _warm_count(cls, pipeline: Pipeline | None) -> dict[str, int]:
        """Shapes warm and to warm, over every GPU's engine."""
        engines = cls._warmth(pipeline)
        return ({"shapes_warm": sum(e.warm for e in engines),
                 "shapes": sum(e.shapes for e in engines)} if engines else {})

    def _warm_up(self, engines: list[OcrEngine]) -> None:
        """cuDNN plans and arena growth for every shape bucket, on every GPU at once (each its
        own engine and sessions), beside the work: the daemon serves once its models are
        loaded, a batch of a shape not warm yet building that shape's session itself
        (`ShapeSessions.adopt`: once, however many ask). It waited for the whole warm-up,
        51 shapes at 0.7-3.7 s each on an H100, before taking a file. On the CPU there is
        nothing to gain and it takes minutes."""
        distinct = list({id(engine): engine for engine in engines}.values())
        if distinct[0].provider not in NVIDIA_PROVIDERS:
            self.warmup = {"state": "none (CPU provider)" if distinct[0].provider == "cpu"
                           else f"none ({distinct[0].provider}: pages at their own size)"}
            return
        started = time.monotonic()
        self.warmup = {"state": "warming", "since_seconds": 0.0}

        def warm() -> None:
            try:
                with ThreadPoolExecutor(len(distinct), thread_name_prefix="warmup") as pool:
                    spent = list(pool.map(lambda engine: engine.warmup(), distinct))
                for engine, seconds in zip(distinct, spent, strict=True):
                    log.info("warmed up every shape bucket on %s %s: %s", engine.provider,
                             engine.device,
                             ", ".join(f"{k} {v:.1f}s" for k, v in seconds.items()))
                self.warmup = {"state": "done",
                               "seconds": round(time.monotonic() - started, 1)}
            except Exception as exc:  # a cold shape is built at its first batch anyway
                log.exception("warm-up failed")
                self.warmup = {"state": f"failed: {type(exc).__name__}: {exc}"}

        threading.Thread(target=warm, name="warmup", daemon=True).start()

    def _stop_pipeline(self, pipeline: Pipeline) -> None:
        handed = pipeline.stop(self.settings.batch.stop_timeout_seconds)
        if handed:
            log.info("handed %d unfinished documents back to the queue", handed)

    # -- health ---------------------------------------------------------------------------

    def is_ready(self) -> bool:
        parts = self.components
        return bool(self.ready and parts and parts.watcher.alive and parts.outage.ok)

    def health(self) -> dict[str, Any]:
        parts = self.components
        # the daemon's own last word counts at once; a cached probe fills the quiet times
        database = bool(parts and parts.outage.reachable())
        watcher_alive = bool(parts and parts.watcher.alive)
        hardware = parts.hardware if parts else None
        choice = hardware.choice if hardware else None
        pipeline = parts.pipeline if parts else None
        stuck_calls = pipeline.stuck_calls() if pipeline else []
        if not self.ready or not watcher_alive or not (pipeline and pipeline.alive
                                                       and pipeline.devices.ok
                                                       and not pipeline.stuck
                                                       and not pipeline.every_ocr_loop_stuck):
            status = "unhealthy"  # a dead or hung loop is not hidden: systemd and Docker
            # restart it
        elif not database or (choice and choice.fallbacks) or pipeline.devices.degraded or \
                stuck_calls:
            status = "degraded"
        else:
            status = "healthy"
        return health_document(
            status=status,
            version=__version__,
            gpu_available=bool(hardware and hardware.nvml and hardware.nvml.gpus),
            provider=choice.name if choice else "none",
            uptime=time.monotonic() - self.started,
            queue_depth=parts.pipeline.inflight_count() if parts else 0,
            database="ok" if database else "unreachable",
            provider_reason=choice.reason if choice else None,
            opencl_gpus=[d.device for d in hardware.opencl.gpus]
            if hardware and hardware.opencl else [],
            watcher=parts.watcher.observer_kind if parts else None,
            devices=pipeline.devices.report() if pipeline else [],
            # how long work has waited without any progress (0 when nothing is in flight)
            stalled_seconds=round(pipeline.seconds_since_progress(), 1)
            if pipeline and pipeline.inflight_count() else 0.0,
            stuck=stuck_calls,
            warmup={**self.warmup, **self._warm_count(pipeline)},
        )

    # -- stop -----------------------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.handle_signal)
        signal.signal(signal.SIGINT, self.handle_signal)

    def handle_signal(self, signum: int, _frame: FrameType | None) -> None:
        """First signal: graceful stop. Second: exit at once with its own exit code."""
        self._signals += 1
        if self._signals == 1:
            log.info("%s received: stopping (again to exit at once)",
                     signal.Signals(signum).name)
            self.stop_requested.set()
            sdnotify.stopping()
            return
        raise Interrupted(f"{signal.Signals(signum).name} received twice: exiting at once")

    def wait(self) -> None:
        """Until a stop is requested. Under systemd's watchdog, ping it only while the watcher
        and the workers are alive, so a wedged daemon gets restarted."""
        interval = sdnotify.watchdog_interval()
        next_ping = 0.0
        while not self.stop_requested.wait(0.5):
            if interval is not None and time.monotonic() >= next_ping:
                parts = self.components
                if parts and parts.watcher.alive and parts.pipeline.alive and \
                        not parts.pipeline.stuck and not parts.pipeline.every_ocr_loop_stuck:
                    sdnotify.watchdog()
                next_ping = time.monotonic() + interval

    def stop(self) -> None:
        self.ready = False
        self._stack.close()
        log.info("stopped")

    def workers_busy(self) -> bool:
        """A worker is still inside the engine (its work handed back) after the stop."""
        return self.components is not None and self.components.pipeline.threads_alive()


def run(settings: Settings, *, probe: ProbeHardware = probe_hardware,
        build: BuildEngines = build_engines) -> None:
    service = Service(settings, probe=probe, build=build)
    service.install_signal_handlers()
    try:
        service.start()
        service.wait()
    finally:
        try:
            service.stop()
        finally:
            if service.workers_busy():
                # A worker still inside onnxruntime (its work handed back, or a second signal
                # cut the stop short): tearing the interpreter down under a running native call
                # aborts the process (SIGABRT, "terminate called..."), so leave without it.
                logging.shutdown()
                os._exit(ExitCode.INTERRUPTED if service._signals > 1 else ExitCode.OK)
