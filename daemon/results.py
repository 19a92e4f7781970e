"""The values OCR produces and the store keeps: a leaf that imports nothing of the daemon.

`documents` decodes files into `Page`s, `ocr` turns images into `PageResult`s, `store` writes
them, `files` renders them into sidecars; each imports these types from here, so none of them
needs another's module.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

# H x W x 3, BGR (OpenCV's order, as RapidOCR expects); a decoded grey or bilevel page may be
# H x W grey, which the engines spread to BGR once it is shrunk to its reading size
Image = npt.NDArray[np.uint8]
Point = tuple[float, float]

# Between the pages of a document's text wherever it is printed or written as one text
# (`ocr-daemon text`, `ocr`, `.txt` sidecars): a form feed on a line of its own.
PAGE_SEPARATOR = "\n\f\n"


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

    def scaled(self, across: float, down: float) -> PageResult:
        """The same result with every box scaled: from the pixels of a page decoded smaller
        than its file to the file's."""
        if (across, down) == (1.0, 1.0):
            return self
        lines = tuple(
            Line(line.text, line.score,
                 tuple((x * across, y * down) for x, y in line.box))  # type: ignore[arg-type]
            for line in self.lines)
        return PageResult(lines=lines, source=self.source, timings=self.timings)

    @property
    def confidence(self) -> float | None:
        if not self.lines:
            return None
        return sum(line.score for line in self.lines) / len(self.lines)


@dataclass(frozen=True)
class PageBound:
    """The sides the OCR engine brings every page within before it reads it (RapidOCR's
    min_side_len and max_side_len): a larger page is shrunk to a longest side of `max_side`."""

    min_side: int
    max_side: int


@dataclass(frozen=True)
class Page:
    """One decoded page: an image to OCR, or text already taken from a PDF text layer."""

    index: int
    image: Image | None = None
    text_layer: PageResult | None = None
    # the file's pixels per pixel of `image`, across and down: a large JPEG is decoded smaller
    # for OCR (documents.decode.jpeg_shrink), and what is found on it is scaled back by this
    scale: tuple[float, float] = (1.0, 1.0)


def join_pages(texts: Iterable[str]) -> str:
    """A document's text: its pages' texts in order, separated by `PAGE_SEPARATOR`."""
    return PAGE_SEPARATOR.join(texts)


def lines_from_json(rows: Sequence[dict[str, Any]]) -> tuple[Line, ...]:
    """Lines as `lines_json` wrote them, back (score and box as rounded there)."""
    def corners(box: Sequence[Sequence[float]]) -> tuple[Point, Point, Point, Point]:
        (x0, y0), (x1, y1), (x2, y2), (x3, y3) = box
        return (x0, y0), (x1, y1), (x2, y2), (x3, y3)

    return tuple(Line(row["text"], float(row["score"]), corners(row["box"])) for row in rows)


def lines_json(lines: Sequence[Line]) -> list[dict[str, Any]]:
    """Lines as the ledger stores them and the JSON outputs show them (score to 5 places, box
    corners to 0.1 px: more is noise, and it keeps rows small). A page's lines are rounded
    together in numpy: one by one, a receipt's 50 took ~0.2 ms of the store loop, under the
    GIL."""
    if not lines:
        return []
    boxes = np.round(np.array([line.box for line in lines], dtype=np.float64), 1).tolist()
    scores = np.round(np.array([line.score for line in lines], dtype=np.float64), 5).tolist()
    return [{"text": line.text, "score": score, "box": box}
            for line, score, box in zip(lines, scores, boxes, strict=True)]
