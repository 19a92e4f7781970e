"""Plain values passed between decoding, the engines and the pipeline."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

import numpy as np
import numpy.typing as npt

Image = npt.NDArray[np.uint8]  # H x W x 3, BGR (OpenCV's order, as RapidOCR expects)
Point = tuple[float, float]


@dataclass(frozen=True)
class Line:
    text: str
    score: float
    box: tuple[Point, Point, Point, Point]  # clockwise from top-left, page pixel coordinates


@dataclass(frozen=True)
class PageResult:
    lines: tuple[Line, ...] = ()
    source: Literal["ocr", "text_layer"] = "ocr"
    timings: dict[str, float] = field(default_factory=dict, compare=False)

    @property
    def text(self) -> str:
        return "\n".join(line.text for line in self.lines)

    @property
    def confidence(self) -> float | None:
        if not self.lines:
            return None
        return sum(line.score for line in self.lines) / len(self.lines)


@dataclass(frozen=True)
class Page:
    """One decoded page: an image to OCR, or text already taken from a PDF text layer."""

    index: int
    image: Image | None = None
    text_layer: PageResult | None = None


class OcrEngine(Protocol):
    """What the pipeline needs from an engine. Tests swap in fakes that crash or stall."""

    @property
    def provider(self) -> str: ...

    def recognize(self, images: Sequence[Image]) -> list[PageResult]:
        """OCR every image; one result per image, in order."""
        ...

    def close(self) -> None: ...
