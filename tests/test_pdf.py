"""PDF pages: text layers, renders, limits and broken input — on PDFs the tests make themselves.

Text pages are written with pdfium's own editing API (standard Helvetica, no font files), image
pages with Pillow, and the odd cases (encrypted, garbage text layer, zero pages) as hand-written
PDF syntax, so every fixture is visible here and nothing comes from outside the repository.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from types import GeneratorType
from typing import Any

import numpy as np
import pypdfium2 as pdfium
import pytest
from PIL import Image as PILImage
from PIL import ImageDraw

from daemon.config import OcrSettings
from daemon.documents.decode import iter_pages
from daemon.documents.pdf import iter_pdf_pages, render_size
from daemon.documents.pdf_workers import PdfWorkers
from daemon.errors import DocumentError
from daemon.results import Page
from tests.support import CATALOG, LETTER, _add_text, _write_pdf, encrypted_pdf

IMAGE = "image"  # page spec: a full-page scan made with Pillow

PageSpec = Sequence[str] | str


# --- fixtures made here -----------------------------------------------------------------------


def _scan_pdf(count: int, size_px: tuple[int, int] = (850, 1100), dpi: int = 100) -> bytes:
    """Image-only pages as a scanner writes them: 850x1100 px at 100 dpi is US Letter."""
    frames = []
    for i in range(count):
        image = PILImage.new("RGB", size_px, "white")
        draw = ImageDraw.Draw(image)
        draw.rectangle((100, 100, 300, 200), fill=(255, 0, 0))  # red: checks the BGR order
        draw.text((100, 300), f"scanned page {i}", fill="black")
        frames.append(image)
    out = io.BytesIO()
    frames[0].save(out, "PDF", resolution=dpi, save_all=True, append_images=frames[1:])
    return out.getvalue()


def make_pdf(specs: Sequence[PageSpec], *, rotate: int = 0, scan_text: Sequence[str] = ()) -> bytes:
    """One page per spec: a list of text lines (born-digital) or IMAGE (a scan, plus
    `scan_text` drawn on top as a real text layer, like a stamp or an OCR layer)."""
    pdf = pdfium.PdfDocument.new()
    n_scans = sum(1 for s in specs if s == IMAGE)
    scans = pdfium.PdfDocument(_scan_pdf(n_scans)) if n_scans else None
    scan_index = 0
    for index, spec in enumerate(specs):
        if spec == IMAGE:
            assert scans is not None
            pdf.import_pages(scans, [scan_index], index=index)
            scan_index += 1
            page = pdf[index]
            if scan_text:
                _add_text(pdf, page, scan_text)
        else:
            page = pdf.new_page(*LETTER)
            _add_text(pdf, page, spec)
        if rotate:
            page.set_rotation(rotate)
        page.close()
    out = io.BytesIO()
    pdf.save(out)
    pdf.close()
    if scans is not None:
        scans.close()
    return out.getvalue()


def garbage_text_pdf(*, private_use_map: bool = False) -> bytes:
    """Text that extracts as garbage: a font mapping its codes to no Unicode at all (control
    characters), or — with `private_use_map` — a ToUnicode map into the Private Use Area, as
    some PDF producers write for symbol or subset fonts."""
    codes = bytes(range(32, 96))
    content = b"BT /F1 12 Tf 72 700 Td <%s> Tj ET" % codes.hex().encode()
    names = b" ".join(b"/g%d" % c for c in codes)
    cmap = (
        b"/CIDInit /ProcSet findresource begin 12 dict begin begincmap "
        b"/CMapName /Garbage def 1 begincodespacerange <00> <FF> endcodespacerange "
        b"1 beginbfrange <20> <5F> <E000> endbfrange endcmap "
        b"CMapName currentdict /CMap defineresource pop end end"
    )
    to_unicode = b" /ToUnicode 6 0 R" if private_use_map else b""
    return _write_pdf([
        CATALOG,
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] "
        b"/Resources << /Font << /F1 4 0 R >> >> /Contents 5 0 R >>",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica "
        b"/Encoding << /Differences [32 %s] >>%s >>" % (names, to_unicode),
        b"<< /Length %d >>\nstream\n%s\nendstream" % (len(content), content),
        b"<< /Length %d >>\nstream\n%s\nendstream" % (len(cmap), cmap),
    ])


LINES = ["Invoice 2024-117 for Example GmbH", "Total due: 1,234.56 EUR by 31 May"]


def pages(data: bytes, **settings: object) -> list[Page]:
    return list(iter_pdf_pages(data, OcrSettings(**settings)))


# --- text layers ------------------------------------------------------------------------------


def test_text_layer_page_gives_its_lines_without_rendering() -> None:
    [page] = pages(make_pdf([LINES]))

    assert page.index == 0
    assert page.image is None
    assert page.text_layer is not None
    assert page.text_layer.source == "text_layer"
    assert [line.text for line in page.text_layer.lines] == LINES
    assert page.text_layer.text == "\n".join(LINES)
    assert all(line.score == 1.0 for line in page.text_layer.lines)


def test_text_layer_boxes_are_in_pixels_at_the_render_dpi() -> None:
    [page] = pages(make_pdf([LINES]), pdf_dpi=200)
    assert page.text_layer is not None
    first, second = page.text_layer.lines
    scale = 200 / 72
    (left, top), (right, top2), (right2, bottom), (left2, bottom2) = first.box
    assert (top, right, bottom, left) == (top2, right2, bottom2, left2)  # clockwise, axis-aligned
    assert left == pytest.approx(72 * scale, abs=4)  # text starts 1 inch from the left edge
    # the first baseline is at y=720 pt from the bottom: 72 pt below the top edge
    assert top < (792 - 720) * scale < bottom
    assert right > left + 100
    assert second.box[0][1] > bottom  # the second line lies below the first
    assert page.text_layer.lines[0].box[2][0] < 8.5 * 200


def test_text_layer_boxes_follow_page_rotation() -> None:
    [page] = pages(make_pdf([LINES], rotate=90), pdf_dpi=72)
    assert page.text_layer is not None
    # rotated 90° clockwise, the page is 792 wide and 612 high; horizontal text runs downwards
    for line in page.text_layer.lines:
        (left, top), _, (right, bottom), _ = line.box
        assert 0 <= left < right <= 792 and 0 <= top < bottom <= 612
        assert bottom - top > right - left


def test_ignore_mode_renders_text_pages_too() -> None:
    [page] = pages(make_pdf([LINES]), pdf_text_layer="ignore", pdf_dpi=100)
    assert page.text_layer is None
    assert page.image is not None
    assert page.image.shape == (1100, 850, 3)
    assert (page.image < 128).any()  # the text was drawn


def test_too_little_text_is_not_a_text_layer() -> None:
    [page] = pages(make_pdf([["Page 3"]]), pdf_dpi=72)
    assert page.text_layer is None
    assert page.image is not None


@pytest.mark.parametrize("private_use_map", [False, True], ids=["unmapped", "private-use"])
def test_garbage_text_layer_is_ocrd_instead(private_use_map: bool) -> None:
    data = garbage_text_pdf(private_use_map=private_use_map)
    [page] = pages(data, pdf_dpi=72)
    assert page.text_layer is None
    assert page.image is not None


def test_scan_with_a_stamped_line_is_ocrd_but_a_scan_with_an_ocr_layer_is_not() -> None:
    [stamped] = pages(make_pdf([IMAGE], scan_text=["Received 2024-05-02 by scanner 7"]))
    assert stamped.text_layer is None and stamped.image is not None

    ocr_layer = [f"line {i}: the quick brown fox jumps over the lazy dog" for i in range(6)]
    [layered] = pages(make_pdf([IMAGE], scan_text=ocr_layer))
    assert layered.text_layer is not None
    assert [line.text for line in layered.text_layer.lines] == ocr_layer


# --- rendering --------------------------------------------------------------------------------


def test_image_page_renders_bgr_at_the_configured_dpi() -> None:
    data = _scan_pdf(1)
    [page] = pages(data, pdf_dpi=200)
    assert page.text_layer is None
    assert page.image is not None
    assert page.image.dtype == np.uint8
    assert page.image.shape == (2200, 1700, 3)  # 8.5 x 11 in at 200 dpi
    # the red square drawn at (100..300, 100..200) px at 100 dpi → twice that at 200 dpi
    blue, green, red = page.image[300, 400].tolist()  # Pillow stores RGB pages as JPEG
    assert red > 240 and green < 15 and blue < 15
    assert page.image[10, 10].min() > 240

    [low] = pages(data, pdf_dpi=72)
    assert low.image is not None and low.image.shape == (792, 612, 3)


def test_pixel_cap_lowers_the_scale_instead_of_refusing(caplog: pytest.LogCaptureFixture) -> None:
    cap = 500_000
    with caplog.at_level(logging.WARNING, logger="daemon.documents.pdf"):
        [page] = pages(_scan_pdf(1), pdf_dpi=300, max_image_pixels=cap)
    assert page.image is not None
    height, width, _ = page.image.shape
    assert height * width <= cap
    assert height * width > 0.98 * cap  # lowered just enough, not more
    assert height / width == pytest.approx(11 / 8.5, rel=0.01)
    assert any("instead of 300" in r.getMessage() for r in caplog.records)


def test_pixel_cap_keeps_text_layer_boxes_in_the_capped_pixels() -> None:
    cap = 400_000
    [page] = pages(make_pdf([LINES]), pdf_dpi=300, max_image_pixels=cap)
    size = render_size(*LETTER, 300, cap)
    assert page.text_layer is not None
    for line in page.text_layer.lines:
        (left, top), _, (right, bottom), _ = line.box
        assert 0 <= left < right <= size.width and 0 <= top < bottom <= size.height


def test_render_size_for_an_enormous_page() -> None:
    size = render_size(14400, 14400, 200, 100_000_000)  # the 200-inch PDF maximum
    assert size.width * size.height <= 100_000_000
    assert size.width == size.height
    assert size.dpi < 200
    normal = render_size(*LETTER, 200, 100_000_000)
    assert (normal.width, normal.height, normal.dpi) == (1700, 2200, 200)


# --- many pages -------------------------------------------------------------------------------


def _mixed_specs(count: int = 20) -> list[PageSpec]:
    return [IMAGE if i % 3 == 0 else [f"Page {i} of the mixed document", f"line two of {i}"]
            for i in range(count)]


def test_twenty_page_mixed_pdf_gives_each_page_its_kind() -> None:
    specs = _mixed_specs()
    result = pages(make_pdf(specs), pdf_dpi=72)

    assert [p.index for p in result] == list(range(20))
    for spec, page in zip(specs, result, strict=True):
        if spec == IMAGE:
            assert page.text_layer is None
            assert page.image is not None and page.image.shape == (792, 612, 3)
        else:
            assert page.image is None
            assert page.text_layer is not None
            assert page.text_layer.text == "\n".join(spec)


def test_pages_are_produced_lazily_and_an_abandoned_document_is_closed() -> None:
    pages_iter = iter_pdf_pages(make_pdf(_mixed_specs(6)), OcrSettings(pdf_dpi=72))
    assert isinstance(pages_iter, GeneratorType)
    first = next(pages_iter)
    assert first.index == 0
    pages_iter.close()  # runs the generator's finally: the document is closed, no error
    with pytest.raises(StopIteration):
        next(pages_iter)


def test_max_pages_refused_before_any_page_is_rendered() -> None:
    pages_iter = iter_pdf_pages(make_pdf(_mixed_specs()), OcrSettings(max_pages=5))
    with pytest.raises(DocumentError, match=r"20 pages, more than ocr.max_pages=5") as exc:
        next(pages_iter)
    assert exc.value.permanent


def test_threads_decoding_different_pdfs_get_the_same_pages() -> None:
    documents = [make_pdf(_mixed_specs(6)), _scan_pdf(3), make_pdf([LINES] * 4)]

    def summary(data: bytes) -> list[tuple[int, str | None, int]]:
        return [(p.index, p.text_layer.text if p.text_layer else None,
                 int(p.image.sum()) if p.image is not None else 0)
                for p in pages(data, pdf_dpi=72)]

    expected = [summary(d) for d in documents]
    with ThreadPoolExecutor(max_workers=6) as pool:
        results = list(pool.map(summary, documents * 4))
    assert results == expected * 4


# --- bad input --------------------------------------------------------------------------------


def test_encrypted_pdf_needs_a_password() -> None:
    data = encrypted_pdf()
    pdfium.PdfDocument(data, password="secret").close()  # the fixture is a real encrypted PDF
    with pytest.raises(DocumentError, match=r"^encrypted PDF \(password required\)$") as exc:
        pages(data)
    assert exc.value.permanent


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"%PDF-1.7\n" + bytes(range(256)) * 8, "broken PDF"),
        (b"%PDF-", "broken PDF"),
        (_write_pdf([CATALOG, b"<< /Type /Pages /Kids [] /Count 0 >>"]), "PDF has no pages"),
    ],
    ids=["garbage-after-header", "header-only", "zero-pages"],
)
def test_broken_pdfs_are_document_errors(data: bytes, reason: str) -> None:
    with pytest.raises(DocumentError, match=reason):
        pages(data)


@pytest.mark.parametrize("keep", [0.3, 0.6, 0.95])
def test_truncated_pdf_is_a_document_error(keep: float) -> None:
    data = make_pdf(_mixed_specs(4))
    with pytest.raises(DocumentError, match="broken PDF"):
        pages(data[: int(len(data) * keep)])


def test_decode_sends_pdf_content_here_whatever_it_is_called() -> None:
    result = list(iter_pages(make_pdf([LINES, IMAGE]), OcrSettings(pdf_dpi=72)))
    assert [p.text_layer is not None for p in result] == [True, False]
    with pytest.raises(DocumentError, match="encrypted"):
        list(iter_pages(encrypted_pdf(), OcrSettings()))


# --- pdfium in worker processes (batch.pdf_processes) ----------------------------------------


@pytest.fixture(scope="module")
def pdf_workers() -> Iterator[PdfWorkers]:
    workers = PdfWorkers(2)
    yield workers
    workers.close()


def _same_pages(got: Sequence[Page], want: Sequence[Page]) -> None:
    assert [p.index for p in got] == [p.index for p in want]
    for a, b in zip(got, want, strict=True):
        assert a.text_layer == b.text_layer
        assert (a.image is None) == (b.image is None)
        assert a.image is None or b.image is None or np.array_equal(a.image, b.image)


def test_pdf_workers_make_every_page_as_pdfium_does_in_process(
        pdf_workers: PdfWorkers, caplog: pytest.LogCaptureFixture) -> None:
    """Text layers, scans, turned pages and a page lowered to the pixel cap: the same Pages,
    in order, from worker processes, with the memory budget asked for each page first and
    the lowered-dpi warning logged by the daemon."""
    cases: list[tuple[bytes, dict[str, Any]]] = [
        (make_pdf(_mixed_specs(7)), {}),
        (make_pdf([LINES, IMAGE], rotate=90), {}),
        (make_pdf([IMAGE], scan_text=["an OCR layer " * 12]), {}),
        (_scan_pdf(2), {"pdf_dpi": 300, "max_image_pixels": 500_000}),
    ]
    warned = 0
    for data, settings in cases:
        ocr = OcrSettings(**settings)
        reserved: list[int] = []
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="daemon.documents.pdf"):
            got = list(pdf_workers.pages(data, ocr, reserved.append))
        warned += sum("instead of 300" in r.getMessage() for r in caplog.records)
        _same_pages(got, list(iter_pdf_pages(data, ocr)))
        assert len(reserved) == len(got)
        for page, nbytes in zip(got, reserved, strict=True):
            assert page.image is None or page.image.nbytes <= nbytes <= 1.01 * page.image.nbytes
    assert warned == 2  # one per scan lowered to the cap


@pytest.mark.parametrize(("data", "settings", "reason"), [
    (encrypted_pdf(), {}, r"^encrypted PDF \(password required\)$"),
    (b"%PDF-1.7\n" + bytes(range(256)) * 8, {}, "broken PDF"),
    (_write_pdf([CATALOG, b"<< /Type /Pages /Kids [] /Count 0 >>"]), {}, "PDF has no pages"),
    (make_pdf(_mixed_specs(6)), {"max_pages": 5}, r"6 pages, more than ocr.max_pages=5"),
], ids=["encrypted", "garbage", "zero-pages", "too-many-pages"])
def test_pdf_workers_refuse_what_pdfium_refuses_in_process(
        pdf_workers: PdfWorkers, data: bytes, settings: dict[str, Any], reason: str) -> None:
    with pytest.raises(DocumentError, match=reason) as exc:
        list(pdf_workers.pages(data, OcrSettings(**settings), lambda _nbytes: None))
    assert exc.value.permanent


def test_a_dead_pdf_worker_fails_its_document_and_the_next_is_read() -> None:
    """pdfium crashing on a hostile file (or a worker killed for memory) is one document's
    transient failure; the pool is rebuilt for the next."""
    import os

    workers = PdfWorkers(1)
    try:
        data = make_pdf([LINES, IMAGE])
        pages_iter = workers.pages(data, OcrSettings(), lambda _nbytes: None)
        first = next(pages_iter)
        assert first.text_layer is not None
        workers._executor.submit(os._exit, 1)  # the worker dies, as a segfault would end it
        with pytest.raises(DocumentError, match="stopped the PDF renderer") as exc:
            next(pages_iter)
        assert not exc.value.permanent
        _same_pages(list(workers.pages(data, OcrSettings(), lambda _nbytes: None)),
                    list(iter_pdf_pages(data, OcrSettings())))
    finally:
        workers.close()


def test_closing_pdf_workers_does_not_wait_for_a_hung_render() -> None:
    """pdfium looping on a hostile file must not hold up the daemon's stop: the worker is
    given the timeout, then killed."""
    import time

    workers = PdfWorkers(1)
    hung = workers._executor.submit(time.sleep, 60)  # a render that never ends
    deadline = time.monotonic() + 10
    while not hung.running() and time.monotonic() < deadline:  # handed to the worker
        time.sleep(0.01)
    assert hung.running()
    [process] = list(workers._executor._processes.values())
    start = time.monotonic()
    workers.close(timeout=0.5)
    assert time.monotonic() - start < 5
    # killed; the pool's own manager thread may be reaping it at the same moment (its
    # `waitpid` and close's race, and the loser's `is_alive` reads True once): dead soon
    deadline = time.monotonic() + 5
    while process.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not process.is_alive()


def test_a_pdf_worker_killed_mid_render_leaves_no_segment_behind() -> None:
    """A PDF worker SIGKILLed while rendering left its page's segment (300 MB for a large
    page) in /dev/shm for the daemon's life, one per crash. Its segments are named after it
    and removed once it is found dead; a new pool removes those of an earlier daemon's."""
    from daemon.documents.pdf_workers import SEGMENT_PREFIX
    from daemon.process_pool import WorkerDied
    from tests.support import die_holding_a_segment

    def ours() -> set[str]:
        return {e for e in os.listdir("/dev/shm") if e.startswith(SEGMENT_PREFIX)}

    before = ours()
    workers = PdfWorkers(1)
    try:
        with pytest.raises(WorkerDied):
            workers.call(die_holding_a_segment, 8 << 20)
        assert ours() == before
    finally:
        workers.close()
    # one left by a worker of a daemon that was itself killed: the next pool removes it
    leftover = f"{SEGMENT_PREFIX}999999999-0"
    with open(os.path.join("/dev/shm", leftover), "wb") as handle:
        handle.write(b"x" * 4096)
    PdfWorkers(1).close()
    assert leftover not in ours()
