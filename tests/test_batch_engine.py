"""The batching engine: text parity with plain RapidOCR, OOM splitting, warm-up coverage."""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import cv2
import numpy as np
import onnxruntime as ort
import pytest

from daemon.config import OcrSettings, Settings
from daemon.errors import ConfigError
from daemon.hardware.nvml import probe_nvml
from daemon.hardware.openvino import probe_openvino
from daemon.hardware.providers import CPU, CUDA_EP, ProviderChoice, choose_provider
from daemon.ocr import batch as batch_module
from daemon.ocr import buckets
from daemon.ocr import host as host_module
from daemon.ocr.batch import BatchEngine
from daemon.ocr.device_runs import GpuOutOfMemoryError, ShapeSessions
from daemon.ocr.graphs import REC_PAD
from daemon.ocr.models import resolve_model_paths
from daemon.ocr.rapid import RapidOcrEngine
from daemon.results import Image, PageResult
from tests.rendering import random_lines, render_page

OOM_MESSAGE = (
    "[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Non-zero status code returned while running "
    "Conv node. CUDA failure 2: out of memory ; GPU=0 ; expr=cudaMalloc(&p, size);"
)


class RecordingSession:
    """Wraps a real session: records input shapes; fails like CUDA when a batch is too big."""

    def __init__(self, real: Any, max_batch: int | None = None) -> None:
        self.real = real
        self.max_batch = max_batch
        self.shapes: list[tuple[int, ...]] = []
        self.failed: list[int] = []
        self._lock = threading.Lock()

    def get_inputs(self) -> Any:
        return self.real.get_inputs()

    def get_modelmeta(self) -> Any:
        return self.real.get_modelmeta()

    def get_providers(self) -> list[str]:
        return list(self.real.get_providers())

    def run(self, names: Any, feeds: dict[str, np.ndarray]) -> Any:
        (batch,) = feeds.values()
        with self._lock:
            if self.max_batch is not None and len(batch) > self.max_batch:
                self.failed.append(len(batch))
                raise RuntimeError(OOM_MESSAGE)
            self.shapes.append(tuple(batch.shape))
        return self.real.run(names, feeds)


class Sessions(dict[str, RecordingSession]):
    """The sessions an engine built, by model; `limits` (set before building) caps batches."""

    def __init__(self) -> None:
        super().__init__()
        self.limits: dict[str, int | None] = {}


@pytest.fixture
def recording_sessions(monkeypatch: pytest.MonkeyPatch) -> Sessions:
    """Makes every session the engine builds a RecordingSession around the real one."""
    made = Sessions()
    real_create = batch_module.create_session

    def create(path: Path, choice: Any, ocr: OcrSettings, **_: Any) -> RecordingSession:
        kind = "det" if "det" in path.name else "cls" if "cls" in path.name else "rec"
        made[kind] = RecordingSession(real_create(path, choice, ocr), made.limits.get(kind))
        return made[kind]

    monkeypatch.setattr(batch_module, "create_session", create)
    return made


def _pages() -> list[Image]:
    """Pages of several sizes; the first two share a detection bucket, so N>1 batches run."""
    return [
        render_page(random_lines(1, 6), width=900, font_size=30),
        render_page(random_lines(2, 6), width=900, font_size=28),
        render_page(random_lines(3, 14), width=700, font_size=22),
        render_page(random_lines(4, 3), width=1500, font_size=44),
        render_page(random_lines(5, 1, (1, 2)), width=420, font_size=26),
    ]


@pytest.fixture(scope="module")
def pages() -> list[Image]:
    return _pages()


@pytest.fixture(scope="module")
def reference(pages: list[Image]) -> list[PageResult]:
    return RapidOcrEngine(OcrSettings(), CPU).recognize(pages)


class NamedSession:
    """A stand-in session whose run answers its name: which session a run went to."""

    def __init__(self, name: str) -> None:
        self.name = name

    def run(self, names: Any, feeds: dict[str, np.ndarray]) -> Any:
        return self.name


def _texts(results: list[PageResult]) -> list[list[str]]:
    return [[line.text for line in page.lines] for page in results]


def _assert_same_text(got: list[PageResult], want: list[PageResult]) -> None:
    assert len(got) == len(want)
    for index, (mine, theirs) in enumerate(zip(got, want, strict=True)):
        assert [line.text for line in mine.lines] == [line.text for line in theirs.lines], index
        for a, b in zip(mine.lines, theirs.lines, strict=True):
            # padding shifts the probability map a little, never by more than a few pixels
            assert np.abs(np.array(a.box) - np.array(b.box)).max() <= 4, (index, a.text)


def test_text_matches_plain_rapidocr_on_a_mixed_batch(
    pages: list[Image], reference: list[PageResult]
) -> None:
    assert all(len(r.lines) >= 1 for r in reference), "the reference must read every page"
    engine = BatchEngine(OcrSettings(), CPU, max_pages=4)
    try:
        results = engine.recognize(pages)
    finally:
        engine.close()
    assert engine.provider == "cpu"
    _assert_same_text(results, reference)
    for result in results:
        assert {"det", "cls", "rec", "total"} <= result.timings.keys()
        assert result.timings["det"] > 0 and result.timings["rec"] > 0


@pytest.mark.skipif(not probe_openvino().version,
                    reason="needs OpenVINO (`make test` installs it on x86-64)")
def test_openvino_reads_the_pages_as_onnxruntime_does(
    pages: list[Image], reference: list[PageResult]
) -> None:
    """OpenVINO's runtime on the same edited graphs, in the precision the daemon would take
    here (bf16 where the CPU computes in it): the same lines; bf16's probability map moves a
    box's corner a few pixels more than padding does (5 px seen on a 44 px line)."""
    found = probe_openvino(forced=True)
    choice = ProviderChoice("openvino", openvino_device="CPU", precision=found.precision)
    engine = BatchEngine(OcrSettings(), choice, max_pages=4)
    try:
        results = engine.recognize(pages)
    finally:
        engine.close()
    assert (engine.provider, engine.device) == ("openvino", "cpu")
    assert _texts(results) == _texts(reference)
    for mine, theirs in zip(results, reference, strict=True):
        for a, b in zip(mine.lines, theirs.lines, strict=True):
            assert np.abs(np.array(a.box) - np.array(b.box)).max() <= 8, a.text


