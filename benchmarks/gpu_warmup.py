"""What changing input shapes costs the recogniser on a GPU, one session against a session per
shape, per cuDNN algorithm search mode; and the daemon engine's whole warm-up. A script, not a
test.

    python -m benchmarks gpu-warmup --algos HEURISTIC --engine --sweep-seconds 30

onnxruntime's CUDA convolutions (cuDNN 9 builds) build a cuDNN plan per node whenever a run's
input shape differs from that node's previous run. For each mode, on the recogniser as the
daemon builds it (on-device arg-max appended): three shapes taken in turn, twice, in ONE
session (every run pays the plans), then the same in a session PER shape (`ShapeSessions`:
only each session's first run does), then one shape run again (steady). `--engine` then times
`BatchEngine.warmup()` (every bucket, in threads; `session_builds`: the sessions it built,
one at a time, and their seconds summed), reads the GPU memory the process holds (NVML),
times each warmed shape run again (what a batch costs by its shape: the data for the
batch sizes) and two recogniser shapes run from two threads at once against one after the
other; with `--sweep-seconds`, batches bigger than the engine's (SWEEP), each on a session of
its own, with the memory they take, then some of the same shapes in half precision
(SWEEP_FP16), each part for up to that long. Prints ONE JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from benchmarks.common import machine

TAKING_TURNS = [(1, 48, 640, 3), (8, 48, 1280, 3), (32, 48, 480, 3)]
STEADY = (32, 48, 960, 3)
# Batches bigger than the engine's (lines 1, 8, 32; pages up to --batch 8), smallest first: what
# bigger batch sizes would buy per line or page, and the GPU memory they take
SWEEP = ([("rec", (n, 48, w, 3)) for w in (320, 960) for n in (32, 64, 128, 256)]
         + [("det", (n, 960, 960, 3)) for n in (8, 16, 32)])
# the same in half precision (ocr.gpu_precision = "fp16"), against the float32 rows above and
# the steady table: what fp16 buys
SWEEP_FP16 = ([("rec", (n, 48, w, 3)) for w in (320, 960) for n in (32, 128)]
              + [("det", (n, 960, 960, 3)) for n in (4, 8)])


def gpu_bytes_held() -> int | None:
    """GPU memory this process holds, by NVML (None without it)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
            if proc.pid == os.getpid():
                return int(proc.usedGpuMemory or 0)
    except Exception:
        return None
    return None


def cudnn_version() -> str | None:
    """The cuDNN this process loaded (after a CUDA session ran), by its own cudnnGetVersion.
    Plans of depthwise convolutions are reported to take ~1.5 s longer to build from cuDNN
    9.10 on (runtime compilation; the recogniser is full of them), so the version says which
    side of that a warm-up's figures are on."""
    import ctypes

    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    paths = sorted({line.split()[-1] for line in maps.splitlines()
                    if "/libcudnn.so" in line and line.split()[-1].startswith("/")})
    for path in paths:
        try:
            version = int(ctypes.CDLL(path).cudnnGetVersion())
        except (OSError, AttributeError):
            continue
        return f"{version // 10000}.{version // 100 % 100}.{version % 100} ({path})"
    return None


def measure(algo: str) -> dict[str, Any]:
    import numpy as np

    from daemon.config import OcrSettings, Settings
    from daemon.hardware.providers import choose_provider
    from daemon.hardware.sessions import create_session, provider_name
    from daemon.ocr.device_runs import ShapeSessions, run_split
    from daemon.ocr.graphs import rec_model
    from daemon.ocr.host import rec_lut
    from daemon.ocr.models import load_rapidocr_config, resolve_model_paths

    ocr = OcrSettings(cudnn_conv_algo_search=algo)  # type: ignore[arg-type]
    choice = choose_provider(Settings(ocr=ocr))
    model = rec_model(resolve_model_paths(ocr, load_rapidocr_config(ocr)).rec, rec_lut())

    def make() -> Any:
        return create_session(model, choice, ocr, shared_arena=True)

    def run(session: Any, shape: tuple[int, ...]) -> float:
        t0 = time.perf_counter()
        run_split(session, np.zeros(shape, np.uint16), shape[0])
        return round(time.perf_counter() - t0, 4)

    def turns(session: Any) -> list[list[float]]:
        return [[run(session, shape) for shape in TAKING_TURNS] for _ in range(2)]

    one = make()
    out: dict[str, Any] = {"provider": provider_name(one), "shapes": TAKING_TURNS}
    out["one_session_s"] = turns(one)
    per_shape = ShapeSessions(one, lambda shape: make())
    t0 = time.perf_counter()
    for shape in TAKING_TURNS:
        per_shape.adopt(shape)
    out["per_shape_sessions_built_s"] = round(time.perf_counter() - t0, 3)
    out["per_shape_s"] = turns(per_shape)
    run(per_shape, STEADY)
    out["steady_s"] = statistics.median(run(per_shape, STEADY) for _ in range(5))
    out["steady_shape"] = STEADY
    return out


