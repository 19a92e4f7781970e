"""The reference engine: plain `RapidOCR()` called once per page.

Kept for parity checks, benchmarks, and as a fallback (`ocr.engine = "rapidocr"`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

from daemon.config import OcrSettings
from daemon.hardware.providers import ProviderChoice
from daemon.ocr.script import traditional_result, wants_traditional
from daemon.results import Image, Line, PageResult, Point

logging.getLogger("RapidOCR").setLevel(logging.WARNING)


def rapidocr_params(ocr: OcrSettings, choice: ProviderChoice) -> dict[str, Any]:
    params: dict[str, Any] = {
        "Global.use_cls": ocr.use_cls,
        "Global.text_score": ocr.text_score,
        "Global.log_level": "warning",
        "Det.limit_side_len": ocr.det_limit_side_len,
        "Det.limit_type": ocr.det_limit_type,
        "Rec.lang_type": ocr.lang,
    }
    if ocr.intra_op_threads:
        params["EngineConfig.onnxruntime.intra_op_num_threads"] = ocr.intra_op_threads
    if choice.name in ("cuda", "tensorrt"):
        params["EngineConfig.onnxruntime.use_cuda"] = True
        params["EngineConfig.onnxruntime.cuda_ep_cfg.device_id"] = ocr.device_id
        params["EngineConfig.onnxruntime.cuda_ep_cfg.cudnn_conv_algo_search"] = (
            ocr.cudnn_conv_algo_search
        )
    return params


def to_page_result(output: Any, seconds: float) -> PageResult:
    txts = getattr(output, "txts", None) or ()
    scores = getattr(output, "scores", None) or ()
    boxes = getattr(output, "boxes", None)
    lines = []
    for i, (text, score) in enumerate(zip(txts, scores, strict=False)):
        box: tuple[Point, Point, Point, Point] = (
            tuple((float(x), float(y)) for x, y in boxes[i])  # type: ignore[assignment]
            if boxes is not None
            else ((0.0, 0.0),) * 4
        )
        lines.append(Line(text=str(text), score=float(score), box=box))
    return PageResult(lines=tuple(lines), timings={"total": seconds})


class RapidOcrEngine:
    """One RapidOCR instance; not thread-safe, so one per worker thread."""

    def __init__(self, ocr: OcrSettings, choice: ProviderChoice) -> None:
        from rapidocr import RapidOCR

        self._choice = choice
        self._device_id = ocr.device_id
        self._engine = RapidOCR(params=rapidocr_params(ocr, choice))
        self._traditional = wants_traditional(ocr)

    @property
    def provider(self) -> str:
        return self._choice.name

    @property
    def thread_safe(self) -> bool:
        return False

    @property
    def device(self) -> str:
        return "cpu" if self._choice.name == "cpu" else str(self._device_id)

    def warmup(self) -> dict[str, float]:
        """Nothing to warm: RapidOCR picks its own shapes per page."""
        return {}

    def recognize(self, images: Sequence[Image]) -> list[PageResult]:
        results = []
        for image in images:
            start = time.perf_counter()
            output = self._engine(image)
            result = to_page_result(output, time.perf_counter() - start)
            results.append(traditional_result(result) if self._traditional else result)
        return results

    def close(self) -> None:
        pass
