"""PDF pages with pypdfium2: a born-digital page's own text layer, or a rendered BGR image.

Pages are produced lazily, one at a time, and every pdfium object (page, text page, bitmap) is
closed before the page is yielded, so a 500-page PDF never sits in memory as 500 renders.

pdfium is not thread-safe — not even across separate documents (it keeps global state: font
caches, the last-error code, the partition allocator) — and decoding runs in a thread pool.
So every pdfium call made here goes through the one module-level `_PDFIUM_LOCK`. It is held per
page (load, extract or render, close), never across a `yield`, so threads decoding different
PDFs interleave page by page instead of one PDF blocking the others. It is re-entrant because
a generator abandoned mid-document is finalised (its `finally` closes the document) in whatever
thread happens to drop it, possibly one already inside a locked section.

A page's text layer is "usable", and is taken instead of OCR when `ocr.pdf_text_layer` is
"prefer", when all of these hold (see `TextLayerRule`):

* it has at least `min_chars` non-whitespace characters (a page number or a stamped header on a
  scan is not a text layer);
* at least `min_printable_ratio` of them are real text (printable, not U+FFFD, not
  private-use), and no more than the rest are characters the font could not map to Unicode
  (fonts without a usable ToUnicode map extract as garbage; checked on a sample of 256);
* when images cover at least `scan_image_coverage` of the page (a scan, perhaps with an
  invisible OCR layer or a stamped line), it needs `scan_min_chars` characters: a scan with a
  short stamp is OCR'd, a scan carrying a full OCR layer (OCRmyPDF, scanner software) is not.
"""

from __future__ import annotations

import ctypes
import logging
import math
import threading
import unicodedata
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pypdfium2 as pdfium
import pypdfium2.raw as pdfium_c

from daemon.config import OcrSettings
from daemon.errors import DocumentError
from daemon.results import Image, Line, Page, PageResult, Point

log = logging.getLogger(__name__)

_PDFIUM_LOCK = threading.RLock()

POINTS_PER_INCH = 72.0


@dataclass(frozen=True)
class TextLayerRule:
    min_chars: int = 20
    min_printable_ratio: float = 0.9
    scan_image_coverage: float = 0.5
    scan_min_chars: int = 100


TEXT_LAYER_RULE = TextLayerRule()


@dataclass(frozen=True)
class RenderSize:
    scale: float  # pixels per PDF point
    width: int
    height: int

    @property
    def dpi(self) -> float:
        return self.scale * POINTS_PER_INCH


def render_size(width_pt: float, height_pt: float, dpi: int, max_pixels: int) -> RenderSize:
    """The bitmap size for a page at `dpi`, lowered just enough to stay within `max_pixels`.

    An enormous page (a poster, a 200-inch PDF maximum) is rendered smaller rather than refused:
    the page is legitimate, only the pixel budget is not.
    """
    scale = dpi / POINTS_PER_INCH
    width, height = _pixels(width_pt, height_pt, scale)
    if width * height > max_pixels:
        scale = math.sqrt(max_pixels / (width_pt * height_pt))
        width, height = _pixels(width_pt, height_pt, scale)
        while width * height > max_pixels and scale > 0:  # ceil() can overshoot by a row
            scale *= 0.999
            width, height = _pixels(width_pt, height_pt, scale)
    return RenderSize(scale=scale, width=width, height=height)


def _pixels(width_pt: float, height_pt: float, scale: float) -> tuple[int, int]:
    # pypdfium2's render() sizes its bitmap with ceil(); match it so boxes and renders agree
    return max(1, math.ceil(width_pt * scale)), max(1, math.ceil(height_pt * scale))


def iter_pdf_pages(data: bytes, ocr: OcrSettings,
                   reserve: Callable[[int], None] = lambda _nbytes: None) -> Iterator[Page]:
    """Every page of the PDF in `data`, in order: its text layer, or a render at `ocr.pdf_dpi`."""
    doc = open_document(data)
    try:
        with _PDFIUM_LOCK:
            count = len(doc)
        _check_count(count, ocr)
        for index in range(count):
            with _PDFIUM_LOCK:
                page = _load_page(doc, index)
                yield_value = _page(page, index, ocr, reserve)
            yield yield_value
    finally:
        close_document(doc)


