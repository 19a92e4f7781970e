"""The batching engine: RapidOCR's models and pre/post-processing, with the batching our own.

RapidOCR runs detection one page at a time and recognition in batches of 6 whose width changes
almost every batch; on onnxruntime-gpu each new shape means a new cuDNN algorithm search and
arena growth, which makes the GPU slower than the CPU. Here pages are resized by RapidOCR's
rule, padded into fixed detection buckets and detected `[N,3,H,W]` at a time; every text line
of the call is pooled, sorted by aspect ratio and recognised in fixed width x batch buckets
(see `daemon.ocr.buckets`; on a GPU a line is padded or squeezed to the nearest width, by 16%
at most, 12% from 320 px on). Everything else (resizing, DB post-processing, crops, angle
classification, CTC decoding, box mapping, filtering) is RapidOCR's own code, so the text
matches plain `RapidOCR()` with the same settings, up to that padding (RapidOCR pads within
its batches too).

`recognize` may be called from several threads at once: onnxruntime's `run` is thread-safe
and all per-call state is local.

A little over our ~400-line habit: one call's flow (prepare, detect, classify, recognise,
finish) and the warm-up of the very shapes that flow feeds read best together; the host
stages are in `ocr.host`, the device runs in `ocr.device_runs`, the graph edits in `ocr.graphs`.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Literal, cast

import cv2
import numpy as np
import numpy.typing as npt

from daemon.budget import shm_room
from daemon.config import NVIDIA_PROVIDERS, OcrSettings
from daemon.errors import ConfigError
from daemon.hardware.providers import ProviderChoice
from daemon.hardware.sessions import background_builds, create_session, provider_name
from daemon.ocr import buckets
from daemon.ocr.device_runs import (
    FloatArray,
    GpuOutOfMemoryError,
    ShapeSessions,
    run_split,
)
from daemon.ocr.graphs import REC_PAD, det_model, rec_model
from daemon.ocr.host import (
    Detected,
    HostPool,
    PageBuffer,
    ctc_decode,
    det_lut,
    detect_lines,
    rec_lut,
    resize_rec,
)
from daemon.ocr.models import load_rapidocr_config, resolve_model_paths
from daemon.ocr.script import to_traditional, wants_traditional
from daemon.results import Image, Line, PageResult, Point
from daemon.sizing import GPU_BATCHES_IN_FLIGHT, warmup_threads
from daemon.sizing import host_processes as host_processes_auto

log = logging.getLogger(__name__)

# Padding a page with white makes the padded area look like more page margin, which disturbs
# the text near the edge least.
DET_PAD_WHITE = 255
# What each model's session is fed: pixels (det), LUT indices with REC_PAD (rec), floats (cls)
INPUT_DTYPES: dict[str, type[np.generic]] = {"det": np.uint8, "rec": np.uint16,
                                              "cls": np.float32}


@dataclass
class _Page:
    """Per-page state of one `recognize` call."""

    ori_shape: tuple[int, int]
    image: Image  # after RapidOCR's bounds resize and vertical padding: boxes refer to this
    op_record: dict[str, Any]
    det_input: Image | None  # [h,w,3] resized for detection; None when too small to detect
    boxes: FloatArray | None = None
    crops: list[Image] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    buffer: PageBuffer | None = None  # the image in shared memory, for the host processes


class BatchEngine:
    """Batched det/cls/rec on one set of onnxruntime sessions, shared by all callers."""

    def __init__(
        self,
        ocr: OcrSettings,
        choice: ProviderChoice,
        *,
        max_pages: int = 4,
        rec_batch_sizes: Sequence[int] | None = None,
        post_threads: int = 2,
        fixed_shapes: bool | None = None,
        host_processes: int | Literal["auto"] = 0,
        shape_sessions: bool | None = None,
    ) -> None:
        from rapidocr.ch_ppocr_cls.main import CLS_SHAPE_BY_OCR_VERSION
        from rapidocr.ch_ppocr_cls.utils import ClsPostProcess
        from rapidocr.ch_ppocr_det.utils import DetPreProcess
        from rapidocr.ch_ppocr_rec.main import RTL_LANGS
        from rapidocr.ch_ppocr_rec.utils import CTCLabelDecode
        from rapidocr.utils.model_resolver import normalize_lang

        from daemon.ocr.boxes import FastDBPostProcess

        if max_pages < 1:
            raise ValueError("max_pages must be at least 1")
        self._ocr = ocr
        self._choice = choice
        cfg = load_rapidocr_config(ocr)
        self._cfg = cfg
        paths = resolve_model_paths(ocr, cfg)

        det = cfg.Det
        self._det_pre = DetPreProcess(det.limit_side_len, det.limit_type, det.mean, det.std)
        # Both models normalise pixels on the device, by tables of this host code's own
        # results; the recogniser also hands back arg-max and max, not 18,710 probabilities.
        half = ocr.gpu_precision == "fp16" and choice.name in NVIDIA_PROVIDERS
        models = {"det": det_model(paths.det, det_lut(self._det_pre), fp16=half),
                  "rec": rec_model(paths.rec, rec_lut(), fp16=half), "cls": paths.cls}
        self._det = create_session(models["det"], choice, ocr, shared_arena=True)
        self._rec = create_session(models["rec"], choice, ocr, shared_arena=True)
        self._cls = (create_session(models["cls"], choice, ocr, shared_arena=True)
                     if ocr.use_cls else None)
        self._provider = provider_name(self._det)
        self._gpu = self._provider in NVIDIA_PROVIDERS  # fixed shapes, a session a shape
        # a GPU: each warmed shape its own sessions (see ShapeSessions: a shape change costs
        # the CUDA convolutions seconds); their first runs are the warm-up
        if shape_sessions is None:
            shape_sessions = self._gpu
        if shape_sessions:

            def per_shape(model: str, base: Any) -> ShapeSessions:
                name = base.get_inputs()[0].name  # TensorRT: a profile of exactly the shape
                return ShapeSessions(
                    base, lambda shape: create_session(models[model], choice, ocr,
                                                       shared_arena=True, profile=(name, shape)),
                    model)

            self._det = per_shape("det", self._det)
            self._rec = per_shape("rec", self._rec)
            self._cls = per_shape("cls", self._cls) if self._cls is not None else None
        db_params = {
            "thresh": det.thresh,
            "box_thresh": det.box_thresh,
            "max_candidates": det.max_candidates,
            "unclip_ratio": det.unclip_ratio,
            "use_dilation": det.use_dilation,
            "score_mode": det.score_mode,
        }
        self._det_post = FastDBPostProcess(**db_params)
        # GPU providers (or when asked): a small fixed set of input shapes, all warmed up
        self._coarse = self._gpu if fixed_shapes is None else fixed_shapes
        self._det_ladder = buckets.det_ladder(det.limit_side_len, coarse=self._coarse)
        self._det_sizes = buckets.det_batch_sizes(max_pages)
        if rec_batch_sizes is None:
            # On the CPU batches of 32 wide lines only grow the arena (+0.6 GB on receipts)
            # for no speed; the GPU wants them.
            rec_batch_sizes = (
                buckets.REC_BATCH_SIZES if self._gpu else buckets.REC_BATCH_SIZES_CPU
            )
        self._rec_sizes = tuple(sorted(set(rec_batch_sizes)))
        self._rec_waste = (buckets.REC_MAX_WASTE_GPU if self._coarse
                           else buckets.REC_MAX_WASTE_CPU)

        meta = self._rec.get_modelmeta().custom_metadata_map
        if "character" not in meta:
            raise ConfigError(f"{paths.rec.name} has no character list in its metadata")
        # RapidOCR's list: blank first, space last
        self._characters = CTCLabelDecode(character=meta["character"].splitlines()).character
        self._rtl = normalize_lang(cfg.Rec.lang_type) in RTL_LANGS
        self._traditional = wants_traditional(ocr)
        if self._rtl:
            from rapidocr.utils import utils as rapid_utils

            cast(Any, rapid_utils).validate_rtl_dependency()

        self._cls_shape = tuple(CLS_SHAPE_BY_OCR_VERSION[cfg.Cls.ocr_version])
        self._cls_post = ClsPostProcess(list(cfg.Cls.label_list))
        self._cls_thresh = float(cfg.Cls.cls_thresh)

        self._pool = (
            ThreadPoolExecutor(post_threads, thread_name_prefix="ocr-post")
            if post_threads > 0
            else None
        )
        if host_processes == "auto":
            # the GPU path's host stages on every core; on the CPU inference has them already
            host_processes = host_processes_auto() if self._gpu else 0
        # the angle classifier turns raw crops, so with it lines are cut in this process
        self._host = (HostPool(host_processes, db_params,
                               keep_segments=GPU_BATCHES_IN_FLIGHT * max_pages)
                      if host_processes > 0 and self._cls is None else None)

    @property
    def provider(self) -> str:
        """What the detector really runs on: a GPU provider can fall back to the CPU silently."""
        return self._provider

    @property
    def sessions(self) -> dict[str, Any]:
        """The model sessions by name ("det", "rec", and "cls" with the classifier)."""
        found = {"det": self._det, "rec": self._rec, "cls": self._cls}
        return {name: session for name, session in found.items() if session is not None}

    @property
    def thread_safe(self) -> bool:
        return True  # onnxruntime's run is thread-safe and all per-call state is local

    @property
    def device(self) -> str:
        if self._provider == "openvino":  # "cpu", or an Intel GPU as OpenVINO names it
            return (self._choice.openvino_device or "CPU").lower()
        return str(self._ocr.device_id) if self._gpu else "cpu"

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        if self._host is not None:
            self._host.close()

    # ---------------------------------------------------------------- the pipeline

    def recognize(self, images: Sequence[Image]) -> list[PageResult]:
        if not images:
            return []
        pages = self._map(self._prepare, images)
        try:
            self._detect(pages)
        finally:
            for page in pages:
                if page.buffer is not None:
                    page.buffer.release()
        crops = [(p, i) for p, page in enumerate(pages) for i in range(len(page.crops))]
        flat = [pages[p].crops[i] for p, i in crops]
        owners = [p for p, _ in crops]
        if self._cls is not None:
            flat = self._classify(flat, owners, pages)
        texts = self._recognize_lines(flat, owners, pages)
        results = []
        for p, page in enumerate(pages):
            mine = [texts[k] for k, owner in enumerate(owners) if owner == p]
            results.append(self._finish(page, mine))
        return results

    def _map(self, fn: Callable[[Image], _Page], images: Sequence[Image]) -> list[_Page]:
        if self._pool is None or len(images) == 1:
            return [fn(image) for image in images]
        return list(self._pool.map(fn, images))

    def _prepare(self, image: Image) -> _Page:
        """RapidOCR's preprocess_img + apply_vertical_padding + DetPreProcess, for one page."""
        from rapidocr.utils.process_img import apply_vertical_padding, resize_image_within_bounds

        start = time.perf_counter()
        g = self._cfg.Global
        img = image
        op_record: dict[str, Any] = {"preprocess": {"ratio_h": 1.0, "ratio_w": 1.0}}
        if g.use_preprocess_img:
            img, ratio_h, ratio_w = resize_image_within_bounds(
                image, g.min_side_len, g.max_side_len
            )
            op_record = {"preprocess": {"ratio_h": ratio_h, "ratio_w": ratio_w}}
        if img.ndim == 2:
            # a grey page, shrunk in one channel (the same bytes as each of three, a third
            # of the work), spread to BGR as RapidOCR's LoadImage does
            img = cast(Image, cv2.cvtColor(img, cv2.COLOR_GRAY2BGR))
        if g.use_vertical_padding:
            img, op_record = apply_vertical_padding(
                img, op_record, g.width_height_ratio, g.min_height
            )
        else:
            op_record["padding_1"] = {"top": 0, "left": 0}
        det_input = self._det_pre.resize(img)  # normalised on the device
        page = _Page(
            ori_shape=(image.shape[0], image.shape[1]),
            image=img,
            op_record=op_record,
            det_input=det_input,
            buffer=PageBuffer(img, det_input.shape[:2], self._host.segments)
            if self._host is not None and det_input is not None
            and shm_room(PageBuffer.nbytes(img, det_input.shape[:2]))
            else None,
        )
        page.timings["det"] = time.perf_counter() - start
        return page

    def _detect(self, pages: list[_Page]) -> None:
        by_bucket: dict[tuple[int, int], list[_Page]] = defaultdict(list)
        for page in pages:
            if page.det_input is not None:
                h, w = page.det_input.shape[:2]
                # the CPU runs each page at its own size: padding there is real convolution
                key = buckets.det_bucket(h, w, self._det_ladder) if self._coarse else (h, w)
                by_bucket[key].append(page)
        pending: list[Future[None]] = []
        detected: list[tuple[_Page, Future[Detected]]] = []
        try:
            for (bucket_h, bucket_w), members in by_bucket.items():
                offset = 0
                for slot in buckets.plan_batches(len(members), self._det_sizes, max_waste=0.0):
                    chunk = members[offset : offset + slot.real]
                    offset += slot.real
                    batch = np.empty((slot.size, bucket_h, bucket_w, 3), np.uint8)
                    for k, page in enumerate(chunk):
                        assert page.det_input is not None
                        h, w = page.det_input.shape[:2]
                        batch[k, :h, :w] = page.det_input
                        # only the padding is filled: the whole batch first was ~2 ms a
                        # batch of 4 at 960x960, a third of the bytes written twice
                        batch[k, :h, w:] = DET_PAD_WHITE
                        batch[k, h:] = DET_PAD_WHITE
                    batch[len(chunk):] = DET_PAD_WHITE
                    start = time.perf_counter()
                    (maps,) = run_split(self._det, batch, slot.real)
                    share = (time.perf_counter() - start) / len(chunk)
                    for k, page in enumerate(chunk):
                        assert page.det_input is not None
                        h, w = page.det_input.shape[:2]
                        page.timings["det"] += share
                        if self._host is not None and page.buffer is not None:
                            page.buffer.put_map(maps[k, 0, :h, :w])
                            detected.append((page, self._host.post_detect(page.buffer.ref)))
                            continue
                        prob = np.ascontiguousarray(maps[k : k + 1, :, :h, :w])
                        if self._pool is None:
                            self._post_detect(page, prob)
                        else:
                            pending.append(self._pool.submit(self._post_detect, page, prob))
            for future in pending:
                future.result()
            for page, result in detected:
                start = time.perf_counter()
                lines = result.result()
                page.boxes, page.crops = lines.boxes, lines.lines
                if lines.packed:
                    assert page.buffer is not None
                    page.crops = page.buffer.take_lines(lines.packed)
                page.timings["det"] += time.perf_counter() - start
        finally:
            # A worker writes a page's lines into the page's segment: when this call fails
            # (another page's post-processing, a device error) none may still be at it once
            # the segments go back to the pool, or it would write into a later page's.
            wait([future for _, future in detected])

    def _post_detect(self, page: _Page, prob: FloatArray) -> None:
        """DB boxes for one page from its cropped probability map, then its lines (raw crops
        for the angle classifier, else resized for the recogniser as the host processes do)."""
        start = time.perf_counter()
        found = detect_lines(self._det_post, page.image, prob, resize=self._cls is None)
        page.boxes, page.crops = found.boxes, found.lines
        page.timings["det"] += time.perf_counter() - start

    def _classify(self, crops: list[Image], owners: list[int], pages: list[_Page]) -> list[Image]:
        """RapidOCR's angle classifier (fixed input shape, so only batch size varies)."""
        from rapidocr.ch_ppocr_cls.main import TextClassifier

        assert self._cls is not None
        start = time.perf_counter()
        shim = SimpleNamespace(cls_image_shape=list(self._cls_shape))
        out = list(crops)
        order = np.argsort([c.shape[1] / float(c.shape[0]) for c in crops])
        offset = 0
        for slot in buckets.plan_batches(len(crops), buckets.CLS_BATCH_SIZES, max_waste=0.25):
            chunk = order[offset : offset + slot.real]
            offset += slot.real
            batch = np.zeros((slot.size, *self._cls_shape), np.float32)
            for k, idx in enumerate(chunk):
                batch[k] = TextClassifier.resize_norm_img(cast(Any, shim), crops[idx])
            (probs,) = run_split(self._cls, batch, slot.real)
            for k, (label, score) in enumerate(self._cls_post(probs)):
                if "180" in label and score > self._cls_thresh:
                    out[chunk[k]] = cv2.rotate(crops[chunk[k]], cv2.ROTATE_180)
        _share_out(pages, owners, "cls", time.perf_counter() - start)
        return out

    def _recognize_lines(
        self, crops: list[Image], owners: list[int], pages: list[_Page]
    ) -> list[tuple[str, float]]:
        start = time.perf_counter()
        results: list[tuple[str, float]] = [("", 0.0)] * len(crops)
        needed = [buckets.rec_needed_width(c.shape[0], c.shape[1]) for c in crops]
        order = sorted(range(len(crops)), key=lambda k: crops[k].shape[1] / crops[k].shape[0])
        for width, chunk, size in self._rec_plan(order, needed):
            # only the padding is filled, beside each line and in the rows no line takes:
            # the whole batch first wrote the lines' bytes twice
            batch = np.empty((size, buckets.REC_HEIGHT, width, 3), np.uint16)
            for k, idx in enumerate(chunk):
                fed = min(needed[idx], width)
                resize_rec(crops[idx], fed, batch[k])
                batch[k, :, fed:] = REC_PAD
            batch[len(chunk):] = REC_PAD
            best, best_prob = run_split(self._rec, batch, len(chunk))
            lines = ctc_decode(self._characters, best, best_prob)
            for k, (text, score) in enumerate(lines):
                results[chunk[k]] = (text, float(score))
        _share_out(pages, owners, "rec", time.perf_counter() - start)
        return results

    def _rec_plan(self, order: list[int], needed: list[int]
                  ) -> Iterator[tuple[int, list[int], int]]:
        """(width, crop indices, batch size) per recognition run, lines sorted by aspect.

        GPU: fixed width and batch-size buckets (every new shape is a cuDNN search); a line
        wider than its width is squeezed to it where it is resized (`resize_rec`).
        CPU: no shape is costly but padding is real compute (the recogniser is ~85% of CPU time
        on receipts), so every line runs alone at its own width, down to REC_MIN_WIDTH_CPU
        rather than RapidOCR's 320: 73% of receipt lines are narrower than 320, and that
        floor made the recogniser do 55% more work. Batch 1 is also the cheapest per pixel on a core
        (~76 against ~90 us per pixel column at batch 8, one thread). OpenVINO the same: it
        runs a width it has run before faster (32 receipts: 16.6 s with widths padded to a
        multiple of 16 columns, 19.0 s at their own), but padding a line, or stretching it,
        or squeezing it into the GPU's width buckets, cost SROIE's F1 0.0022-0.0037, past the
        0.002 its bf16 is allowed."""
        if not self._coarse:
            for k in order:
                yield max(buckets.REC_MIN_WIDTH_CPU, needed[k]), [k], 1
            return
        by_width: dict[int, list[int]] = defaultdict(list)
        for k in order:
            by_width[buckets.rec_bucket_width(needed[k])].append(k)
        for width, members in by_width.items():
            offset = 0
            for slot in buckets.plan_batches(len(members), self._rec_sizes,
                                             max_waste=self._rec_waste):
                yield width, members[offset : offset + slot.real], slot.size
                offset += slot.real

    def _finish(self, page: _Page, texts: list[tuple[str, float]]) -> PageResult:
        """RapidOCR's build_final_output: map boxes back, drop empty and low-score lines."""
        from rapidocr.utils.process_img import map_boxes_to_original

        page.timings.setdefault("cls", 0.0)
        page.timings.setdefault("rec", 0.0)
        page.timings["total"] = page.timings["det"] + page.timings["cls"] + page.timings["rec"]
        if page.boxes is None or not texts:
            return PageResult(timings=page.timings)
        if self._rtl:
            from rapidocr.utils.utils import reorder_bidi_for_display

            shown = reorder_bidi_for_display(tuple(t for t, _ in texts))
            texts = [(str(t), s) for t, (_, s) in zip(shown, texts, strict=True)]
        boxes = map_boxes_to_original(page.boxes.copy(), page.op_record, *page.ori_shape)
        lines = []
        # as Python floats in one call: per corner, float() of numpy scalars cost ~10x more
        for box, (text, score) in zip(boxes.tolist(), texts, strict=True):
            if not text.strip() or score < self._ocr.text_score:
                continue
            if self._traditional:
                text = to_traditional(text)
            (x0, y0), (x1, y1), (x2, y2), (x3, y3) = box
            corners: tuple[Point, Point, Point, Point] = ((x0, y0), (x1, y1), (x2, y2),
                                                          (x3, y3))
            lines.append(Line(text=text, score=score, box=corners))
        return PageResult(lines=tuple(lines), timings=page.timings)

    # ---------------------------------------------------------------- warm-up

    def warm_shapes_count(self) -> tuple[int, int]:
        """(shapes warm, shapes to warm) over the models with a session per shape (a GPU):
        what /health says while the daemon serves and warms."""
        warm = total = 0
        for model, shapes in self.warmup_shapes().items():
            session = self.sessions.get(model)
            if isinstance(session, ShapeSessions):
                warm += len(set(session.warm) & {tuple(shape) for shape in shapes})
                total += len(shapes)
        return warm, total

    def warm_seconds(self) -> list[tuple[str, tuple[int, ...], float, float]]:
        """(model, shape, session build seconds, first-run seconds) of each warm shape."""
        return [(model, shape, build, run)
                for model, session in self.sessions.items() if isinstance(session, ShapeSessions)
                for shape, (build, run) in sorted(session.warm.items())]

    def warmup_shapes(self) -> dict[str, list[tuple[int, ...]]]:
        """Every input shape `warmup` runs, per model."""
        det = [
            (n, h, w, 3)
            for h, w in buckets.det_warm_shapes(self._cfg.Det.limit_side_len,
                                                self._cfg.Det.limit_type, coarse=self._coarse)
            for n in self._det_sizes
        ]
        rec = [
            (n, buckets.REC_HEIGHT, w, 3) for w in buckets.REC_WIDTHS for n in self._rec_sizes
        ]
        cls = (
            [(n, *self._cls_shape) for n in buckets.CLS_BATCH_SIZES]
            if self._cls is not None
            else []
        )
        return {"det": det, "cls": cls, "rec": rec}  # type: ignore[dict-item]

    def warmup(self, full: bool | None = None, threads: int | None = None,
               seconds: float | None = None) -> dict[str, float]:
        """Run every bucket once, so cuDNN searches and arena growth happen now, not per file.

        `full=None` means full on a GPU provider only. On the CPU a shape costs nothing to
        change but the full set would take minutes and gigabytes (4 pages of 736x7936), so
        there only the smallest shape of each model runs, to get lazy initialisation done.
        On a GPU each shape gets its own sessions here (`ShapeSessions`), and their first run
        builds a cuDNN plan for every convolution: 0.7-3.7 s a recogniser shape on an H100,
        host work, so a full warm-up runs up to `threads` shapes at once (default
        `sizing.WARMUP_THREADS_MAX` or the usable cores, fewer). In one shared session they would
        wait on each node's lock and undo each other's plans.
        No new shape starts after `seconds` (default `ocr.warmup_seconds`, for all models):
        the shapes left cold get their own sessions at their first batch (`ShapeSessions.
        expect`), so a slow GPU delays those batches once instead of the daemon's start.
        Returns seconds per model run (no "cls" without the angle classifier).
        """
        if full is None:
            full = self._gpu
        if threads is None:
            threads = warmup_threads() if full else 1
        if seconds is None:
            seconds = self._ocr.warmup_seconds
        deadline = time.monotonic() + seconds
        if self._host is not None:
            self._host.warmup()  # worker processes start now, not on the first page
        sessions = self.sessions
        spent: dict[str, float] = {}
        for model, shapes in self.warmup_shapes().items():
            session = sessions.get(model)
            if session is None or not shapes:
                continue
            if isinstance(session, ShapeSessions):
                session.expect(shapes)
            if not full:
                shapes = [min(shapes, key=lambda shape: math.prod(shape))]
            start = time.perf_counter()
            cold = warm_shapes(session, shapes, INPUT_DTYPES[model], threads, model, deadline)
            spent[model] = time.perf_counter() - start
            if cold:
                log.warning("warm-up out of time (%.0f s): %d %s shapes left to their first "
                            "batch", seconds, len(cold), model)
        return spent


