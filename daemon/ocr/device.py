"""Device runs: one `session.run`, split in halves when the GPU runs out of memory."""

from __future__ import annotations

import logging
import re
from typing import Any

import numpy as np
import numpy.typing as npt

from daemon.errors import DocumentError

log = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float32]

_OOM_PATTERN = re.compile(
    r"out of memory|CUDNN|cudaMalloc|Failed to allocate|allocation fail|BFCArena", re.IGNORECASE
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
