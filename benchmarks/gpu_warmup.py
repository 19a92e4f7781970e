"""What a new input shape costs the recogniser on a GPU, per cuDNN algorithm search mode, and
whether warming shapes in parallel threads shortens the daemon's start. A script, not a test.

    python benchmarks/gpu_warmup.py --algos HEURISTIC,DEFAULT --threads 4

For each mode, on a fresh recogniser session built as the daemon builds it (the on-device
arg-max appended): the first and second run of each of a few shapes one after another, then
a second set of shapes of the same sizes warmed by `warm_shapes` in threads. Prints ONE JSON
object; `choice` is the mode whose new shapes cost least unless its steady runs are more than
`--steady-slack` slower than the fastest mode's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# two sets of equal sizes (batch x width), as the recogniser's buckets give them
ONE_BY_ONE = [(1, 48, 640, 3), (8, 48, 1280, 3), (32, 48, 480, 3)]
IN_THREADS = [(1, 48, 800, 3), (8, 48, 960, 3), (32, 48, 320, 3)]
STEADY = (32, 48, 960, 3)


def measure(algo: str, threads: int) -> dict[str, Any]:
    import numpy as np

    from daemon.config import OcrSettings, Settings
    from daemon.hardware.providers import choose_provider
    from daemon.hardware.sessions import create_session, provider_name
    from daemon.ocr import buckets
    from daemon.ocr.batch import warm_shapes
    from daemon.ocr.device import run_split
    from daemon.ocr.graphs import rec_model
    from daemon.ocr.host import rec_lut
    from daemon.ocr.models import load_rapidocr_config, resolve_model_paths

    ocr = OcrSettings(cudnn_conv_algo_search=algo)  # type: ignore[arg-type]
    start = time.perf_counter()
    choice = choose_provider(Settings(ocr=ocr))
    paths = resolve_model_paths(ocr, load_rapidocr_config(ocr))
    session = create_session(rec_model(paths.rec, rec_lut()), choice, ocr)
    out: dict[str, Any] = {"provider": provider_name(session),
                           "load_s": round(time.perf_counter() - start, 3)}

    def run(shape: tuple[int, ...]) -> float:
        t0 = time.perf_counter()
        run_split(session, np.zeros(shape, np.uint16), shape[0])
        return time.perf_counter() - t0

    first = {str(list(s)): round(run(s), 3) for s in ONE_BY_ONE}
    second = {str(list(s)): round(run(s), 4) for s in ONE_BY_ONE}
    out["one_by_one_first_s"], out["one_by_one_second_s"] = first, second
    t0 = time.perf_counter()
    warm_shapes(session, IN_THREADS, np.uint16, threads, "rec")
    out["in_threads_s"] = round(time.perf_counter() - t0, 3)
    out["one_by_one_s"] = round(sum(first.values()), 3)
    run(STEADY)
    out["steady_s"] = round(statistics.median(run(STEADY) for _ in range(5)), 4)
    out["steady_shape"] = list(STEADY)
    new_shape = (sum(first.values()) - sum(second.values())) / len(ONE_BY_ONE)
    shapes = len(buckets.REC_WIDTHS) * len(buckets.REC_BATCH_SIZES)
    out["new_shape_s"] = round(new_shape, 3)
    out["rec_warmup_estimate_one_by_one_s"] = round(new_shape * shapes, 1)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--algos", default="HEURISTIC,DEFAULT")
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--steady-slack", type=float, default=1.25)
    args = parser.parse_args()
    report: dict[str, Any] = {"threads": args.threads, "modes": {}}
    for algo in args.algos.split(","):
        report["modes"][algo] = measure(algo, args.threads)
        print(json.dumps({algo: report["modes"][algo]}), file=sys.stderr, flush=True)
    fastest = min(m["steady_s"] for m in report["modes"].values())
    fit = {a: m for a, m in report["modes"].items() if m["steady_s"] <= fastest * args.steady_slack}
    report["choice"] = min(fit, key=lambda a: fit[a]["new_shape_s"])
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
