"""OpenVINO as the engine's runtime where it measurably wins: CPUs with bf16 arithmetic (AVX-512
BF16, AMX) and Intel GPUs. Most hosts have no NVIDIA GPU, and there the CPU path is the
product: the same PP-OCR graphs (the daemon's edits included: pixel input, on-device arg-max)
run by OpenVINO in bf16 take 1.4-1.8x less time than onnxruntime's CPU provider on a bf16 CPU
(a recogniser batch of 4-8 lines; a single line 1.1-1.4x), and about as long in fp32, so
without bf16 (or on ARM) onnxruntime stays. End to end the daemon on OpenVINO read SROIE's 100
receipts 1.23x faster, at 1.32x less CPU time a page, F1 0.9201 against 0.9208
(`python -m benchmarks bench --modes a,e,f`; benchmarks/NOTES.md).

`OpenVinoSession` looks like the part of an onnxruntime session the batch engine uses (`run`,
`get_inputs`, `get_outputs`, `get_modelmeta`, `get_providers`), so batching and the graph
edits work unchanged. `probe_openvino` says whether OpenVINO can be used here, on which device,
in which precision, and why.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

OPENVINO = "OpenVINO"  # what an OpenVinoSession's get_providers() says (short name "openvino")
# OpenVINO's CPU plugin keeps compiled kernels per input shape it has run, 5,000 by default:
# on 40 receipts (pages and lines at their own sizes) that cache took the process to 2.0 GB
# (1.32 GB without it, 24.2 s instead of 20.3 s), and it grows with the shapes a long run
# meets. 1,000 entries: 1.75 GB there, ~21.8 s (1,500: 1.81 GB, 21.5 s; 500: 1.68 GB, 22.2 s).
CPU_CACHE_ENTRIES = 1000


@dataclass(frozen=True)
class OpenVinoProbe:
    """Whether OpenVINO is used here: `device` ("CPU", "GPU") and `precision` ("bf16",
    "f32", "f16") when it is; `reason` either way."""

    usable: bool
    reason: str
    version: str | None = None
    device: str | None = None
    precision: str | None = None
    devices: dict[str, list[str]] = field(default_factory=dict)  # device -> capabilities


def _core() -> Any:
    import openvino

    return openvino.Core()


def probe_openvino(precision: str = "auto", *, gpus: bool = True, forced: bool = False,
                   core: Any = None) -> OpenVinoProbe:
    """Where OpenVINO wins here: an Intel GPU (unless `gpus` is False: FORCE_CPU), else a CPU
    that computes in bf16. `precision` ("auto", "bf16", "fp32": ocr.cpu_precision) "fp32" asks
    for float32 on the CPU, where OpenVINO gains nothing. `forced` (ocr.provider =
    "openvino"): usable on the CPU whatever it computes in."""
    try:
        import openvino

        version = openvino.__version__.split("-")[0]
        if core is None:
            core = _core()
    except Exception as exc:  # not installed (ARM, a GPU host's install) or broken
        return OpenVinoProbe(False, f"OpenVINO not installed ({type(exc).__name__}: {exc})")
    devices: dict[str, list[str]] = {}
    for device in core.available_devices:
        try:
            devices[device] = list(core.get_property(device, "OPTIMIZATION_CAPABILITIES"))
        except Exception:  # a device that cannot say: not used
            continue
    intel_gpu = next((d for d in devices if d.split(".")[0] == "GPU"), None)
    if gpus and intel_gpu is not None:
        name = _device_name(core, intel_gpu)
        return OpenVinoProbe(True, f"OpenVINO on the Intel GPU {name} (fp32)", version,
                             intel_gpu, "f32", devices)
    cpu_bf16 = "BF16" in devices.get("CPU", [])
    if precision != "fp32" and cpu_bf16:
        name = _device_name(core, "CPU")
        return OpenVinoProbe(True, f"OpenVINO on the CPU in bf16: {name} computes in bf16, "
                             "where OpenVINO runs the models 1.4-1.8x faster than "
                             "onnxruntime", version, "CPU", "bf16", devices)
    if forced and "CPU" in devices:
        return OpenVinoProbe(True, "OpenVINO on the CPU in fp32" + (
            " (this CPU has no bf16 arithmetic)" if not cpu_bf16 else ""), version, "CPU",
            "f32", devices)
    if precision == "bf16" and not cpu_bf16:
        why = "this CPU has no bf16 arithmetic"
    elif "CPU" not in devices:
        why = "OpenVINO finds no CPU device"
    elif precision == "fp32":
        why = "ocr.cpu_precision = fp32, where OpenVINO reads no faster than onnxruntime"
    else:
        why = "this CPU has no bf16 arithmetic; in fp32 OpenVINO reads no faster than onnxruntime"
    return OpenVinoProbe(False, why, version, None, None, devices)


def _device_name(core: Any, device: str) -> str:
    try:
        return str(core.get_property(device, "FULL_DEVICE_NAME"))
    except Exception:
        return device


@dataclass(frozen=True)
class _Port:
    """An input or output as onnxruntime's NodeArg shows it (name, shape)."""

    name: str
    shape: list[int | str]
    type: str


