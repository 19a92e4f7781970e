"""Execution provider choice and onnxruntime session construction.

Order TensorRT -> CUDA -> CPU. A provider counts only once a real session built with it reports
it in `session.get_providers()`: onnxruntime lists CUDA even when its libraries cannot load and
then silently runs on the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnxruntime as ort

from daemon.config import OcrSettings, Settings

ProviderSpec = str | tuple[str, dict[str, Any]]


@dataclass(frozen=True)
class ProviderChoice:
    name: str  # "cpu" | "cuda" | "tensorrt"
    ort_providers: tuple[ProviderSpec, ...] = ("CPUExecutionProvider",)
    reason: str = "CPU only"
    gpu_info: str | None = None
    fallbacks: tuple[str, ...] = field(default=())


CPU = ProviderChoice("cpu")


def choose_provider(settings: Settings) -> ProviderChoice:
    """Pick the provider for this process. (CPU until the hardware probe lands.)"""
    if settings.cpu_only:
        return ProviderChoice("cpu", reason="FORCE_CPU or ocr.provider = cpu")
    return CPU


def session_options(ocr: OcrSettings) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if ocr.intra_op_threads:
        options.intra_op_num_threads = ocr.intra_op_threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return options


def create_session(model_path: Path, choice: ProviderChoice, ocr: OcrSettings) -> Any:
    """An InferenceSession for `model_path` on `choice`'s providers."""
    return ort.InferenceSession(
        str(model_path), sess_options=session_options(ocr), providers=list(choice.ort_providers)
    )
