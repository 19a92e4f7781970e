"""The documents a pipeline holds, and its progress clock.

A document is held from its claim until it is stored, failed or handed back, and each holds
one of `queue.capacity` slots: when every slot is taken, files wait in the folder and nothing
grows. The table is what the claim loop fills, the heartbeat renews, the OCR and store loops
complete and the outcomes empty; `/health` reads its size and how long it went without
progress (a loop alive but hung is reported, not hidden).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from daemon.results import Page, PageResult
from daemon.store.records import Claim


@dataclass
class InFlight:
    claim: Claim
    path: Path | None = None  # the path it was read from, once read
    total: int | None = None
    results: dict[int, PageResult] = field(default_factory=dict)
    failed: bool = False
    finished: bool = False
    ocr_seconds: float = 0.0
    # the bytes read and checked, kept for an output made from them (the searchable PDF),
    # and what of the memory budget they hold until then
    data: bytes | None = None
    data_budget: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def complete(self) -> bool:
        return self.total is not None and len(self.results) == self.total

    def stop(self) -> bool:
        """Mark it failed (its pages are dropped, nothing is stored); False when it was
        finished or failed already."""
        with self.lock:
            if self.finished or self.failed:
                return False
            self.failed = True
            return True

    def finish(self) -> bool:
        """Mark it finished (it is being stored); False when it was finished or failed
        already."""
        with self.lock:
            if self.finished or self.failed:
                return False
            self.finished = True
            return True


@dataclass
class Call:
    """A decoder or engine call under way on some documents: since when (None while it waits
    for the memory budget, which is no hang)."""

    what: str  # "decode", or the OCR loop's name
    docs: tuple[InFlight, ...]
    since: float | None

    def seconds(self) -> float:
        return 0.0 if self.since is None else time.monotonic() - self.since


@dataclass(frozen=True)
class PageTask:
    doc: InFlight
    page: Page
    nbytes: int = 0  # of the memory budget, given back once the engine is done with it


class InFlightTable:
    def __init__(self, capacity: int, on_depth: Callable[[int], None],
                 release_bytes: Callable[[int], None] = lambda _nbytes: None) -> None:
        self._release_bytes = release_bytes  # the budget's, for a document's kept bytes
        self._slots = threading.BoundedSemaphore(capacity)
        self._docs: dict[int, InFlight] = {}
        self._lock = threading.Lock()
        self._on_depth = on_depth
        self._progress_at = time.monotonic()
        self._calls: dict[int, Call] = {}
        self.changed = threading.Event()  # a slot freed or news queued: the claim loop looks

    # -- slots ----------------------------------------------------------------------------

    def take_slot(self, timeout: float | None = None) -> bool:
        """One slot, waiting up to `timeout` (None: not at all)."""
        if timeout is None:
            return self._slots.acquire(blocking=False)
        return self._slots.acquire(timeout=timeout)

    def give_slots(self, count: int) -> None:
        for _ in range(count):
            self._slots.release()

    # -- documents ------------------------------------------------------------------------

    def add(self, claim: Claim) -> InFlight:
        """A claimed document, in the slot taken for it."""
        doc = InFlight(claim)
        with self._lock:
            if not self._docs:  # time idle before this is not stuck time
                self._progress_at = time.monotonic()
            self._docs[claim.document_id] = doc
            self._on_depth(len(self._docs))
        return doc

    def remove(self, doc: InFlight, *, keep_data: bool = False) -> None:
        """It is stored, failed or handed back: its slot is free (once, however often it is
        removed), and its kept bytes too unless `keep_data` (outputs still to be made from
        them: `drop_data` then)."""
        if not keep_data:
            self.drop_data(doc)
        self.progressed()
        with self._lock:
            if self._docs.pop(doc.claim.document_id, None) is not None:
                self._slots.release()
            self._on_depth(len(self._docs))
        self.changed.set()

    def drop_data(self, doc: InFlight) -> None:
        with doc.lock:
            nbytes, doc.data, doc.data_budget = doc.data_budget, None, 0
        if nbytes:
            self._release_bytes(nbytes)

    def held(self) -> dict[int, InFlight]:
        """A copy: document id -> the document."""
        with self._lock:
            return dict(self._docs)

    def count(self) -> int:
        with self._lock:
            return len(self._docs)

    def ahead_of_the_engines(self) -> int:
        """Documents with pages still to decode or recognise (not only to store)."""
        with self._lock:
            return sum(1 for doc in self._docs.values() if not doc.complete)

    # -- calls under way: a hang shows as one that lasts ------------------------------------

    @contextmanager
    def calling(self, what: str, docs: Sequence[InFlight]) -> Iterator[Call]:
        """A decoder or engine call on `docs`, timed while it lasts."""
        call = Call(what, tuple(docs), time.monotonic())
        with self._lock:
            self._calls[id(call)] = call
        try:
            yield call
        finally:
            with self._lock:
                self._calls.pop(id(call), None)

    def stuck_calls(self, after_seconds: float) -> list[Call]:
        """The calls under way for longer than `after_seconds` (a decoder or an engine call
        that never returns), longest first."""
        with self._lock:
            calls = list(self._calls.values())
        return sorted((call for call in calls if call.seconds() > after_seconds),
                      key=Call.seconds, reverse=True)

    # -- the progress clock ---------------------------------------------------------------

    def progressed(self) -> None:
        """A page decoded or recognised, a document stored or failed."""
        self._progress_at = time.monotonic()

    def seconds_since_progress(self) -> float:
        return time.monotonic() - self._progress_at

    def stuck(self, after_seconds: float) -> bool:
        """Work held and no progress for `after_seconds`."""
        return self.count() > 0 and self.seconds_since_progress() > after_seconds
