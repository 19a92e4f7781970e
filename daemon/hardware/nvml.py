"""NVIDIA GPUs through NVML: one probe at start-up, and a long-lived reader for every scrape.

A host without the driver or the library is a host without an NVIDIA GPU, never an exception.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GpuInfo:
    index: int  # NVML (PCI bus) order
    name: str
    uuid: str
    memory_total_bytes: int
    memory_used_bytes: int
    utilization_ratio: float | None  # 0..1 over NVML's last sample period; None if unsupported


@dataclass(frozen=True)
class NvmlReport:
    available: bool
    driver_version: str | None = None
    cuda_driver_version: str | None = None
    gpus: list[GpuInfo] = field(default_factory=list)
    error: str | None = None  # why there is no NVIDIA GPU, for logs and doctor


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _nvml_missing(exc: BaseException) -> str:
    import pynvml

    if isinstance(exc, pynvml.NVMLError_LibraryNotFound):
        return "no NVIDIA GPU: NVML library (libnvidia-ml.so.1) not found"
    if isinstance(exc, pynvml.NVMLError_DriverNotLoaded):
        return "no NVIDIA GPU: NVIDIA driver not loaded"
    return f"no NVIDIA GPU: NVML failed: {exc}"


def _read_gpu(pynvml: Any, index: int) -> GpuInfo:
    handle = pynvml.nvmlDeviceGetHandleByIndex(index)
    memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
    try:
        utilization: float | None = pynvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100.0
    except pynvml.NVMLError:  # e.g. MIG instances report no utilisation
        utilization = None
    return GpuInfo(
        index=index,
        name=_text(pynvml.nvmlDeviceGetName(handle)),
        uuid=_text(pynvml.nvmlDeviceGetUUID(handle)),
        memory_total_bytes=int(memory.total),
        memory_used_bytes=int(memory.used),
        utilization_ratio=utilization,
    )


def probe_nvml() -> NvmlReport:
    """One NVML reading of every GPU; init and shutdown around it."""
    try:
        import pynvml
    except ImportError:
        return NvmlReport(False, error="no NVIDIA GPU: nvidia-ml-py is not installed")
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        return NvmlReport(False, error=_nvml_missing(exc))
    try:
        driver = _text(pynvml.nvmlSystemGetDriverVersion())
        try:
            cuda = pynvml.nvmlSystemGetCudaDriverVersion_v2()
            cuda_version: str | None = f"{cuda // 1000}.{cuda % 1000 // 10}"
        except pynvml.NVMLError:
            cuda_version = None
        gpus = [_read_gpu(pynvml, i) for i in range(pynvml.nvmlDeviceGetCount())]
        return NvmlReport(True, driver, cuda_version, gpus, None if gpus else "no NVIDIA GPU")
    except pynvml.NVMLError as exc:
        return NvmlReport(False, error=f"NVML failed while reading GPUs: {exc}")
    finally:
        with contextlib.suppress(pynvml.NVMLError):
            pynvml.nvmlShutdown()


class NvmlReader:
    """A long-lived NVML handle for reading GPUs at every scrape.

    NVML is initialised on first use and kept; a host without NVML is found out once and then
    answers an empty list without trying again, so scrapes stay cheap and the log quiet.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pynvml: Any = None
        self._unavailable = False

    def read(self) -> list[GpuInfo]:
        with self._lock:
            if self._unavailable:
                return []
            if self._pynvml is None:
                try:
                    import pynvml

                    pynvml.nvmlInit()
                except ImportError:
                    self._unavailable = True
                    return []
                except pynvml.NVMLError as exc:
                    log.info("GPU metrics off: %s", _nvml_missing(exc))
                    self._unavailable = True
                    return []
                self._pynvml = pynvml
            pynvml = self._pynvml
            try:
                return [_read_gpu(pynvml, i) for i in range(pynvml.nvmlDeviceGetCount())]
            except pynvml.NVMLError as exc:  # a GPU fell off the bus: report it, keep serving
                log.warning("NVML read failed: %s", exc)
                return []

    def close(self) -> None:
        with self._lock:
            if self._pynvml is not None:
                with contextlib.suppress(self._pynvml.NVMLError):
                    self._pynvml.nvmlShutdown()
                self._pynvml = None
