"""Image decoding: EXIF orientation and multi-frame TIFFs, on images the tests make."""

from __future__ import annotations

import io

import pytest
from PIL import Image as PILImage

from daemon.config import OcrSettings
from daemon.documents.decode import iter_image_pages, iter_pages
from daemon.errors import DocumentError

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
