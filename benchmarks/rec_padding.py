"""How much of the recogniser's GPU batches is text and how much padding, page by page, with the
GPU's fixed width x batch buckets. A script, not a test; it runs on the CPU.

    python -m benchmarks rec-padding --images ../shared/ocr-eval/sroie/img --limit 40
    python -m benchmarks rec-padding --render 20 --a4 --steady warmup.json
    python -m benchmarks rec-padding --images DIR --steady warmup.json --sizes 1,8,128 --waste .5

The batch engine runs as on a GPU (fixed shape buckets and the GPU's batch sizes, `--batch`
pages a call) on the CPU provider; a wrapper round the recogniser's session counts, per batch
it is fed, the pixel columns that hold a line (not the padding value) against the columns
fed. With `--steady`
(the JSON `gpu_warmup.py --engine --sweep-seconds N` prints, measured on a GPU) it also adds
up what those batches would cost that GPU: a projection from per-shape timings, not a run;
`--sizes` and `--waste` plan the batches another way, to compare batch sizes by that
projection.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from benchmarks.common import machine


class CountingSession:
    """Counts text and padding columns of every batch; runs the real session."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.shapes: Counter[tuple[int, ...]] = Counter()
        self.text_columns = 0
        self.fed_columns = 0
        self.lines = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    def run(self, names: Any, feeds: dict[str, Any], *args: Any) -> Any:
        from daemon.ocr.graphs import REC_PAD

        (batch,) = feeds.values()
        self.shapes[tuple(batch.shape)] += 1
        self.fed_columns += batch.shape[0] * batch.shape[2]
        used = (batch != REC_PAD).any(axis=(1, 3))  # [N, W]: a column with any line pixel
        self.text_columns += int(used.sum())
        self.lines += int(used.any(axis=1).sum())
        return self.real.run(names, feeds, *args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", type=Path)
    source.add_argument("--render", type=int, metavar="N")
    parser.add_argument("--a4", action="store_true", help="with --render: dense A4 pages")
    parser.add_argument("--zh", action="store_true",
                        help="with --render: Traditional Chinese pages (a CJK font from Debian)")
    parser.add_argument("--limit", type=int)
    parser.add_argument("--batch", type=int, default=8, help="pages per engine call")
    parser.add_argument("--steady", type=Path, help="gpu_warmup.py's JSON (a GPU's timings)")
    parser.add_argument("--sizes", help="recogniser batch sizes to plan with, e.g. 1,8,32,128 "
                        "(default: the GPU's, buckets.REC_BATCH_SIZES)")
    parser.add_argument("--waste", type=float, help="largest share of a batch that may be "
                        "padding (default: buckets.REC_MAX_WASTE_GPU)")
    args = parser.parse_args(argv)

    from benchmarks.bench import load_pages, source_images
    from daemon.config import OcrSettings
    from daemon.hardware.providers import CPU
    from daemon.ocr import buckets
    from daemon.ocr.batch import BatchEngine

    with tempfile.TemporaryDirectory() as tmp:
        images = source_images(args, Path(tmp))
        ocr = OcrSettings()
        sizes = (tuple(int(n) for n in args.sizes.split(",")) if args.sizes
                 else buckets.REC_BATCH_SIZES)
        engine = BatchEngine(ocr, CPU, max_pages=args.batch, fixed_shapes=True,
                             rec_batch_sizes=sizes, shape_sessions=False)
        if args.waste is not None:
            engine._rec_waste = args.waste  # the plan as it would be with that limit
        counting = CountingSession(engine.sessions["rec"])
        engine._rec = counting  # the engine as it is, its recogniser counted
        pages = [frame for path in images for frame in load_pages(path, ocr)]
        try:
            for start in range(0, len(pages), args.batch):
                engine.recognize(pages[start : start + args.batch])
        finally:
            engine.close()
    report: dict[str, Any] = {
        "pages": len(pages), "lines": counting.lines,
        "runs": sum(counting.shapes.values()),
        "text_columns_per_page": round(counting.text_columns / len(pages)),
        "fed_columns_per_page": round(counting.fed_columns / len(pages)),
        "text_share": round(counting.text_columns / max(1, counting.fed_columns), 3),
        "runs_by_shape": {str(list(k)): v for k, v in sorted(counting.shapes.items())},
    }
    report["sizes"], report["waste"] = list(sizes), engine._rec_waste
    if args.steady:
        engine_rows = json.loads(args.steady.read_text())["engine"]
        known = {tuple(json.loads(key[4:])): row["ms"]
                 for part in ("steady", "sweep") for key, row in engine_rows.get(part, {}).items()
                 if key.startswith("rec ") and "ms" in row}
        ms = scaled_ms = 0.0
        missing = []
        for shape, runs in counting.shapes.items():
            if shape in known:
                ms += known[shape] * runs
                continue
            # a batch size timed at other widths: scaled by width from the nearest one timed
            widths = [s[2] for s in known if s[0] == shape[0]]
            if not widths:
                missing.append(str(list(shape)))
                continue
            near = min(widths, key=lambda w: abs(w - shape[2]))
            scaled_ms += known[(shape[0], shape[1], near, shape[3])] * shape[2] / near * runs
        report["projected_gpu_rec_ms_per_page"] = round((ms + scaled_ms) / len(pages), 2)
        report["of_which_scaled_by_width"] = round(scaled_ms / len(pages), 2)
        report["projection_note"] = ("sum of per-shape GPU timings from " + str(args.steady)
                                     + " (its steady and sweep tables), not a run; a shape not "
                                     "timed but its batch size at another width scaled by "
                                     "width; shapes with neither: "
                                     + (", ".join(missing) or "none"))
    print(json.dumps({**report, "machine": machine()}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
