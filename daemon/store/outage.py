"""The database-outage policy, one for the whole daemon: a ledger write waits out an outage
(with backoff) rather than losing its result or failing a document; the first failure is
logged once, recovery likewise; `/health` and `/ready` read `ok`, refreshed by a cached probe
in the quiet times. The pipeline, intake and the service share one `Outage`, so every side
reports the database the same way."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from daemon.errors import DatabaseUnavailable
from daemon.store.access import Access

log = logging.getLogger("daemon.store")
T = TypeVar("T")
CHECK_SECONDS = 2.0  # `reachable` reuses a probe this recent
PROBE_SECONDS = 2.0  # a probe unanswered this long: unreachable
FIRST_DELAY, MAX_DELAY = 0.5, 10.0  # `retry`'s backoff between tries


class GaveUp(Exception):
    """The daemon is stopping while the database is away: the claim's lease hands the work
    back to whoever runs next."""


class Outage:
    def __init__(self, ledger: Access, *, pause: float = 1.0) -> None:
        self.ledger = ledger
        self.ok = True  # the last word of any statement or probe
        self._pause = pause  # after a failure seen outside `retry`, before the caller goes on
        self._stopping = threading.Event()
        self._checked = (-CHECK_SECONDS, True)  # until a probe says otherwise
        self._probing: float | None = None  # since when a probe runs
        self._check_lock = threading.Lock()

    def stop(self) -> None:
        """The daemon is stopping: `retry` gives up rather than waiting the outage out."""
        self._stopping.set()

    def retry(self, action: Callable[[], T]) -> T:
        """Run a ledger write, waiting out an outage (with backoff) rather than losing the
        result. Raises `GaveUp` only once `stop` was called."""
        delay = FIRST_DELAY
        while True:
            try:
                result = action()
            except DatabaseUnavailable as exc:
                self.down(exc)
                if self._stopping.is_set():
                    raise GaveUp() from exc
                time.sleep(delay)
                delay = min(delay * 2, MAX_DELAY)
                continue
            self.up()
            return result

    def up(self) -> None:
        if not self.ok:
            log.info("database reachable again")
        self.ok = True

    def down(self, exc: Exception) -> None:
        """A statement failed for want of the database: logged once per outage, then a pause
        so that a loop does not spin on it."""
        if self.ok:
            log.error("database unavailable, retrying: %s", exc)
        self.ok = False
        self._stopping.wait(self._pause)

    def reachable(self) -> bool:
        """The last word of the daemon's own statements, and a SELECT 1 at most once per
        CHECK_SECONDS, run beside the caller: /health is asked by Docker, systemd and every
        curious client, and must answer at once, a round trip or not (with the server
        black-holed, each answer waited out the connect). A probe still unanswered after
        PROBE_SECONDS says unreachable."""
        with self._check_lock:
            checked_at, reachable = self._checked
            now = time.monotonic()
            if self._probing is None and now - checked_at >= CHECK_SECONDS:
                self._probing = now
                threading.Thread(target=self._probe, name="database-probe",
                                 daemon=True).start()
            if self._probing is not None and now - self._probing > PROBE_SECONDS:
                reachable = False
        return reachable and self.ok

    def _probe(self) -> None:
        try:
            self.ledger.ping()
            reachable = True
        except Exception:  # any failure to answer is "unreachable" here
            reachable = False
        with self._check_lock:
            self._checked = (time.monotonic(), reachable)
            self._probing = None
