"""Engines per URL, and `open_ledger`, the one way in for the service and the CLI.

SQLite gets WAL, a busy timeout and foreign keys on every connection. A PostgreSQL connection
is pinged when it leaves the pool after an idle spell (`PING_AFTER_IDLE_SECONDS`), not at
every checkout: the pool's own pre-ping was a round trip a transaction (a small one 0.44 ->
0.37 ms on a local server, a whole round trip more on a distant one). One that died while in
use is a disconnect error, which the daemon's `retry_db` waits out like any outage."""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DisconnectionError

from daemon.config import DatabaseSettings, Settings
from daemon.errors import ConfigError, DaemonError, DatabaseError
from daemon.store import migrate
from daemon.store.access import is_postgresql
from daemon.store.ledger import Ledger


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def make_engine(settings: DatabaseSettings) -> Engine:
    try:
        url = make_url(settings.url)
    except ArgumentError as exc:
        raise ConfigError(f"database.url: {exc}") from None
    if url.get_backend_name() not in ("sqlite", "postgresql"):  # its statements are for these
        raise ConfigError(f"database.url: {url.get_backend_name()} is not supported: "
                          "sqlite:///PATH or postgresql+psycopg://USER@HOST/DB")
    if not is_postgresql(url):
        if url.database and url.database != ":memory:":
            Path(url.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url, echo=settings.echo, connect_args={"timeout": 30, "check_same_thread": False}
        )
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    # bounded waits: a server black-holed must show as unreachable within seconds, not hang
    # a connect (the kernel's ~2 min) or a statement for ever
    engine = create_engine(url, echo=settings.echo, pool_size=5, max_overflow=5, pool_timeout=10,
                           connect_args={"connect_timeout": CONNECT_TIMEOUT_SECONDS,
                                         "options": f"-c statement_timeout="
                                                    f"{STATEMENT_TIMEOUT_SECONDS * 1000:.0f}"})
    ping = engine.dialect.do_ping

    def checkout(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        idle_since = record.info.get(_IDLE_SINCE)
        if idle_since is not None and time.monotonic() - idle_since > PING_AFTER_IDLE_SECONDS:
            try:
                alive = ping(dbapi_connection)
            except Exception as exc:  # the pool drops it and checks out another
                raise DisconnectionError(f"a pooled connection failed its ping: {exc}") from exc
            if not alive:
                raise DisconnectionError("a pooled connection was closed by the server")

    def checkin(_dbapi_connection: Any, record: Any) -> None:
        record.info[_IDLE_SINCE] = time.monotonic()

    event.listen(engine, "checkout", checkout)
    event.listen(engine, "checkin", checkin)
    return engine


PING_AFTER_IDLE_SECONDS = 5.0
_IDLE_SINCE = "ocr_daemon_idle_since"
CONNECT_TIMEOUT_SECONDS = 5
STATEMENT_TIMEOUT_SECONDS = 60  # the longest: a 500-page document's text in one transaction


def lock_single_daemon(engine: Engine) -> int | None:
    """On an SQLite file: an exclusive lock on `NAME.lock` beside it, held (the descriptor
    returned) while the daemon runs. SQLite is the single-host default: a second daemon on the
    same file would re-queue the first one's documents as left over by a dead run and OCR them
    again, so it refuses to start instead. None for PostgreSQL (leases coordinate there)."""
    database = None if is_postgresql(engine.url) else engine.url.database
    if not database or database == ":memory:":
        return None
    path = Path(database).expanduser().resolve()
    lock = path.with_name(path.name + ".lock")
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise DatabaseError(f"another ocr-daemon is running on {path} (it holds {lock}); one "
                            "SQLite database serves one daemon: run several on PostgreSQL"
                            ) from None
    return fd


def open_ledger(settings: Settings, *, migrate_now: bool) -> tuple[Engine, Ledger]:
    """The database engine and the ledger on it. With `migrate_now` the schema is brought up
    to date; without, a schema behind the code is a `DatabaseError` naming the fix."""
    engine = make_engine(settings.database)
    try:
        if migrate_now:
            migrate.upgrade(engine)
        elif not migrate.is_up_to_date(engine):
            raise DatabaseError("database schema is not up to date: run `ocr-daemon migrate`")
    except DaemonError:
        engine.dispose()
        raise
    except Exception as exc:
        engine.dispose()
        raise DatabaseError(f"database {engine.url.render_as_string(hide_password=True)}: "
                            f"{str(exc).splitlines()[0]}") from None
    return engine, Ledger(engine)
