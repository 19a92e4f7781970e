"""What the GPU's fixed line widths cost in text: bag-of-words F1 of the batch engine with the
GPU's shapes, run on the CPU, for ladders of widths and ways of fitting a line to one, against
the CPU path on the same pages. A script, not a test.

    python -m benchmarks rec-widths --images ../shared/ocr-eval/sroie/img
    python -m benchmarks rec-widths --images DIR --variants "cpu own nearest@1.2 up@1.3"

Variants (`--variants`, space-separated):
  cpu           the CPU path as the daemon runs it there (pages at their own size, each line
                alone at its own width from 128 px)
  own           the GPU's detection buckets, each line at its own width from 320 (RapidOCR's
                floor): no width ladder at all
  RULE@LADDER   the GPU's detection buckets and a width ladder: LADDER is a growth factor
                (rungs from 160, multiples of 32, up to 3200, as `buckets.rec_width_ladder`)
                or widths joined by "/"; RULE says where a line wider than the first rung
                goes (a narrower one is padded up to it): "up" pads it to the next rung,
                "down" squeezes it to the one below, "nearest" takes the nearer by ratio (the
                daemon's rule)
  daemon        the engine exactly as the daemon runs it on a GPU, batches included
  fp16          `daemon` with both models in half precision (ocr.gpu_precision = "fp16"), run
                by onnxruntime's CPU: float16 numbers, casting around the nodes it has no
                float16 kernel for; F1 only (its speed means nothing here)

Each RULE@LADDER line runs alone at its width (a line's output does not depend on the rest of
its batch: the `daemon` variant shows it), so only the widths differ between variants.
Prints ONE JSON object on stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import machine

OLD_LADDER = "320/480/640/800/960/1280/1600/1920/2560/3200"  # the ladder before nearest widths
FROM_320 = "320/384/480/576/704/864/1056/1280/1536/1856/2240/2688/3232"  # before the 160 floor
DEFAULT_VARIANTS = (f"cpu own daemon up@{OLD_LADDER} nearest@{FROM_320} up@1.2 down@1.2 "
                    "nearest@1.2 nearest@1.3")


def fitter(spec: str) -> tuple[Callable[[int], int], int]:
    """`RULE@LADDER` -> (needed width -> fed width, rungs)."""
    import bisect

    from daemon.ocr import buckets

    rule, _, ladder_spec = spec.partition("@")
    if "/" in ladder_spec:
        ladder = tuple(int(w) for w in ladder_spec.split("/"))
    else:
        ladder = buckets.rec_width_ladder(float(ladder_spec))
    if rule == "nearest":
        return (lambda needed: buckets.rec_bucket_width(needed, ladder)), len(ladder)
    if rule not in ("up", "down"):
        raise SystemExit(f"unknown rule in {spec!r}: up, down or nearest")

    def fit(needed: int) -> int:
        if needed <= ladder[0]:
            return ladder[0]
        if needed > ladder[-1]:
            return -(-needed // buckets.REC_WIDTH_STEP_BEYOND) * buckets.REC_WIDTH_STEP_BEYOND
        index = bisect.bisect_left(ladder, needed)
        if rule == "up" or ladder[index] == needed:
            return ladder[index]
        return ladder[index - 1]

    return fit, len(ladder)


def build(variant: str, ocr: Any) -> tuple[Any, dict[str, Any]]:
    from daemon.hardware.providers import CPU
    from daemon.ocr import buckets
    from daemon.ocr.batch import BatchEngine

    gpu_shapes: dict[str, Any] = {"fixed_shapes": True, "shape_sessions": False,
                                  "rec_batch_sizes": buckets.REC_BATCH_SIZES}
    if variant == "cpu":
        return BatchEngine(ocr, CPU, max_pages=8), {}
    if variant == "daemon":
        return BatchEngine(ocr, CPU, max_pages=8, **gpu_shapes), {
            "rungs": len(buckets.REC_WIDTHS)}
    if variant == "fp16":
        import functools

        from daemon.ocr import batch

        # the engine asks for fp16 models on a GPU only: here, on the CPU, by hand
        real = batch.det_model, batch.rec_model
        batch.det_model = functools.partial(batch.det_model, fp16=True)  # type: ignore[assignment]
        batch.rec_model = functools.partial(batch.rec_model, fp16=True)  # type: ignore[assignment]
        try:
            return BatchEngine(ocr, CPU, max_pages=8, **gpu_shapes), {"precision": "fp16"}
        finally:
            batch.det_model, batch.rec_model = real
    if variant == "own":
        fit: Callable[[int], int] = lambda needed: max(buckets.REC_MIN_WIDTH, needed)  # noqa: E731
        extra: dict[str, Any] = {}
    else:
        fit, rungs = fitter(variant)
        extra = {"rungs": rungs}

    class OneLineAWidth(BatchEngine):
        def _rec_plan(self, order: list[int], needed: list[int]
                      ) -> Iterator[tuple[int, list[int], int]]:
            for k in order:
                yield fit(needed[k]), [k], 1

    return OneLineAWidth(ocr, CPU, max_pages=8, **gpu_shapes), extra


def run(variant: str, images: Sequence[Path], lang: str) -> dict[str, Any]:
    from benchmarks.bench import load_pages, score, truth_for
    from daemon.config import OcrSettings

    ocr = OcrSettings(lang=lang)
    engine, report = build(variant, ocr)
    pairs = []
    start = time.perf_counter()
    try:
        for path in images:
            truth = truth_for(path)
            results = engine.recognize(list(load_pages(path, ocr)))
            if truth is not None:
                pairs.append(("\n".join(line.text for r in results for line in r.lines), truth))
    finally:
        engine.close()
    report.update(score(pairs) or {})
    report["seconds"] = round(time.perf_counter() - start, 1)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", type=Path)
    source.add_argument("--render", type=int, metavar="N", help="N rendered pages (bench.py)")
    parser.add_argument("--a4", action="store_true", help="with --render: dense A4 pages")
    parser.add_argument("--zh", action="store_true",
                        help="with --render: Traditional Chinese pages (a CJK font from Debian)")
    parser.add_argument("--limit", type=int)
    parser.add_argument("--lang", default="ch", help="ocr.lang (chinese_cht: Traditional output)")
    parser.add_argument("--variants", default=DEFAULT_VARIANTS)
    args = parser.parse_args(argv)

    from benchmarks.bench import say, source_images

    report: dict[str, Any] = {"benchmark": "recognition widths on the GPU's shapes, on the CPU",
                              "variants": {}}
    with tempfile.TemporaryDirectory() as tmp:
        images = source_images(args, Path(tmp))
        report["pages"] = len(images)
        for variant in args.variants.split():
            say(f"{variant} ...")
            report["variants"][variant] = run(variant, images, args.lang)
    cpu = report["variants"].get("cpu", {}).get("f1")
    if cpu is not None:
        for row in report["variants"].values():
            row["f1_minus_cpu"] = round(row["f1"] - cpu, 4)
    print(json.dumps({**report, "machine": machine()}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
