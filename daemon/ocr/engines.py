"""Build the configured engine for one worker."""

from __future__ import annotations

import os

from daemon.config import Settings
from daemon.ocr.langs import validate_lang
from daemon.ocr.providers import ProviderChoice
from daemon.ocr.types import OcrEngine


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

        return BatchEngine(ocr, choice, max_pages=settings.batch.max_pages)
    from daemon.ocr.rapid import RapidOcrEngine

    return RapidOcrEngine(ocr, choice)
