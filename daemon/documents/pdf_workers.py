"""pdfium in worker processes: PDF pages rendered on every core, and pdfium crashing on a
hostile file is that document's failure, not the daemon's.

pdfium is not thread-safe, so in one process every call goes through one lock (`pdf.py`):
scanned pages render one at a time, ~17 ms a Letter page at 200 dpi, and a daemon rendered
at most ~58 pages/s however many cores it had (benchmarks/pdf_pages.py). Here each worker
process has a pdfium of its own. A document goes into shared memory once; a worker copies it
out and opens it the first time it is given one of its pages, and keeps the last few open.
Each page is what `pdf._page` makes of it in-process: its text layer or its render, drawn
straight into a new shared segment that the daemon maps as the page's pixels (no copy; the
name is removed at once). The daemon's side still opens the document first (encrypted,
broken, no pages, too many pages: the same refusals), reads the page sizes for the memory
budget, and yields the pages in order. Without room in /dev/shm a document is read in-process
and a page comes back pickled. Each worker keeps up to `OPEN_PER_WORKER` documents' bytes.

Measured on 2 cores. Letter scans at 200 dpi, two decoding threads at once
(`benchmarks/pdf_pages.py --pages 10 --repeat 5`): 59.7 pages/s in-process, 76.7 in two
workers. 300-dpi A4 scans in PDFs through the whole daemon (`benchmarks/host_ceiling.py
--a4-pdf 40`): each render takes ~54 ms under the lock, so in-process a daemon reads at most
~18 such pages/s whatever its cores; workers remove that ceiling but cost 10-30% more per
page, and on 2 cores the daemon read 14.0 pages/s in-process against 12.0 in workers: the
pipeline's "auto" uses them from 4 cores on.
"""

from __future__ import annotations

import contextlib
import logging
import math
import mmap
import os
import secrets
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import CancelledError
from dataclasses import replace
from multiprocessing import resource_tracker, shared_memory
from typing import Any

import numpy as np

from daemon.budget import SHM_FOLDER, shm_room
from daemon.config import OcrSettings
from daemon.documents import pdf
from daemon.errors import DocumentError
from daemon.process_pool import ProcessPool, WorkerDied, alive
from daemon.results import Image, Page

log = logging.getLogger(__name__)

OPEN_PER_WORKER = 2  # documents a worker keeps open: the one it is on and the one before
# A worker's render segments are named after it, so that those of a worker that died before
# handing them over (killed for memory, pdfium crashing on a hostile file) can be found and
# removed: each was a page's pixels (a 300 MB page, a segment) in /dev/shm for the daemon's life.
SEGMENT_PREFIX = "ocrd-pdf-"


class PdfWorkers(ProcessPool):
    """pdfium in worker processes (`daemon.process_pool`): a worker that dies fails its page's
    document, transiently (a worker killed for memory is not the file's fault), and the pool
    is rebuilt; closing gives a page being rendered CLOSE_TIMEOUT seconds."""

    def __init__(self, processes: int) -> None:
        super().__init__(processes, "a PDF worker")
        self._after_a_death()  # those of an earlier daemon's workers, killed with it

    def _after_a_death(self) -> None:
        try:
            entries = os.listdir(SHM_FOLDER)
        except OSError:  # no /dev/shm here: segments live elsewhere, and nothing to sweep
            return
        for entry in entries:
            if not entry.startswith(SEGMENT_PREFIX):
                continue
            pid = entry[len(SEGMENT_PREFIX):].split("-")[0]
            if not pid.isdigit() or alive(int(pid)):
                continue
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(SHM_FOLDER, entry))
                log.warning("removed %s, a dead PDF worker's page", entry)
            with contextlib.suppress(Exception):  # it registered it with the shared tracker
                resource_tracker.unregister("/" + entry, "shared_memory")

    def pages(self, data: bytes, ocr: OcrSettings, reserve: Callable[[int], None]
              ) -> Iterator[Page]:
        """The pages of the PDF in `data`, in order, as `pdf.iter_pdf_pages` makes them (in this
        process when shared memory has no room for the document)."""
        if not shm_room(len(data)):
            yield from pdf.iter_pdf_pages(data, ocr, reserve)
            return
        sizes = pdf.page_sizes(data, ocr)
        shm = shared_memory.SharedMemory(create=True, size=max(1, len(data)))
        try:
            buffer = shm.buf
            assert buffer is not None  # an open segment
            buffer[: len(data)] = data
            del buffer  # a segment cannot be closed while a view of it lives
            for index, (width_pt, height_pt) in enumerate(sizes):
                size = pdf.render_size(width_pt, height_pt, ocr.pdf_dpi, ocr.max_image_pixels)
                reserve(size.width * size.height * 3)  # a text layer gives it back at once
                page = self._page(shm.name, len(data), index, ocr)
                if page.image is not None:
                    pdf.warn_if_lowered(size, index, width_pt, height_pt, ocr)
                yield page
        finally:
            shm.close()
            shm.unlink()

    def _page(self, name: str, nbytes: int, index: int, ocr: OcrSettings) -> Page:
        try:
            page, pixels = self.call(_render, name, nbytes, index, ocr)
            return page if pixels is None else replace(page, image=_take(pixels))
        except WorkerDied:
            raise DocumentError(f"page {index + 1} stopped the PDF renderer (pdfium crashed or "
                                f"was killed)", permanent=False) from None
        except (CancelledError, RuntimeError):
            if not self.closed:
                raise
            # the daemon stops: its documents in flight were handed back already
            raise DocumentError("the daemon is stopping", permanent=False) from None


