"""What accelerators this host has: NVIDIA GPUs through NVML, OpenCL devices, onnxruntime's build.

Every probe answers with a report, never an exception: a host without a driver, library or
ICD is a host without that kind of GPU. OpenCL runs in a subprocess with a timeout because a
broken ICD can hang or crash the process that loads it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import threading
from dataclasses import asdict, dataclass, field
from typing import Any

import onnxruntime as ort

from daemon.config import Settings
from daemon.errors import ProviderError

log = logging.getLogger(__name__)

OPENCL_TIMEOUT_SECONDS = 10.0


# --- NVML -------------------------------------------------------------------------------------


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


# --- OpenCL -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class OpenClDevice:
    platform: str
    device: str
    type: str  # "gpu" | "cpu" | "accelerator" | "custom" | "other"
    vendor: str
    version: str
    memory_bytes: int


@dataclass(frozen=True)
class OpenClReport:
    available: bool
    devices: list[OpenClDevice] = field(default_factory=list)
    error: str | None = None

    @property
    def gpus(self) -> list[OpenClDevice]:
        return [d for d in self.devices if d.type == "gpu"]


# Runs in the child. Device type is a bit field (PoCL reports CPU | DEFAULT), so pick the most
# telling bit rather than pyopencl's to_string.
_OPENCL_SCRIPT = r"""
import json, sys
try:
    import pyopencl as cl
except ImportError as exc:
    print(json.dumps({"error": "pyopencl is not installed"})); sys.exit(0)
try:
    platforms = cl.get_platforms()
except cl.Error as exc:
    print(json.dumps({"devices": [], "error": "no OpenCL platform: %s" % exc})); sys.exit(0)
out = []
bits = [(cl.device_type.GPU, "gpu"), (cl.device_type.ACCELERATOR, "accelerator"),
        (cl.device_type.CPU, "cpu"), (getattr(cl.device_type, "CUSTOM", 16), "custom")]
for p in platforms:
    try:
        devices = p.get_devices()
    except cl.Error:
        continue
    for d in devices:
        kind = next((name for bit, name in bits if d.type & bit), "other")
        out.append({"platform": p.name.strip(), "device": d.name.strip(), "type": kind,
                    "vendor": d.vendor.strip(), "version": d.version.strip(),
                    "memory_bytes": int(d.global_mem_size)})
print(json.dumps({"devices": out}))
"""


def probe_opencl(timeout: float = OPENCL_TIMEOUT_SECONDS) -> OpenClReport:
    """List OpenCL platforms and devices from a child Python, killed after `timeout` seconds."""
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _OPENCL_SCRIPT],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return OpenClReport(False, error=f"OpenCL probe timed out after {timeout:g} s")
    except OSError as exc:
        return OpenClReport(False, error=f"OpenCL probe could not start: {exc}")
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or [""]
        return OpenClReport(
            False, error=f"OpenCL probe exited with status {proc.returncode}: {tail[0]}"
        )
    try:
        data = json.loads(proc.stdout.strip().splitlines()[-1])
        devices = [OpenClDevice(**d) for d in data.get("devices", [])]
    except (ValueError, IndexError, TypeError) as exc:
        return OpenClReport(False, error=f"OpenCL probe answered nonsense: {exc}")
    return OpenClReport(bool(devices), devices, data.get("error"))


# --- onnxruntime ------------------------------------------------------------------------------


def onnxruntime_info() -> dict[str, Any]:
    build_info = getattr(ort, "get_build_info", None)
    return {
        "version": ort.__version__,
        "device": ort.get_device(),
        "available_providers": list(ort.get_available_providers()),
        "build_info": build_info() if build_info is not None else None,
    }


# --- doctor -----------------------------------------------------------------------------------


def doctor_report(settings: Settings) -> dict[str, Any]:
    """Everything `ocr-daemon doctor` shows, JSON-able. Probes run even with FORCE_CPU: the
    point is to see the hardware; the provider line still follows the settings."""
    from daemon.ocr.providers import choose_provider  # providers imports this module

    nvml = probe_nvml()
    opencl = probe_opencl()
    provider: dict[str, Any] = {
        "requested": settings.ocr.provider,
        "force_cpu": settings.force_cpu,
        "device_id": settings.ocr.device_id,
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
    }
    try:
        choice = choose_provider(settings, nvml=nvml, opencl=opencl)
    except ProviderError as exc:
        provider.update(name=None, reason=str(exc), gpu_info=None, fallbacks=[], error=True)
    else:
        provider.update(
            name=choice.name,
            reason=choice.reason,
            gpu_info=choice.gpu_info,
            fallbacks=list(choice.fallbacks),
            error=False,
        )
    return {
        "onnxruntime": onnxruntime_info(),
        "nvml": asdict(nvml),
        "opencl": asdict(opencl),
        "provider": provider,
    }


def _mib(n: int) -> str:
    return f"{n / 2**20:,.0f} MiB"


def _table(headers: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    out = ["  " + line.rstrip()]
    for row in rows:
        out.append("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return out


def format_doctor(report: dict[str, Any]) -> str:
    """`doctor_report`'s dict as a few readable tables."""
    lines: list[str] = []
    rt = report["onnxruntime"]
    lines.append(f"onnxruntime {rt['version']} ({rt['device']} build)")
    lines.append(f"  providers in this build: {', '.join(rt['available_providers'])}")

    nvml = report["nvml"]
    lines.append("")
    if nvml["gpus"]:
        lines.append(
            f"NVIDIA GPUs (driver {nvml['driver_version']}, CUDA {nvml['cuda_driver_version']})"
        )
        rows = [
            [
                str(g["index"]),
                g["name"],
                _mib(g["memory_used_bytes"]),
                _mib(g["memory_total_bytes"]),
                "n/a" if g["utilization_ratio"] is None else f"{g['utilization_ratio']:.0%}",
            ]
            for g in nvml["gpus"]
        ]
        lines.extend(_table(["GPU", "NAME", "MEM USED", "MEM TOTAL", "UTIL"], rows))
    else:
        lines.append(f"NVIDIA GPUs: none ({nvml['error'] or 'no NVIDIA GPU'})")

    opencl = report["opencl"]
    lines.append("")
    if opencl["devices"]:
        lines.append("OpenCL devices")
        rows = [
            [d["type"], d["device"], d["platform"], _mib(d["memory_bytes"])]
            for d in opencl["devices"]
        ]
        lines.extend(_table(["TYPE", "DEVICE", "PLATFORM", "MEMORY"], rows))
    else:
        lines.append(f"OpenCL devices: none ({opencl['error'] or 'no OpenCL device'})")

    p = report["provider"]
    lines.append("")
    requested = f"requested {p['requested']}" + (", FORCE_CPU=true" if p["force_cpu"] else "")
    if p["error"]:
        lines.append(f"Execution provider: NONE ({requested})")
        lines.append(f"  error: {p['reason']}")
    else:
        lines.append(f"Execution provider: {p['name']} ({requested})")
        if p["gpu_info"]:
            lines.append(f"  gpu: {p['gpu_info']}")
        lines.append(f"  reason: {p['reason']}")
        if p["fallbacks"]:
            lines.append(f"  fallbacks: {', '.join(p['fallbacks'])}")
    if p["cuda_visible_devices"] is not None:
        lines.append(f"  CUDA_VISIBLE_DEVICES={p['cuda_visible_devices']!r}")
    return "\n".join(lines)
