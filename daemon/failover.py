"""The OCR devices in service: a batch that fails on one device is run on the others, and a
device that keeps failing batches the others recognise is taken out of service.

One engine per GPU (or the CPU's); the pipeline's workers take batches from one queue as they
are free, so work already goes by load. What this adds is failover: a lost GPU (Xid, ECC,
fallen off the bus) or one out of memory for good must not fail documents that another GPU
can read, and must show in /health. A batch that fails on every device is the batch's fault
(or every device's): its documents fail and are retried, no device is blamed, and a run of
such batches makes the pipeline unhealthy, so the service restarts.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from daemon.metrics import Metrics
from daemon.ocr.engines import OcrEngine
from daemon.results import Image, PageResult

log = logging.getLogger("daemon.failover")

# A device that failed this many batches in a row which another device then recognised is
# taken out of service; this many batches in a row that failed on every device make the
# pipeline unhealthy (the service restarts).
DEVICE_FAILURES = 2
ALL_DEVICES_FAILURES = 5


@dataclass
class DeviceHealth:
    """One OCR device's record, for failover and /health."""

    device: str
    batches: int = 0
    consecutive_failures: int = 0
    failed: bool = False
    last_error: str | None = None


class Devices:
    def __init__(self, engines: list[OcrEngine], metrics: Metrics) -> None:
        self._engines = engines
        self.metrics = metrics
        self._health = {engine.device: DeviceHealth(engine.device) for engine in engines}
        self._lock = threading.Lock()
        self._failed_everywhere = 0  # batches in a row that no device could recognise
        for device in self._health:
            metrics.device_up.labels(device).set(1)

    def in_service(self, engine: OcrEngine) -> bool:
        with self._lock:
            return not self._health[engine.device].failed

    def run(self, engine: OcrEngine, images: list[Image]
            ) -> tuple[list[PageResult], OcrEngine] | Exception:
        """The batch on `engine`; if it raises, on each other device in service in turn. A
        device whose batch another device then recognised is at fault (after DEVICE_FAILURES
        in a row it is taken out of service); a batch no device recognises is the batch's
        fault (or every device's): its documents fail, to be retried."""
        errors: list[tuple[OcrEngine, Exception]] = []
        for candidate in self._order(engine):
            try:
                results = candidate.recognize(images)
            except Exception as exc:
                log.exception("OCR failed on a batch of %d pages on device %s", len(images),
                              candidate.device)
                errors.append((candidate, exc))
                continue
            for failed, error in errors:
                self._device_failed(failed, error)
            self._device_ok(candidate)
            return results, candidate
        with self._lock:
            self._failed_everywhere += 1
        return errors[-1][1] if errors else RuntimeError("no OCR device in service")

    def _order(self, engine: OcrEngine) -> list[OcrEngine]:
        """`engine`, then one engine of each other device in service."""
        order = {engine.device: engine}
        for other in self._engines:
            if other.device not in order and not self._health[other.device].failed:
                order[other.device] = other
        return list(order.values())

    def _device_ok(self, engine: OcrEngine) -> None:
        with self._lock:
            health = self._health[engine.device]
            health.batches += 1
            health.consecutive_failures = 0
            self._failed_everywhere = 0
        self.metrics.device_batches_total.labels(engine.device, "ok").inc()

    def _device_failed(self, engine: OcrEngine, exc: Exception) -> None:
        with self._lock:
            health = self._health[engine.device]
            health.consecutive_failures += 1
            health.last_error = f"{type(exc).__name__}: {exc}"[:500]
            taken_out = health.consecutive_failures >= DEVICE_FAILURES and not health.failed
            if taken_out:
                health.failed = True
        self.metrics.device_batches_total.labels(engine.device, "failed").inc()
        if taken_out:
            self.metrics.device_up.labels(engine.device).set(0)
            log.error("OCR device %s taken out of service after %d failed batches that other "
                      "devices recognised: %s", engine.device, DEVICE_FAILURES,
                      health.last_error)

    def report(self) -> list[dict[str, object]]:
        """Each OCR device, for /health."""
        with self._lock:
            return [{"device": h.device, "state": "failed" if h.failed else "ok",
                     "batches": h.batches, "last_error": h.last_error}
                    for h in self._health.values()]

    @property
    def ok(self) -> bool:
        """Some device in service, and not every recent batch failing everywhere."""
        with self._lock:
            return (any(not h.failed for h in self._health.values())
                    and self._failed_everywhere < ALL_DEVICES_FAILURES)

    @property
    def degraded(self) -> bool:
        with self._lock:
            return any(h.failed for h in self._health.values())
