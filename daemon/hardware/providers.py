"""Execution provider choice, once at start-up.

Order TensorRT -> CUDA -> OpenVINO -> CPU. A provider counts only once a real session built with
it reports it in `session.get_providers()`: onnxruntime lists CUDA even when its libraries
cannot load and then silently runs on the CPU. Without an NVIDIA GPU (or with FORCE_CPU, which
skips the GPUs), OpenVINO's runtime is taken where it measurably wins (`hardware.openvino`: a
CPU with bf16 arithmetic, an Intel GPU), onnxruntime's CPU provider elsewhere;
`ocr.provider = "cpu"` is onnxruntime on the CPU, "openvino" OpenVINO whatever the CPU.

`choose_provider` runs once at start-up. An explicitly named provider ("cuda", "tensorrt") that
cannot be brought up is a `ProviderError`; with "auto" the daemon goes on with the best provider
that works and says why in `ProviderChoice.reason`. Every later session is checked again by
`daemon.hardware.sessions.create_session`.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from daemon.config import PROVIDER_NAMES, OcrSettings, Settings, cache_dir
from daemon.errors import ProviderError
from daemon.hardware.nvml import GpuInfo, NvmlReport, probe_nvml
from daemon.hardware.opencl import OpenClReport, probe_opencl
from daemon.hardware.openvino import OPENVINO, probe_openvino

log = logging.getLogger(__name__)

ProviderSpec = str | tuple[str, dict[str, Any]]

CPU_EP = "CPUExecutionProvider"
CUDA_EP = "CUDAExecutionProvider"
TENSORRT_EP = "TensorrtExecutionProvider"

# short name (config, metrics, logs) -> onnxruntime name; "openvino" is OpenVINO's own runtime
ORT_NAMES: dict[str, str] = {"cpu": CPU_EP, "cuda": CUDA_EP, "tensorrt": TENSORRT_EP}
SHORT_NAMES = {ort_name: short for short, ort_name in ORT_NAMES.items()} | {OPENVINO: "openvino"}
assert set(SHORT_NAMES.values()) == set(PROVIDER_NAMES)

# The smallest model that ships with rapidocr; a probe session must run a real convolution so
# that cuDNN (loaded lazily by onnxruntime) is exercised too.
PROBE_MODEL = "ch_ppocr_mobile_v2.0_cls_mobile.onnx"
PROBE_INPUT_SHAPE = (1, 3, 48, 192)


@dataclass(frozen=True)
class ProviderChoice:
    """The provider the OCR sessions use, and why.

    `fallbacks` holds one short code per GPU provider that was tried (or that a GPU on this host
    would have needed) and did not come up, e.g. "cuda_session_failed". They are the `reason`
    label of `ocr_provider_fallbacks_total`, so they are a small fixed set; the human-readable
    story is in `reason`.
    """

    name: str  # "cpu" | "cuda" | "tensorrt" | "openvino"
    ort_providers: tuple[ProviderSpec, ...] = (CPU_EP,)
    reason: str = "CPU only"
    gpu_info: str | None = None
    fallbacks: tuple[str, ...] = field(default=())
    devices: tuple[int, ...] = ()  # CUDA devices to run on, one engine each (GPU providers)
    openvino_device: str | None = None  # "openvino": "CPU", or an Intel GPU ("GPU")
    precision: str | None = None  # "openvino": "bf16" | "f32"

    @property
    def on_intel_gpu(self) -> bool:
        """OpenVINO on an Intel GPU ("GPU", "GPU.0", ...)."""
        return self.name == "openvino" and (self.openvino_device or "").split(".")[0] == "GPU"

    def on_device(self, device: int, ocr: OcrSettings) -> ProviderChoice:
        """The same provider on CUDA device `device` (its own onnxruntime options)."""
        device_ocr = ocr.model_copy(update={"device_id": device})
        return replace(self, ort_providers=ort_providers_for(self.name, device_ocr))


CPU = ProviderChoice("cpu")


# --- options ------------------------------------------------------------------------------


def cuda_options(ocr: OcrSettings) -> dict[str, Any]:
    options: dict[str, Any] = {
        "device_id": ocr.device_id,
        "cudnn_conv_algo_search": ocr.cudnn_conv_algo_search,
        # Grow the arena by what is asked, not by doubling: batches of many shapes otherwise
        # reserve far more GPU memory than they use.
        "arena_extend_strategy": "kSameAsRequested",
    }
    if ocr.gpu_mem_limit_bytes > 0:
        options["gpu_mem_limit"] = ocr.gpu_mem_limit_bytes
    return options


def tensorrt_cache_dir() -> Path:
    """Where TensorRT keeps built engines, so only the first start pays for building them."""
    return cache_dir() / "tensorrt"


def tensorrt_options(ocr: OcrSettings, cache_dir: Path) -> dict[str, Any]:
    return {
        "device_id": ocr.device_id,
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": str(cache_dir),
        "trt_timing_cache_enable": True,
        "trt_timing_cache_path": str(cache_dir),
        "trt_fp16_enable": False,  # fp16 changes recognition output; parity with CPU first
    }


def with_shape_profile(specs: tuple[ProviderSpec, ...], input_name: str,
                       shape: tuple[int, ...]) -> tuple[ProviderSpec, ...]:
    """`specs` with TensorRT's optimisation profile pinned to `shape` (min = opt = max): a
    session of one shape bucket (`ocr.device_runs.ShapeSessions`) gets one engine built for
    exactly that shape, kept in the engine cache, instead of an engine rebuilt at every new
    shape TensorRT meets. Other providers' options are left as they are."""
    dims = f"{input_name}:{'x'.join(str(d) for d in shape)}"
    out: list[ProviderSpec] = []
    for spec in specs:
        if isinstance(spec, tuple) and spec[0] == TENSORRT_EP:
            spec = (TENSORRT_EP, {**spec[1], "trt_profile_min_shapes": dims,
                                  "trt_profile_opt_shapes": dims,
                                  "trt_profile_max_shapes": dims})
        out.append(spec)
    return tuple(out)


