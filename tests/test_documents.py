"""Image decoding: EXIF orientation and multi-frame TIFFs, on images the tests make."""

from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
from PIL import Image as PILImage

from daemon.config import OcrSettings
from daemon.documents.decode import iter_image_pages, iter_pages, jpeg_shrink
from daemon.errors import DocumentError
from daemon.results import PageBound
from tests.pages import render_page

RED, BLUE = (255, 0, 0), (0, 0, 255)


def _two_tone(width: int = 80, height: int = 40) -> PILImage.Image:
    """Left half red, right half blue, as stored in the file."""
    image = PILImage.new("RGB", (width, height), BLUE)
    image.paste(RED, (0, 0, width // 2, height))
    return image


def test_exif_orientation_6_jpeg_is_turned_upright() -> None:
    # Orientation 6: the camera was turned, the stored pixels must be rotated 90° clockwise.
    exif = PILImage.Exif()
    exif[0x0112] = 6
    out = io.BytesIO()
    _two_tone().save(out, "JPEG", exif=exif, quality=95)

    [page] = list(iter_pages(out.getvalue(), OcrSettings()))

    assert page.image is not None
    assert page.image.shape == (80, 40, 3)  # 80x40 stored → 40 wide, 80 high upright
    top_b, _, top_r = page.image[10, 20].tolist()  # stored left (red) is now on top
    bottom_b, _, bottom_r = page.image[70, 20].tolist()
    assert top_r > 200 and top_b < 60
    assert bottom_b > 200 and bottom_r < 60


def test_jpeg_without_exif_is_left_alone() -> None:
    out = io.BytesIO()
    _two_tone().save(out, "JPEG", quality=95)
    [page] = list(iter_image_pages(out.getvalue(), OcrSettings()))
    assert page.image is not None and page.image.shape == (40, 80, 3)


def test_multi_page_tiff_gives_every_frame() -> None:
    frames = [PILImage.new("RGB", (60 + 10 * i, 50), color) for i, color in
              enumerate([RED, (0, 255, 0), BLUE])]
    out = io.BytesIO()
    frames[0].save(out, "TIFF", save_all=True, append_images=frames[1:], compression="tiff_lzw")

    result = list(iter_pages(out.getvalue(), OcrSettings()))

    assert [p.index for p in result] == [0, 1, 2]
    assert [p.image.shape if p.image is not None else None for p in result] == [
        (50, 60, 3), (50, 70, 3), (50, 80, 3)
    ]
    # BGR order: the first frame is red, the third blue
    assert result[0].image is not None and result[0].image[0, 0].tolist() == [0, 0, 255]
    assert result[2].image is not None and result[2].image[0, 0].tolist() == [255, 0, 0]


def test_tiff_with_more_frames_than_max_pages_is_refused() -> None:
    frames = [PILImage.new("L", (20, 20), 255) for _ in range(4)]
    out = io.BytesIO()
    frames[0].save(out, "TIFF", save_all=True, append_images=frames[1:])
    with pytest.raises(DocumentError, match="max_pages=3"):
        list(iter_pages(out.getvalue(), OcrSettings(max_pages=3)))


# -- OpenCV's fast path gives Pillow's pixels ------------------------------------------------


def _both_ways(data: bytes, monkeypatch: pytest.MonkeyPatch) -> tuple[object, object, bool]:
    """The page from the normal path, from Pillow alone, and whether OpenCV took it."""
    from daemon.documents import decode as decode_module

    taken: list[bool] = []
    real = decode_module.opencv_decode

    def watching(data_: bytes, image: object, shrink: int = 1) -> object:
        result = real(data_, image, shrink)  # type: ignore[arg-type]
        taken.append(result is not None)
        return result

    monkeypatch.setattr(decode_module, "opencv_decode", watching)
    fast = next(iter_pages(data, OcrSettings())).image
    monkeypatch.setattr(decode_module, "opencv_decode", lambda _d, _i, _s=1: None)
    slow = next(iter_pages(data, OcrSettings())).image
    return fast, slow, bool(taken and taken[0])


def _encoded(image: PILImage.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


@pytest.mark.parametrize("orientation", range(1, 9))
def test_opencv_path_matches_pillow_for_every_exif_orientation(
        orientation: int, monkeypatch: pytest.MonkeyPatch) -> None:
    page = render_page(["Orientation matters", "for every scan"], width=500)
    exif = PILImage.Exif()
    exif[0x0112] = orientation
    fast, slow, taken = _both_ways(_encoded(page, "JPEG", quality=90, exif=exif), monkeypatch)
    assert taken
    assert np.array_equal(fast, slow)  # type: ignore[arg-type]


@pytest.mark.parametrize("mode,fmt,taken", [
    ("RGB", "PNG", True), ("L", "PNG", True), ("L", "JPEG", True), ("P", "PNG", False),
    ("RGBA", "PNG", False), ("I;16", "PNG", False), ("CMYK", "JPEG", False),
])
def test_opencv_path_takes_only_what_it_decodes_like_pillow(
        mode: str, fmt: str, taken: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    page = render_page(["Modes and depths"], width=300).convert(
        "I" if mode == "I;16" else mode)
    if mode == "I;16":
        page = page.convert("I;16")
    fast, slow, took = _both_ways(_encoded(page, fmt), monkeypatch)
    assert took is taken
    assert np.array_equal(fast, slow)  # type: ignore[arg-type]


@pytest.mark.parametrize("mode,fmt,options", [
    ("1", "TIFF", {"compression": "group4"}), ("1", "TIFF", {}), ("1", "PNG", {}),
    ("L", "TIFF", {"compression": "tiff_lzw"}), ("L", "BMP", {}), ("L", "PNG", {}),
    ("L", "JPEG", {}), ("P", "PNG", {}),
])
def test_bilevel_grey_and_palette_pages_are_pillows_rgb_pixels(
        mode: str, fmt: str, options: dict[str, object]) -> None:
    """Scanners' bilevel and grey pages stay one grey byte a pixel, `[H, W]`: each channel of
    Pillow's RGB conversion exactly (what the engine spreads them to); others come as BGR."""
    page = render_page(["Scanned at 300 dpi", "in black and white"], width=400)
    page = page.quantize(7) if mode == "P" else page.convert(mode)
    got = next(iter_pages(_encoded(page, fmt, **options), OcrSettings())).image
    with PILImage.open(io.BytesIO(_encoded(page, fmt, **options))) as stored:
        want = np.asarray(stored.convert("RGB"))[:, :, ::-1]
    assert got is not None
    if mode == "P":
        assert np.array_equal(got, want)
    else:
        assert got.shape == want.shape[:2]
        assert np.array_equal(cv2.cvtColor(got, cv2.COLOR_GRAY2BGR), want)
    assert len(np.unique(want)) > 1


def test_truncated_or_trailing_data_goes_to_pillow(monkeypatch: pytest.MonkeyPatch) -> None:
    data = _encoded(render_page(["Cut short"], width=300), "JPEG")
    with pytest.raises(DocumentError, match="truncated"):  # not grey rows from OpenCV
        list(iter_pages(data[: len(data) // 2], OcrSettings()))
    fast, slow, took = _both_ways(data + b"camera maker notes", monkeypatch)
    assert not took and np.array_equal(fast, slow)  # type: ignore[arg-type]


# -- large JPEGs: decoded no larger than the engine reads them ---------------------------------


def test_jpeg_shrink_leaves_both_sides_within_the_bound() -> None:
    bound = PageBound(min_side=30, max_side=2000)
    assert jpeg_shrink(4000, 3000, bound) == 2  # a 12 MP photo: exactly the bound
    assert jpeg_shrink(3999, 3000, bound) == 1  # half would be under it: the engine'd enlarge
    assert jpeg_shrink(7016, 4961, bound) == 2  # A4 at 600 dpi
    assert jpeg_shrink(16000, 12000, bound) == 8
    assert jpeg_shrink(8000, 100, bound) == 2  # a strip: its short side decides
    assert jpeg_shrink(8000, 6000, None) == 1


def test_a_large_turned_jpeg_is_decoded_smaller_and_scaled_back() -> None:
    """A phone photo turned by EXIF: half size, upright, the same picture as the full
    decode, and `scale` maps its pixels to the file's across and down the turned page (odd
    sides: libjpeg rounds each up, so the two differ)."""
    picture = render_page(["Photographed at 24 megapixels"], size=150, width=4201)
    exif = PILImage.Exif()
    exif[0x0112] = 6
    out = io.BytesIO()
    picture.save(out, "JPEG", quality=92, exif=exif)
    width, height = picture.size
    assert height % 2 == 1 or width % 2 == 1
    bound = PageBound(30, 2000)
    [small] = list(iter_pages(out.getvalue(), OcrSettings(), bound=bound))
    [full] = list(iter_pages(out.getvalue(), OcrSettings()))
    assert full.image is not None and small.image is not None
    assert full.image.shape == (width, height, 3) and full.scale == (1.0, 1.0)  # upright
    assert small.image.shape == (-(-width // 2), -(-height // 2), 3)
    assert small.scale == (height / -(-height // 2), width / -(-width // 2))
    shrunk = cv2.resize(full.image, small.image.shape[1::-1], interpolation=cv2.INTER_AREA)
    assert np.abs(shrunk.astype(int) - small.image).mean() < 3
    # off, or without the engine's bound: the file's own size
    assert next(iter_pages(out.getvalue(), OcrSettings(), bound=None)).image.shape == \
        full.image.shape