def _check_count(count: int, ocr: OcrSettings) -> None:
    if count > ocr.max_pages:
        raise DocumentError(f"PDF has {count} pages, more than ocr.max_pages={ocr.max_pages}")


def page_sizes(data: bytes, ocr: OcrSettings) -> list[tuple[float, float]]:
    """Each page's width and height in points (unturned: what the memory budget needs), after
    the checks `iter_pdf_pages` makes of the document."""
    doc = open_document(data)
    try:
        with _PDFIUM_LOCK:
            count = len(doc)
            _check_count(count, ocr)
            sizes = []
            size = pdfium_c.FS_SIZEF()
            for index in range(count):
                if not pdfium_c.FPDF_GetPageSizeByIndexF(doc, index, size):
                    raise DocumentError(f"broken PDF: page {index + 1} cannot be loaded")
                sizes.append((size.width, size.height))
            return sizes
    finally:
        close_document(doc)


def close_document(doc: Any) -> None:
    with _PDFIUM_LOCK:
        doc.close()


Into = Callable[[tuple[int, ...]], Image]  # an array of this shape to render into


def one_page(doc: Any, index: int, ocr: OcrSettings, into: Into | None = None) -> Page:
    """Page `index` of an open document, as `iter_pdf_pages` makes it (for the PDF worker
    processes: the memory budget and the lowered-dpi warning stay with the daemon)."""
    with _PDFIUM_LOCK:
        return _page(_load_page(doc, index), index, ocr, lambda _nbytes: None, warn=False,
                     into=into)


PageMap = Callable[[tuple[float, float]], tuple[float, float]]


def device_to_page(data: bytes, indices: Sequence[int], ocr: OcrSettings) -> dict[int, PageMap]:
    """For each page of `indices` (those the PDF has), the map from the pixels of the page as
    rendered for OCR to the page's own space, pdfium's transform inverted: the searchable
    PDF places its text with them. Under the lock like every pdfium call (written beside
    rendering without it, the store threads crashed the daemon with SIGSEGV)."""
    maps: dict[int, PageMap] = {}
    with _PDFIUM_LOCK:
        doc = pdfium.PdfDocument(data)
        try:
            for index in indices:
                if index >= len(doc):
                    continue
                page = doc[index]
                try:
                    width_pt, height_pt = page.get_size()
                    size = render_size(width_pt, height_pt, ocr.pdf_dpi, ocr.max_image_pixels)
                    maps[index] = _page_map(page, size)
                finally:
                    page.close()
        finally:
            doc.close()
    return maps


def _page_map(page: Any, size: Any) -> PageMap:
    """Pixels of the page as rendered at `size` -> the page's own space (points): the inverse
    of pdfium's page-to-device transform (the one `render()` applies, /Rotate and crop box
    included), fitted on three far-apart points (its integer pixels then err < 0.01 pt)."""
    left, bottom, right, top = page.get_mediabox()
    dx, dy = ctypes.c_int(), ctypes.c_int()
    device = []
    for x, y in ((left, bottom), (right, bottom), (left, top)):
        pdfium_c.FPDF_PageToDevice(page, 0, 0, size.width, size.height, 0, x, y, dx, dy)
        device.append((float(dx.value), float(dy.value)))
    (u0, v0), (u1, v1), (u2, v2) = device
    # device = origin + a * (x - left) / (right - left) + b * (y - bottom) / (top - bottom)
    a = (u1 - u0, v1 - v0)
    b = (u2 - u0, v2 - v0)
    det = a[0] * b[1] - a[1] * b[0]

    def to_page(point: tuple[float, float]) -> tuple[float, float]:
        pu, pv = point[0] - u0, point[1] - v0
        s = (pu * b[1] - pv * b[0]) / det
        t = (a[0] * pv - a[1] * pu) / det
        return left + s * (right - left), bottom + t * (top - bottom)

    return to_page



def open_document(data: bytes) -> Any:
    """Load with the raw API: pypdfium2's constructor reports "no pages" through pdfium's
    last-error code, which a successful load does not reset, so an empty PDF would read as
    whatever failed before it. `data` must stay alive while the document is open (the caller
    holds it)."""
    with _PDFIUM_LOCK:
        raw = pdfium_c.FPDF_LoadMemDocument64(data, len(data), None)
        if not raw:
            raise DocumentError(_open_failure_reason(pdfium_c.FPDF_GetLastError()))
        if pdfium_c.FPDF_GetPageCount(raw) < 1:
            pdfium_c.FPDF_CloseDocument(raw)
            raise DocumentError("PDF has no pages")
        return pdfium.PdfDocument(raw)