@dataclass(frozen=True)
class _Meta:
    custom_metadata_map: dict[str, str]


class OpenVinoSession:
    """One model compiled by OpenVINO for `device`, run like an onnxruntime session: shapes are
    dynamic (a page at its own size, lines in any batch), each calling thread has its own infer
    request, and outputs are copied out of it (the request's buffers are reused)."""

    def __init__(self, model_path: Path, device: str, precision: str, threads: int = 0,
                 streams: int = 1, core: Any = None) -> None:
        import onnx

        core = core if core is not None else _core()
        # `streams` calls at once (the OCR workers sharing the engine), `threads` cores each:
        # under the LATENCY hint there is one stream, and a second worker's call waits
        config: dict[str, Any] = {"NUM_STREAMS": max(1, streams),
                                  "INFERENCE_PRECISION_HINT": precision}
        if device == "CPU":  # kernels kept per input shape seen: bounded (see the constant)
            config["CPU_RUNTIME_CACHE_CAPACITY"] = CPU_CACHE_ENTRIES
        if device == "CPU" and threads:
            config["INFERENCE_NUM_THREADS"] = threads * max(1, streams)
        self._compiled = core.compile_model(core.read_model(str(model_path)), device, config)
        self._outputs = list(self._compiled.outputs)
        self._names = [port.get_any_name() for port in self._outputs]
        proto = onnx.load(str(model_path), load_external_data=False)
        self._meta = _Meta({p.key: p.value for p in proto.metadata_props})
        self._inputs = [_Port(port.get_any_name(), _dims(port.get_partial_shape()),
                              str(port.get_element_type())) for port in self._compiled.inputs]
        self._local = threading.local()
        self.device, self.precision = device, precision

    def run(self, names: Sequence[str] | None, feeds: dict[str, Any], *_: Any) -> list[Any]:
        import numpy as np

        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self._compiled.create_infer_request()
        results = request.infer(feeds)
        wanted = self._outputs if names is None else [
            self._outputs[self._names.index(name)] for name in names]
        return [np.array(results[port], copy=True) for port in wanted]

    def get_inputs(self) -> list[_Port]:
        return list(self._inputs)

    def get_outputs(self) -> list[_Port]:
        return [_Port(name, _dims(port.get_partial_shape()), str(port.get_element_type()))
                for name, port in zip(self._names, self._outputs, strict=True)]

    def get_modelmeta(self) -> _Meta:
        return self._meta

    def get_providers(self) -> list[str]:
        return [OPENVINO]


def _dims(shape: Any) -> list[int | str]:
    return [d.get_length() if d.is_static else "?" for d in shape]