def timed_build(make: Any, seconds: list[float]) -> Any:
    def timed() -> Any:
        start = time.perf_counter()
        try:
            return make()
        finally:
            seconds.append(time.perf_counter() - start)

    return timed


def engine_warmup(seconds: float, sweep_seconds: float = 0) -> dict[str, Any]:
    import numpy as np

    from daemon.config import Settings
    from daemon.hardware.providers import choose_provider
    from daemon.ocr.batch import INPUT_DTYPES, BatchEngine
    from daemon.ocr.device_runs import ShapeSessions, run_split

    settings = Settings()
    start = time.perf_counter()
    engine = BatchEngine(settings.ocr, choose_provider(settings), max_pages=8)
    built = time.perf_counter() - start
    # each session the warm-up builds, timed (one at a time, beside the other shapes' first runs)
    builds: list[float] = []
    for session in engine.sessions.values():
        if isinstance(session, ShapeSessions):
            session._make = timed_build(session._make, builds)
    try:
        spent = engine.warmup(seconds=seconds)  # the daemon's 60 s or more: how long it takes
        warm = engine.warmup_shapes()
        out: dict[str, Any] = {
            "provider": engine.provider, "built_s": round(built, 2),
            "warmup_s": {k: round(v, 2) for k, v in spent.items()},
            "shapes": {k: len(v) for k, v in warm.items()},
            # shapes with a session of their own once the warm-up returned (the rest: cold)
            "shapes_warmed": {k: len(getattr(session, "shapes", ()))
                              for k, session in engine.sessions.items()},
            "gpu_bytes_held": gpu_bytes_held(),
            "session_builds": {"count": len(builds), "total_s": round(sum(builds), 2),
                               "max_s": round(max(builds, default=0.0), 3)},
        }
        # the shapes timed below: those the warm-up reached (a cold one would plan in the loop)
        # (the CPU, one session a model, warms its smallest shape only)
        timed = {model: ([s for s in shapes if s in set(session.shapes)]
                         if isinstance(session, ShapeSessions)
                         else [min(shapes, key=lambda shape: math.prod(shape))] if shapes
                         else [])
                 for model, shapes in warm.items()
                 if (session := engine.sessions.get(model)) is not None}
        # every warmed shape, run again on its own session: what a batch costs by its shape
        # (median of 5, ms; per line or page, and per pixel column for the recogniser)
        steady: dict[str, dict[str, Any]] = {}
        for model, shapes in timed.items():
            session = engine.sessions[model]
            for shape in shapes:
                batch = np.zeros(shape, INPUT_DTYPES[model])
                times = []
                for _ in range(5):
                    t0 = time.perf_counter()
                    run_split(session, batch, shape[0])
                    times.append(time.perf_counter() - t0)
                ms = statistics.median(times) * 1000
                row = {"ms": round(ms, 2), "ms_each": round(ms / shape[0], 3)}
                if model == "rec":
                    row["us_per_column"] = round(1000 * ms / (shape[0] * shape[2]), 3)
                steady[f"{model} {list(shape)}"] = row
        out["steady"] = steady
        # two threads on two shapes' sessions at once against one after the other
        session = engine.sessions["rec"]
        warmed = timed["rec"]
        pair = [s for s in warmed if s[0] == max(x[0] for x in warmed)][:2] if warmed else []

        def runs(shape: tuple[int, ...]) -> None:
            for _ in range(10):
                run_split(session, np.zeros(shape, np.uint16), shape[0])

        t0 = time.perf_counter()
        for shape in pair:
            runs(shape)
        one_after = time.perf_counter() - t0
        t0 = time.perf_counter()
        with ThreadPoolExecutor(2) as pool:
            list(pool.map(runs, pair))
        out["two_in_flight"] = {"shapes": pair, "runs_each": 10,
                                "one_after_the_other_s": round(one_after, 3),
                                "two_threads_s": round(time.perf_counter() - t0, 3)}
        out["gpu_bytes_held_after"] = gpu_bytes_held()
        if sweep_seconds > 0:
            out["sweep"] = batch_sweep(engine.sessions, SWEEP, sweep_seconds)
            # the engine's own sessions of the float16 models (ocr.gpu_precision = "fp16")
            half = BatchEngine(settings.ocr.model_copy(update={"gpu_precision": "fp16"}),
                               engine._choice, max_pages=8)
            try:
                out["sweep_fp16"] = batch_sweep(half.sessions, SWEEP_FP16, sweep_seconds)
            finally:
                half.close()
        return out
    finally:
        engine.close()