def _open_failure_reason(err_code: int) -> str:
    if err_code == pdfium_c.FPDF_ERR_PASSWORD:
        return "encrypted PDF (password required)"
    if err_code == pdfium_c.FPDF_ERR_SECURITY:
        return "encrypted PDF (unsupported security handler)"
    if err_code == pdfium_c.FPDF_ERR_FORMAT:
        return "broken PDF (corrupt, truncated or not really a PDF)"
    return f"unreadable PDF (pdfium error {err_code})"


def _load_page(doc: Any, index: int) -> Any:
    try:
        return doc[index]
    except pdfium.PdfiumError:
        raise DocumentError(f"broken PDF: page {index + 1} cannot be loaded") from None


def _page(page: Any, index: int, ocr: OcrSettings, reserve: Callable[[int], None],
          *, warn: bool = True, into: Into | None = None) -> Page:
    """Called with the lock held; always closes `page`."""
    try:
        width_pt, height_pt = page.get_size()
        if not (width_pt > 0 and height_pt > 0):
            raise DocumentError(
                f"broken PDF: page {index + 1} has no area ({width_pt}x{height_pt} pt)"
            )
        size = render_size(width_pt, height_pt, ocr.pdf_dpi, ocr.max_image_pixels)
        if ocr.pdf_text_layer == "prefer":
            lines = _usable_text_lines(page, size)
            if lines is not None:
                return Page(index=index, text_layer=PageResult(lines=lines, source="text_layer"))
        if warn:
            warn_if_lowered(size, index, width_pt, height_pt, ocr)
        reserve(size.width * size.height * 3)
        return Page(index=index, image=_render(page, size, index, into))
    finally:
        page.close()


def warn_if_lowered(size: RenderSize, index: int, width_pt: float, height_pt: float,
                    ocr: OcrSettings) -> None:
    if size.dpi < ocr.pdf_dpi - 0.5:
        log.warning(
            "PDF page %d (%.0fx%.0f pt) rendered at %.0f dpi instead of %d to fit "
            "ocr.max_image_pixels=%d",
            index + 1, width_pt, height_pt, size.dpi, ocr.pdf_dpi, ocr.max_image_pixels,
            extra={"page": index + 1, "dpi": size.dpi, "scaled": True},
        )


def _render(page: Any, size: RenderSize, index: int, into: Into | None = None) -> Image:
    """The page at `size`, BGR, copied out of pdfium's bitmap into a new array or `into`'s."""
    try:
        bitmap = page.render(scale=size.scale)  # BGR, white background, page /Rotate applied
    except (pdfium.PdfiumError, MemoryError, ValueError) as exc:
        raise DocumentError(f"page {index + 1} could not be rendered: {exc}") from None
    try:
        pixels = bitmap.to_numpy()
        if pixels.ndim != 3 or pixels.shape[2] != 3:  # pragma: no cover - we ask for BGR
            raise DocumentError(f"page {index + 1} rendered with unexpected shape {pixels.shape}")
        if into is None:
            return np.array(pixels, dtype=np.uint8, copy=True)  # own the memory before closing
        out = into(pixels.shape)
        out[...] = pixels
        return out
    finally:
        bitmap.close()


def _usable_text_lines(
    page: Any, size: RenderSize, rule: TextLayerRule = TEXT_LAYER_RULE
) -> tuple[Line, ...] | None:
    """The page's text lines when its text layer is usable (module docstring), else None.

    Costs a few pdfium calls per line, not per character: the text comes out in one call and
    each line's box from pdfium's text rectangles for that line's character range.
    """
    textpage = page.get_textpage()
    try:
        n_chars = textpage.count_chars()
        if n_chars < rule.min_chars:
            return None
        text = _text(textpage, n_chars)
        visible = [i for i, char in enumerate(text) if not char.isspace()]
        if len(visible) < rule.min_chars:
            return None
        real = sum(1 for i in visible if _is_real_text(text[i]))
        if real < rule.min_printable_ratio * len(visible):
            return None
        if _unmapped_ratio(textpage, visible) > 1 - rule.min_printable_ratio:
            return None
        if len(visible) < rule.scan_min_chars and (
            _image_coverage(page) >= rule.scan_image_coverage
        ):
            return None
        return tuple(_lines(textpage, text, page, size))
    finally:
        textpage.close()


