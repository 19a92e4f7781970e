"""Pages per second out of `iter_pdf_pages`: text layers taken vs pages rendered (no OCR).

Generates its own 20-page PDFs: born-digital pages (45 lines of Helvetica each, ~2,600
characters, like a dense letter) and image-only scans (Letter at 200 dpi, as a scanner writes
them). Prints one JSON object.

    python -m benchmarks pdf-pages [--pages 20] [--dpi 200] [--repeat 5] [--threads N]

Then the scans again through N decoding threads at once (the daemon's decode pool), pdfium in
this process (one lock) against pdfium in N worker processes (`batch.pdf_processes`).
"""

from __future__ import annotations

import argparse
import ctypes
import io
import json
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pypdfium2 as pdfium
import pypdfium2.raw as pdfium_c
from PIL import Image as PILImage
from PIL import ImageDraw

from benchmarks.common import machine
from daemon.config import OcrSettings
from daemon.documents.pdf import iter_pdf_pages
from daemon.documents.pdf_workers import PdfWorkers

WORDS = [
    "the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "invoices",
    "2024", "total", "EUR",
]


def text_pdf(pages: int, lines: int = 45) -> bytes:
    pdf = pdfium.PdfDocument.new()
    font = pdfium.PdfFont.load_standard(pdf, "Helvetica")
    for p in range(pages):
        page = pdf.new_page(612, 792)
        for i in range(lines):
            text = " ".join(WORDS[(p + i + k) % len(WORDS)] for k in range(11)) + f" {p}.{i}"
            obj = pdfium_c.FPDFPageObj_CreateTextObj(pdf, font, 10.0)
            wide = (text + "\0").encode("utf-16-le")
            utf16 = (ctypes.c_ushort * (len(wide) // 2)).from_buffer_copy(wide)
            pdfium_c.FPDFText_SetText(obj, utf16)
            pdfium_c.FPDFPageObj_Transform(obj, 1, 0, 0, 1, 72, 740 - 15 * i)
            pdfium_c.FPDFPage_InsertObject(page, obj)
        page.gen_content()
        page.close()
    out = io.BytesIO()
    pdf.save(out)
    pdf.close()
    return out.getvalue()


def scan_pdf(pages: int, dpi: int = 200) -> bytes:
    frames = []
    for p in range(pages):
        image = PILImage.new("L", (int(8.5 * dpi), 11 * dpi), 255)
        draw = ImageDraw.Draw(image)
        for i in range(45):
            draw.text((dpi, dpi + i * 40), " ".join(WORDS) + f" {p}.{i}", fill=0)
        frames.append(image)
    out = io.BytesIO()
    frames[0].save(out, "PDF", resolution=dpi, save_all=True, append_images=frames[1:])
    return out.getvalue()


def pages_per_second(data: bytes, ocr: OcrSettings, repeat: int) -> dict[str, Any]:
    rates = []
    kinds: set[str] = set()
    for _ in range(repeat):
        start = time.perf_counter()
        count = 0
        for page in iter_pdf_pages(data, ocr):
            kinds.add("text_layer" if page.text_layer is not None else "image")
            count += 1
        rates.append(count / (time.perf_counter() - start))
    return {
        "pages": count,
        "kind": "/".join(sorted(kinds)),
        "pages_per_s_median": round(statistics.median(rates), 1),
        "pages_per_s_best": round(max(rates), 1),
        "ms_per_page_median": round(1000 / statistics.median(rates), 2),
    }


def parallel_pages_per_second(scans: bytes, ocr: OcrSettings, threads: int, repeat: int,
                              workers: PdfWorkers | None) -> dict[str, Any]:
    """`threads` decoding threads, each through its own copy of the scans, at once (the
    daemon's decode pool): pdfium in this process (one lock) or in `workers`."""
    copies = [scans + b"\n%" + str(k).encode() + b"\n" for k in range(threads)]  # distinct

    def one(data: bytes) -> int:
        if workers is None:
            return sum(1 for _ in iter_pdf_pages(data, ocr))
        return sum(1 for _ in workers.pages(data, ocr, lambda _nbytes: None))

    rates = []
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, copies))  # workers started, caches warm
        for _ in range(repeat):
            start = time.perf_counter()
            count = sum(pool.map(one, copies))
            rates.append(count / (time.perf_counter() - start))
    return {"threads": threads, "pdf_processes": workers.processes if workers else 0,
            "pages_per_s_median": round(statistics.median(rates), 1)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=int, default=20)
    parser.add_argument("--dpi", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="decoding threads for the parallel figures (default: the cores)")
    args = parser.parse_args(argv)

    born_digital = text_pdf(args.pages)
    scans = scan_pdf(args.pages)
    prefer = OcrSettings(pdf_dpi=args.dpi, pdf_text_layer="prefer")
    ignore = OcrSettings(pdf_dpi=args.dpi, pdf_text_layer="ignore")
    result = {
        "benchmark": "pdf_pages",
        "dpi": args.dpi,
        "repeat": args.repeat,
        "text_layer": pages_per_second(born_digital, prefer, args.repeat),
        "render_born_digital": pages_per_second(born_digital, ignore, args.repeat),
        "render_scans": pages_per_second(scans, prefer, args.repeat),
        "pdf_bytes": {"born_digital": len(born_digital), "scans": len(scans)},
    }
    workers = PdfWorkers(args.threads)
    try:
        result["render_scans_in_parallel"] = {
            "in_process": parallel_pages_per_second(scans, prefer, args.threads, args.repeat,
                                                    None),
            "in_pdf_worker_processes": parallel_pages_per_second(
                scans, prefer, args.threads, args.repeat, workers),
        }
    finally:
        workers.close()
    result |= {
        "pypdfium2": pdfium.PYPDFIUM_INFO.version,
        "pdfium": pdfium.PDFIUM_INFO.version,
    }
    print(json.dumps({**result, "machine": machine()}, indent=2))


if __name__ == "__main__":
    main()
