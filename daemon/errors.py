"""Error classes and exit codes.

`DaemonError` is fatal: it carries the exit code the CLI returns. `DocumentError` concerns one
file only: it is recorded in the ledger (and the failed folder) and never stops the daemon.
Exactly one place, `daemon.cli.main`, turns exceptions into exit codes.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    ERROR = 1
    USAGE = 2
    CONFIG = 3
    DATABASE = 4
    PROVIDER = 5
    NOT_FOUND = 6
    UNHEALTHY = 7
    INTERRUPTED = 130  # the second SIGINT/SIGTERM: exit at once


class DaemonError(Exception):
    """A fatal error: the process cannot go on. Carries its exit code."""

    exit_code: ExitCode = ExitCode.ERROR


class ConfigError(DaemonError):
    exit_code = ExitCode.CONFIG


class DatabaseError(DaemonError):
    exit_code = ExitCode.DATABASE


class ProviderError(DaemonError):
    """An explicitly requested execution provider could not be brought up."""

    exit_code = ExitCode.PROVIDER


class NotFoundError(DaemonError):
    exit_code = ExitCode.NOT_FOUND


class Interrupted(DaemonError):
    """The second SIGINT/SIGTERM: stop waiting for work in flight, exit at once."""

    exit_code = ExitCode.INTERRUPTED


class StoreError(Exception):
    """The database refused or failed a statement (a constraint, a bad value, a pool timeout,
    a bug). Raised by `daemon.store` only, in place of its driver's errors: nothing outside the
    store imports SQLAlchemy. Not fatal by itself; the caller decides."""


class DatabaseUnavailable(StoreError):
    """The database cannot be reached right now (down, restarting, the connection lost): an
    outage, waited out (`daemon.store.outage`) rather than counted against a document."""


class DocumentError(Exception):
    """One file could not be processed. Never fatal.

    `permanent` errors (corrupt, unsupported, encrypted, too large) fail the file at once;
    transient ones (file busy, vanished, permission flapping, out of GPU memory) are retried
    with backoff up to `queue.max_attempts`.
    """

    def __init__(self, reason: str, *, permanent: bool = True) -> None:
        super().__init__(reason)
        self.reason = reason
        self.permanent = permanent
