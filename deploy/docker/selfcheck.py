"""Build-time check of the image: the OCR models are in the image and the engine runs offline.

Run by the Dockerfile under `RUN --network=none`, so a model that RapidOCR would fetch at run
time fails the build instead of the first container start. Also checks that the CUDA execution
provider is compiled into the installed onnxruntime (onnxruntime-gpu, not the CPU build), and
that the daemon's own engine reads the line too: it edits the models for the device (the onnx
package, offline) and caches them ($XDG_CACHE_HOME), so the image ships them ready. No GPU is
needed: the OCR itself runs on the CPU provider here.

Usage: python selfcheck.py [--require-cuda-provider]
"""

from __future__ import annotations

import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    import numpy as np
    import onnxruntime as ort
    import rapidocr
    from PIL import Image, ImageDraw, ImageFont
    from rapidocr import RapidOCR

    providers = ort.get_available_providers()
    print(f"onnxruntime {ort.__version__}: {providers}")
    if "--require-cuda-provider" in argv and "CUDAExecutionProvider" not in providers:
        print("FAIL: CUDAExecutionProvider missing: the CPU-only onnxruntime is installed")
        return 1

    models = sorted(Path(rapidocr.__file__).parent.joinpath("models").glob("*.onnx"))
    print("bundled models:", ", ".join(p.name for p in models))
    kinds = {kind: [p for p in models if kind in p.name] for kind in ("det", "rec", "cls")}
    missing = [kind for kind, found in kinds.items() if not found]
    if missing:
        print(f"FAIL: no bundled {'/'.join(missing)} model among {[p.name for p in models]}")
        return 1

    image = Image.new("RGB", (640, 120), "white")
    font = ImageFont.load_default(size=56)
    ImageDraw.Draw(image).text((16, 24), "Invoice 2024", fill="black", font=font)
    result = RapidOCR()(np.asarray(image))
    text = " ".join(getattr(result, "txts", None) or ())
    print(f"OCR of a rendered line: {text!r}")
    if "2024" not in text:
        print("FAIL: the engine ran but did not read the test line")
        return 1

    from daemon.config import OcrSettings
    from daemon.hardware.providers import CPU
    from daemon.ocr.batch import BatchEngine

    engine = BatchEngine(OcrSettings(), CPU)
    try:
        bgr = np.ascontiguousarray(np.asarray(image)[:, :, ::-1])
        [page] = engine.recognize([bgr])
    finally:
        engine.close()
    print(f"the daemon's engine read: {page.text!r}")
    if "2024" not in page.text:
        print("FAIL: the daemon's engine ran but did not read the test line")
        return 1
    print("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
