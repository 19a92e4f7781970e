"""Host stages of the engine: pre-processing of lines, and box extraction and crops, in
worker processes on the GPU path so they use every core.

After detection, each page's DB boxes are extracted from its probability map, sorted, cropped
from the page and each crop resized to the recogniser's height: Python loops and small OpenCV
calls, the largest share of the host work left once pre-processing moved to the device. In
threads they hold the GIL (the whole host pipeline scaled 1.04x from one core to two); in
processes they scale with the cores.

The page travels in shared memory (the main process writes it once; the worker maps it, no
copy), its probability map (a page's own `h x w` crop of the batch output) after it in the same
segment; the resized lines come back there too where they fit, the boxes pickled (kB). The
steps are RapidOCR's own or, where they cost most, faster ways to the same bytes (`ocr.boxes`
for the boxes, `crop_line`, `ctc_decode`), each pinned by a test against RapidOCR's function;
in and out of process a line is cropped and resized alike.
"""

from __future__ import annotations

import copy
import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from multiprocessing import shared_memory
from typing import Any, cast

import cv2
import numpy as np
import numpy.typing as npt

from daemon.ocr import buckets
from daemon.process_pool import CLOSE_TIMEOUT, ProcessPool
from daemon.results import Image

log = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float32]


@dataclass(frozen=True)
class SharedPage:
    """A page in shared memory, what a worker needs to map it: the image at the start of the
    segment, then (at `map_offset`) its detection map, `[h, w]` float32, which the worker's
    resized lines overwrite once the boxes are found."""

    name: str
    shape: tuple[int, ...]
    map_offset: int
    map_shape: tuple[int, int]




