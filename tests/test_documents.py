"""Image decoding: EXIF orientation and multi-frame TIFFs, on images the tests make."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image as PILImage

from daemon.config import OcrSettings
from daemon.documents.decode import iter_image_pages, iter_pages
from daemon.errors import DocumentError
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

    def watching(data_: bytes, image: object) -> object:
        result = real(data_, image)  # type: ignore[arg-type]
        taken.append(result is not None)
        return result

    monkeypatch.setattr(decode_module, "opencv_decode", watching)
    fast = next(iter_pages(data, OcrSettings())).image
    monkeypatch.setattr(decode_module, "opencv_decode", lambda _d, _i: None)
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
    ("L", "TIFF", {"compression": "tiff_lzw"}), ("L", "BMP", {}), ("P", "PNG", {}),
])
def test_bilevel_grey_and_palette_pages_are_pillows_rgb_pixels(
        mode: str, fmt: str, options: dict[str, object]) -> None:
    """Scanners' bilevel and grey pages take a one-byte-a-pixel way to BGR: exactly what
    Pillow's RGB conversion gives, channel for channel."""
    page = render_page(["Scanned at 300 dpi", "in black and white"], width=400)
    page = page.quantize(7) if mode == "P" else page.convert(mode)
    got = next(iter_pages(_encoded(page, fmt, **options), OcrSettings())).image
    with PILImage.open(io.BytesIO(_encoded(page, fmt, **options))) as stored:
        want = np.asarray(stored.convert("RGB"))[:, :, ::-1]
    assert got is not None and np.array_equal(got, want)
    assert len(np.unique(want)) > 1


def test_truncated_or_trailing_data_goes_to_pillow(monkeypatch: pytest.MonkeyPatch) -> None:
    data = _encoded(render_page(["Cut short"], width=300), "JPEG")
    with pytest.raises(DocumentError, match="truncated"):  # not grey rows from OpenCV
        list(iter_pages(data[: len(data) // 2], OcrSettings()))
    fast, slow, took = _both_ways(data + b"camera maker notes", monkeypatch)
    assert not took and np.array_equal(fast, slow)  # type: ignore[arg-type]
