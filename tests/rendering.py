"""Pages rendered with Pillow's own scalable font, so OCR tests need no files from outside."""

from __future__ import annotations

import random

import numpy as np
from PIL import Image as PILImage
from PIL import ImageDraw, ImageFont

from daemon.results import Image

WORDS = (
    "invoice", "total", "amount", "paid", "cash", "change", "receipt", "number", "date",
    "customer", "address", "street", "city", "station", "coffee", "bread", "milk", "butter",
    "cheese", "apples", "orange", "tax", "discount", "quantity", "price", "thank", "you", "for",
    "shopping", "with", "us", "please", "come", "again", "order", "table", "server", "guest",
)


def render_page(
    lines: list[str],
    *,
    width: int = 900,
    font_size: int = 32,
    margin: int = 40,
    line_gap: int = 18,
    angle: int = 0,
    font: ImageFont.FreeTypeFont | None = None,
) -> Image:
    """A white page with `lines` in black, as a BGR array (what the engines take); in `font`
    (loaded at `font_size`) where one is given, else Pillow's own."""
    if font is None:
        font = ImageFont.load_default(size=font_size)
    height = 2 * margin + len(lines) * (font_size + line_gap)
    page = PILImage.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(page)
    for i, line in enumerate(lines):
        draw.text((margin, margin + i * (font_size + line_gap)), line, fill="black", font=font)
    if angle:
        page = page.rotate(angle, expand=True, fillcolor="white")
    rgb = np.asarray(page, dtype=np.uint8)
    return np.ascontiguousarray(rgb[:, :, ::-1])


def random_lines(seed: int, count: int, words_per_line: tuple[int, int] = (2, 6)) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(count):
        words = [rng.choice(WORDS) for _ in range(rng.randint(*words_per_line))]
        if rng.random() < 0.5:
            words.append(f"{rng.randint(1, 999)}.{rng.randint(0, 99):02d}")
        lines.append(" ".join(words))
    return lines
