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
        self._checked = (-CHECK_SECONDS, False)
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
        CHECK_SECONDS: /health is asked by Docker, systemd and every curious client, and each
        answer must not cost a round trip."""
        with self._check_lock:
            checked_at, reachable = self._checked
            if time.monotonic() - checked_at >= CHECK_SECONDS:
                try:
                    self.ledger.ping()
                    reachable = True
                except Exception:  # any failure to answer is "unreachable" here
                    reachable = False
                self._checked = (time.monotonic(), reachable)
        return reachable and self.ok
