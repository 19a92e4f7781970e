"""The watcher's side of the ledger: a ready file -> its hash -> a ledger row, or a refusal
with its reason. A file whose content is already stored is a duplicate: its path is recorded
and the after-action applies to it as it did to the first. The files the watcher finds ready
together are looked up together and registered together (on PostgreSQL a round trip each
for all of them, on SQLite a transaction)."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

from daemon.config import Settings
from daemon.errors import DocumentError, NotFoundError
from daemon.files import (
    PathStat,
    after_done,
    open_beneath,
    path_key,
    path_of,
    quarantine,
    sha256_beneath,
    sha256_handle,
    unreadable,
)
from daemon.metrics import Metrics
from daemon.outputs import wanted as outputs_wanted
from daemon.outputs import write_outputs
from daemon.store.ledger import Ledger
from daemon.store.models import State
from daemon.store.outage import Outage
from daemon.store.records import NewFile, Registration

log = logging.getLogger("daemon.intake")
# A file of a batch, hashed, waits this long (and the reading of one more file) at most for
# the rest to be registered with it: a batch of large files (a 50 MB PDF hashes in ~0.03-0.1
# s) must not keep the first from the pipeline while the rest are read
REGISTER_WAIT = 0.05


class Intake:
    """`take` and `reject` are the watcher's two callbacks. `outage` waits out a database
    outage (the daemon's one policy, so every side reports the database the same way);
    `notify` wakes the pipeline when something new is queued."""

    def __init__(self, settings: Settings, ledger: Ledger, metrics: Metrics, *,
                 outage: Outage, notify: Callable[[], None]) -> None:
        self.settings = settings
        self.ledger = ledger
        self.metrics = metrics
        self.retry_db = outage.retry
        self.notify = notify
        self.root = settings.watch.path.resolve()
        # what the ledger had for the paths of the batch the watcher takes next (`look_up`)
        self._looked_up: dict[str, list[tuple[PathStat, Registration]]] = {}
        # the new files of the watcher's batch hashed and not yet registered (None: no batch,
        # a file is registered as it is taken), since when, and those that failed
        self._hashed: list[tuple[Path, NewFile]] | None = None
        self._hashed_since = 0.0
        self._failed: list[Path] = []

    def look_up(self, paths: Sequence[Path]) -> Callable[[], list[Path]]:
        """The watcher's batch of ready files, looked up in the ledger at once (one round trip,
        not one a file): `take` then finds each there. A restart over a kept inbox, and a
        burst of drops, pay a round trip a batch for their lookups. Until the watcher calls
        what this returns (`_taken`), the new files `take` hashes are registered together."""
        keys = [path_key(path) for path in paths]
        self._looked_up = {}  # none of an earlier batch's left, should this one fail
        self._looked_up = self.retry_db(lambda: self.ledger.known_paths(keys))
        self._hashed, self._failed = [], []
        return self._taken

    def _taken(self) -> list[Path]:
        """The watcher's batch is over: its new files not registered yet are, together.
        Returns the files of the batch that could not be taken in, for the watcher to look at
        again (as it does a file whose `take` raised)."""
        self._register_hashed()
        self._hashed = None
        failed, self._failed = self._failed, []
        return failed

    def _known(self, key: str, stat: PathStat) -> Registration | None:
        """The document `key` was registered for if the file is still what was hashed then:
        from the batch looked up, else asked of the ledger."""
        rows = self._looked_up.pop(key, None)
        if rows is None:
            return self.retry_db(lambda: self.ledger.known_path(key, stat))
        return next((known for was, known in rows if was == stat), None)

    def take(self, path: Path) -> None:
        if self._hashed and time.monotonic() - self._hashed_since >= REGISTER_WAIT:
            self._register_hashed()  # the batch's first has waited: not for this one's hash too
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
        except (DocumentError, OSError) as exc:
            self.reject(path, unreadable(exc))
            return
        file = NewFile(key, digest, size, stat)
        if self._hashed is None:  # not in a batch
            self._registered(path, file, self.retry_db(
                lambda: self.ledger.register(key, digest, size, stat=stat)))
            return
        self._hashed.append((path, file))
        if len(self._hashed) == 1:
            self._hashed_since = time.monotonic()

    def _register_hashed(self) -> None:
        """The files of the batch hashed so far, registered in one call (`register_many`). A
        failure is logged and the files kept for `taken` to hand back."""
        if not self._hashed:
            return
        hashed, self._hashed = self._hashed, []
        try:
            registrations = self.retry_db(
                lambda: self.ledger.register_many([file for _, file in hashed]))
        except Exception:
            log.exception("could not register %d files", len(hashed))
            self._failed.extend(path for path, _ in hashed)
            return
        for (path, file), registration in zip(hashed, registrations, strict=True):
            try:
                self._registered(path, file, registration)
            except Exception:
                log.exception("could not take in %s", path)
                self._failed.append(path)

    def _registered(self, path: Path, file: NewFile, registration: Registration) -> None:
        """What follows a file's registration: the pipeline woken for a new content, the
        after-action for a duplicate of a stored one, a known failure said again."""
        key, size, digest = file.path, file.size, file.sha256
        if registration.created:
            log.info("seen %s (%d bytes, sha256 %s)", key, size, digest[:12])
            self.notify()
        elif registration.state == State.DONE and registration.path_added:
            log.info("seen %s: same content as an already stored document (sha256 %s)",
                     key, digest[:12])
            self.metrics.files_total.labels(status="duplicate").inc()
            self._outputs_of_a_duplicate(path, digest)
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

    def _outputs_of_a_duplicate(self, path: Path, sha256: str) -> None:
        """A duplicate of a stored document gets the outputs its first path got (sidecars,
        searchable PDF), from the stored text; it got none."""
        if not outputs_wanted(self.settings):
            return
        try:
            stored = self.retry_db(lambda: self.ledger.find(sha256))
        except NotFoundError:  # forgotten meanwhile
            return
        write_outputs(self.settings, path, [page.result() for page in stored.pages], sha256,
                      self.root)

    def _seen_again(self, path: Path, known: Registration) -> None:
        """A file unchanged since it was hashed: its after-action is retried if its document is
        done (a kill between commit and move), a known failure is said again."""
        if known.state == State.DONE:
            after_done(path, known.sha256, self.settings, self.root)
        elif known.state == State.FAILED:
            log.warning("seen %s: this content failed before (%s); it is not tried again "
                        "unless asked: ocr-daemon retry %s", path_key(path), known.reason,
                        known.sha256)

    def read_again(self, paths: Sequence[str]) -> tuple[str, bool]:
        """`ocr-daemon retry` of a file refused before it was read (unreadable, too large...):
        read now as `take` reads it, and queued if it can be. Returns what became of it, and
        whether it was queued."""
        for recorded in reversed(paths):
            try:
                digest, size, info = sha256_beneath(path_of(recorded), self.root,
                                                    self.settings.watch.max_file_bytes)
            except FileNotFoundError:
                continue
            except (DocumentError, OSError) as exc:
                return f"still refused: {unreadable(exc)}", False
            for other in paths:  # each refusal's row (keyed by its path) gives way to it
                if other != recorded:
                    self.retry_db(partial(self.ledger.register, other, digest, size))
            registration = self.retry_db(
                partial(self.ledger.register, recorded, digest, size, stat=PathStat.of(info)))
            if registration.created or registration.state == State.QUEUED:
                self.notify()
                return f"read now, re-queued (sha256 {digest[:12]})", True
            return f"read now: its content is {registration.state} already", False
        return "not re-queued: no longer there", False

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