def ort_providers_for(name: str, ocr: OcrSettings, cache_dir: Path | None = None) -> tuple[
    ProviderSpec, ...
]:
    """The onnxruntime provider list for `name`; CPU always last, for nodes a GPU EP rejects."""
    if name == "cuda":
        return ((CUDA_EP, cuda_options(ocr)), CPU_EP)
    if name == "tensorrt":
        trt = tensorrt_options(ocr, cache_dir or tensorrt_cache_dir())
        return ((TENSORRT_EP, trt), (CUDA_EP, cuda_options(ocr)), CPU_EP)
    return (CPU_EP,)


def session_options(ocr: OcrSettings) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if ocr.intra_op_threads:
        options.intra_op_num_threads = ocr.intra_op_threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # The CPU arena keeps the high-water mark of every input shape for the process's life
    # (2.0 -> 1.4 GB peak RSS on receipts without it); RapidOCR turns it off as well.
    options.enable_cpu_mem_arena = False
    return options


@functools.cache
def preload_gpu_libraries() -> None:
    """Load CUDA/cuDNN from the nvidia-* wheels where onnxruntime-gpu offers it (>= 1.21).

    Without it a pip-installed CUDA stack is invisible to the dynamic loader and the CUDA
    provider silently drops out. Only worth trying when the build has a GPU provider.
    """
    available = ort.get_available_providers()
    if CUDA_EP not in available and TENSORRT_EP not in available:
        return
    preload = getattr(ort, "preload_dlls", None)
    if preload is None:
        return
    try:
        preload()
    except Exception as exc:  # missing wheels are fine: system libraries may still be there
        log.debug("onnxruntime.preload_dlls() failed: %s", exc)


# --- probing ------------------------------------------------------------------------------


def probe_model_path() -> Path:
    import rapidocr

    return Path(rapidocr.__file__).parent / "models" / PROBE_MODEL


@dataclass(frozen=True)
class ProbeResult:
    ok: bool
    code: str  # "" when ok; else "not_in_build" | "session_failed" | "dropped" | "no_device"
    detail: str


def tensorrt_bridge() -> Path:
    return Path(ort.__file__).parent / "capi" / "libonnxruntime_providers_tensorrt.so"


