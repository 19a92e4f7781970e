"""`ocr-daemon doctor`: the hardware found, onnxruntime's build and the provider choice, as
JSON or as a few readable tables."""

from __future__ import annotations

import os
from dataclasses import asdict
from typing import Any

import onnxruntime as ort

from daemon.config import NVIDIA_PROVIDERS, Settings
from daemon.errors import ProviderError
from daemon.hardware.builds import build_report
from daemon.hardware.nvml import NvmlReport, probe_nvml
from daemon.hardware.opencl import probe_opencl
from daemon.hardware.openvino import probe_openvino
from daemon.hardware.providers import (
    TENSORRT_EP,
    choose_provider,
    linked_nvinfer,
    tensorrt_bridge,
    tensorrt_cache_dir,
    tensorrt_libraries_loadable,
)

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
            # onnxruntime's CPU runs float32, an NVIDIA GPU what ocr.gpu_precision says,
            # OpenVINO what its probe chose (ocr.cpu_precision)
            precision=(settings.ocr.gpu_precision if choice.name in NVIDIA_PROVIDERS
                       else OV_PRECISION.get(choice.precision or "", "fp32")),
            openvino_device=choice.openvino_device,
        )
    return {
        "onnxruntime": onnxruntime_info(),
        "build": build_report(driver_cuda(nvml), probe=False),
        "nvml": asdict(nvml),
        "opencl": asdict(opencl),
        "provider": provider,
        "tensorrt": tensorrt_report(provider.get("name")),
        "openvino": asdict(probe_openvino(settings.ocr.cpu_precision,
                                          gpus=not settings.force_cpu)),
    }


# OpenVINO's precision names as the daemon's settings write them
OV_PRECISION = {"bf16": "bf16", "f32": "fp32", "f16": "fp16"}


def tensorrt_report(chosen: str | None) -> dict[str, Any]:
    """Whether TensorRT is used, and if not, why: onnxruntime's bridge in this build, the very
    libnvinfer major version it links, the engine cache; each shape bucket's session its own
    engine with an optimisation profile of exactly that shape (providers.with_shape_profile)."""
    bridge = tensorrt_bridge()
    links = linked_nvinfer(bridge)
    in_build = TENSORRT_EP in ort.get_available_providers()
    loadable = bool(in_build and tensorrt_libraries_loadable(bridge))
    if chosen == "tensorrt":
        why = "used"
    elif not in_build or links is None:
        why = "not used: this onnxruntime build has no TensorRT provider"
    elif not loadable:
        why = (f"not used: {links} (the major version onnxruntime's TensorRT bridge links) is "
               "not installed or not on the library path")
    elif chosen == "cuda":
        why = "not used: its session probe failed (see the provider's reason)"
    else:
        why = f"not used: the provider is {chosen or 'none'}"
    return {"used": chosen == "tensorrt", "why": why, "in_build": in_build, "links": links,
            "loadable": loadable, "engine_cache": str(tensorrt_cache_dir()),
            "profiles": "one engine per shape bucket, its profile that shape (min = opt = max)"}


def driver_cuda(nvml: NvmlReport) -> tuple[int, int] | None:
    """The driver's CUDA version as NVML reads it ("13.0"), as `builds` wants it."""
    if not nvml.cuda_driver_version:
        return None
    major, _, minor = nvml.cuda_driver_version.partition(".")
    return int(major), int(minor or 0)


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
    build = report["build"]
    installed = ", ".join(f"{k} {v}" for k, v in build["installed"].items()) or "none"
    lines.append(f"  installed: {installed}; this host wants {build['recommended']} "
                 f"({build['reason']})")
    lines.extend(f"  PROBLEM: {problem}" for problem in build["problems"])

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
        lines.append(f"  arithmetic: {p['precision']}" + (
            " (ocr.gpu_precision)" if p["name"] in NVIDIA_PROVIDERS
            else f" (ocr.cpu_precision, on OpenVINO's {p['openvino_device']})"
            if p["name"] == "openvino" else " (the CPU always)"))
        if p["fallbacks"]:
            lines.append(f"  fallbacks: {', '.join(p['fallbacks'])}")
    if p["cuda_visible_devices"] is not None:
        lines.append(f"  CUDA_VISIBLE_DEVICES={p['cuda_visible_devices']!r}")
    ov = report["openvino"]
    devices = "; ".join(f"{name} ({', '.join(caps)})" for name, caps in ov["devices"].items())
    lines.append(f"OpenVINO {ov['version']}: {devices or 'no device'}" if ov["version"]
                 else f"OpenVINO: {ov['reason']}")
    if ov["version"]:
        lines.append(f"  {'wins here' if ov['usable'] else 'not used'}: {ov['reason']}")
    trt = report["tensorrt"]
    lines.append(f"TensorRT: {trt['why']}")
    if trt["used"]:
        lines.append(f"  engine cache: {trt['engine_cache']}; {trt['profiles']}")
    return "\n".join(lines)
