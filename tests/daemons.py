"""Helpers for runs of several real daemon processes on one PostgreSQL database, shared by the
tests and `benchmarks/scale_out.py`: a throwaway database, stand-in daemons
(tests/standin_daemon.py, run through `tests.support.DaemonProcess`) started and stopped.
Not a test module."""

from __future__ import annotations

import signal
import subprocess
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import create_engine, text

REPO = Path(__file__).resolve().parent.parent


@contextmanager
def scratch_database(admin_url: str, prefix: str) -> Iterator[str]:
    """A new, empty database on the server of `admin_url`, dropped afterwards (its open
    connections ended first); yields its URL."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield admin.url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.execute(text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n"),
                {"n": name})
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        admin.dispose()


def standin_daemon(workdir: Path, inbox: Path, url: str, log: Path, *, lease: float,
                   seconds: float, capacity: int | None = None) -> subprocess.Popen[bytes]:
    """`ocr-daemon run` with the stand-in engine (`seconds` a page) on `inbox` and the
    already migrated database `url`, its output to `log` (`DaemonProcess`, not waited for)."""
    from tests.support import DaemonProcess

    env = {
        "OCR_DAEMON_WATCH__PATH": str(inbox),
        "OCR_DAEMON_DATABASE__URL": url,
        "OCR_DAEMON_DATABASE__MIGRATE_ON_START": "false",
        "OCR_DAEMON_METRICS__ENABLED": "false",
        "OCR_DAEMON_QUEUE__LEASE_SECONDS": str(lease),
        "STANDIN_SECONDS": str(seconds),
    }
    if capacity is not None:
        env["OCR_DAEMON_QUEUE__CAPACITY"] = str(capacity)
    workdir.mkdir()
    daemon = DaemonProcess(workdir, env, standin=True, log=log)
    daemon.start(wait_ready=False)
    assert daemon.proc is not None
    return daemon.proc


def stop(procs: Iterable[subprocess.Popen[bytes]]) -> None:
    """SIGTERM to every daemon still running, then up to 30 s each to stop before SIGKILL."""
    procs = list(procs)
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
