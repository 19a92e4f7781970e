"""Test fixtures made by the tests: pages of text rendered with Pillow, and fuzzy matching."""

from __future__ import annotations

import io
import re
from difflib import SequenceMatcher
from pathlib import Path

from PIL import Image

from tests import rendering

SENTENCES = [
    "The quick brown fox jumps over the lazy dog",
    "Invoice number 48213 due on 12 March 2026",
    "Please deliver the parcel to the north gate",
    "Seven lighthouse keepers counted purple waves",
    "Total amount payable 1280 euros",
    "Meeting moved to Thursday afternoon",
]


def render_page(lines: list[str], *, size: int = 36, width: int = 1200,
                margin: int = 60) -> Image.Image:
    """`tests.rendering.render_page`, as a Pillow image (for files and PDFs)."""
    bgr = rendering.render_page(lines, width=width, font_size=size, margin=margin,
                                line_gap=int(size * 0.8))
    return Image.fromarray(bgr[:, :, ::-1].copy())


def page_bytes(lines: list[str], fmt: str = "PNG", **kwargs: int) -> bytes:
    buffer = io.BytesIO()
    render_page(lines, **kwargs).save(buffer, fmt)
    return buffer.getvalue()


def write_page(path: Path, lines: list[str], fmt: str | None = None) -> Path:
    """Write atomically (temp name, then rename), as a well-behaved producer does."""
    fmt = fmt or {".jpg": "JPEG", ".jpeg": "JPEG", ".tif": "TIFF", ".tiff": "TIFF",
                  ".bmp": "BMP", ".webp": "WEBP"}.get(path.suffix.lower(), "PNG")
    temp = path.with_name(path.name + ".part")
    temp.write_bytes(page_bytes(lines, fmt))
    temp.rename(path)
    return path


def normalise(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def similarity(a: str, b: str) -> float:
    return SequenceMatcher(None, normalise(a), normalise(b)).ratio()
