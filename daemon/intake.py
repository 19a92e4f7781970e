"""The watcher's side of the ledger: a ready file -> its hash -> a ledger row, or a refusal
with its reason. A file whose content is already stored is a duplicate: its path is recorded
and the after-action applies to it as it did to the first."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol, TypeVar

from daemon.config import Settings
from daemon.errors import DocumentError
from daemon.files import LeadsOutside, after_done, open_beneath, quarantine, sha256_handle
from daemon.metrics import Metrics
from daemon.store.models import State
from daemon.store.repository import Ledger, PathStat, Registration

log = logging.getLogger("daemon.intake")
T = TypeVar("T")


class RetryDb(Protocol):
    def __call__(self, action: Callable[[], T], /) -> T: ...


def path_key(path: Path) -> str:
    """How paths are recorded: absolute, symlinks not resolved (the name the file came as)."""
    return os.path.abspath(path)


class Intake:
    """`take` and `reject` are the watcher's two callbacks. `retry_db` waits out a database
    outage (the pipeline's, so both sides report the database the same way); `notify` wakes
    the pipeline when something new is queued."""

    def __init__(self, settings: Settings, ledger: Ledger, metrics: Metrics, *,
                 retry_db: RetryDb, notify: Callable[[], None]) -> None:
        self.settings = settings
        self.ledger = ledger
        self.metrics = metrics
        self.retry_db = retry_db
        self.notify = notify
        self.root = settings.watch.path.resolve()
        # what the ledger had for the paths of the batch the watcher takes next (`look_up`)
        self._looked_up: dict[str, list[tuple[PathStat, Registration]]] = {}

    def look_up(self, paths: Sequence[Path]) -> None:
        """The watcher's batch of ready files, looked up in the ledger at once (one round trip,
        not one a file): `take` then finds each there. A restart over a kept inbox, and a
        burst of drops, pay a round trip a batch for their lookups."""
        keys = [path_key(path) for path in paths]
        self._looked_up = {}  # none of an earlier batch's left, should this one fail
        self._looked_up = self.retry_db(lambda: self.ledger.known_paths(keys))

    def _known(self, key: str, stat: PathStat) -> Registration | None:
        """The document `key` was registered for if the file is still what was hashed then:
        from the batch looked up, else asked of the ledger."""
        rows = self._looked_up.pop(key, None)
        if rows is None:
            return self.retry_db(lambda: self.ledger.known_path(key, stat))
        return next((known for was, known in rows if was == stat), None)

    def take(self, path: Path) -> None:
        key = path_key(path)
        try:  # opened once, links followed only inside the folder: what was checked is read
            with os.fdopen(open_beneath(path, self.root), "rb") as handle:
                stat = PathStat.of(os.fstat(handle.fileno()))
                # still what was hashed when last seen (a restart over a kept inbox): not read
                known = self._known(key, stat)
                if known is not None:
                    self._seen_again(path, known)
                    return
                digest, size = sha256_handle(handle, self.settings.watch.max_file_bytes)
        except FileNotFoundError:
            return  # gone before we got to it: nothing to record
        except DocumentError as exc:
            self.reject(path, exc.reason)
            return
        except PermissionError:
            self.reject(path, "permission denied: the daemon's user cannot read it")
            return
        except LeadsOutside:
            self.reject(path, "symlink points outside the watched folder")
            return
        except OSError as exc:
            self.reject(path, f"cannot read: {exc.strerror}")
            return
        registration = self.retry_db(lambda: self.ledger.register(key, digest, size,
                                                                  stat=stat))
        if registration.created:
            log.info("seen %s (%d bytes, sha256 %s)", key, size, digest[:12])
            self.notify()
        elif registration.state == State.DONE and registration.path_added:
            log.info("seen %s: same content as an already stored document (sha256 %s)",
                     key, digest[:12])
            self.metrics.files_total.labels(status="duplicate").inc()
            after_done(path, digest, self.settings, self.root)
        elif registration.state == State.DONE:  # the after-action may not have run (a kill
            after_done(path, digest, self.settings, self.root)  # between commit and move)
        elif registration.state == State.FAILED:
            # not OCR'd again by itself: say so, and how, rather than nothing
            log.warning("seen %s: this content failed before (%s); it is not tried again "
                        "unless asked: ocr-daemon retry %s", key, registration.reason,
                        digest)
            if registration.path_added:
                self.metrics.files_total.labels(status="duplicate").inc()
        elif registration.path_added:
            log.info("seen %s: same content as a document already %s (sha256 %s)", key,
                     registration.state, digest[:12])
            self.metrics.files_total.labels(status="duplicate").inc()

    def _seen_again(self, path: Path, known: Registration) -> None:
        """A file unchanged since it was hashed: its after-action is retried if its document is
        done (a kill between commit and move), a known failure is said again."""
        if known.state == State.DONE:
            after_done(path, known.sha256, self.settings, self.root)
        elif known.state == State.FAILED:
            log.warning("seen %s: this content failed before (%s); it is not tried again "
                        "unless asked: ocr-daemon retry %s", path_key(path), known.reason,
                        known.sha256)

    def reject(self, path: Path, reason: str) -> None:
        key = path_key(path)
        registration = self.retry_db(lambda: self.ledger.record_rejection(key, reason))
        if not registration.path_added:
            return
        log.error("failed %s: %s", key, reason)
        self.metrics.files_total.labels(status="failed").inc()
        moved = quarantine(path, reason, self.settings, self.root)
        if moved is not None:  # where `ocr-daemon retry` will read it from
            self.retry_db(lambda: self.ledger.register(
                path_key(moved), registration.sha256, 0, rejected=reason))
