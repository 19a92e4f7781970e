"""Turn a file's bytes into pages: images (PNG, JPEG, BMP, WebP), every frame of a TIFF.

Runs in the CPU pool, ahead of OCR. Every failure is a `DocumentError` with a reason a person
can act on; nothing here may take the daemon down.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, cast

import cv2
import numpy as np
from PIL import Image as PILImage
from PIL import ImageOps, ImageSequence, UnidentifiedImageError

from daemon.config import OcrSettings
from daemon.errors import DocumentError
from daemon.results import Image, Page, PageBound

if TYPE_CHECKING:
    from daemon.documents.pdf_workers import PdfWorkers

IMAGE_FORMATS = {"PNG", "JPEG", "BMP", "WEBP", "TIFF", "MPO"}
MIN_SIDE = 8


def sniff(data: bytes) -> str:
    """The format the content claims, whatever the file name says."""
    if data.startswith(b"%PDF-"):
        return "pdf"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    if data.startswith(b"BM"):
        return "bmp"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return "unknown"


GREY_MODES = ("1", "L")  # bilevel and grey frames are decoded to one byte a pixel


def to_pixels(frame: PILImage.Image) -> Image:
    """The frame as OpenCV's BGR array, or a bilevel or grey one (what document scanners
    write: a 300-dpi CCITT G4 TIFF) as one grey byte a pixel, `[H, W]`, the values of
    Pillow's RGB (0 and 255 for bilevel). A grey page is a third of the bytes to hold and to
    shrink; the engine spreads it to BGR once it is at its reading size (the same bytes as
    spreading it first). An RGB frame (every JPEG, most PNGs) is not converted to a Pillow
    copy first, and the channel swap is OpenCV's (SIMD, outside the GIL): decoding was the
    largest host stage of the GPU path."""
    if frame.mode in GREY_MODES:
        return np.asarray(frame if frame.mode == "L" else frame.convert("L"), dtype=np.uint8)
    rgb = np.asarray(frame if frame.mode == "RGB" else frame.convert("RGB"), dtype=np.uint8)
    return cast(Image, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))


Reserve = Callable[[int], None]


def _no_reserve(_nbytes: int) -> None:
    pass


# EXIF orientation -> the OpenCV steps that give what Pillow's exif_transpose gives
_ORIENT: dict[int, Callable[[Image], Image]] = {
    2: lambda img: cast(Image, cv2.flip(img, 1)),
    3: lambda img: cast(Image, cv2.rotate(img, cv2.ROTATE_180)),
    4: lambda img: cast(Image, cv2.flip(img, 0)),
    5: lambda img: cast(Image, cv2.transpose(img)),
    6: lambda img: cast(Image, cv2.rotate(img, cv2.ROTATE_90_CLOCKWISE)),
    7: lambda img: cast(Image, cv2.flip(cv2.transpose(img), -1)),
    8: lambda img: cast(Image, cv2.rotate(img, cv2.ROTATE_90_COUNTERCLOCKWISE)),
}
# complete files only: a truncated one goes to Pillow, which refuses it with a reason (OpenCV
# would fill the missing rows with grey)
_ENDINGS = {"JPEG": b"\xff\xd9", "PNG": b"IEND\xaeB`\x82"}


# OpenCV's reading flags, colour and grey, by the factor libjpeg's DCT scaling shrinks a side
_SHRINK_FLAGS = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2,
                 4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}
_SHRINK_FLAGS_GREY = {1: cv2.IMREAD_GRAYSCALE, 2: cv2.IMREAD_REDUCED_GRAYSCALE_2,
                      4: cv2.IMREAD_REDUCED_GRAYSCALE_4, 8: cv2.IMREAD_REDUCED_GRAYSCALE_8}


def jpeg_shrink(width: int, height: int, bound: PageBound | None) -> int:
    """How much smaller (1, 2, 4 or 8 a side) libjpeg may decode a page that the engine shrinks
    to `bound` anyway: the most that leaves both sides at or above the bound, so the engine
    still only shrinks. A 600-dpi A4 scan or a 24 MP photo decodes at half size: ~3x less CPU
    for decoding and shrinking (154 -> 51 ms a page), a quarter of the memory, and the
    engine's linear shrink from a 2x smaller page aliases less (bag-of-words F1 on the 13
    receipts of ../shared/ocr-eval/sroie larger than 4000 px: 0.9357 -> 0.9422)."""
    if bound is None:
        return 1
    for shrink in (8, 4, 2):
        if (max(width, height) // shrink >= bound.max_side
                and min(width, height) // shrink >= bound.min_side):
            return shrink
    return 1


def opencv_ready(data: bytes, image: PILImage.Image) -> bool:
    """Whether `opencv_decode` can take the file: a complete one-frame 8-bit RGB or grey
    JPEG or PNG."""
    if image.format not in _ENDINGS or image.mode not in ("RGB", "L"):
        return False
    if not data.rstrip(b"\0").endswith(_ENDINGS[image.format]):
        return False
    tile = getattr(image, "tile", None)  # an ImageFile's: (decoder, box, offset, rawmode)
    # 16-bit PNG, or bits packed below 8: Pillow's conversion rules
    return not (image.format == "PNG" and tile and tile[0][3] not in ("RGB", "L"))


def opencv_decode(data: bytes, image: PILImage.Image, shrink: int = 1) -> Image | None:
    """A file `opencv_ready` took, decoded by OpenCV straight to BGR, or to grey for a grey
    file (`to_pixels`), a JPEG `shrink` times smaller a side by libjpeg, turned by its EXIF
    orientation: at full size the same pixels as Pillow's path (tested), ~17% less CPU on
    receipts and one copy of the page instead of three at its peak (Pillow's RGBX, the bytes
    numpy views, the BGR array). None when OpenCV reads it otherwise than Pillow would see it
    (then Pillow decodes it)."""
    grey = image.mode == "L"
    flags = (_SHRINK_FLAGS_GREY if grey else _SHRINK_FLAGS)[shrink]
    pixels = cv2.imdecode(np.frombuffer(data, np.uint8), flags | cv2.IMREAD_IGNORE_ORIENTATION)
    expected: tuple[int, ...] = (-(-image.height // shrink), -(-image.width // shrink))
    if not grey:  # libjpeg rounds each side up
        expected += (3,)
    if pixels is None or pixels.shape != expected:
        return None
    turn = _ORIENT.get(int(image.getexif().get(0x0112, 1) or 1))
    decoded = cast(Image, pixels)
    return turn(decoded) if turn is not None else decoded


def _scale(image: PILImage.Image, shrink: int) -> tuple[float, float]:
    """File pixels per pixel of a page decoded `shrink` times smaller a side, across and
    down the page as turned by its EXIF orientation (libjpeg rounds each side up)."""
    if shrink == 1:
        return 1.0, 1.0
    across = image.width / -(-image.width // shrink)
    down = image.height / -(-image.height // shrink)
    quarter = int(image.getexif().get(0x0112, 1) or 1) in (5, 6, 7, 8)
    return (down, across) if quarter else (across, down)


def iter_pages(data: bytes, ocr: OcrSettings, reserve: Reserve = _no_reserve, *,
               bound: PageBound | None = None, pdf_workers: PdfWorkers | None = None
               ) -> Iterator[Page]:
    """The pages of a file, decoded one at a time. `reserve(nbytes)` is called with a page's
    pixel bytes before it is decoded (it may wait for memory, or raise to stop). With the
    OCR engine's `bound`, a large JPEG may come smaller than the file (`jpeg_shrink`): its
    `Page.scale` maps what is found on it back to the file's pixels. PDF pages are made by
    `pdf_workers` when given (pdfium in worker processes), else in this process."""
    if not data:
        raise DocumentError("empty file (0 bytes)")
    kind = sniff(data)
    if kind == "pdf":
        from daemon.documents.pdf import iter_pdf_pages

        if pdf_workers is not None:
            yield from pdf_workers.pages(data, ocr, reserve)
        else:
            yield from iter_pdf_pages(data, ocr, reserve)
        return
    yield from iter_image_pages(data, ocr, reserve, bound=bound)


def iter_image_pages(data: bytes, ocr: OcrSettings, reserve: Reserve = _no_reserve, *,
                     bound: PageBound | None = None) -> Iterator[Page]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", PILImage.DecompressionBombWarning)
            image = PILImage.open(io.BytesIO(data))
            if image.format not in IMAGE_FORMATS:
                raise DocumentError(f"unsupported image format {image.format}")
            single = getattr(image, "n_frames", 1) == 1
            for index, frame in enumerate(ImageSequence.Iterator(image)):
                if index >= ocr.max_pages:
                    raise DocumentError(f"more than ocr.max_pages={ocr.max_pages} pages")
                width, height = frame.size
                if width * height > ocr.max_image_pixels:
                    raise DocumentError(
                        f"page {index + 1} is {width}x{height} pixels, over "
                        f"ocr.max_image_pixels={ocr.max_image_pixels}"
                    )
                if min(width, height) < MIN_SIDE:
                    raise DocumentError(f"page {index + 1} is too small to OCR ({width}x{height})")
                ready = single and opencv_ready(data, image)
                shrink = (jpeg_shrink(width, height, bound)  # libjpeg's DCT scaling
                          if ready and image.format == "JPEG" else 1)
                depth = 1 if frame.mode in GREY_MODES else 3  # bytes a pixel, decoded
                small = (-(-width // shrink)) * (-(-height // shrink)) * depth
                reserve(small)
                fast = opencv_decode(data, image, shrink) if ready else None
                if fast is not None:
                    scale = _scale(image, shrink)
                    image.close()
                    yield Page(index=index, image=fast, scale=scale)
                    return
                if shrink != 1:  # OpenCV refused it after all: Pillow decodes it whole
                    reserve(width * height * depth - small)
                if index == 0:  # in place: without an orientation tag there is nothing to copy
                    ImageOps.exif_transpose(frame, in_place=True)
                pixels = to_pixels(frame)
                if single:  # Pillow's copy (4 bytes a pixel) must not wait with the page
                    image.close()
                    del frame
                    yield Page(index=index, image=pixels)
                    return
                yield Page(index=index, image=pixels)
    except DocumentError:
        raise
    except UnidentifiedImageError:
        raise DocumentError(f"not a readable image (content looks like: {sniff(data)})") from None
    except (PILImage.DecompressionBombError, PILImage.DecompressionBombWarning) as exc:
        raise DocumentError(f"decompression bomb refused: {exc}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise DocumentError(f"corrupt or truncated image: {exc}") from None
