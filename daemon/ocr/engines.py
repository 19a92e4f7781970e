"""What the pipeline needs from an engine, and how the configured one is built."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Protocol

from daemon.config import Settings
from daemon.hardware.providers import ProviderChoice
from daemon.ocr.langs import validate_lang
from daemon.results import Image, PageResult


class OcrEngine(Protocol):
    """What the pipeline needs from an engine. Tests swap in fakes that crash or stall."""

    @property
    def provider(self) -> str:
        """What the engine really runs on ("cpu", "cuda", "tensorrt")."""
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
    """One worker per GPU; on the CPU two, so decoding, post-processing and inference of
    different pages overlap on a small machine, capped by the cores there are."""
    if settings.batch.workers:
        return settings.batch.workers
    if choice.name != "cpu":
        return 1
    return max(1, min(2, os.cpu_count() or 1))


def build_engine(settings: Settings, choice: ProviderChoice, workers: int) -> OcrEngine:
    ocr = settings.ocr
    validate_lang(ocr.lang)  # a language that would need a download is a start-up error
    if choice.name == "cpu" and not ocr.intra_op_threads and workers > 1:
        # share the cores between the workers instead of oversubscribing them
        threads = max(1, (os.cpu_count() or 1) // workers)
        ocr = ocr.model_copy(update={"intra_op_threads": threads})
    if ocr.engine == "batch":
        from daemon.ocr.batch import BatchEngine

        return BatchEngine(ocr, choice, max_pages=settings.batch.max_pages,
                           host_processes=settings.batch.host_processes)
    from daemon.ocr.rapid import RapidOcrEngine

    return RapidOcrEngine(ocr, choice)


def build_engines(settings: Settings, choice: ProviderChoice, workers: int) -> list[OcrEngine]:
    """One engine per worker thread: the same instance when it is thread-safe (the batch
    engine's sessions are), a fresh one each otherwise (plain RapidOCR is not)."""
    first = build_engine(settings, choice, workers)
    if first.thread_safe:
        return [first] * workers
    return [first] + [build_engine(settings, choice, workers) for _ in range(workers - 1)]