def warm_shapes(session: Any, shapes: Sequence[tuple[int, ...]], dtype: npt.DTypeLike,
                threads: int, model: str = "model", deadline: float | None = None
                ) -> list[tuple[int, ...]]:
    """Run `session` once on zeros of each shape, up to `threads` at once, the most used first
    (`buckets.WARM_FIRST`: the daemon serves while it warms, so the shapes the first batches
    need are ready soonest), then largest first; none starts after `deadline`
    (time.monotonic()). Returns the shapes left cold.

    At most twice the largest shape's elements are in flight: the arena keeps whatever a
    warm-up peak took, and the batches in flight on one GPU (`GPU_BATCHES_IN_FLIGHT`) can
    take that much later anyway. An out-of-memory shape is logged and left cold (such pages split).
    """
    uses = buckets.WARM_FIRST.get(model, {})
    ordered = sorted(shapes, key=lambda shape: (-uses.get(tuple(shape), 0), -math.prod(shape)))
    budget = 2 * max(map(math.prod, ordered)) if ordered else 0
    room = threading.Condition()
    in_flight = 0
    cold: list[tuple[int, ...]] = []

    def one(shape: tuple[int, ...]) -> None:
        nonlocal in_flight
        size = math.prod(shape)
        with room:
            room.wait_for(lambda: in_flight == 0 or in_flight + size <= budget)
            if deadline is not None and time.monotonic() >= deadline:
                cold.append(shape)
                return
            in_flight += size
        try:
            if isinstance(session, ShapeSessions):
                with background_builds():  # a batch waiting on its own shape's build first
                    session.adopt(shape)  # a session of its own, planned by this first run
            run_split(session, np.zeros(shape, dtype), shape[0])
        except GpuOutOfMemoryError as exc:  # pages this big will split or fail alone
            log.warning("warm-up of %s %s: %s", model, list(shape), exc)
        finally:
            with room:
                in_flight -= size
                room.notify_all()

    if threads <= 1 or len(ordered) <= 1:
        for shape in ordered:
            one(shape)
        return cold
    with ThreadPoolExecutor(min(threads, len(ordered)), thread_name_prefix="warmup") as pool:
        list(pool.map(one, ordered))
    return cold


def _share_out(pages: list[_Page], owners: list[int], stage: str, seconds: float) -> None:
    """Attribute a pooled stage's time to pages in proportion to their text lines."""
    if not owners:
        return
    per_line = seconds / len(owners)
    for owner in owners:
        pages[owner].timings[stage] = pages[owner].timings.get(stage, 0.0) + per_line