class SegmentPool:
    """Shared-memory segments reused page after page. A new segment's memory is faulted in
    and zeroed by the kernel on first touch: copying a receipt into a fresh one cost the main
    process more than the rest of preparing it (py-spy, benchmarks/host_ceiling.py). At most
    `keep` idle segments are kept (about the pages of the batches in flight), sized in steps
    of `SEGMENT_STEP`; the rest are unlinked."""

    SEGMENT_STEP = 4 << 20

    def __init__(self, keep: int) -> None:
        self._keep = keep
        self._idle: list[shared_memory.SharedMemory] = []
        self._lock = threading.Lock()

    def acquire(self, nbytes: int) -> shared_memory.SharedMemory:
        with self._lock:
            fitting = [shm for shm in self._idle if shm.size >= nbytes]
            if fitting:
                best = min(fitting, key=lambda shm: shm.size)
                self._idle.remove(best)
                return best
        size = -(-max(1, nbytes) // self.SEGMENT_STEP) * self.SEGMENT_STEP
        return shared_memory.SharedMemory(create=True, size=size)

    def release(self, shm: shared_memory.SharedMemory) -> None:
        with self._lock:
            if len(self._idle) < self._keep:
                self._idle.append(shm)
                return
        _unlink(shm)

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for shm in idle:
            _unlink(shm)


def _unlink(shm: shared_memory.SharedMemory) -> None:
    shm.close()
    shm.unlink()


class PageBuffer:
    """The main process's side of a shared page: the image copied into a segment of the pool,
    which gets the segment back when the page is done. After the image there is room for the
    page's detection map and, in its place afterwards, the page's lines: as large as the
    image or the map, whichever is larger (receipts' lines, small text scaled up to 48 px,
    take ~1.5x the image's bytes: the 4 MB steps of the pool leave room for them).

    Map and lines travel here rather than pickled through the pool's pipe: that was a third
    of a host worker's CPU time (pickle, two kernel copies, unpickle of 3.7 MB of map and
    ~2 MB of lines per receipt), and the main process's pickling and unpickling held the GIL
    that every other stage of the daemon waits for."""

    def __init__(self, image: Image, map_shape: tuple[int, int], pool: SegmentPool) -> None:
        self._pool = pool
        self._shm = pool.acquire(self.nbytes(image, map_shape))
        view: Image = np.ndarray(image.shape, np.uint8, buffer=self._shm.buf)
        view[...] = image
        del view  # a segment cannot be closed while a view of it lives
        self.ref = SharedPage(self._shm.name, tuple(image.shape), _aligned(image.nbytes),
                              map_shape)

    @staticmethod
    def nbytes(image: Image, map_shape: tuple[int, int]) -> int:
        """What a page takes in shared memory (for the room check before it is made)."""
        return _aligned(image.nbytes) + max(map_shape[0] * map_shape[1] * 4, image.nbytes)

    def put_map(self, prob: FloatArray) -> None:
        """The page's `[h, w]` detection map, into its place in the segment."""
        view = np.ndarray(self.ref.map_shape, np.float32, buffer=self._shm.buf,
                          offset=self.ref.map_offset)
        view[...] = prob
        del view

    def take_lines(self, widths: Sequence[int]) -> list[Image]:
        """The lines a worker left in the segment (`widths`, in order), copied out in one
        piece: the segment goes back to the pool before they are recognised."""
        total = _line_bytes(widths)
        flat: Image = np.ndarray((total,), np.uint8, buffer=self._shm.buf,
                                 offset=self.ref.map_offset).copy()
        lines: list[Image] = []
        offset = 0
        for width in widths:
            size = _line_bytes((width,))
            lines.append(flat[offset : offset + size].reshape(buckets.REC_HEIGHT, width, 3))
            offset += size
        return lines

    def release(self) -> None:
        self._pool.release(self._shm)


def _aligned(nbytes: int) -> int:
    return -(-nbytes // 64) * 64


def _line_bytes(widths: Sequence[int]) -> int:
    return buckets.REC_HEIGHT * 3 * sum(widths)


@dataclass(frozen=True)
class Detected:
    boxes: FloatArray | None  # sorted as RapidOCR sorts them; None when no text was found
    lines: list[Image]  # each box's crop (resized to the recogniser's height), in box order
    # from a worker: the widths of the lines it left in the page's segment instead of `lines`
    packed: tuple[int, ...] = ()


# --- pre-processing (the normalisation itself runs on the device: ocr/graphs.py) ---------


def resize_rec(crop: Image, resized_w: int, out: npt.NDArray[np.uint16]) -> None:
    """RapidOCR's TextRecognizer.resize_norm_img without the normalisation (done on the
    device), written into the first `resized_w` columns of a bucket-wide `[48, W, 3]` slot;
    the caller fills the rest with REC_PAD (normalised to 0.0, mid-grey, as RapidOCR pads).
    `resized_w` is the line's own width, or the slot's when the line is squeezed into it
    (`buckets.rec_bucket_width`). A line already at that size (resized where it was cropped)
    is copied as it is."""
    if crop.shape[:2] == (buckets.REC_HEIGHT, resized_w):
        out[:, :resized_w] = crop
    else:
        out[:, :resized_w] = cv2.resize(crop, (resized_w, buckets.REC_HEIGHT))


def normalise_rec(pixels: Image) -> FloatArray:
    """RapidOCR's recognition normalisation of `[H, W, 3]` pixels, to `[3, H, W]` float32."""
    out = cast(FloatArray, pixels.astype(np.float32).transpose((2, 0, 1)) / 255)
    out -= 0.5
    out /= 0.5
    return out


def rec_lut() -> FloatArray:
    """`normalise_rec` of every pixel value, per channel (256 x 3), and 0.0 for REC_PAD."""
    values = np.arange(256, dtype=np.uint8).reshape(1, 256, 1).repeat(3, axis=2)
    table = normalise_rec(values)[:, 0, :].T  # [256, 3]
    return np.concatenate([table, np.zeros((1, 3), np.float32)])


def det_lut(pre: Any) -> FloatArray:
    """RapidOCR's DetPreProcess normalisation of every pixel value, per channel (256 x 3)."""
    values = np.arange(256, dtype=np.uint8).reshape(1, 256, 1).repeat(3, axis=2)
    return np.ascontiguousarray(pre.normalize(values)[0].astype(np.float32))


def ctc_decode(characters: Sequence[str], best: npt.NDArray[np.int64],
               best_prob: FloatArray) -> list[tuple[str, float]]:
    """RapidOCR's CTCLabelDecode.decode(best, best_prob, remove_duplicate=True) for a whole
    batch at once: repeats collapsed, blanks (index 0) dropped, the score the mean of the
    kept steps' scores each rounded to 5 places, rounded again. The same text and the same
    floats, for a tenth of the cost (RapidOCR's per-line numpy calls and a Python `round`
    per character were ~5 ms per receipt in the main process).

    Rounding: RapidOCR rounds each score with Python's `round(x, 5)`, the float nearest to
    the exact value of x rounded half-even to 5 decimals. `np.round` computes
    rint(x * 1e5) / 1e5; for a float32 score (24-bit mantissa) x * 1e5 (17 bits) is exact in
    float64, rint rounds that exact value half-even, and the division is correctly rounded:
    the same float. The mean is numpy's own (`sum` of the slice / count, as `np.mean`)."""
    keep = best != 0
    keep[:, 1:] &= best[:, 1:] != best[:, :-1]
    counts = keep.sum(axis=1).tolist()
    chars = [characters[i] for i in best[keep].tolist()]
    scores = np.round(best_prob[keep].astype(np.float32).astype(np.float64), 5)
    texts: list[str] = []
    means = np.zeros(len(counts))  # a line with no text scores 0.0
    start = 0
    for k, count in enumerate(counts):
        end = start + count
        if count:
            means[k] = scores[start:end].sum() / count
        texts.append("".join(chars[start:end]))
        start = end
    # rounded all at once: the same rint(x * 1e5) / 1e5 per element as a scalar's round(5),
    # which took ~40% of this function's time, once a line
    return list(zip(texts, np.round(means, 5).tolist(), strict=True))


# --- in the worker -----------------------------------------------------------------------

_post: Any = None


def _init_worker(det_params: dict[str, Any]) -> None:
    global _post
    from daemon.ocr.boxes import FastDBPostProcess

    cv2.setNumThreads(1)  # one process per core already
    _post = FastDBPostProcess(**det_params)


def post_detect(page: SharedPage) -> Detected:
    """DB boxes of one page from its map, then its lines, ready to recognise: left in the
    page's segment where the map was when they fit (they do on receipts), else sent back."""
    shm = shared_memory.SharedMemory(name=page.name)
    try:
        image: Image = np.ndarray(page.shape, np.uint8, buffer=shm.buf)
        prob: FloatArray = np.ndarray((1, 1, *page.map_shape), np.float32, buffer=shm.buf,
                                      offset=page.map_offset)
        try:
            found = detect_lines(_post, image, prob)
            del prob  # the map is spent: its place takes the lines
            widths = tuple(line.shape[1] for line in found.lines)
            if not widths or _line_bytes(widths) > shm.size - page.map_offset:
                return found
            offset = page.map_offset
            for line in found.lines:
                slot = np.ndarray(line.shape, np.uint8, buffer=shm.buf, offset=offset)
                slot[...] = line
                offset += line.nbytes
                del slot
            return Detected(found.boxes, [], widths)
        finally:
            del image  # the mapping cannot close while a view of it lives
    finally:
        shm.close()


def crop_line(image: Image, box: FloatArray, rotate_crop: Callable[[Image, FloatArray], Image]
              ) -> Image:
    """RapidOCR's get_rotate_crop_image (`rotate_crop`) of one box, with a shortcut for the
    usual box: an upright rectangle on whole pixels (RapidOCR rounds and clips every corner
    to whole pixels; 73% of boxes on receipts are upright). Its perspective transform is then
    a whole-pixel shift, where bicubic sampling weighs the one pixel under each sample 1 and
    its neighbours 0, so warpPerspective returns exactly the pixels of the rectangle: a slice
    gives the same bytes for ~1/10 of the cost (the crops were the largest host stage:
    18 of 40 ms per receipt on one core)."""
    (x0, y0), (x1, y1), (x2, y2), (x3, y3) = box.tolist()
    if (y0 == y1 and y2 == y3 and x0 == x3 and x1 == x2 and x1 > x0 and y3 > y0
            and float(x0).is_integer() and float(y0).is_integer()
            and float(x1).is_integer() and float(y3).is_integer()):
        crop = image[int(y0):int(y3), int(x0):int(x1)]
        # the rectangle lies in the image: RapidOCR clips every corner to [0, size - 1]
        return np.rot90(crop) if crop.shape[0] / crop.shape[1] >= 1.5 else crop
    return rotate_crop(image, copy.deepcopy(box))


def detect_lines(post: Any, image: Image, prob: FloatArray, *, resize: bool = True) -> Detected:
    """RapidOCR's DB post-processing, box sorting and rotated crops, then (with `resize`) each
    crop resized to the recogniser's height at its own width: the width its slot gets in any
    batch, so the recogniser's input is the same as resizing it there."""
    from rapidocr.ch_ppocr_det.main import TextDetector
    from rapidocr.utils.process_img import get_rotate_crop_image

    boxes, _ = post(prob, image.shape[:2])
    if len(boxes) == 0:
        return Detected(None, [])
    boxes = TextDetector.sorted_boxes(boxes)
    crops = [crop_line(image, box, get_rotate_crop_image) for box in boxes]
    if not resize:
        return Detected(boxes, crops)
    lines: list[Image] = []
    for crop in crops:
        width = buckets.rec_needed_width(crop.shape[0], crop.shape[1])
        lines.append(cast(Image, cv2.resize(crop, (width, buckets.REC_HEIGHT))))
    return Detected(boxes, lines)


# --- in the main process -----------------------------------------------------------------


class HostPool(ProcessPool):
    """`post_detect` in worker processes (`daemon.process_pool`: a worker that dies fails the
    batch it was running, which the pipeline retries; the next batch gets fresh workers), and
    the shared-memory segments the pages travel in."""

    def __init__(self, processes: int, det_params: dict[str, Any], keep_segments: int = 8
                 ) -> None:
        super().__init__(processes, "a host worker", _init_worker, (det_params,))
        self.segments = SegmentPool(keep_segments)

    def post_detect(self, page: SharedPage) -> Future[Detected]:
        return self.submit(post_detect, page)

    def close(self, timeout: float = CLOSE_TIMEOUT) -> None:
        super().close(timeout)
        self.segments.close()