def test_concurrent_callers_get_their_own_pages(
    pages: list[Image], reference: list[PageResult]
) -> None:
    engine = BatchEngine(OcrSettings(), CPU, max_pages=2)
    got: dict[int, list[PageResult]] = {}

    def call(k: int, chunk: list[Image]) -> None:
        got[k] = engine.recognize(chunk)

    try:
        threads = [threading.Thread(target=call, args=(0, pages[:3])),
                   threading.Thread(target=call, args=(1, pages[3:]))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        engine.close()
    _assert_same_text(got[0] + got[1], reference)


def test_angle_classifier_matches_rapidocr_on_an_upside_down_page() -> None:
    ocr = OcrSettings(use_cls=True)
    lines = random_lines(7, 4, (1, 3))  # short lines: the 48x192 classifier misreads long ones
    flipped = render_page(lines, width=800, font_size=30, angle=180)
    want = RapidOcrEngine(ocr, CPU).recognize([flipped])
    with_cls = BatchEngine(ocr, CPU)
    without_cls = BatchEngine(OcrSettings(use_cls=False), CPU)
    try:
        got = with_cls.recognize([flipped])
        unturned = without_cls.recognize([flipped])
    finally:
        with_cls.close()
        without_cls.close()
    _assert_same_text(got, want)
    truth = Counter(" ".join(lines).split())
    assert Counter(got[0].text.split()) == truth  # every line turned the right way up
    assert Counter(unturned[0].text.split()) != truth
    assert got[0].timings["cls"] > 0


def test_out_of_memory_splits_batches_and_loses_no_page(
    recording_sessions: Sessions, pages: list[Image], reference: list[PageResult]
) -> None:
    recording_sessions.limits.update(det=1, rec=3)
    # the GPU's batched shapes: the CPU runs every line (and most pages) alone
    engine = BatchEngine(OcrSettings(), CPU, max_pages=4, fixed_shapes=True)
    try:
        results = engine.recognize(pages)
    finally:
        engine.close()
    det, rec = recording_sessions["det"], recording_sessions["rec"]
    assert det.failed and rec.failed, "the fake must have refused some batches"
    assert all(shape[0] <= 1 for shape in det.shapes)
    assert all(shape[0] <= 3 for shape in rec.shapes)
    # the same text as RapidOCR, and boxes exactly as without the splits (the GPU's padded
    # detection shapes move boxes by a few pixels against RapidOCR's unpadded ones)
    recording_sessions.limits.clear()
    whole = BatchEngine(OcrSettings(), CPU, max_pages=4, fixed_shapes=True)
    try:
        unsplit = whole.recognize(pages)
    finally:
        whole.close()
    assert [r.lines for r in results] == [r.lines for r in unsplit]
    assert [r.text for r in results] == [r.text for r in reference]


def test_out_of_memory_on_a_single_page_is_a_transient_document_error(
    recording_sessions: Sessions, pages: list[Image]
) -> None:
    recording_sessions.limits.update(det=0)
    engine = BatchEngine(OcrSettings(), CPU, fixed_shapes=True)  # both pages in one GPU bucket
    try:
        with pytest.raises(GpuOutOfMemoryError) as caught:
            engine.recognize(pages[:2])
    finally:
        engine.close()
    assert caught.value.permanent is False
    assert recording_sessions["det"].failed == [2, 1]  # tried the pair, then the first half


def test_other_session_errors_are_not_retried(recording_sessions: Sessions) -> None:
    engine = BatchEngine(OcrSettings(), CPU)
    det = recording_sessions["det"]

    def broken(names: Any, feeds: Any) -> Any:
        det.failed.append(1)
        raise RuntimeError("[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : bad input")

    det.run = broken  # type: ignore[method-assign]
    try:
        with pytest.raises(RuntimeError, match="INVALID_ARGUMENT"):
            engine.recognize([render_page(["hello"])])
    finally:
        engine.close()
    assert det.failed == [1]


def test_recognize_after_warmup_uses_only_warmed_shapes(
    recording_sessions: Sessions, pages: list[Image]
) -> None:
    engine = BatchEngine(OcrSettings(), CPU, max_pages=4, fixed_shapes=True)  # the GPU's shapes
    try:
        engine.recognize(pages)
        warmed = engine.warmup_shapes()
    finally:
        engine.close()
    for model in ("det", "rec"):
        seen = set(recording_sessions[model].shapes)
        assert seen, model
        assert seen <= set(warmed[model]), (model, seen - set(warmed[model]))


class ZeroSession:
    """Stands in for a model in the warm-up test: running every real bucket takes minutes."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.shapes: list[tuple[int, ...]] = []

    def get_inputs(self) -> Any:
        return self.real.get_inputs()

    def get_modelmeta(self) -> Any:
        return self.real.get_modelmeta()

    def get_providers(self) -> list[str]:
        return list(self.real.get_providers())

    def run(self, names: Any, feeds: dict[str, np.ndarray]) -> Any:
        (batch,) = feeds.values()
        self.shapes.append(tuple(batch.shape))
        return [np.zeros((len(batch), 1), np.float32)]


@pytest.mark.parametrize(("use_cls", "limit_type", "limit"), [(False, "min", 736),
                                                              (True, "max", 1280)])
def test_warmup_runs_every_bucket_once(
    monkeypatch: pytest.MonkeyPatch, use_cls: bool, limit_type: str, limit: int
) -> None:
    made: dict[str, ZeroSession] = {}
    real_create = batch_module.create_session

    def create(path: Path, choice: Any, ocr: OcrSettings, **_: Any) -> ZeroSession:
        kind = "det" if "det" in path.name else "cls" if "cls" in path.name else "rec"
        made[kind] = ZeroSession(real_create(path, choice, ocr))
        return made[kind]

    monkeypatch.setattr(batch_module, "create_session", create)
    ocr = OcrSettings(use_cls=use_cls, det_limit_type=limit_type, det_limit_side_len=limit)
    engine = BatchEngine(ocr, CPU, max_pages=4)
    try:
        spent = engine.warmup(full=True)
    finally:
        engine.close()
    assert set(spent) == set(made) == ({"det", "cls", "rec"} if use_cls else {"det", "rec"})
    for model, session in made.items():
        counts = Counter(session.shapes)
        assert set(counts.values()) == {1}, model
    det_shapes = {shape[1:3] for shape in made["det"].shapes}  # [N, H, W, 3] pixels
    assert det_shapes == set(buckets.det_warm_shapes(limit, limit_type))
    assert {shape[0] for shape in made["det"].shapes} == {1, 2, 4}
    assert {shape[2] for shape in made["rec"].shapes} == set(buckets.REC_WIDTHS)
    if limit_type == "min":  # the short side is always the limit
        assert all(limit in shape[1:3] for shape in made["det"].shapes)
    else:  # pages up to the limit keep their size: every bucket up to it, none above
        assert all(max(shape[1:3]) <= limit for shape in made["det"].shapes)
        assert (256, 256) in det_shapes and (limit, limit) in det_shapes


class OverlapSession:
    """Records how many runs and elements are in flight at once; a run waits (up to 1 s) for
    two more to overlap it, so a warm-up that can run shapes together does."""

    def __init__(self) -> None:
        self.room = threading.Condition()
        self.shapes: list[tuple[int, ...]] = []
        self.running = self.in_flight = self.peak_runs = self.peak_elements = 0

    def get_inputs(self) -> Any:
        return [SimpleNamespace(name="x")]

    def run(self, names: Any, feeds: dict[str, np.ndarray]) -> Any:
        (batch,) = feeds.values()
        with self.room:
            self.shapes.append(tuple(batch.shape))
            self.running += 1
            self.in_flight += batch.size
            self.peak_runs = max(self.peak_runs, self.running)
            self.peak_elements = max(self.peak_elements, self.in_flight)
            self.room.notify_all()
            self.room.wait_for(lambda: self.running >= 3, timeout=1)
            self.running -= 1
            self.in_flight -= batch.size
        return [np.zeros((len(batch), 1), np.float32)]


def test_warmup_runs_shapes_together_within_twice_the_largest() -> None:
    """A GPU's new shapes cost host work: they are warmed in threads, but never with more than
    twice the largest shape's elements in flight (the arena keeps a warm-up's peak)."""
    shapes = [(n, 48, w, 3) for w in (3200, 2560, 1920, 640, 320) for n in (1, 8, 32)]
    session = OverlapSession()
    batch_module.warm_shapes(session, shapes, np.uint16, threads=4)
    assert sorted(session.shapes) == sorted(shapes)  # each once
    assert session.peak_runs >= 2
    assert session.peak_elements <= 2 * 32 * 48 * 3200 * 3


def test_warmup_on_the_cpu_runs_one_small_shape_per_model(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    made: dict[str, ZeroSession] = {}
    real_create = batch_module.create_session

    def create(path: Path, choice: Any, ocr: OcrSettings, **_: Any) -> ZeroSession:
        kind = "det" if "det" in path.name else "cls" if "cls" in path.name else "rec"
        made[kind] = ZeroSession(real_create(path, choice, ocr))
        return made[kind]

    monkeypatch.setattr(batch_module, "create_session", create)
    engine = BatchEngine(OcrSettings(use_cls=True), CPU)
    try:
        engine.warmup()
        warm = engine.warmup_shapes()
    finally:
        engine.close()
    for model, session in made.items():
        assert len(session.shapes) == 1, model
        assert session.shapes[0] in warm[model]
    assert made["det"].shapes[0][0] == 1
    assert made["rec"].shapes[0] == (1, 48, buckets.REC_WIDTHS[0], 3)


def test_real_warmup_runs_and_leaves_results_unchanged(
    pages: list[Image], reference: list[PageResult], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Warm-up on the real models, with the bucket set cut down so it takes seconds."""
    monkeypatch.setattr(buckets, "REC_WIDTHS", (320, 640))
    monkeypatch.setattr(buckets, "det_warm_shapes", lambda limit, kind, coarse=False: [(736, 1344)])
    engine = BatchEngine(OcrSettings(), CPU, max_pages=2, rec_batch_sizes=(1, 2, 4))
    try:
        spent = engine.warmup(full=True)
        results = engine.recognize(pages[:2])
    finally:
        engine.close()
    assert spent["det"] > 0 and spent["rec"] > 0 and "cls" not in spent
    _assert_same_text(results, reference[:2])