def _text(textpage: Any, n_chars: int) -> str:
    """The page's characters, one str character per pdfium character index.

    The bulk call is 1:1 with character indices except around characters outside the BMP
    (two UTF-16 units) or ones pdfium excludes; then fall back to one call per character.
    """
    text: str = textpage.get_text_range(0, n_chars, errors="replace")
    if len(text) == n_chars:
        return text
    return "".join(chr(pdfium_c.FPDFText_GetUnicode(textpage, i)) for i in range(n_chars))


def _unmapped_ratio(textpage: Any, visible: list[int], sample: int = 256) -> float:
    """Share of characters the font could not map to Unicode, on an even sample of them."""
    step = max(1, len(visible) // sample)
    picked = visible[::step]
    unmapped = sum(1 for i in picked if pdfium_c.FPDFText_HasUnicodeMapError(textpage, i))
    return unmapped / len(picked)


def _lines(textpage: Any, text: str, page: Any, size: RenderSize) -> Iterator[Line]:
    """One line per run of characters between pdfium's line breaks (CR/LF it inserts)."""
    start = 0
    for end in [*(i for i, char in enumerate(text) if char in "\r\n"), len(text)]:
        line = text[start:end].strip()
        if line:
            box = _text_box(textpage, start, end - start)
            corners: tuple[Point, Point, Point, Point] = (
                _device_box(page, size, box) if box is not None else ((0.0, 0.0),) * 4
            )
            yield Line(text=line, score=1.0, box=corners)
        start = end + 1


def _text_box(textpage: Any, start: int, count: int) -> list[float] | None:
    """Union of pdfium's text rectangles for a character range, in PDF points (l, b, r, t)."""
    n_rects = pdfium_c.FPDFText_CountRects(textpage, start, count)
    box: list[float] | None = None
    left, top, right, bottom = (ctypes.c_double() for _ in range(4))
    for i in range(max(0, n_rects)):
        if not pdfium_c.FPDFText_GetRect(textpage, i, left, top, right, bottom):
            continue
        rect = [left.value, bottom.value, right.value, top.value]
        box = rect if box is None else [
            min(box[0], rect[0]), min(box[1], rect[1]), max(box[2], rect[2]), max(box[3], rect[3])
        ]
    return box


def _is_real_text(char: str) -> bool:
    return char.isprintable() and char != "\ufffd" and unicodedata.category(char) != "Co"


def _device_box(
    page: Any, size: RenderSize, box: list[float]
) -> tuple[Point, Point, Point, Point]:
    """A box in PDF points → clockwise corners in the pixels of the page rendered at `size`.

    pdfium's own transform is used so page rotation and a cropbox offset are honoured exactly
    as `render()` applies them.
    """
    xs: list[int] = []
    ys: list[int] = []
    dx, dy = ctypes.c_int(), ctypes.c_int()
    for x, y in ((box[0], box[1]), (box[2], box[3]), (box[0], box[3]), (box[2], box[1])):
        pdfium_c.FPDF_PageToDevice(page, 0, 0, size.width, size.height, 0, x, y, dx, dy)
        xs.append(dx.value)
        ys.append(dy.value)
    left, right = float(min(xs)), float(max(xs))
    top, bottom = float(min(ys)), float(max(ys))
    return ((left, top), (right, top), (right, bottom), (left, bottom))


def _image_coverage(page: Any) -> float:
    """Share of the page area covered by top-level image objects (overlaps counted twice, capped
    at 1): a cheap scan detector, no pixel work."""
    left, bottom, right, top = page.get_bbox()
    page_area = (right - left) * (top - bottom)
    if page_area <= 0:
        return 0.0
    covered = 0.0
    for obj in page.get_objects(filter=[pdfium_c.FPDF_PAGEOBJ_IMAGE], max_depth=1):
        obj_left, obj_bottom, obj_right, obj_top = obj.get_bounds()
        w = min(obj_right, right) - max(obj_left, left)
        h = min(obj_top, top) - max(obj_bottom, bottom)
        if w > 0 and h > 0:
            covered += w * h
    return min(1.0, float(covered / page_area))
