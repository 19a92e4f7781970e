"""What the pipeline needs from an engine, and how the configured one is built."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Literal, Protocol

from daemon.config import NVIDIA_PROVIDERS, Settings
from daemon.hardware.providers import CPU, ProviderChoice
from daemon.ocr.langs import validate_lang
from daemon.results import Image, PageResult
from daemon.sizing import host_processes, intra_op_threads, ocr_workers

log = logging.getLogger(__name__)


class OcrEngine(Protocol):
    """What the pipeline needs from an engine. Tests swap in fakes that crash or stall."""

    @property
    def provider(self) -> str:
        """What the engine really runs on ("cpu", "cuda", "tensorrt")."""
        ...

    @property
    def device(self) -> str:
        """Where it runs, as metrics and /health label it: "cpu", or the CUDA device ("0")."""
        ...

    @property
    def thread_safe(self) -> bool:
        """One instance may serve every worker thread at once (else: one per worker)."""
        ...

    def recognize(self, images: Sequence[Image]) -> list[PageResult]:
        """OCR every image; one result per image, in order."""
        ...

    def warmup(self) -> dict[str, float]:
        """Run every input shape once before the first file; seconds spent per model."""
        ...

    def close(self) -> None: ...


def worker_count(settings: Settings, choice: ProviderChoice) -> int:
    """OCR worker threads for this provider choice (`sizing.ocr_workers`)."""
    return ocr_workers(settings, choice.name, len(choice.devices))


def build_engine(settings: Settings, choice: ProviderChoice, workers: int) -> OcrEngine:
    ocr = settings.ocr
    validate_lang(ocr.lang)  # a language that would need a download is a start-up error
    if choice.name not in NVIDIA_PROVIDERS and not ocr.intra_op_threads and workers > 1:
        # share the cores between the workers instead of oversubscribing them
        threads = intra_op_threads(workers)
        ocr = ocr.model_copy(update={"intra_op_threads": threads})
    if ocr.engine == "batch":
        from daemon.ocr.batch import BatchEngine

        return BatchEngine(ocr, choice, max_pages=settings.batch.max_pages,
                           host_processes=settings.batch.host_processes)
    from daemon.ocr.rapid import RapidOcrEngine

    if choice.name == "openvino":  # plain RapidOCR runs onnxruntime: the CPU, as it says
        log.warning("ocr.engine = rapidocr runs onnxruntime on the CPU, not OpenVINO")
        choice = CPU
    return RapidOcrEngine(ocr, choice)


def build_engines(settings: Settings, choice: ProviderChoice, workers: int) -> list[OcrEngine]:
    """One engine per worker thread, the workers dealt round-robin over the GPUs (each engine
    with its own sessions and device_id). A thread-safe engine (the batch engine's sessions
    are) is built once per device and shared by its workers; plain RapidOCR, which is not,
    once per worker."""
    several = choice.name in NVIDIA_PROVIDERS and len(choice.devices) > 1
    devices: tuple[int | None, ...] = choice.devices if several else (None,)
    host = settings.batch.host_processes
    if host == "auto" and several:  # the cores shared between the GPUs' host workers
        host = host_processes(len(devices))
    first: dict[int | None, OcrEngine] = {}
    engines = []
    for slot in range(max(workers, len(devices))):
        device = devices[slot % len(devices)]
        shared = first.get(device)
        if shared is None or not shared.thread_safe:
            shared = _build_on(settings, choice, device, host, workers)
            first.setdefault(device, shared)
        engines.append(shared)
    return engines


def _build_on(settings: Settings, choice: ProviderChoice, device: int | None,
              host: int | Literal["auto"], workers: int) -> OcrEngine:
    if device is None:
        return build_engine(settings, choice, workers)
    return build_engine(settings.model_copy(update={
        "ocr": settings.ocr.model_copy(update={"device_id": device}),
        "batch": settings.batch.model_copy(update={"host_processes": host}),
    }), choice.on_device(device, settings.ocr), workers)
