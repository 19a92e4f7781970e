"""A byte budget for what the pipeline holds in memory: the raw bytes of files being decoded
and the decoded pages waiting for, or inside, the OCR engine (`queue.memory_budget_bytes`).

Counting files or pages is no bound: one large-format TIFF page is 300 MB of pixels. Decoding
waits until its bytes fit. Two rules keep it from ever waiting on itself:
- raw bytes wait until they fit beside everything held, or until nothing is held at all (a file
  bigger than the budget is read alone);
- a page waits until it fits, or until no other decoded page is held: the raw bytes held while
  waiting belong to the documents being decoded, which only the pages' release can unblock, so
  they do not count against the page that comes next. A page over the budget is processed
  alone, never refused for its size (`ocr.max_image_pixels` refuses).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

WAIT_SLICE = 0.2  # seconds between looks at `cancelled`

SHM_FOLDER = "/dev/shm"
SHM_KEEP_FREE = 64 << 20  # room left for others in the shared-memory file system


def shm_room(nbytes: int) -> bool:
    """Whether `nbytes` more fit in shared memory now (pages and PDFs travel to worker
    processes there). Writing past a full tmpfs kills the writer (SIGBUS), and Docker gives
    containers 64 MB by default: what does not fit is handled in the daemon's process."""
    try:
        stats = os.statvfs(SHM_FOLDER)
    except OSError:
        return False
    return stats.f_bavail * stats.f_frsize >= nbytes + SHM_KEEP_FREE


class ByteBudget:
    def __init__(self, limit: int, on_change: Callable[[int], None] | None = None) -> None:
        self.limit = limit
        self._raw = 0
        self._pages = 0
        self._changed = threading.Condition()
        self._on_change = on_change

    @property
    def used(self) -> int:
        with self._changed:
            return self._raw + self._pages

    def acquire_raw(self, nbytes: int, cancelled: Callable[[], bool]) -> bool:
        """Wait for room for a file's bytes; False when `cancelled` first."""
        return self._acquire(nbytes, cancelled, raw=True)

    def acquire_page(self, nbytes: int, cancelled: Callable[[], bool]) -> bool:
        """Wait for room for a decoded page; False when `cancelled` first."""
        return self._acquire(nbytes, cancelled, raw=False)

    def release_raw(self, nbytes: int) -> None:
        self._release(nbytes, raw=True)

    def release_page(self, nbytes: int) -> None:
        self._release(nbytes, raw=False)

    def _acquire(self, nbytes: int, cancelled: Callable[[], bool], *, raw: bool) -> bool:
        with self._changed:
            while True:
                used = self._raw + self._pages
                alone = used == 0 if raw else self._pages == 0
                if alone or used + nbytes <= self.limit:
                    if raw:
                        self._raw += nbytes
                    else:
                        self._pages += nbytes
                    self._report()
                    return True
                if cancelled():
                    return False
                self._changed.wait(WAIT_SLICE)

    def _release(self, nbytes: int, *, raw: bool) -> None:
        with self._changed:
            if raw:
                self._raw = max(0, self._raw - nbytes)
            else:
                self._pages = max(0, self._pages - nbytes)
            self._report()
            self._changed.notify_all()

    def _report(self) -> None:
        if self._on_change is not None:
            self._on_change(self._raw + self._pages)
