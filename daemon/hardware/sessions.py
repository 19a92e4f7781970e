"""onnxruntime sessions that run where they were asked to, or say so.

A provider that worked for the start-up probe can still be dropped for a real model (out of GPU
memory, an unsupported operator, a lazily loaded cuDNN library missing); onnxruntime then runs
on the CPU with only a warning. `create_session` checks every session it builds; such a silent
fallback is logged and reported to the fallback listeners (the service hands them to metrics).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnxruntime as ort

from daemon.config import OcrSettings
from daemon.hardware.providers import (
    CPU_EP,
    CUDA_EP,
    SHORT_NAMES,
    ProviderChoice,
    ProviderSpec,
    session_options,
    with_shape_profile,
)
from daemon.sizing import usable_cores

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Fallback:
    """One session that came up on another provider than the one chosen."""

    wanted: str  # "cuda" | "tensorrt" | "openvino"
    got: str  # the short name of the provider the session actually runs on
    reason: str  # short code, the metric label: "<wanted>_dropped" | "<wanted>_session_failed"
    detail: str  # for the log
    model: str  # the model file's name


FallbackListener = Callable[[Fallback], None]

_listeners: list[FallbackListener] = []
_listeners_lock = threading.Lock()


def add_fallback_listener(listener: FallbackListener) -> Callable[[], None]:
    """Call `listener` for every silent fallback `create_session` detects; returns the remover.

    A hook rather than an import of the metrics module: ocr code only reports, the side concern
    (metrics, tests) decides what to do with it.
    """
    with _listeners_lock:
        _listeners.append(listener)

    def remove() -> None:
        with _listeners_lock, contextlib.suppress(ValueError):
            _listeners.remove(listener)

    return remove


def _notify(event: Fallback) -> None:
    with _listeners_lock:
        listeners = list(_listeners)
    for listener in listeners:
        try:
            listener(event)
        except Exception:  # a broken listener must not break OCR
            log.exception("fallback listener %r failed", listener)


def provider_name(session: Any) -> str:
    """The short name ("cpu", "cuda", "tensorrt", "openvino") of the provider a session runs
    on first."""
    providers = session.get_providers()
    return SHORT_NAMES.get(providers[0], providers[0]) if providers else "cpu"


def _spec_name(spec: ProviderSpec) -> str:
    return spec if isinstance(spec, str) else spec[0]


_shared_arenas: dict[int, bool] = {}
_shared_lock = threading.Lock()


class BuildLock:
    """Sessions are built one at a time in the process: building them at once on one GPU has
    been reported to crash onnxruntime (microsoft/onnxruntime#26610; #27089: session set-up
    races). The GIL is let go while one builds, so other threads' runs go on meanwhile.

    Builds for a batch waiting on its shape go before the warm-up's (those made inside
    `background_builds()`): with a GPU's 2 s builds the warm-up's threads otherwise take the
    lock in turn ahead of the batch (`python -m benchmarks startup`: the first page waited
    31 s for its shapes behind a warm-up of 67 shapes)."""

    def __init__(self) -> None:
        self._free = threading.Condition()
        self._held = False
        self._urgent = 0  # batch-path builds waiting
        self._background = threading.local()

    def locked(self) -> bool:
        return self._held

    @contextlib.contextmanager
    def background(self) -> Iterator[None]:
        """Builds made by this thread inside wait for every batch-path build waiting."""
        before = getattr(self._background, "on", False)
        self._background.on = True
        try:
            yield
        finally:
            self._background.on = before

    def __enter__(self) -> None:
        urgent = not getattr(self._background, "on", False)
        with self._free:
            if urgent:
                self._urgent += 1
                try:
                    self._free.wait_for(lambda: not self._held)
                finally:
                    self._urgent -= 1
            else:
                self._free.wait_for(lambda: not self._held and not self._urgent)
            self._held = True

    def __exit__(self, *exc: object) -> None:
        with self._free:
            self._held = False
            self._free.notify_all()


_building = BuildLock()
background_builds = _building.background


def share_device_arena(ocr: OcrSettings) -> bool:
    """One CUDA memory arena for every session on `ocr.device_id` that asks for it.

    Each session otherwise grows its own arena to the peak of the shapes it runs, and with a
    session per shape (`ocr.device.ShapeSessions`) those peaks would add up. Registered once
    per device in onnxruntime's environment; False (each session its own arena, as before)
    where onnxruntime refuses, with the reason logged once.
    """
    with _shared_lock:
        known = _shared_arenas.get(ocr.device_id)
        if known is not None:
            return known
        try:
            info = ort.OrtMemoryInfo("Cuda", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR,
                                     ocr.device_id, ort.OrtMemType.DEFAULT)
            arena = ort.OrtArenaCfg({
                "max_mem": max(0, ocr.gpu_mem_limit_bytes),
                "arena_extend_strategy": 1,  # kSameAsRequested, as the provider's own
            })
            ort.create_and_register_allocator_v2(
                CUDA_EP, info, {"device_id": str(ocr.device_id)}, arena
            )
            shared = True
        except Exception as exc:
            log.warning("one GPU memory arena for all sessions on device %d: not available "
                        "(%s); each session keeps its own", ocr.device_id, exc)
            shared = False
        _shared_arenas[ocr.device_id] = shared
        return shared


def create_session(
    model_path: Path,
    choice: ProviderChoice,
    ocr: OcrSettings,
    *,
    on_fallback: FallbackListener | None = None,
    shared_arena: bool = False,
    profile: tuple[str, tuple[int, ...]] | None = None,
) -> Any:
    """An InferenceSession for `model_path` on `choice`'s providers, verified.

    If the chosen GPU provider is not first in the built session's providers (onnxruntime drops
    it with only a warning), or building with it raises, the fallback is logged, reported to
    `on_fallback` and the module's listeners, and a session that runs on the CPU is returned.
    `shared_arena`: on CUDA, take GPU memory from the device's shared arena where there is one.
    `profile`: (input name, shape) of a session that only ever runs that shape: on TensorRT
    its optimisation profile (`providers.with_shape_profile`).
    """
    if choice.name == "openvino":
        return _openvino_session(model_path, choice, ocr, on_fallback)
    options = session_options(ocr)
    if shared_arena and choice.name == "cuda" and share_device_arena(ocr):
        options.add_session_config_entry("session.use_env_allocators", "1")
    wanted = _spec_name(choice.ort_providers[0])
    # Providers this build lacks are left out here rather than warned about by onnxruntime:
    # catching its warning would swap process-wide state under the other threads' feet.
    specs = choice.ort_providers
    if profile is not None:
        specs = with_shape_profile(specs, *profile)
    available = ort.get_available_providers()
    kept = [spec for spec in specs if _spec_name(spec) in available]
    missing = [_spec_name(spec) for spec in specs if spec not in kept]
    try:
        with _building:
            session = ort.InferenceSession(
                str(model_path), sess_options=options, providers=kept or [CPU_EP]
            )
    except Exception as exc:
        if wanted == CPU_EP:
            raise
        # Build on the CPU first: if that fails too, the model is at fault, not the GPU,
        # and its error is the one to raise, with no fallback counted.
        cpu_session = _cpu_session(model_path, ocr)
        event = Fallback(
            wanted=choice.name,
            got="cpu",
            reason=f"{choice.name}_session_failed",
            detail=str(exc),
            model=Path(model_path).name,
        )
        _report(event, on_fallback)
        return cpu_session
    got = session.get_providers()
    if got and got[0] == wanted:
        return session
    said = (f"{', '.join(missing)} not in this onnxruntime build (it has {', '.join(available)})"
            if missing else "")
    event = Fallback(
        wanted=choice.name,
        got=provider_name(session),
        reason=f"{choice.name}_dropped",
        detail=f"session providers {got}" + (f": {said}" if said else ""),
        model=Path(model_path).name,
    )
    _report(event, on_fallback)
    return session  # built on what was kept, which ends with the CPU


def _openvino_session(model_path: Path, choice: ProviderChoice, ocr: OcrSettings,
                      on_fallback: FallbackListener | None) -> Any:
    """The model compiled by OpenVINO (`hardware.openvino`); where that fails, onnxruntime on
    the CPU, the fallback reported as for a GPU provider."""
    from daemon.hardware.openvino import OpenVinoSession

    threads = ocr.intra_op_threads  # each call's cores (build_engine shares them out)
    streams = max(1, usable_cores() // threads) if threads else 1
    try:
        return OpenVinoSession(model_path, choice.openvino_device or "CPU",
                               choice.precision or "f32", threads, streams)
    except Exception as exc:
        event = Fallback(wanted="openvino", got="cpu", reason="openvino_session_failed",
                         detail=f"OpenVINO could not compile it: {exc}",
                         model=Path(model_path).name)
        _report(event, on_fallback)
        return _cpu_session(model_path, ocr)


def _cpu_session(model_path: Path, ocr: OcrSettings) -> Any:
    """onnxruntime on the CPU: what a provider that could not take the model falls back to."""
    with _building:
        return ort.InferenceSession(str(model_path), sess_options=session_options(ocr),
                                    providers=[CPU_EP])


def _report(event: Fallback, on_fallback: FallbackListener | None) -> None:
    log.warning(
        "Execution provider fell back model=%s wanted=%s got=%s reason=%s detail=%r",
        event.model,
        event.wanted,
        event.got,
        event.reason,
        event.detail,
    )
    if on_fallback is not None:
        try:
            on_fallback(event)
        except Exception:
            log.exception("on_fallback callback failed")
    _notify(event)