def _keep_inputs(monkeypatch: pytest.MonkeyPatch, model: str) -> list[np.ndarray]:
    """Every input row the engines built from now on feed `model` ("det", "rec"), copied."""
    fed: list[np.ndarray] = []
    real_create = batch_module.create_session

    class Keeping(RecordingSession):
        def run(self, names: Any, feeds: dict[str, np.ndarray]) -> Any:
            fed.extend(np.array(row) for row in next(iter(feeds.values())))
            return super().run(names, feeds)

    def create(path: Path, choice: Any, ocr: OcrSettings, **_: Any) -> Any:
        session = real_create(path, choice, ocr)
        return Keeping(session) if model in path.name else session

    monkeypatch.setattr(batch_module, "create_session", create)
    return fed


def test_gpu_shapes_feed_each_line_at_the_nearest_width(
    pages: list[Image], reference: list[PageResult], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the GPU's fixed widths a line is padded or squeezed to the nearest rung, by 16% at
    most (12% from 320 on), never padded up by a whole rung (up to 50% before, which cost
    0.008 F1 on receipts) nor from a short line up to RapidOCR's 320 (a third of a receipt's
    columns were that padding); only lines under 160 are padded to 160. The text still
    matches RapidOCR's."""
    fed = _keep_inputs(monkeypatch, "rec")
    engine = BatchEngine(OcrSettings(), CPU, max_pages=4, fixed_shapes=True,
                         rec_batch_sizes=buckets.REC_BATCH_SIZES, shape_sessions=False)
    try:
        results = engine.recognize(pages)
    finally:
        engine.close()
    assert _texts(results) == _texts(reference)
    text = [int((row != REC_PAD).any(axis=(0, 2)).sum()) for row in fed]  # columns of line
    rows = [(row.shape[1], used) for row, used in zip(fed, text, strict=True) if used]
    assert len(rows) >= 20 and any(width > buckets.REC_MIN_WIDTH for width, _ in rows)
    assert any(width < buckets.REC_MIN_WIDTH for width, _ in rows)
    for width, used in rows:
        assert width in buckets.REC_WIDTHS
        if width > buckets.REC_MIN_WIDTH_GPU:
            assert used >= width / (1.12 if width > buckets.REC_MIN_WIDTH else 1.16), (
                width, used)  # little padding, if any