def linked_nvinfer(bridge: Path) -> str | None:
    """The libnvinfer the TensorRT bridge was linked against (`libnvinfer.so.10` for
    onnxruntime-gpu 1.31), read from its dynamic section's strings; None without a bridge.
    Another major version loads but is not the one the bridge calls."""
    try:
        data = bridge.read_bytes()
    except OSError:
        return None
    found = re.search(rb"libnvinfer\.so\.\d+", data)
    return found.group().decode() if found else None


def tensorrt_libraries_loadable(bridge: Path | None = None) -> bool:
    """onnxruntime's TensorRT bridge library is there and the very libnvinfer it links loads
    (`libnvinfer.so.11` beside a bridge built for 10 is no TensorRT for it)."""
    wanted = linked_nvinfer(bridge or tensorrt_bridge())
    if wanted is None:
        return False
    try:
        ctypes.CDLL(wanted)
        return True
    except OSError:
        return False


def probe_provider(name: str, ocr: OcrSettings, cache_dir: Path | None = None) -> ProbeResult:
    """Build a real session with `name` first and run it once; ok only if it stayed first."""
    ort_name = ORT_NAMES[name]
    available = ort.get_available_providers()
    if ort_name not in available:
        return ProbeResult(
            False,
            "not_in_build",
            f"{ort_name} is not in this onnxruntime build ({ort.__version__}, providers: "
            f"{', '.join(available)}); install onnxruntime-gpu instead of onnxruntime",
        )
    preload_gpu_libraries()
    if name == "tensorrt" and not tensorrt_libraries_loadable():
        # Asking onnxruntime anyway prints a screenful of EP errors on every CUDA host
        # without TensorRT (most of them) before it falls back; say it in one line instead.
        return ProbeResult(
            False,
            "no_libraries",
            f"TensorRT libraries ({linked_nvinfer(tensorrt_bridge()) or 'libnvinfer'}, the "
            "major version onnxruntime's TensorRT bridge links) are not installed or not on "
            "the loader path",
        )
    if cache_dir is not None:
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            return ProbeResult(
                False,
                "session_failed",
                f"TensorRT engine cache {cache_dir} cannot be created ({exc}); "
                "set XDG_CACHE_HOME or CACHE_DIRECTORY to a writable folder",
            )
    providers = list(ort_providers_for(name, ocr, cache_dir))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            session = ort.InferenceSession(
                str(probe_model_path()), sess_options=session_options(ocr), providers=providers
            )
            got = session.get_providers()
            if got and got[0] == ort_name:
                feed = {session.get_inputs()[0].name: np.zeros(PROBE_INPUT_SHAPE, np.float32)}
                session.run(None, feed)
        except Exception as exc:
            return ProbeResult(False, "session_failed", f"{ort_name} session failed: {exc}")
    if not got or got[0] != ort_name:
        said = "; ".join(str(w.message) for w in caught)
        return ProbeResult(
            False,
            "dropped",
            f"onnxruntime dropped {ort_name} (session providers: {', '.join(got)})"
            + (f": {said}" if said else "; its CUDA/cuDNN libraries probably failed to load"),
        )
    return ProbeResult(True, "", f"{ort_name} session ran on the probe model")


def visible_cuda_devices(environ: Mapping[str, str]) -> list[str] | None:
    """CUDA_VISIBLE_DEVICES as a list of entries; None when unset (every device visible)."""
    raw = environ.get("CUDA_VISIBLE_DEVICES")
    if raw is None:
        return None
    entries: list[str] = []
    for entry in (e.strip() for e in raw.split(",")):
        # CUDA stops at the first invalid entry; "-1" is the common way to hide every GPU.
        if not entry or entry.startswith("-"):
            break
        entries.append(entry)
    return entries


def _nvml_gpu_for(
    device_id: int, visible: list[str] | None, gpus: list[GpuInfo]
) -> GpuInfo | None:
    """The NVML GPU behind CUDA device `device_id`, best effort.

    NVML numbers GPUs by PCI bus; CUDA numbers the visible ones, fastest first unless
    CUDA_DEVICE_ORDER=PCI_BUS_ID. With one GPU, or indices in CUDA_VISIBLE_DEVICES, this is right.
    """
    if visible is not None:
        if device_id >= len(visible):
            return None
        entry = visible[device_id]
        for gpu in gpus:
            if entry.isdigit() and gpu.index == int(entry):
                return gpu
            if not entry.isdigit() and gpu.uuid.startswith(entry):
                return gpu
        return None
    return gpus[device_id] if device_id < len(gpus) else None


