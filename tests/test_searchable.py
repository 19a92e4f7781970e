"""Searchable PDFs: the text comes back out (pypdfium2), the file is sound (qpdf --check), the
page is the original image; and through the daemon, one per stored image."""

from __future__ import annotations

import io
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pikepdf
import pypdfium2 as pdfium
import pytest

from daemon.config import OcrSettings
from daemon.documents.decode import iter_pages
from daemon.documents.searchable import ScannedPage, scanned_pages, searchable_pdf
from daemon.results import Line, PageResult
from tests.pages import SENTENCES, render_page, similarity, write_page
from tests.support import REPO, SettingsFactory, mixed_pdf, pipeline_running, wait_until

QPDF = shutil.which("qpdf")


def box(x: float, y: float, w: float, h: float) -> tuple[tuple[float, float], ...]:
    return ((x, y), (x + w, y), (x + w, y + h), (x, y + h))


def extracted(data: bytes) -> list[str]:
    document = pdfium.PdfDocument(data)
    try:
        return [document[i].get_textpage().get_text_range() for i in range(len(document))]
    finally:
        document.close()


def words(text: str) -> list[str]:
    return "".join(c if not c.isspace() else " " for c in text).split()


def check_with_qpdf(data: bytes, tmp_path: Path) -> None:
    """qpdf's checks: the qpdf command where it is installed (`.ci/run` installs Debian's), and
    always the same library through pikepdf."""
    target = tmp_path / "check.pdf"
    target.write_bytes(data)
    if QPDF is not None:
        result = subprocess.run([QPDF, "--check", str(target)], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr
    with pikepdf.open(target) as pdf:
        assert pdf.check_pdf_syntax() == []


def test_the_text_comes_back_out_latin_and_chinese(tmp_path: Path) -> None:
    image = np.full((400, 800, 3), 255, np.uint8)
    result = PageResult(lines=(
        Line("Invoice 48213 due in March", 0.9, box(40, 40, 500, 40)),  # type: ignore[arg-type]
        Line("台灣的發票 請保留", 0.9, box(40, 120, 400, 40)),  # type: ignore[arg-type]
        Line("slanted line", 0.9, ((40, 300), (300, 250), (308, 290), (48, 340))),
    ))
    data = searchable_pdf([ScannedPage(image, result), ScannedPage(image, PageResult())])
    pages = extracted(data)
    assert len(pages) == 2 and pages[1] == ""
    assert words(pages[0]) == words("Invoice 48213 due in March 台灣的發票 請保留 slanted line")
    check_with_qpdf(data, tmp_path)


def test_the_page_is_the_original_image(tmp_path: Path) -> None:
    """The page is sized by the image's resolution, and rendered pixel for pixel (at 72 dpi,
    where a point is a pixel: any other scale resamples) it is the image as read, to the byte,
    for a PNG and a JPEG, each embedded as its own compressed pixels."""
    page = render_page(SENTENCES[:2], width=600)
    for fmt in ("PNG", "JPEG"):
        for dpi in (200, 72):
            buffer = io.BytesIO()
            page.save(buffer, fmt, dpi=(dpi, dpi))
            data = buffer.getvalue()
            [scanned] = scanned_pages(data, [PageResult()], OcrSettings())
            assert scanned.dpi == dpi and scanned.embedded is not None
            pdf = searchable_pdf([scanned])
            assert scanned.embedded.data in pdf  # neither is decoded and compressed again
            assert (data in pdf) == (fmt == "JPEG")
            document = pdfium.PdfDocument(pdf)
            assert document[0].get_size() == pytest.approx(
                (600 * 72 / dpi, page.height * 72 / dpi), abs=1e-3)
            if dpi == 72:
                assert np.array_equal(shown_at_72_dpi(document), as_read(data))
            document.close()
            check_with_qpdf(pdf, tmp_path)


def shown_at_72_dpi(document: pdfium.PdfDocument, index: int = 0) -> np.ndarray:
    return document[index].render(scale=1, no_smoothimage=True).to_numpy()[:, :, :3]


def bgr(image: np.ndarray) -> np.ndarray:
    return image if image.ndim == 3 else np.repeat(image[:, :, None], 3, axis=2)


def as_read(data: bytes) -> np.ndarray:
    """The page as the daemon read it for OCR, in BGR."""
    image = next(iter_pages(data, OcrSettings())).image
    assert image is not None
    return bgr(image)


def shows_the_page_read(pdf: bytes, data: bytes, tmp_path: Path) -> None:
    """The one-page `pdf` of the file `data`, rendered at 72 dpi, is the page as the daemon
    read it, to the byte; and it is a sound PDF."""
    document = pdfium.PdfDocument(pdf)
    try:
        assert np.array_equal(shown_at_72_dpi(document), as_read(data))
    finally:
        document.close()
    check_with_qpdf(pdf, tmp_path)


@pytest.mark.parametrize(("mode", "embedded"), [
    ("RGB", True), ("L", True), ("1", True), ("P", True),
    ("RGBA", False), ("LA", False), ("P with a transparent colour", False), ("I;16", False),
    ("RGB turned by its EXIF", False),
])
def test_a_png_goes_in_as_it_is_where_a_reader_shows_what_was_read(
        mode: str, embedded: bool, tmp_path: Path) -> None:
    """A PNG's own compressed pixels go into the PDF where a reader shows exactly the page
    the daemon read (grey of 1-8 bits, RGB, indexed colour); others (transparency, 16 bits)
    go in as the page read. Either way the PDF page is the page read, to the byte."""
    page = render_page(SENTENCES[:2], width=600)
    page.paste((200, 40, 40), (20, 20, 120, 60))  # some colour
    if mode.startswith("P"):
        image = page.quantize(16)
    elif mode == "I;16":
        image = page.convert("L").convert("I;16")
    else:
        image = page.convert(mode.split()[0])
    buffer = io.BytesIO()
    options: dict[str, object] = {"transparency": 0} if "transparent" in mode else {}
    if "EXIF" in mode:
        exif = image.getexif()
        exif[0x0112] = 6  # turned a quarter: read as a portrait page
        options["exif"] = exif.tobytes()
    image.save(buffer, "PNG", dpi=(72, 72), **options)
    data = buffer.getvalue()
    [scanned] = scanned_pages(data, [PageResult()], OcrSettings())
    assert (scanned.embedded is not None) == embedded
    pdf = searchable_pdf([scanned])
    if scanned.embedded is not None:
        assert scanned.embedded.data in pdf
    shows_the_page_read(pdf, data, tmp_path)


@pytest.mark.parametrize(("kind", "embedded"), [
    ("G4", True), ("G4, white is zero", True), ("G4, two pages", True),
    ("G4 in strips", False), ("G4 turned by its orientation", False), ("LZW grey", False),
])
def test_a_g4_tiff_goes_in_as_it_is_where_a_reader_shows_what_was_read(
        kind: str, embedded: bool, tmp_path: Path) -> None:
    """A scanner's TIFF of CCITT G4 strips goes into the PDF as those strips, each page the
    page the daemon read to the byte, white or black as zero; a TIFF in several strips a page,
    turned by its orientation or otherwise compressed goes in as the pages read."""
    page = render_page(SENTENCES[:4], width=600).convert("1")
    pages = [page, page.transpose(0).rotate(180)] if "two" in kind else [page]
    options: dict[str, object] = {"compression": "group4", "dpi": (72, 72)}
    if "white is zero" in kind:
        options["tiffinfo"] = {262: 0}
    elif "strips" in kind:
        options["strip_size"] = 2000
    elif "orientation" in kind:
        options["tiffinfo"] = {274: 6}
    elif "LZW" in kind:
        pages = [page.convert("L")]
        options["compression"] = "tiff_lzw"
    buffer = io.BytesIO()
    pages[0].save(buffer, "TIFF", save_all=True, append_images=pages[1:], **options)
    data = buffer.getvalue()
    results = [PageResult() for _ in pages]
    scanned = scanned_pages(data, results, OcrSettings())
    assert len(scanned) == len(pages)
    assert all((one.embedded is not None) == embedded for one in scanned)
    pdf = searchable_pdf(scanned)
    for one in scanned:
        if one.embedded is not None:
            assert one.embedded.data in pdf
    document = pdfium.PdfDocument(pdf)
    try:
        read = [p.image for p in iter_pages(data, OcrSettings())]
        assert len(document) == len(read) == len(pages)
        for index, image in enumerate(read):
            assert image is not None and image.ndim == 2  # read grey: 0 and 255
            assert np.array_equal(shown_at_72_dpi(document, index), bgr(image))
    finally:
        document.close()
    check_with_qpdf(pdf, tmp_path)


@pytest.mark.parametrize(("kind", "bits"), [
    ("G4 in strips", 1), ("uncompressed bilevel", 1), ("LZW grey of black and white", 1),
    ("LZW grey", 8), ("black and white but one grey pixel", 8),
])
def test_a_black_and_white_page_read_goes_in_at_a_bit_a_pixel(
        kind: str, bits: int, tmp_path: Path) -> None:
    """A page read as black and white only, whatever its file's compression, goes into the
    PDF at a bit a pixel (its rows padded to a byte: 603 pixels wide here); a page with grey
    in it at eight. Either way the PDF page is the page read, to the byte."""
    page = render_page(SENTENCES[:3], width=640)
    page = page.crop((0, 0, 603, page.height)).convert("L")
    options: dict[str, object] = {"dpi": (72, 72)}
    if kind == "G4 in strips":
        page, options["compression"], options["strip_size"] = page.convert("1"), "group4", 2000
    elif kind == "uncompressed bilevel":
        page = page.convert("1")
    elif kind == "LZW grey of black and white":
        page, options["compression"] = page.convert("1").convert("L"), "tiff_lzw"
    elif kind == "black and white but one grey pixel":
        page = page.convert("1").convert("L")
        page.putpixel((1, 1), 128)  # off the sparse sample's grid
    else:
        options["compression"] = "tiff_lzw"
    buffer = io.BytesIO()
    page.save(buffer, "TIFF", **options)
    data = buffer.getvalue()
    [scanned] = scanned_pages(data, [PageResult()], OcrSettings())
    assert scanned.embedded is None
    pdf = searchable_pdf([scanned])
    with pikepdf.open(io.BytesIO(pdf)) as document:
        image = document.pages[0].Resources.XObject.Im0
        assert (int(image.BitsPerComponent), image.ColorSpace) == (bits, pikepdf.Name.DeviceGray)
    shows_the_page_read(pdf, data, tmp_path)


def chinese_scan(path: Path) -> None:
    """A page of Simplified Chinese, in the tests' subset font (tests/fonts)."""
    from PIL import Image as PILImage
    from PIL import ImageDraw, ImageFont

    font = ImageFont.truetype(str(Path(__file__).parent / "fonts" /
                                  "DroidSansFallback-test-subset.ttf"), 48)
    image = PILImage.new("RGB", (900, 260), "white")
    draw = ImageDraw.Draw(image)
    draw.text((60, 50), "请把包裹送到北门", fill="black", font=font)
    draw.text((60, 140), "七位灯塔守护者数紫色的浪", fill="black", font=font)
    image.save(path.with_name(path.name + ".part"), "PNG")
    path.with_name(path.name + ".part").rename(path)


def test_the_daemon_writes_one_pdf_per_stored_file(settings_factory: SettingsFactory,
                                                    tmp_path: Path) -> None:
    from daemon.hardware.providers import CPU
    from daemon.ocr.engines import build_engine

    out = tmp_path / "searchable"
    settings = settings_factory(watch={"output_pdf": "pdf", "output_dir": str(out),
                                       "recursive": True}, ocr={"lang": "ch"})
    engine = build_engine(settings, CPU, 1)
    with pipeline_running(settings, engine, stop_seconds=5) as (_, ledger, _):
        inbox = settings.watch.path
        (inbox / "sub").mkdir()
        write_page(inbox / "letter.png", SENTENCES[:3])
        write_page(inbox / "sub" / "memo.jpg", SENTENCES[3:5])
        (inbox / "mixed.pdf.part").write_bytes(mixed_pdf(
            [["A born digital cover page"], None, None], SENTENCES[5:7]))
        (inbox / "mixed.pdf.part").rename(inbox / "mixed.pdf")
        chinese_scan(inbox / "chinese.png")
        assert wait_until(lambda: ledger.counts()["done"] == 4, 180)
        assert wait_until(lambda: all((out / name).exists() for name in (
            "sub/memo.jpg.pdf", "letter.png.pdf", "mixed.pdf", "chinese.png.pdf")), 30)
    for name, source in (("letter.png.pdf", inbox / "letter.png"),
                         ("sub/memo.jpg.pdf", inbox / "sub" / "memo.jpg"),
                         ("mixed.pdf", inbox / "mixed.pdf"),
                         ("chinese.png.pdf", inbox / "chinese.png")):
        data = (out / name).read_bytes()
        stored = ledger.find("x", [str(source)])
        pages = extracted(data)
        assert len(pages) == len(stored.pages)
        assert name != "chinese.png.pdf" or "包裹送到北门" in stored.text, stored.text
        for got, page in zip(pages, stored.pages, strict=True):  # page by page
            assert similarity(got, page.text) > 0.99, (name, page.page_no, got, page.text)
        check_with_qpdf(data, tmp_path)
    assert list(inbox.rglob("*.pdf")) == [inbox / "mixed.pdf"]  # nothing written in the inbox


def test_output_pdf_needs_an_output_dir(settings_factory: SettingsFactory) -> None:
    with pytest.raises(ValueError, match="output_dir"):
        settings_factory(watch={"output_pdf": "pdf"})


# -- PDF inputs: their own pages, scanned ones gaining a text layer --------------------------


def _rendered_box(data: bytes, index: int, fraction: tuple[float, float, float, float]
                  ) -> tuple[tuple[float, float], ...]:
    """A box at the given fractions (left, top, right, bottom) of page `index` as the daemon
    renders it for OCR, in those pixels."""
    from daemon.documents.pdf import render_size

    document = pdfium.PdfDocument(data)
    size = render_size(*document[index].get_size(), OcrSettings().pdf_dpi,
                       OcrSettings().max_image_pixels)
    width, height = size.width, size.height  # get_size() is the page as shown (turned)
    document.close()
    left, top, right, bottom = fraction
    return ((left * width, top * height), (right * width, top * height),
            (right * width, bottom * height), (left * width, bottom * height))


def test_a_pdf_keeps_its_pages_and_its_scans_gain_text(tmp_path: Path) -> None:
    from daemon.documents.searchable import searchable_from_pdf

    original = mixed_pdf([["A born digital page", "with its own text"], None, None],
                         ["scanned words"])
    with pikepdf.open(io.BytesIO(original)) as pdf:  # the last scan is turned a quarter
        pdf.pages[2].Rotate = 90
        buffer = io.BytesIO()
        pdf.save(buffer)
        original = buffer.getvalue()
    results = [
        PageResult(lines=(Line("A born digital page", 1.0, box(0, 0, 9, 9)),),  # type: ignore[arg-type]
                   source="text_layer"),
        PageResult(lines=(Line("scanned words", 0.9,
                               _rendered_box(original, 1, (0.1, 0.1, 0.6, 0.2))),)),
        PageResult(lines=(Line("台灣的發票 turned", 0.9,
                               _rendered_box(original, 2, (0.2, 0.3, 0.7, 0.36))),)),
    ]
    data = searchable_from_pdf(original, results, OcrSettings())
    before, after = extracted(original), extracted(data)
    assert after[0] == before[0]  # its own text layer, untouched
    assert words(after[1]) == words(before[1] + " scanned words")
    assert words(after[2]) == words(before[2] + " 台灣的發票 turned")
    # on the turned page the text lies where the OCR box was, in the pixels rendered for OCR
    import ctypes

    import pypdfium2.raw as pdfium_c

    from daemon.documents.pdf import render_size

    (left, top), _, (right, bottom), _ = results[2].lines[0].box
    document = pdfium.PdfDocument(data)
    page = document[2]
    size = render_size(*page.get_size(), OcrSettings().pdf_dpi, OcrSettings().max_image_pixels)
    textpage = page.get_textpage()
    u, v = ctypes.c_int(), ctypes.c_int()
    for index in range(textpage.count_chars()):
        x0, y0, x1, y1 = textpage.get_charbox(index)
        pdfium_c.FPDF_PageToDevice(page, 0, 0, size.width, size.height, 0, (x0 + x1) / 2,
                                   (y0 + y1) / 2, u, v)
        assert left - 2 <= u.value <= right + 2 and top - 2 <= v.value <= bottom + 2, index
    document.close()
    check_with_qpdf(data, tmp_path)
    # nothing read by OCR (a text layer, a blank scan): the PDF is copied, not rewritten
    only_text = mixed_pdf([["nothing scanned here"], None], ["x"])
    assert searchable_from_pdf(only_text, [PageResult(source="text_layer"), PageResult()],
                               OcrSettings()) == only_text


def test_writing_searchable_pdfs_beside_rendering_does_not_crash_pdfium(tmp_path: Path) -> None:
    """pdfium is not thread-safe: the searchable PDF's page transforms ran outside its lock,
    and two threads rendering beside two writing PDFs died with SIGSEGV or SIGABRT within
    about a second (the store threads write PDFs beside the decode threads' renders). Run in
    a process of its own for 5 s: a crash is its exit by a signal."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent("""
        import threading, time
        from daemon.config import OcrSettings
        from daemon.documents.pdf import iter_pdf_pages
        from daemon.documents.searchable import searchable_from_pdf
        from daemon.results import Line, PageResult
        from tests.pages import SENTENCES
        from tests.support import mixed_pdf

        ocr = OcrSettings()
        data = mixed_pdf([SENTENCES[:2], None, SENTENCES[2:4], None], SENTENCES[:3])
        box = ((10.0, 10.0), (200.0, 10.0), (200.0, 40.0), (10.0, 40.0))
        results = [PageResult(lines=(Line("word", 0.9, box),), source="ocr")] * 4
        stop = time.monotonic() + 5
        calls = []

        def render():
            while time.monotonic() < stop:
                calls.append(sum(1 for _ in iter_pdf_pages(data, ocr, lambda _n: None)))

        def write():
            while time.monotonic() < stop:
                calls.append(len(searchable_from_pdf(data, results, ocr)))

        threads = [threading.Thread(target=f) for f in (render, render, write, write)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        print(len(calls))
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    assert int(proc.stdout) > 100  # the threads really ran side by side, many times


def test_no_two_files_share_an_output_and_a_duplicate_gets_its_own(
        settings_factory: SettingsFactory, tmp_path: Path) -> None:
    """`scan.png` and `scan.jpg` both became `scan.pdf` (the second replacing the first);
    `b.png` with the content of `a.png` got neither `b.pdf` nor its sidecar, whether it came
    while `a.png` was read or after it was stored."""
    from daemon.outputs import pdf_name
    from tests.support import DeviceEngine

    extensions = settings_factory().watch.extensions
    # names the watcher takes in (each ends with one of its extensions)
    names = ["scan.png", "scan.jpg", "scan.pdf", "scan.png.pdf", "scan.png.pdf.pdf", "x.PDF",
             "x.pdf.PNG"]
    assert len({pdf_name(n, extensions) for n in names}) == len(names)
    assert pdf_name("report.pdf", extensions) == "report.pdf"

    out = tmp_path / "searchable"
    settings = settings_factory(watch={"output_pdf": "pdf", "output_dir": str(out),
                                       "sidecar": "txt"})
    inbox = settings.watch.path
    with pipeline_running(settings, DeviceEngine("cpu", delay=0.0)) as (_, ledger, _):
        write_page(inbox / "scan.png", SENTENCES[:1])
        write_page(inbox / "scan.jpg", SENTENCES[1:2])
        write_page(inbox / "a.png", SENTENCES[2:3])
        assert wait_until(lambda: ledger.counts()["done"] == 3, 30)
        (inbox / "b.png").write_bytes((inbox / "a.png").read_bytes())  # after it was stored
        assert wait_until(lambda: (out / "b.png.pdf").exists(), 20)
        assert wait_until((inbox / "b.png.txt").exists, 5)
    assert {p.name for p in out.iterdir()} == {"scan.png.pdf", "scan.jpg.pdf", "a.png.pdf",
                                               "b.png.pdf"}
    assert (out / "scan.png.pdf").read_bytes() != (out / "scan.jpg.pdf").read_bytes()
    assert (inbox / "b.png.txt").read_text() == (inbox / "a.png.txt").read_text()
    assert ledger.counts()["done"] == 3  # the duplicate was not OCR'd again
