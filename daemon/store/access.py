"""How the store reaches the database: the connection handles every query module shares, the
one dialect check, and the store's edge, where SQLAlchemy's errors become the project's own
(`StoreError`, `DatabaseUnavailable` for an outage) so that nothing outside `daemon.store`
imports SQLAlchemy."""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy import Engine, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import OperationalError, SQLAlchemyError
from sqlalchemy.orm import sessionmaker

from daemon.errors import DatabaseUnavailable, StoreError

C = TypeVar("C", bound=type)
OFFSET_SECONDS = 60.0  # how often the offset of this host's clock from the server's is measured


def utcnow() -> datetime:
    return datetime.now(UTC)


def is_postgresql(url: str | URL) -> bool:
    """The one dialect check: PostgreSQL, else SQLite (`make_engine` accepts no other)."""
    return make_url(url).get_backend_name() == "postgresql"


def first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


@contextmanager
def translated() -> Iterator[None]:
    """The store's edge: an operational error (the server down or gone, a lost connection)
    is `DatabaseUnavailable`, any other SQLAlchemy error a `StoreError`; the original is the
    cause."""
    try:
        yield
    except OperationalError as exc:
        raise DatabaseUnavailable(first_line(exc)) from exc
    except SQLAlchemyError as exc:
        raise StoreError(f"{type(exc).__name__}: {first_line(exc)}") from exc


def guarded(cls: C) -> C:
    """Every public method of `cls` (its bases' included) runs inside `translated`: one
    decorator on the class, not one per method, so a method added later cannot leak a driver
    error."""
    for name in dir(cls):
        if name.startswith("_"):
            continue
        member = inspect.getattr_static(cls, name)
        if not inspect.isfunction(member):
            continue

        def wrap(method: Callable[..., Any]) -> Callable[..., Any]:
            @functools.wraps(method)
            def run(*args: Any, **kwargs: Any) -> Any:
                with translated():
                    return method(*args, **kwargs)
            return run

        setattr(cls, name, wrap(member))
    return cls


class Access:
    """The handles on one database that the ledger's parts (worker path, operator queries,
    search) share, and the ledger's clock: on PostgreSQL, where daemons on several hosts
    compare each other's leases, the database's (this host's clock set by its offset from
    the server's, measured every OFFSET_SECONDS): hosts whose clocks drifted 40 s apart let
    one take a live one's documents. SQLite is one host's: its own clock."""

    def __init__(self, engine: Engine, clock: Callable[[], datetime] | None = None, *,
                 host_clock: Callable[[], datetime] = utcnow) -> None:
        self.engine = engine
        self._sessions = sessionmaker(engine, expire_on_commit=False)
        self._postgresql = is_postgresql(engine.url)
        # Statements that stand alone (a lookup; a claim, one atomic UPDATE, then its paths):
        # on PostgreSQL in autocommit, without a BEGIN and a COMMIT or ROLLBACK round trip
        # each (known_path 0.45 -> 0.31 ms CPU, 0.9 -> 0.4 ms wall on a local server). On
        # SQLite switching costs more than it saves.
        self._alone = (engine.execution_options(isolation_level="AUTOCOMMIT")
                       if self._postgresql else engine)
        self._host_clock = host_clock
        self._offset: timedelta | None = None
        self._offset_at = 0.0
        self._clock = clock or (self._database_time if self._postgresql else host_clock)

    def _database_time(self) -> datetime:
        """Now by the server's clock: this host's, plus its offset from the server's (one
        `SELECT now()` every OFFSET_SECONDS, its round trip halved)."""
        if self._offset is None or time.monotonic() - self._offset_at > OFFSET_SECONDS:
            before = self._host_clock()
            with self._alone.connect() as connection:
                server = connection.execute(text("SELECT now()")).scalar_one()
            after = self._host_clock()
            self._offset = server - (before + (after - before) / 2)
            self._offset_at = time.monotonic()
        return self._host_clock() + self._offset

    @property
    def postgresql(self) -> bool:
        return self._postgresql

    @property
    def url(self) -> str:
        """The database's URL without its password, for logs."""
        return self.engine.url.render_as_string(hide_password=True)

    def ping(self) -> None:
        """SELECT 1: raises `DatabaseUnavailable` when the database cannot be reached."""
        with self._alone.connect() as connection:
            connection.execute(text("SELECT 1"))

    def close(self) -> None:
        self.engine.dispose()