def gpu_devices(ocr: OcrSettings, visible: list[str] | None, gpus: list[GpuInfo]
                ) -> tuple[int, ...]:
    """The CUDA devices to run engines on: `ocr.gpus` ("all": every GPU CUDA can see, i.e.
    CUDA_VISIBLE_DEVICES's entries or every NVIDIA GPU), never without `ocr.device_id`, the one
    the provider was probed on."""
    count = len(visible) if visible is not None else len(gpus)
    count = max(count, ocr.device_id + 1)
    if ocr.gpus == "all":
        return tuple(range(count))
    wanted = [d for d in dict.fromkeys(ocr.gpus) if d < count]
    dropped = [d for d in ocr.gpus if d >= count]
    if dropped:
        log.warning("ocr.gpus: no CUDA device %s here (%d visible)",
                    ", ".join(map(str, dropped)), count)
    return tuple(wanted) or (ocr.device_id,)


def _describe_gpu(name: str, gpu: GpuInfo | None, device_id: int) -> str:
    label = "TensorRT" if name == "tensorrt" else "CUDA"
    return f"{label}: {gpu.name}" if gpu is not None else f"{label}: device {device_id}"


def choose_provider(
    settings: Settings,
    *,
    environ: Mapping[str, str] | None = None,
    nvml: NvmlReport | None = None,
    opencl: OpenClReport | None = None,
    tensorrt_cache: Path | None = None,
) -> ProviderChoice:
    """Pick the provider for this process, once, at start-up.

    `environ`, `nvml` and `opencl` default to the real environment and probes; `doctor` passes
    the probes it already ran so the OpenCL subprocess runs once.
    """
    ocr = settings.ocr
    if ocr.provider == "openvino":
        return _openvino_forced(settings)
    if settings.cpu_only:
        if ocr.provider == "cpu":
            choice = ProviderChoice("cpu", reason="ocr.provider = cpu: onnxruntime on the CPU")
        else:
            choice = _on_the_cpu(settings, "FORCE_CPU=true: GPU probing skipped", ())
        log.info("Using the %s execution provider reason=%r", choice.name, choice.reason)
        return choice

    env = os.environ if environ is None else environ
    requested = ocr.provider
    candidates = ["tensorrt", "cuda"] if requested == "auto" else [requested]
    nvml = nvml if nvml is not None else probe_nvml()
    visible = visible_cuda_devices(env)
    gpu = _nvml_gpu_for(ocr.device_id, visible, nvml.gpus)

    cache = tensorrt_cache if tensorrt_cache is not None else tensorrt_cache_dir()
    failures: list[ProbeResult] = []
    codes: list[str] = []
    hidden = visible is not None and ocr.device_id >= len(visible)
    for name in candidates:
        if hidden:
            result = ProbeResult(
                False,
                "no_device",
                f"CUDA_VISIBLE_DEVICES={env.get('CUDA_VISIBLE_DEVICES', '')!r} leaves no CUDA "
                f"device {ocr.device_id} (ocr.device_id)",
            )
        else:
            result = probe_provider(name, ocr, cache if name == "tensorrt" else None)
        if result.ok:
            reason = result.detail
            if requested == "auto" and name == "cuda" and failures:
                # TensorRT is an optional extra on top of CUDA: most onnxruntime-gpu installs
                # list it without its libraries. Say so, but do not count it as a fallback, or
                # every normal CUDA start would trip a fallback alert.
                reason += f"; TensorRT not used: {failures[-1].detail}"
                codes = [c for c in codes if not c.startswith("tensorrt_")]
            devices = gpu_devices(ocr, visible, nvml.gpus)
            if len(devices) > 1:
                reason += f"; one engine on each of CUDA devices {', '.join(map(str, devices))}"
            choice = ProviderChoice(
                name,
                ort_providers=ort_providers_for(name, ocr, cache),
                reason=reason,
                gpu_info=_describe_gpu(name, gpu, ocr.device_id),
                fallbacks=tuple(codes),
                devices=devices,
            )
            log.info(
                "GPU acceleration available gpu_info=%r provider=%s", choice.gpu_info, name
            )
            return choice
        failures.append(result)
        # A provider missing from a CPU build on a host without a GPU is the normal CPU install,
        # not a fallback; anything else means a GPU was wanted and not had.
        if result.code != "not_in_build" or nvml.gpus or requested != "auto":
            codes.append(f"{name}_{result.code}")

    if requested != "auto":
        raise ProviderError(
            f"ocr.provider = {requested!r} was requested but cannot be used: {failures[-1].detail}"
            + (f" (NVML: {nvml.error})" if nvml.error else "")
            + ". Set ocr.provider = \"auto\" to fall back to the CPU, or FORCE_CPU=true."
        )

    reason = _cpu_reason(nvml, opencl, failures, codes)
    if opencl is None and not nvml.gpus:
        opencl = probe_opencl()
        reason = _cpu_reason(nvml, opencl, failures, codes)
    choice = _on_the_cpu(settings, reason, tuple(codes))
    if opencl is not None and opencl.gpus and not nvml.gpus and not choice.on_intel_gpu:
        # an OpenCL GPU that nothing here reads
        choice = replace(choice, fallbacks=(*choice.fallbacks, "opencl_only"))
    log.warning("NVIDIA GPU acceleration unavailable, using %s reason=%r", choice.name,
                choice.reason)
    return choice