# --- in the worker -----------------------------------------------------------------------

_documents: OrderedDict[str, tuple[bytes, Any]] = OrderedDict()  # segment -> (bytes, document)


def _document(name: str, nbytes: int) -> Any:
    if name in _documents:
        _documents.move_to_end(name)
        return _documents[name][1]
    shm = shared_memory.SharedMemory(name=name)
    try:
        buffer = shm.buf
        assert buffer is not None  # an open segment
        data = bytes(buffer[:nbytes])
        del buffer  # a segment cannot be closed while a view of it lives
    finally:
        shm.close()
    _documents[name] = (data, pdf.open_document(data))  # pdfium reads `data` while it is open
    while len(_documents) > OPEN_PER_WORKER:
        _, (_, old) = _documents.popitem(last=False)
        pdf.close_document(old)
    return _documents[name][1]


def _render(name: str, nbytes: int, index: int, ocr: OcrSettings
            ) -> tuple[Page, tuple[str, tuple[int, ...]] | None]:
    """Page `index`, rendered straight into a new shared segment (named, with its shape, in
    place of the image) when there is room. Pickled through the pool's pipe, an 11 MB Letter
    page at 200 dpi took four copies and the daemon's GIL to unpickle: workers rendered half
    as many pages as one process."""
    segments: list[shared_memory.SharedMemory] = []

    def into(shape: tuple[int, ...]) -> Image:
        size = math.prod(shape)
        if not shm_room(size):
            return np.empty(shape, np.uint8)  # sent back pickled
        segments.append(new_segment(size))
        return np.ndarray(shape, np.uint8, buffer=segments[0].buf)

    try:
        page = pdf.one_page(_document(name, nbytes), index, ocr, into)
    except BaseException:
        for shm in segments:  # its mapping goes with the failed render's array
            shm.unlink()
        raise
    if not segments:
        return page, None
    shm = segments[0]
    assert page.image is not None  # rendered into the segment
    shape = page.image.shape
    page = replace(page, image=None)  # the last view of the segment: it can close
    shm.close()
    return page, (shm.name, shape)


def new_segment(size: int) -> shared_memory.SharedMemory:
    """A segment for a page rendered in this worker, named after it (`SEGMENT_PREFIX`)."""
    name = f"{SEGMENT_PREFIX}{os.getpid()}-{secrets.token_hex(6)}"
    return shared_memory.SharedMemory(name=name, create=True, size=max(1, size))


def _take(pixels: tuple[str, tuple[int, ...]]) -> Image:
    """A render a worker left in shared memory, as an array over that memory (no copy: the
    page's own pixels until it is dropped); the segment's name is removed at once, so nothing
    is left behind whatever happens to the page."""
    name, shape = pixels
    path = os.path.join(SHM_FOLDER, name)
    nbytes = math.prod(shape)
    fd = os.open(path, os.O_RDWR)
    try:
        mapping = mmap.mmap(fd, max(1, nbytes))
    finally:
        os.close(fd)
        os.unlink(path)
        resource_tracker.unregister("/" + name, "shared_memory")  # the worker registered it
    return np.frombuffer(mapping, np.uint8, count=nbytes).reshape(shape)
