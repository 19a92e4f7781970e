"""How much of the recogniser's GPU batches is text and how much padding, page by page, with the
GPU's fixed width x batch buckets. A script, not a test; it runs on the CPU.

    python benchmarks/rec_padding.py --images ../shared/ocr-eval/sroie/img --limit 40
    python benchmarks/rec_padding.py --render 20 --a4 --steady warmup.json

The batch engine runs as on a GPU (fixed shape buckets and the GPU's batch sizes, `--batch`
pages a call) on the CPU provider; a wrapper round the recogniser's session counts, per batch
it is fed, the pixel columns that hold a line (not the padding value) against the columns
fed. With `--steady`
(the JSON `gpu_warmup.py --engine` prints, measured on a GPU) it also adds up what those
batches would cost that GPU: a projection from per-shape timings, not a run.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


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


def main() -> int:
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
    args = parser.parse_args()

    from bench import load_pages, source_images

    from daemon.config import OcrSettings
    from daemon.hardware.providers import CPU
    from daemon.ocr import buckets
    from daemon.ocr.batch import BatchEngine

    with tempfile.TemporaryDirectory() as tmp:
        images = source_images(args, Path(tmp))
        ocr = OcrSettings()
        engine = BatchEngine(ocr, CPU, max_pages=args.batch, fixed_shapes=True,
                             rec_batch_sizes=buckets.REC_BATCH_SIZES, shape_sessions=False)
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
    if args.steady:
        steady = json.loads(args.steady.read_text())["engine"]["steady"]
        known = {key: row["ms"] for key, row in steady.items() if key.startswith("rec ")}
        ms = 0.0
        missing = []
        for shape, runs in counting.shapes.items():
            key = f"rec {list(shape)}"
            if key in known:
                ms += known[key] * runs
            else:
                missing.append(key)
        report["projected_gpu_rec_ms_per_page"] = round(ms / len(pages), 2)
        report["projection_note"] = ("sum of per-shape GPU timings from " + str(args.steady)
                                     + ", not a run; shapes without a timing: "
                                     + (", ".join(missing) or "none"))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
