"""Shape buckets and batch plans for the batching engine: pure functions, no onnxruntime.

On onnxruntime-gpu a session's convolutions build a cuDNN plan whenever their input shape
changes (0.7-3.7 s a recogniser shape on an H100), so the engine only ever feeds shapes from a
small fixed set, each run by a session of its own (`ocr.device.ShapeSessions`): page sizes
round up to a ladder of sides, text-line widths go to the nearest rung of a ladder of widths
(see `rec_bucket_width`), and batch sizes come from a fixed list. The ladders are finite, so
`warmup` can build and run every bucket once at start.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass

# Detection sides: multiples of 64 growing by ~15%, so a page never pads by more than ~15% per
# side; the configured limit_side_len is added so the usual side needs no padding at all.
_DET_LADDER_START = 256
# In "min" mode a wide strip (a till roll photographed sideways, a one-line label) has its short
# side scaled up to the limit and its long side with it, far beyond 4096.
_DET_LADDER_END = 8192
_DET_LADDER_GROWTH = 1.15
DET_ALIGN = 32  # the detector's stride: every side RapidOCR feeds it is a multiple of 32

# Recognition: RapidOCR never feeds a line narrower than 320 px (48 x 320/48 at least).
REC_HEIGHT = 48
REC_MIN_WIDTH = 320  # RapidOCR's floor (48 x 320/48); both of the daemon's paths go below it
# The CPU feeds each line alone at its own width, with a 128 floor instead of 320 (one thread,
# receipts, CPU-s/page and bag-of-words F1; plain RapidOCR: 1.79, 0.9086 on 60 pages): floor
# 320 1.74/0.9147, 160 1.27/0.9176, 128 1.22/0.9153, 0 1.15/0.9158 on 60 pages; on the 20 of
# the benchmark 0 scored 0.9181 against RapidOCR's 0.9182 and 128 0.9221 (the shortest
# lines, a digit or two, read better with some blank beside them).
REC_MIN_WIDTH_CPU = 128
# The GPU's line widths: from 160, each rung ~1.2x the last (multiples of 32), to 3232: 16
# rungs (160, 192, 256, 320, 384, 480, ...); a line goes to the nearest by ratio, so it is
# padded or squeezed by 12% at most from 320 on, 16% below (the 192 -> 256 step). Padding a
# wide line up to a coarse rung costs text: the old ladder (320, 480, 640, ...) padding up lost
# 0.008 bag-of-words F1 on the 100 SROIE receipts against the CPU path, the nearest 1.2x rung
# loses 0.0012. Starting at 160 instead of RapidOCR's 320 costs none (0.9196 against 0.9192)
# and feeds the recogniser 23% fewer columns a receipt: 73% of their lines are narrower than
# 320. The tables (and Traditional Chinese pages): benchmarks/NOTES.md, "On a GPU: line widths".
REC_MIN_WIDTH_GPU = 160
REC_WIDTH_GROWTH = 1.2
REC_WIDTH_TOP = 3200
REC_WIDTH_ALIGN = 32
REC_WIDTH_STEP_BEYOND = 640  # lines wider than the ladder (rare): nearest multiple, not warmed

# GPU: few batch sizes (each shape is a session and a cuDNN plan at warm-up, ~2 s measured for
# a rec batch on an H200), padded generously since padding entries cost the GPU little.
REC_BATCH_SIZES = (1, 8, 32)
REC_MAX_WASTE_GPU = 0.8
REC_MAX_WASTE_CPU = 0.25
REC_BATCH_SIZES_CPU = (1, 2, 4, 8)
CLS_BATCH_SIZES = (1, 2, 4, 8, 16, 32)


def _round_up(value: int, step: int) -> int:
    return -(-value // step) * step


def det_ladder(limit_side_len: int, *, coarse: bool = False) -> tuple[int, ...]:
    """Detection sides. `coarse` (GPU providers): the limit, then x1.5 steps only.

    On a GPU every new input shape costs a cuDNN algorithm search (measured on an H200 with
    onnxruntime-gpu 1.31: 1.5 s per shape with HEURISTIC, 3 s with EXHAUSTIVE, against 11 ms
    for a warm 4x3x960x960 detection), so few shapes with more padding beat many tight ones;
    padding costs the GPU next to nothing. On the CPU padding is real work: a fine ladder."""
    limit = _round_up(limit_side_len, DET_ALIGN)
    sides = {limit}
    if coarse:
        side = limit
        while side < _DET_LADDER_END:
            side = _round_up(math.ceil(side * 1.5), 64)
            sides.add(min(side, _DET_LADDER_END))
        return tuple(sorted(sides))
    side = _DET_LADDER_START
    while side <= _DET_LADDER_END:
        sides.add(side)
        side = _round_up(math.ceil(side * _DET_LADDER_GROWTH), 64)
    return tuple(sorted(sides))


def det_bucket_side(side: int, ladder: Sequence[int]) -> int:
    for rung in ladder:
        if rung >= side:
            return rung
    return _round_up(side, 512)


def det_bucket(height: int, width: int, ladder: Sequence[int]) -> tuple[int, int]:
    return det_bucket_side(height, ladder), det_bucket_side(width, ladder)


def det_warm_shapes(limit_side_len: int, limit_type: str, *, coarse: bool = False
                    ) -> list[tuple[int, int]]:
    """The detection buckets a page can land in once RapidOCR's resize rule is applied.

    "min": the short side becomes the limit, the long side anything above it.
    "max": the long side becomes the limit for every page at least that large; smaller pages
    keep their size and fall into any ladder bucket up to the limit, so all of those are warmed.
    """
    ladder = det_ladder(limit_side_len, coarse=coarse)
    fixed = det_bucket_side(_round_up(limit_side_len, DET_ALIGN), ladder)
    if limit_type == "max":
        # pages smaller than the limit keep their size: every pair of rungs up to the limit
        # (about a hundred small shapes, cheap to warm)
        below = [s for s in ladder if s <= fixed]
        return sorted((h, w) for h in below for w in below)
    others = [s for s in ladder if s >= fixed]
    shapes = {(fixed, s) for s in others} | {(s, fixed) for s in others}
    return sorted(shapes)


def rec_needed_width(height: int, width: int) -> int:
    """Width of a crop once scaled to the recogniser's height (RapidOCR's rule)."""
    return math.ceil(REC_HEIGHT * width / float(height))


def rec_width_ladder(growth: float = REC_WIDTH_GROWTH, floor: int = REC_MIN_WIDTH_GPU,
                     top: int = REC_WIDTH_TOP) -> tuple[int, ...]:
    """Line widths from `floor`, each rung `growth` times the last rounded up to a multiple of
    REC_WIDTH_ALIGN (and at least one step more), until one reaches `top`."""
    rungs = [floor]
    while rungs[-1] < top:
        grown = _round_up(math.ceil(rungs[-1] * growth), REC_WIDTH_ALIGN)
        rungs.append(max(rungs[-1] + REC_WIDTH_ALIGN, grown))
    return tuple(rungs)


REC_WIDTHS = rec_width_ladder()


def rec_bucket_width(needed: int, ladder: Sequence[int] | None = None) -> int:
    """The width a line of `needed` pixels (at the recogniser's height) is fed at: the rung
    nearest by ratio, so it is padded (mid-grey, as RapidOCR pads) up to it or squeezed down to
    it, whichever changes it less (a tie squeezes); narrower than the first rung, the first
    rung (padded as RapidOCR pads a line up to its floor). Beyond the ladder, the nearest
    multiple of REC_WIDTH_STEP_BEYOND (or the last rung)."""
    rungs = REC_WIDTHS if ladder is None else ladder
    if needed <= rungs[0]:
        return rungs[0]
    index = bisect.bisect_left(rungs, needed)
    if index < len(rungs):
        up, down = rungs[index], rungs[index - 1]
    else:
        up = _round_up(needed, REC_WIDTH_STEP_BEYOND)
        down = max(rungs[-1], needed // REC_WIDTH_STEP_BEYOND * REC_WIDTH_STEP_BEYOND)
    if up == needed:
        return up
    return down if needed / down <= up / needed else up


@dataclass(frozen=True)
class BatchSlot:
    size: int  # the batch size fed to the model (one of the fixed sizes)
    real: int  # how many entries are real; the rest are padding, dropped afterwards


def plan_batches(count: int, sizes: Sequence[int], max_waste: float) -> list[BatchSlot]:
    """Cover `count` items with batches whose sizes are all in `sizes`.

    Greedy: take the largest size that fits; a remainder is padded up to the next size when
    padding would be at most `max_waste` of that batch, else split further. `max_waste=0`
    never pads (detection: a padded page costs a whole page of compute).
    """
    ordered = sorted(set(sizes))
    if not ordered or ordered[0] != 1:
        raise ValueError("batch sizes must include 1")
    plan: list[BatchSlot] = []
    left = count
    while left > 0:
        fitting = max(s for s in ordered if s <= left)
        if fitting == left:
            plan.append(BatchSlot(fitting, fitting))
            break
        above = [s for s in ordered if s > left]
        if above and (above[0] - left) / above[0] <= max_waste:
            plan.append(BatchSlot(above[0], left))
            break
        plan.append(BatchSlot(fitting, fitting))
        left -= fitting
    return plan


def det_batch_sizes(max_pages: int) -> tuple[int, ...]:
    """Powers of two up to `max_pages`."""
    sizes = [1]
    while sizes[-1] * 2 <= max_pages:
        sizes.append(sizes[-1] * 2)
    return tuple(sizes)


# Runs per recogniser shape on real pages: 40 SROIE receipts and the 7 tesseract-testing pages
# (`python -m benchmarks rec-padding --images ...`, 2-core svc, 2026-12-06; 104 runs). The
# warm-up takes the most used first: the daemon serves while it warms, and [32, 48, 160] alone
# was 40 of the 90 receipt runs. Shapes not listed follow, largest first.
WARM_FIRST: dict[str, dict[tuple[int, ...], int]] = {"rec": {
    (32, 48, 160, 3): 40, (32, 48, 480, 3): 10, (32, 48, 256, 3): 7, (32, 48, 192, 3): 6,
    (32, 48, 320, 3): 5, (32, 48, 384, 3): 6, (32, 48, 576, 3): 6, (32, 48, 704, 3): 5,
    (8, 48, 384, 3): 3, (8, 48, 192, 3): 3, (8, 48, 256, 3): 2, (8, 48, 704, 3): 2,
    (8, 48, 864, 3): 2, (8, 48, 160, 3): 2, (8, 48, 320, 3): 2, (1, 48, 256, 3): 1,
    (8, 48, 1056, 3): 1, (32, 48, 864, 3): 1,
}}