def _on_the_cpu(settings: Settings, reason: str, codes: tuple[str, ...]) -> ProviderChoice:
    """Without an NVIDIA GPU: OpenVINO where it wins here, else onnxruntime on the CPU."""
    found = probe_openvino(settings.ocr.cpu_precision, gpus=not settings.force_cpu)
    if found.usable:
        return ProviderChoice("openvino", reason=f"{found.reason} ({reason})", fallbacks=codes,
                              openvino_device=found.device, precision=found.precision)
    return ProviderChoice("cpu", reason=f"{reason}; OpenVINO not used: {found.reason}",
                          fallbacks=codes)


def _openvino_forced(settings: Settings) -> ProviderChoice:
    """`ocr.provider = "openvino"`: OpenVINO on the device it would take, else on the CPU (in
    bf16 where the CPU has it and ocr.cpu_precision allows); an error without OpenVINO."""
    found = probe_openvino(settings.ocr.cpu_precision, gpus=not settings.force_cpu,
                           forced=True)
    if not found.usable:
        raise ProviderError(f"ocr.provider = 'openvino' was requested but cannot be used: "
                            f"{found.reason}. Set ocr.provider = \"auto\" or \"cpu\".")
    choice = ProviderChoice("openvino", reason=f"ocr.provider = openvino: {found.reason}",
                            openvino_device=found.device, precision=found.precision)
    log.info("Using OpenVINO reason=%r", choice.reason)
    return choice


def _cpu_reason(
    nvml: NvmlReport,
    opencl: OpenClReport | None,
    failures: list[ProbeResult],
    codes: list[str],
) -> str:
    parts: list[str] = []
    if nvml.gpus:
        names = ", ".join(g.name for g in nvml.gpus)
        parts.append(f"NVIDIA GPU present ({names}) but no GPU provider came up")
    else:
        parts.append(nvml.error or "no NVIDIA GPU")
    if opencl is not None and opencl.gpus and not nvml.gpus:
        names = ", ".join(f"{d.device} ({d.platform})" for d in opencl.gpus)
        parts.append(
            f"OpenCL GPU found ({names}), but onnxruntime has no OpenCL execution provider"
        )
    if codes or nvml.gpus:
        # Both GPU providers missing from a CPU build is one fact, not two.
        if any(f.code == "not_in_build" for f in failures):
            parts.append(
                f"onnxruntime {ort.__version__} has no GPU provider (providers: "
                f"{', '.join(ort.get_available_providers())}): install onnxruntime-gpu"
            )
        parts.extend(f.detail for f in failures if f.code != "not_in_build")
    return "; ".join(parts)