def test_gpu_detection_batches_hold_each_page_and_white_around_it(
    pages: list[Image], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A page smaller than its fixed detection shape is padded with white (it reads as more
    margin), right of it and below it; the pixels of the page are its own."""
    fed = _keep_inputs(monkeypatch, "det")
    engine = BatchEngine(OcrSettings(), CPU, max_pages=4, fixed_shapes=True,
                         shape_sessions=False)
    try:
        engine.recognize(pages)
        inputs = [engine._prepare(page).det_input for page in pages]
    finally:
        engine.close()
    assert len(fed) == len(pages)
    padded = 0
    for row in fed:
        found = [d for d in inputs if d is not None and d.shape[0] <= row.shape[0]
                 and d.shape[1] <= row.shape[1]
                 and np.array_equal(row[:d.shape[0], :d.shape[1]], d)]
        assert found, row.shape
        h, w = found[0].shape[:2]
        assert (row[:h, w:] == batch_module.DET_PAD_WHITE).all()
        assert (row[h:] == batch_module.DET_PAD_WHITE).all()
        padded += (h, w) != row.shape[:2]
    assert padded >= 2


def test_each_warmed_shape_runs_on_a_session_of_its_own(
    pages: list[Image], reference: list[PageResult], monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a GPU a shape change costs every convolution a new cuDNN plan, so each warmed shape
    has its own session (built and first run by the warm-up); the text is unchanged."""
    made: dict[str, list[RecordingSession]] = {"det": [], "rec": []}
    real_create = batch_module.create_session

    profiles: dict[str, list[Any]] = {"det": [], "rec": []}

    def create(path: Path, choice: Any, ocr: OcrSettings, **kw: Any) -> RecordingSession:
        kind = "det" if "det" in path.name else "rec"
        made[kind].append(RecordingSession(real_create(path, choice, ocr)))
        profiles[kind].append(kw.get("profile"))
        return made[kind][-1]

    monkeypatch.setattr(batch_module, "create_session", create)
    monkeypatch.setattr(buckets, "REC_WIDTHS", (320, 640, 960, 1280, 1600))
    monkeypatch.setattr(buckets, "det_warm_shapes",
                        lambda limit, kind, coarse=False: [(960, 960)])
    engine = BatchEngine(OcrSettings(), CPU, max_pages=2, rec_batch_sizes=(1, 4),
                         fixed_shapes=True, shape_sessions=True)
    try:
        assert engine.warm_shapes_count() == (0, sum(map(len, engine.warmup_shapes().values())))
        engine.warmup(full=True, threads=2)
        warm = engine.warmup_shapes()
        shapes = sum(map(len, warm.values()))
        assert engine.warm_shapes_count() == (shapes, shapes)  # what /health says
        built, first = engine.sessions["rec"].warm[(4, 48, 320, 3)]  # each shape's seconds
        assert built > 0 and first > 0
        exported = engine.warm_seconds()  # what ocr_warmup_shape_seconds says
        assert sorted((m, s) for m, s, _, _ in exported) == sorted(
            (m, tuple(s)) for m, shapes in warm.items() for s in shapes)
        assert ("rec", (4, 48, 320, 3), built, first) in exported
        results = engine.recognize(pages[:3])
    finally:
        engine.close()
    one = BatchEngine(OcrSettings(), CPU, max_pages=2, rec_batch_sizes=(1, 4), fixed_shapes=True,
                      shape_sessions=False)
    try:
        assert one.recognize(pages[:3]) == results  # the same lines, boxes and scores
    finally:
        one.close()
    made["det"], made["rec"] = made["det"][:-1], made["rec"][:-1]  # that engine's own
    assert _texts(results) == _texts(reference[:3])
    for model in ("det", "rec"):
        base, *own = made[model]
        assert len(own) == len(warm[model]) == len(set(warm[model])), model
        assert {session.shapes[0] for session in own} == set(warm[model]), model
        assert all(len(set(session.shapes)) == 1 for session in own), model
        assert base.shapes == [], model  # every page and line fell in a warmed bucket
        # each shape's own session is built for that shape (TensorRT: its exact profile)
        assert profiles[model][0] is None, model
        assert [p for p in profiles[model][1:len(own) + 1]] == [
            ("x", session.shapes[0]) for session in own], model
    assert sum(len(session.shapes) for session in made["rec"]) > len(warm["rec"])


@pytest.mark.gpu
@pytest.mark.skipif(not (CUDA_EP in ort.get_available_providers() and probe_nvml().gpus),
                    reason="needs an NVIDIA GPU and onnxruntime-gpu")
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_on_a_gpu_the_engine_reads_what_the_cpu_reads(
    precision: str, pages: list[Image], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The GPU path end to end in the engine: a session per warmed shape, the text the CPU
    engine reads with the same buckets (bucket set cut down so the warm-up takes seconds), in
    float32 and with `ocr.gpu_precision = "fp16"`."""
    monkeypatch.setattr(buckets, "REC_WIDTHS", (160, 320, 640, 960))
    settings = Settings(ocr={"provider": "cuda", "gpu_precision": precision})
    gpu = BatchEngine(settings.ocr, choose_provider(settings), max_pages=2)
    try:
        assert gpu.provider == "cuda"
        gpu.warmup()
        got = gpu.recognize(pages[:3])
        rec = gpu.sessions["rec"]
        assert isinstance(rec, ShapeSessions)
        assert len(rec.shapes) == len(gpu.warmup_shapes()["rec"])
    finally:
        gpu.close()
    cpu = BatchEngine(OcrSettings(), CPU, max_pages=2, fixed_shapes=True)
    try:
        want = cpu.recognize(pages[:3])
    finally:
        cpu.close()
    assert [page.text for page in got] == [page.text for page in want]


def test_the_cpu_runs_full_precision_whatever_gpu_precision_says(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Half precision is for a GPU's tensor cores: onnxruntime's CPU has few float16 kernels
    and would cast around nearly every node."""
    asked: list[bool] = []
    for name in ("det_model", "rec_model"):
        real = getattr(batch_module, name)

        def recording(*args: Any, _real: Any = real, fp16: bool = False, **kwargs: Any) -> Any:
            asked.append(fp16)
            return _real(*args, fp16=fp16, **kwargs)

        monkeypatch.setattr(batch_module, name, recording)
    BatchEngine(OcrSettings(gpu_precision="fp16"), CPU).close()
    assert asked == [False, False]
    real_create = batch_module.create_session
    monkeypatch.setattr(batch_module, "create_session",  # a GPU choice, run where we are
                        lambda path, _choice, ocr, **kw: real_create(path, CPU, ocr, **kw))
    BatchEngine(OcrSettings(gpu_precision="fp16"), replace(CPU, name="cuda"),
                host_processes=0).close()
    assert asked[2:] == [True, True]


def test_shape_sessions_send_other_shapes_to_the_first_session() -> None:
    built: list[NamedSession] = []

    def make(shape: tuple[int, ...]) -> NamedSession:
        built.append(NamedSession(f"own{len(built)}"))
        return built[-1]

    sessions = ShapeSessions(NamedSession("base"), make)
    sessions.adopt((1, 48, 320, 3))
    sessions.adopt((1, 48, 320, 3))  # once per shape
    assert len(built) == 1 and sessions.shapes == [(1, 48, 320, 3)]
    assert sessions.run(None, {"x": np.zeros((1, 48, 320, 3))}) == "own0"
    assert sessions.run(None, {"x": np.zeros((2, 48, 320, 3))}) == "base"


def test_a_shape_expected_but_cold_gets_its_own_session_at_its_first_run_once() -> None:
    """A warm-up out of time leaves ladder shapes cold: each gets a session of its own at its
    first batch (its plans paid once, there), even when two threads bring it at once; a shape
    off the ladder still runs on the first session."""
    started = threading.Event()
    release = threading.Event()
    built: list[str] = []

    def make(shape: tuple[int, ...]) -> NamedSession:
        built.append(f"own{len(built)}")
        started.set()
        release.wait(timeout=30)  # building takes a while: the second thread comes meanwhile
        return NamedSession(built[-1])

    sessions = ShapeSessions(NamedSession("base"), make)
    sessions.expect([(8, 48, 384, 3)])
    feeds = {"x": np.zeros((8, 48, 384, 3))}
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(sessions.run, None, feeds)
        assert started.wait(timeout=30)
        second = pool.submit(sessions.run, None, feeds)
        release.set()
        assert first.result() == second.result() == "own0"
    assert built == ["own0"] and sessions.shapes == [(8, 48, 384, 3)]
    assert sessions.run(None, feeds) == "own0"
    assert sessions.run(None, {"x": np.zeros((8, 48, 3840, 3))}) == "base"


def test_shape_sessions_hold_no_lock_while_a_session_builds() -> None:
    """A build takes seconds on a GPU: meanwhile another shape can be asked for (each build
    here waits until the other has started); `create_session` decides whether builds overlap."""
    both_building = threading.Barrier(2, timeout=30)
    built: list[str] = []

    def make(shape: tuple[int, ...]) -> NamedSession:
        both_building.wait()  # broken (an error) if the other build cannot start meanwhile
        built.append("own")
        return NamedSession("own")

    sessions = ShapeSessions(NamedSession("base"), make)
    shapes = [(1, 48, 320, 3), (8, 48, 320, 3)]
    with ThreadPoolExecutor(2) as pool:
        adopted = list(pool.map(sessions.adopt, shapes))
    assert [session.name for session in adopted] == ["own", "own"] and len(built) == 2
    assert sorted(sessions.shapes) == shapes


def test_a_failed_session_build_is_raised_and_tried_again_at_the_next_ask() -> None:
    attempts: list[int] = []

    def make(shape: tuple[int, ...]) -> NamedSession:
        attempts.append(1)
        if len(attempts) == 1:
            raise RuntimeError("CUDA failure 2: out of memory")
        return NamedSession("own")

    sessions = ShapeSessions(NamedSession("base"), make)
    with pytest.raises(RuntimeError, match="out of memory"):
        sessions.adopt((8, 48, 384, 3))
    assert sessions.shapes == []
    assert sessions.adopt((8, 48, 384, 3)).name == "own"  # not remembered as failed
    assert len(attempts) == 2


def test_warmup_out_of_time_starts_no_new_shape_and_the_rest_warm_at_first_use(
    pages: list[Image], reference: list[PageResult]
) -> None:
    """No shape starts after the warm-up's time: the daemon is ready then, and the engine's
    batches still each get a session of their own shape (none replans the first session)."""
    shapes = [(n, 48, w, 3) for w in (640, 320) for n in (1, 8)]
    session = OverlapSession()
    cold = batch_module.warm_shapes(session, shapes, np.uint16, threads=2,
                                    deadline=time.monotonic())
    assert session.shapes == [] and sorted(cold) == sorted(shapes)

    engine = BatchEngine(OcrSettings(warmup_seconds=0), CPU, max_pages=2,
                         rec_batch_sizes=(1, 4), fixed_shapes=True, shape_sessions=True)
    try:
        engine.warmup(full=True, threads=2)  # ocr.warmup_seconds = 0: out of time at once
        rec = engine.sessions["rec"]
        assert isinstance(rec, ShapeSessions) and rec.shapes == []  # nothing warmed
        results = engine.recognize(pages[:3])
        used = rec.shapes
    finally:
        engine.close()
    assert used and set(used) <= set(engine.warmup_shapes()["rec"])
    assert _texts(results) == _texts(reference[:3])


def test_unknown_language_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"ocr\.lang"):
        resolve_model_paths(OcrSettings(lang="klingon"))


def test_missing_model_file_is_a_config_error_not_a_download(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import rapidocr.main

    monkeypatch.setattr(rapidocr.main, "root_dir", tmp_path)
    with pytest.raises(ConfigError, match="does not download"):
        resolve_model_paths(OcrSettings())
    assert not any(tmp_path.rglob("*.onnx"))


@pytest.mark.parametrize(
    ("count", "max_waste", "expected"),
    [
        (7, 0.0, [(4, 4), (2, 2), (1, 1)]),
        (4, 0.0, [(4, 4)]),
        (13, 0.25, [(16, 13)]),
        (9, 0.25, [(8, 8), (1, 1)]),
        (40, 0.25, [(32, 32), (8, 8)]),
        (0, 0.25, []),
    ],
)
def test_plan_batches(count: int, max_waste: float,
                      expected: list[tuple[int, int]]) -> None:
    plan = buckets.plan_batches(count, (1, 2, 4, 8, 16, 32) if max_waste else (1, 2, 4),
                                max_waste)
    assert [(slot.size, slot.real) for slot in plan] == expected
    assert sum(slot.real for slot in plan) == count


def test_buckets_cover_and_bound_the_padding() -> None:
    ladder = buckets.det_ladder(736)
    assert 736 in ladder
    for side in range(32, 4000, 32):
        bucket = buckets.det_bucket_side(side, ladder)
        assert bucket >= side and bucket % 32 == 0
        if side >= 256:
            assert bucket <= side * 1.2

def test_a_line_goes_to_the_nearest_width_padded_or_squeezed_by_12_percent_at_most() -> None:
    """Padding a line costs text (the recogniser never saw that in training): each goes to the
    rung nearest by ratio, so it changes by the ladder's half-step at most: 12% from 320 on,
    16% below. Only a line under 160 is padded further, to 160."""
    ladder = buckets.REC_WIDTHS
    assert ladder[0] == buckets.REC_MIN_WIDTH_GPU == 160 and ladder[-1] >= buckets.REC_WIDTH_TOP
    assert buckets.REC_MIN_WIDTH in ladder
    assert all(w % buckets.REC_WIDTH_ALIGN == 0 for w in ladder)
    steps = [b / a for a, b in itertools.pairwise(ladder)]
    assert max(steps) ** 0.5 < 1.16
    assert max(b / a for a, b in itertools.pairwise(ladder) if a >= 320) ** 0.5 < 1.12
    for needed in range(1, 6000, 7):
        width = buckets.rec_bucket_width(needed)
        if needed <= buckets.REC_MIN_WIDTH_GPU:
            assert width == buckets.REC_MIN_WIDTH_GPU  # padded, as RapidOCR pads short lines
            continue
        assert max(width / needed, needed / width) <= (1.12 if needed > 320 else 1.16), needed
        if needed <= ladder[-1]:
            assert width in ladder
    assert buckets.rec_bucket_width(500) == 480  # squeezed by 4%, not padded to 576 (15%)
    assert buckets.rec_bucket_width(560) == 576  # padded by 3%


def test_gpu_buckets_are_few_and_cover_every_page() -> None:
    """On a GPU each new shape is a cuDNN search: max mode needs one detection shape, min mode
    a handful, and every page the resize rule can produce still lands in one of them."""
    assert buckets.det_warm_shapes(960, "max", coarse=True) == [(960, 960)]
    ladder = buckets.det_ladder(960, coarse=True)
    for side in (32, 500, 959, 960):
        assert buckets.det_bucket_side(side, ladder) == 960
    min_shapes = buckets.det_warm_shapes(736, "min", coarse=True)
    assert len(min_shapes) <= 15
    min_ladder = buckets.det_ladder(736, coarse=True)
    for long_side in (736, 1000, 3000, 8000):
        h, w = buckets.det_bucket(736, long_side, min_ladder)
        assert (h, w) in min_shapes and w >= long_side
    assert len(buckets.det_warm_shapes(960, "max")) > 10  # the CPU keeps a fine ladder


def test_cpu_runs_pages_and_lines_unpadded(
    recording_sessions: Sessions, pages: list[Image], reference: list[PageResult]
) -> None:
    """On the CPU padding is real compute: pages run at their own size, lines one at a time at
    their own width (no 320 floor), and the text still matches RapidOCR's."""
    engine = BatchEngine(OcrSettings(), CPU, max_pages=4)
    try:
        results = engine.recognize(pages)
        det_sizes = {engine._prepare(page).det_input.shape[:2] for page in pages}  # type: ignore[union-attr]
    finally:
        engine.close()
    det, rec = recording_sessions["det"], recording_sessions["rec"]
    assert {shape[1:3] for shape in det.shapes} == det_sizes
    assert all(shape[0] == 1 for shape in rec.shapes)
    widths = [shape[2] for shape in rec.shapes]
    assert min(widths) >= buckets.REC_MIN_WIDTH_CPU and min(widths) < buckets.REC_MIN_WIDTH
    _assert_same_text(results, reference)


# -- host stages in worker processes ----------------------------------------------------------


def test_host_processes_give_the_same_results_as_in_process(
    pages: list[Image], reference: list[PageResult], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The GPU path's box extraction and crops in worker processes (pages in shared memory):
    line for line, box for box what the in-process path gives."""
    in_process = BatchEngine(OcrSettings(), CPU, max_pages=4, fixed_shapes=True,
                             host_processes=0)
    processes = BatchEngine(OcrSettings(), CPU, max_pages=4, fixed_shapes=True,
                            host_processes=2)
    taken = Counter[str]()
    take_lines = host_module.PageBuffer.take_lines

    def counted(buffer: host_module.PageBuffer, widths: Any) -> Any:
        taken["pages"] += 1
        return take_lines(buffer, widths)

    monkeypatch.setattr(host_module.PageBuffer, "take_lines", counted)
    segments: list[str] = []  # this engine's own: other processes on the host make theirs
    acquire = host_module.SegmentPool.acquire

    def recorded(pool: host_module.SegmentPool, nbytes: int) -> Any:
        shm = acquire(pool, nbytes)
        segments.append(shm.name)
        return shm

    monkeypatch.setattr(host_module.SegmentPool, "acquire", recorded)
    try:
        assert processes._host is not None and in_process._host is None
        want = in_process.recognize(pages)
        got = processes.recognize(pages)
        again = processes.recognize(pages[:2])  # the workers serve call after call
    finally:
        in_process.close()
        processes.close()
    assert taken["pages"] == len(pages) + 2  # every page's lines came back in shared memory
    assert [r.lines for r in got] == [r.lines for r in want]
    assert [r.lines for r in again] == [r.lines for r in want[:2]]
    assert [r.text for r in got] == [r.text for r in reference]
    assert segments, "the pages went through shared memory"
    left = [name for name in segments if (Path("/dev/shm") / name.lstrip("/")).exists()]
    assert not left, "shared pages must be unlinked"


def test_a_dead_host_worker_is_replaced(pages: list[Image],
                                        caplog: pytest.LogCaptureFixture) -> None:
    """A worker killed between calls (OOM killer, a crash) costs no page: the next call finds
    the pool broken and starts new workers; one killed during a call fails that call only
    (BrokenProcessPool, which the pipeline retries)."""
    engine = BatchEngine(OcrSettings(), CPU, max_pages=4, fixed_shapes=True, host_processes=1)
    try:
        assert engine._host is not None
        want = engine.recognize(pages[:1])
        dying = engine._host._executor.submit(os._exit, 1)
        with pytest.raises(BrokenProcessPool):
            dying.result()
        with caplog.at_level(logging.WARNING, logger="daemon.ocr.host"):
            assert engine.recognize(pages[:1])[0].lines == want[0].lines
        assert "starting new ones" in caplog.text
        assert engine.recognize(pages[:1])[0].lines == want[0].lines
    finally:
        engine.close()


def test_auto_host_processes_on_a_gpu_provider_only() -> None:
    cpu = BatchEngine(OcrSettings(), CPU, host_processes="auto")
    try:
        assert cpu._host is None  # inference uses the cores on the CPU provider
    finally:
        cpu.close()


def test_no_room_in_shared_memory_means_in_process(pages: list[Image],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A full /dev/shm (Docker's 64 MB default) must not kill the daemon with SIGBUS: the
    page is cut in this process instead, to the same lines."""
    engine = BatchEngine(OcrSettings(), CPU, max_pages=4, fixed_shapes=True, host_processes=1)
    try:
        want = engine.recognize(pages[:2])
        monkeypatch.setattr(batch_module, "shm_room", lambda _nbytes: False)
        assert [r.lines for r in engine.recognize(pages[:2])] == [r.lines for r in want]
    finally:
        engine.close()


def test_host_workers_leave_stopping_to_the_daemon(pages: list[Image]) -> None:
    """systemd sends SIGTERM to the whole cgroup and a terminal's Ctrl-C reaches the whole
    process group: the workers must go on with the batch the daemon is finishing."""
    import signal

    engine = BatchEngine(OcrSettings(), CPU, max_pages=4, fixed_shapes=True, host_processes=1)
    try:
        assert engine._host is not None
        executor = engine._host._executor
        want = engine.recognize(pages[:1])
        for signum in (signal.SIGTERM, signal.SIGINT):
            assert executor.submit(signal.getsignal, signum).result() == signal.SIG_IGN
        workers = dict(executor._processes)  # type: ignore[arg-type]
        for pid in workers:
            os.kill(pid, signal.SIGTERM)
            os.kill(pid, signal.SIGINT)
        assert engine.recognize(pages[:1])[0].lines == want[0].lines
        assert engine._host._executor is executor  # not rebuilt: no worker died
        assert all(process.is_alive() for process in workers.values())
    finally:
        engine.close()


def test_upright_boxes_are_sliced_to_the_same_bytes_as_rapidocr_warps_them() -> None:
    """The crop shortcut (a slice for an upright whole-pixel rectangle) gives byte for byte
    what RapidOCR's bicubic warpPerspective gives, for wide, tall (turned), edge-touching and
    one-pixel-offset boxes; other boxes still go through RapidOCR's own function."""
    from rapidocr.utils.process_img import get_rotate_crop_image

    from daemon.ocr.host import crop_line

    rng = np.random.default_rng(7)
    image = rng.integers(0, 256, (300, 500, 3), dtype=np.uint8)
    h, w = image.shape[:2]
    rects = [(0, 0, 120, 30), (37, 41, 310, 77), (380, 10, 420, 200), (1, 1, w - 1, h - 1),
             (250, 260, w - 1, h - 1)]
    rects += [(x0, y0, x0 + int(rng.integers(5, 150)), y0 + int(rng.integers(5, 90)))
              for x0, y0 in rng.integers(0, 200, (40, 2)).tolist()]
    shortcut = []
    for x0, y0, x1, y1 in rects:
        box = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], np.float32)
        got = crop_line(image, box, get_rotate_crop_image)
        want = get_rotate_crop_image(image, box.copy())
        assert got.shape == want.shape and np.array_equal(got, want), (x0, y0, x1, y1)
        shortcut.append(np.shares_memory(got, image))
    assert all(shortcut), "upright boxes must take the slice"
    tilted = np.array([[40, 50], [200, 40], [202, 70], [42, 80]], np.float32)
    got = crop_line(image, tilted, get_rotate_crop_image)
    assert not np.shares_memory(got, image)
    assert np.array_equal(got, get_rotate_crop_image(image, tilted.copy()))


def test_lines_come_back_in_the_page_segment_or_pickled_when_they_do_not_fit(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A host worker leaves a page's lines in its shared segment, where the map was, and the
    main process copies them out; lines that do not fit there come back pickled. Both are
    byte for byte the lines the in-process path cuts."""
    from multiprocessing import shared_memory

    from daemon.ocr import host
    from daemon.ocr.boxes import FastDBPostProcess
    from daemon.ocr.models import load_rapidocr_config

    det = load_rapidocr_config(OcrSettings()).Det
    monkeypatch.setattr(host, "_post", FastDBPostProcess(
        thresh=det.thresh, box_thresh=det.box_thresh, max_candidates=det.max_candidates,
        unclip_ratio=det.unclip_ratio, use_dilation=det.use_dilation,
        score_mode=det.score_mode))
    rng = np.random.default_rng(5)
    image = rng.integers(0, 256, (240, 900, 3), dtype=np.uint8)
    prob = np.zeros((120, 450), np.float32)  # the detector's map is smaller than the page
    for row in range(6):
        prob[8 + 18 * row : 14 + 18 * row, 20 : 60 + 60 * row] = 0.9
    want = host.detect_lines(host._post, image, prob[None, None])
    assert len(want.lines) == 6

    pool = host.SegmentPool(keep=0)
    roomy = host.PageBuffer(image, prob.shape, pool)
    try:
        roomy.put_map(prob)
        packed = host.post_detect(roomy.ref)
        assert packed.packed and not packed.lines
        got = roomy.take_lines(packed.packed)
    finally:
        roomy.release()
    needed = sum(line.nbytes for line in got)
    assert needed > prob.nbytes  # so a segment can hold the map and not the lines

    ref = roomy.ref
    tight = shared_memory.SharedMemory(create=True, size=ref.map_offset + needed - 1)
    try:
        assert tight.buf is not None
        tight.buf[: image.nbytes] = image.tobytes()
        tight.buf[ref.map_offset : ref.map_offset + prob.nbytes] = prob.tobytes()
        sent = host.post_detect(host.SharedPage(tight.name, image.shape, ref.map_offset,
                                                prob.shape))
    finally:
        tight.close()
        tight.unlink()
    assert not sent.packed and len(sent.lines) == 6
    for lines in (got, sent.lines):
        assert all(np.array_equal(a, b) for a, b in zip(lines, want.lines, strict=True))
    assert np.array_equal(packed.boxes, want.boxes) and np.array_equal(sent.boxes, want.boxes)


def test_a_failed_call_gives_segments_back_only_after_every_worker_is_done(
        pages: list[Image], monkeypatch: pytest.MonkeyPatch) -> None:
    """Host workers write lines into the pages' shared segments: when one page of a call
    fails, the call must wait for the other pages' workers before the segments go back to
    the pool, or a late worker would write into the next call's pages."""
    from concurrent.futures import ThreadPoolExecutor

    engine = BatchEngine(OcrSettings(), CPU, max_pages=4, fixed_shapes=True, host_processes=1)
    events: list[str] = []
    lock = threading.Lock()
    release = host_module.PageBuffer.release

    def released(buffer: host_module.PageBuffer) -> None:
        with lock:
            events.append("released")
        release(buffer)

    def late_worker(_ref: object) -> host_module.Detected:
        time.sleep(0.3)  # still writing when the other page's failure comes back
        with lock:
            events.append("worker done")
        return host_module.Detected(None, [])

    def failing_worker(_ref: object) -> host_module.Detected:
        raise ValueError("bad map")

    calls = Counter[str]()
    threads = ThreadPoolExecutor(4)

    def post_detect(ref: host_module.SharedPage) -> Any:
        calls["pages"] += 1
        return threads.submit(failing_worker if calls["pages"] == 1 else late_worker, ref)

    monkeypatch.setattr(host_module.PageBuffer, "release", released)
    try:
        assert engine._host is not None
        monkeypatch.setattr(engine._host, "post_detect", post_detect)
        with pytest.raises(ValueError, match="bad map"):
            engine.recognize(pages[:3])
    finally:
        threads.shutdown()
        engine.close()
    assert calls["pages"] == 3
    assert events == ["worker done"] * 2 + ["released"] * 3


def test_a_grey_page_reads_as_its_bgr_spread() -> None:
    """Grey and bilevel pages reach the engine as one byte a pixel: shrunk to the reading
    bound in one channel, then spread to BGR. Exactly the lines of the page spread first,
    on the CPU and on the GPU path's fixed shapes; one over the bound (2600 px) shrinks."""
    bgr = render_page(random_lines(7, 6), width=2600, font_size=44)
    grey = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
    spread = cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR)
    for fixed in (False, True):
        engine = BatchEngine(OcrSettings(), CPU, fixed_shapes=fixed)
        try:
            [got, want] = engine.recognize([grey, spread])
        finally:
            engine.close()
        assert got.lines == want.lines and len(want.lines) >= 5


@pytest.mark.parametrize(("message", "oom"), [
    ("CUDA failure 2: out of memory ; GPU=0 ; expr=cudaMalloc(&p, size);", True),
    ("CUDNN failure 4: CUDNN_STATUS_ALLOC_FAILED ; GPU=0", True),
    ("Failed to allocate memory for requested buffer of size 123", True),
    ("CUDNN failure 9: CUDNN_STATUS_NOT_SUPPORTED ; GPU=0 ; expr=cudnnConvolutionForward", False),
    ("CUDNN_BACKEND_API_FAILED: cudnn frontend: no valid engine configs", False),
    ("CUDA failure 700: an illegal memory access was encountered", False),
])
def test_only_allocation_failures_are_out_of_memory(message: str, oom: bool) -> None:
    """Any cuDNN error was taken for out-of-memory: the batch halved down to one page and the
    page failed as retryable, the real error never shown. A cuDNN "not supported" propagates
    as it came."""
    from daemon.ocr.device_runs import is_out_of_memory, run_split

    assert is_out_of_memory(RuntimeError(message)) is oom

    class Failing:
        runs = 0

        def get_inputs(self) -> list[Any]:
            return [type("Input", (), {"name": "x"})()]

        def run(self, _outputs: object, _feed: object) -> list[Any]:
            Failing.runs += 1
            raise RuntimeError(message)

    batch = np.zeros((4, 3, 8, 8), np.uint8)
    with pytest.raises((RuntimeError, GpuOutOfMemoryError)) as raised:
        run_split(Failing(), batch, 4)
    if oom:  # halved down to a single input, which fails as out of GPU memory
        assert isinstance(raised.value, GpuOutOfMemoryError) and Failing.runs == 3  # 4, 2, 1
    else:  # as it came, at the first run
        assert str(raised.value) == message and Failing.runs == 1


def test_warmup_takes_the_most_used_shapes_first() -> None:
    """The daemon serves while it warms: the shapes real pages use most are warmed first
    (`buckets.WARM_FIRST`, measured), then the rest largest first; they were largest first,
    leaving [32, 48, 160], 40 of 90 runs on receipts, among the last."""
    from daemon.ocr.batch import warm_shapes

    order: list[tuple[int, ...]] = []

    class Recording:
        def get_inputs(self) -> list[Any]:
            return [type("Input", (), {"name": "x"})()]

        def run(self, _names: object, feeds: dict[str, Any]) -> list[Any]:
            (batch,) = feeds.values()
            order.append(tuple(batch.shape))
            return [batch]

    shapes = [(n, buckets.REC_HEIGHT, w, 3) for w in buckets.REC_WIDTHS for n in (1, 8, 32)]
    assert warm_shapes(Recording(), shapes, np.uint16, threads=1, model="rec") == []
    assert order[0] == (32, 48, 160, 3) and sorted(order) == sorted(shapes)
    used = [shape for shape in order if shape in buckets.WARM_FIRST["rec"]]
    assert order[:len(used)] == used  # every measured shape before any other
