"""Device runs: one `session.run`, split in halves when the GPU runs out of memory, and a
session per input shape on a GPU."""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from typing import Any

import numpy as np
import numpy.typing as npt

from daemon.errors import DocumentError

log = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float32]

# What says an allocation failed, and nothing else: a cuDNN error of another kind (an op its
# frontend does not support, a bad parameter) matched "CUDNN" and was taken for out-of-memory,
# the batch halved down to one page and the page failed as retryable, hiding the real error.
_OOM_PATTERN = re.compile(
    r"out of memory|cudaMalloc|cudaErrorMemoryAllocation|Failed to allocate|allocation fail"
    r"|BFCArena|(?:CUDNN|CUBLAS|CUFFT)_STATUS_ALLOC_FAILED", re.IGNORECASE
)



class GpuOutOfMemoryError(DocumentError):
    """One page alone does not fit in GPU memory. Transient: retried, perhaps with more room."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason, permanent=False)


def is_out_of_memory(exc: BaseException) -> bool:
    return bool(_OOM_PATTERN.search(str(exc)))


def run_split(session: Any, batch: npt.NDArray[Any], real: int) -> list[npt.NDArray[Any]]:
    """`session.run` on `batch`, halving it on out-of-memory until it fits.

    Returns every output of the model, each for the first `real` entries only (the rest are
    padding). Halves holding nothing but padding are skipped. A single entry that still does
    not fit is a `GpuOutOfMemoryError` for the pages concerned; any other error propagates
    unchanged.
    """
    name = session.get_inputs()[0].name
    try:
        outputs: list[npt.NDArray[Any]] = session.run(None, {name: batch})
        return [output[:real] for output in outputs]
    except Exception as exc:
        if not is_out_of_memory(exc):
            raise
        if len(batch) == 1:
            raise GpuOutOfMemoryError(
                f"out of GPU memory on a single input of shape {list(batch.shape)}"
            ) from exc
        log.warning("out of memory on batch %s; retrying in halves", list(batch.shape))
    middle = len(batch) // 2
    first = run_split(session, batch[:middle], min(real, middle))
    if real <= middle:
        return first
    second = run_split(session, batch[middle:], real - middle)
    return [np.concatenate([a, b]) for a, b in zip(first, second, strict=True)]


class ShapeSessions:
    """A model's sessions on a GPU: one per warmed input shape, the first for any other.

    onnxruntime's CUDA convolution (its cuDNN 9 builds) keeps one cuDNN execution plan per
    node and builds it again whenever a run's input shape differs from that node's previous
    run: nothing is kept per shape. Measured on an H100 (onnxruntime-gpu 1.31.1,
    benchmarks/gpu_warmup.py): recogniser runs taking turns between three shapes cost 0.7 to
    3.7 s each, every time, against 11.5 ms for a [32,48,960] batch run again. A session of
    its own per shape means each node sees one shape forever. The models are small (10 and
    21 MB); the activations come from one arena per device where it can be shared
    (`hardware.sessions.share_device_arena`).

    Quacks like a session for `run_split`: `run` picks the session by the input's shape. A
    shape `expect`ed but not warmed (the warm-up ran out of time) gets its own session at its
    first run, which pays its plans once; any other shape (a line wider than the ladder, the
    halves of an out-of-memory split) runs on the first session.
    """

    def __init__(self, base: Any, make: Callable[[tuple[int, ...]], Any],
                 name: str = "model") -> None:
        self._base = base
        self._make = make
        self._name = name
        self._by_shape: dict[tuple[int, ...], Any] = {}
        # shape -> seconds its session took to build; those run once have their first run's
        self._built: dict[tuple[int, ...], float] = {}
        self._first_run: dict[tuple[int, ...], float] = {}
        self._expected: set[tuple[int, ...]] = set()
        self._pending: dict[tuple[int, ...], Future[Any]] = {}
        self._lock = threading.Lock()

    def get_inputs(self) -> Any:
        return self._base.get_inputs()

    def get_outputs(self) -> Any:
        return self._base.get_outputs()

    def get_modelmeta(self) -> Any:
        return self._base.get_modelmeta()

    def get_providers(self) -> Any:
        return self._base.get_providers()

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        """The shapes with a session of their own."""
        with self._lock:
            return list(self._by_shape)

    @property
    def warm(self) -> dict[tuple[int, ...], tuple[float, float]]:
        """The shapes whose session is built and has run once (its cuDNN plans made): the
        seconds the build and that first run took."""
        with self._lock:
            return {shape: (self._built[shape], seconds)
                    for shape, seconds in self._first_run.items()}

    def expect(self, shapes: Iterable[tuple[int, ...]]) -> None:
        """Shapes that get a session of their own at their first run, if not adopted before."""
        with self._lock:
            self._expected.update(tuple(shape) for shape in shapes)

    def adopt(self, shape: tuple[int, ...]) -> Any:
        """Give `shape` a session of its own, built once however many threads ask, and return
        it. Built outside this object's lock, which is never held for the seconds a build
        takes: a second thread asking for the same shape waits for the first's session, one
        asking for a shape already built gets it at once (`create_session` itself builds one
        session at a time in the process); runs of shapes with a session never take it."""
        shape = tuple(shape)
        with self._lock:
            session = self._by_shape.get(shape)
            if session is not None:
                return session
            waiting = self._pending.get(shape)
            pending: Future[Any] = Future() if waiting is None else waiting
            self._pending[shape] = pending
        if waiting is not None:  # another thread is building it
            return waiting.result()
        try:
            start = time.perf_counter()
            session = self._make(shape)
            built = time.perf_counter() - start
        except BaseException as exc:
            with self._lock:
                del self._pending[shape]
            pending.set_exception(exc)
            raise
        with self._lock:
            self._by_shape[shape] = session
            self._built[shape] = built
            del self._pending[shape]
        pending.set_result(session)
        return session

    def run(self, names: Any, feeds: dict[str, Any], *args: Any) -> Any:
        (batch,) = feeds.values()
        shape = tuple(batch.shape)
        session = self._by_shape.get(shape)
        if session is None:
            session = self.adopt(shape) if shape in self._expected else self._base
        if session is self._base or shape in self._first_run:
            return session.run(names, feeds, *args)
        start = time.perf_counter()  # its first run makes its plans: timed, said once
        outputs = session.run(names, feeds, *args)
        seconds = time.perf_counter() - start
        with self._lock:
            first = shape not in self._first_run
            self._first_run.setdefault(shape, seconds)
        if first:
            log.info("%s %s warm: session built in %.2f s, first run %.2f s", self._name,
                     list(shape), self._built.get(shape, 0.0), seconds)
        return outputs
