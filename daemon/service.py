"""Build everything from Settings; start store -> metrics -> workers -> watcher, stop in
reverse (producers before consumers, so nothing new is taken in while work is finishing)."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

from PIL import Image as PILImage
from sqlalchemy import Engine, text

from daemon import __version__, sdnotify
from daemon.config import Settings
from daemon.errors import DaemonError, DatabaseError, ExitCode
from daemon.metrics import Metrics, MetricsServer, health_document
from daemon.ocr import hardware
from daemon.ocr.engines import build_engine, worker_count
from daemon.ocr.providers import ProviderChoice, choose_provider
from daemon.ocr.types import OcrEngine
from daemon.pipeline import Intake, Pipeline
from daemon.store import migrate
from daemon.store.db import is_sqlite, make_engine
from daemon.store.repository import Ledger
from daemon.watcher import Watcher

log = logging.getLogger("daemon.service")


class Interrupted(DaemonError):
    exit_code = ExitCode.INTERRUPTED


def open_ledger(settings: Settings, *, migrate_now: bool) -> tuple[Engine, Ledger]:
    engine = make_engine(settings.database)
    try:
        if migrate_now:
            migrate.upgrade(engine)
        elif not migrate.is_up_to_date(engine):
            raise DatabaseError("database schema is not up to date: run `ocr-daemon migrate`")
    except DaemonError:
        raise
    except Exception as exc:
        raise DatabaseError(f"database {engine.url.render_as_string(hide_password=True)}: "
                            f"{str(exc).splitlines()[0]}") from None
    return engine, Ledger(engine)


class Service:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.started = time.monotonic()
        self.stop_requested = threading.Event()
        self._signals = 0
        self.metrics = Metrics(__version__)
        self.engine: Engine | None = None
        self.ledger: Ledger | None = None
        self.choice: ProviderChoice | None = None
        self.pipeline: Pipeline | None = None
        self.watcher: Watcher | None = None
        self.server: MetricsServer | None = None
        self.nvml: hardware.NvmlReport | None = None
        self.opencl: hardware.OpenClReport | None = None
        self._unwatch_fallbacks: Callable[[], None] | None = None
        self.ready = False

    def _probe_hardware(self) -> None:
        """NVML and OpenCL once, for the provider choice, /health and the metrics.
        FORCE_CPU skips every probe (a broken driver or ICD cannot hurt a CPU deployment)."""
        if self.settings.cpu_only:
            return
        self.nvml = hardware.probe_nvml()
        if not self.nvml.gpus:
            self.opencl = hardware.probe_opencl()

    # -- start ----------------------------------------------------------------------------

    def start(self) -> None:
        settings = self.settings
        PILImage.MAX_IMAGE_PIXELS = settings.ocr.max_image_pixels
        self.engine, self.ledger = open_ledger(settings,
                                               migrate_now=settings.database.migrate_on_start)
        requeued = self.ledger.requeue_stale(all_processing=is_sqlite(self.engine))
        if requeued:
            log.info("re-queued %d documents left in processing by an earlier run", requeued)
        self._probe_hardware()
        self.choice = choose_provider(settings, nvml=self.nvml, opencl=self.opencl)
        self.metrics.set_provider(self.choice)
        if self.opencl is not None:
            self.metrics.set_opencl_devices(self.opencl.devices)
        self._unwatch_fallbacks = self.metrics.watch_fallbacks()
        workers = worker_count(settings, self.choice)
        sdnotify.extend_timeout(300)  # model loading and bucket warm-up (TensorRT builds)
        engines = self._engines(workers)
        self.pipeline = Pipeline(settings, self.ledger, engines, self.metrics, self.choice.name)
        self._start_metrics()
        self.pipeline.start()
        intake = Intake(settings, self.ledger, self.pipeline, self.metrics)
        self.watcher = Watcher(settings.watch, intake.take, intake.reject)
        self.watcher.start()
        self.ready = True
        sdnotify.ready(f"watching {self.watcher.root}")
        log.info("ocr-daemon %s ready: provider %s (%s), %d worker%s, database %s", __version__,
                 self.choice.name, self.choice.reason, workers, "" if workers == 1 else "s",
                 self.engine.url.render_as_string(hide_password=True))

    def _engines(self, workers: int) -> list[OcrEngine]:
        assert self.choice is not None
        start = time.perf_counter()
        first = build_engine(self.settings, self.choice, workers)
        engines = [first]
        if self.settings.ocr.engine == "rapidocr":  # not thread-safe: one per worker
            engines += [build_engine(self.settings, self.choice, workers)
                        for _ in range(workers - 1)]
        else:  # the batch engine is shared; its sessions are thread-safe
            engines += [first] * (workers - 1)
        warmup = getattr(first, "warmup", None)
        if callable(warmup) and first.provider != "cpu":
            # cuDNN algorithm search and arena growth for every shape bucket happen now, not
            # on the first files. On the CPU there is nothing to gain and it takes minutes.
            spent = warmup()
            log.info("warmed up every shape bucket: %s",
                     ", ".join(f"{k} {v:.1f}s" for k, v in spent.items()))
        for stage in ("det", "cls", "rec"):
            self.metrics.set_stage_provider(stage, first.provider)
        log.info("models loaded in %.1fs", time.perf_counter() - start)
        return engines

    def _start_metrics(self) -> None:
        if not self.settings.metrics.enabled:
            return
        self.server = MetricsServer(self.metrics, self.settings.metrics.host,
                                    self.settings.metrics.port, self.health, self.is_ready)
        self.server.start()
        log.info("metrics on http://%s:%s/metrics", self.settings.metrics.host, self.server.port)

    # -- health ---------------------------------------------------------------------------

    def database_reachable(self) -> bool:
        if self.engine is None:
            return False
        try:
            with self.engine.connect() as connection:
                connection.execute(text("SELECT 1"))
            return True
        except Exception:
            return False

    def is_ready(self) -> bool:
        return bool(self.ready and self.watcher and self.watcher.alive
                    and self.pipeline and self.pipeline.database_ok)

    def health(self) -> dict[str, Any]:
        database = self.database_reachable()
        watcher_alive = bool(self.watcher and self.watcher.alive)
        choice = self.choice
        fell_back = bool(choice and choice.fallbacks)
        if not self.ready or not watcher_alive:
            status = "unhealthy"
        elif not database or fell_back:
            status = "degraded"
        else:
            status = "healthy"
        return health_document(
            status=status,
            version=__version__,
            gpu_available=bool(self.nvml and self.nvml.gpus),
            provider=choice.name if choice else "none",
            uptime=time.monotonic() - self.started,
            queue_depth=self.pipeline.inflight_count() if self.pipeline else 0,
            database="ok" if database else "unreachable",
            provider_reason=choice.reason if choice else None,
            opencl_gpus=[d.device for d in self.opencl.gpus] if self.opencl else [],
            watcher=self.watcher.observer_kind if self.watcher else None,
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
                if self.watcher and self.watcher.alive and self.pipeline and \
                        self.pipeline.alive:
                    sdnotify.watchdog()
                next_ping = time.monotonic() + interval

    def stop(self) -> None:
        self.ready = False
        if self.watcher is not None:
            self.watcher.stop()
        if self.pipeline is not None:
            handed = self.pipeline.stop(self.settings.batch.stop_timeout_seconds)
            if handed:
                log.info("handed %d unfinished documents back to the queue", handed)
        if self.server is not None:
            self.server.stop()
        if self._unwatch_fallbacks is not None:
            self._unwatch_fallbacks()
        self.metrics.close()
        if self.engine is not None:
            self.engine.dispose()
        log.info("stopped")


def run(settings: Settings) -> None:
    service = Service(settings)
    service.install_signal_handlers()
    try:
        service.start()
        service.wait()
    finally:
        try:
            service.stop()
        finally:
            if service.pipeline is not None and service.pipeline.threads_alive():
                # A worker still inside onnxruntime (its work handed back, or a second signal
                # cut the stop short): tearing the interpreter down under a running native call
                # aborts the process (SIGABRT, "terminate called..."), so leave without it.
                logging.shutdown()
                os._exit(ExitCode.INTERRUPTED if service._signals > 1 else ExitCode.OK)