def batch_sweep(sessions: dict[str, Any], sweep: list[tuple[str, tuple[int, ...]]],
                seconds: float) -> dict[str, Any]:
    """Each `sweep` shape on a session of its own (`ShapeSessions.adopt`): its first run (the
    plans, not a batch's cost), then the median of 5 runs in ms, per line or page, per pixel
    column for the recogniser, and the GPU memory the process holds after it. No shape starts
    after `seconds`; one that runs out of memory is reported as such and ends its model's
    sweep (the larger ones would too)."""
    import numpy as np

    from daemon.ocr.batch import INPUT_DTYPES
    from daemon.ocr.device_runs import is_out_of_memory

    deadline = time.monotonic() + seconds
    rows: dict[str, dict[str, Any]] = {}
    failed: set[str] = set()
    for model, shape in sweep:
        key = f"{model} {list(shape)}"
        if model in failed or model not in sessions:
            continue
        if time.monotonic() >= deadline:
            rows[key] = {"skipped": f"past --sweep-seconds {seconds:g}"}
            continue
        owner = sessions[model]
        session = owner.adopt(shape) if hasattr(owner, "adopt") else owner  # CPU: one session
        name = session.get_inputs()[0].name
        batch = {name: np.zeros(shape, INPUT_DTYPES[model])}
        try:
            t0 = time.perf_counter()
            session.run(None, batch)
            first = time.perf_counter() - t0
            times = []
            for _ in range(5):
                t0 = time.perf_counter()
                session.run(None, batch)
                times.append(time.perf_counter() - t0)
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            rows[key] = {"out_of_memory": True}
            failed.add(model)
            continue
        ms = statistics.median(times) * 1000
        row = {"first_s": round(first, 2), "ms": round(ms, 2), "ms_each": round(ms / shape[0], 3),
               "gpu_bytes_held": gpu_bytes_held()}
        if model == "rec":
            row["us_per_column"] = round(1000 * ms / (shape[0] * shape[2]), 3)
        rows[key] = row
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--algos", default="HEURISTIC")
    parser.add_argument("--engine", action="store_true", help="also time the engine's warm-up")
    parser.add_argument("--warmup-seconds", type=float, default=float("inf"),
                        help="the engine warm-up starts no shape after this (default: none)")
    parser.add_argument("--sweep-seconds", type=float, default=0,
                        help="with --engine: time bigger batches (SWEEP), then fp16 ones "
                             "(SWEEP_FP16), for up to this long each")
    args = parser.parse_args(argv)
    report: dict[str, Any] = {"cudnn": cudnn_version()}
    # the engine's figures first (the daemon's own warm-up): a run cut short still has them,
    # each part printed to stderr as one JSON line the moment it is measured
    if args.engine:
        report["engine"] = engine_warmup(args.warmup_seconds, args.sweep_seconds)
        print(json.dumps({"engine": report["engine"]}), file=sys.stderr, flush=True)
    report["modes"] = {}
    for algo in args.algos.split(","):
        report["modes"][algo] = measure(algo)
        print(json.dumps({"modes": report["modes"]}), file=sys.stderr, flush=True)
    print(json.dumps({**report, "machine": machine()}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
