"""OpenCL devices, listed from a child Python with a timeout: a broken ICD can hang or crash the
process that loads it. onnxruntime has no OpenCL provider, so these are only reported.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, field

OPENCL_TIMEOUT_SECONDS = 10.0


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
