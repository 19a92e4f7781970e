"""Several real daemon processes on one folder and one PostgreSQL database, one killed with
SIGKILL mid-run: every file stored exactly once, none lost, the dead one's work taken over
once its leases run out. The OCR engine is a stand-in (tests/standin_daemon.py): what is
tested is claiming, leases and hand-over, not recognition."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage
from sqlalchemy import create_engine, text

from daemon.config import DatabaseSettings
from daemon.store import migrate
from daemon.store.db import make_engine
from daemon.store.ledger import Ledger
from tests.daemons import standin_daemon, stop

pytestmark = [pytest.mark.slow, pytest.mark.postgres]
LEASE = 3.0


def reset(url: str) -> None:
    engine = create_engine(url)
    with engine.begin() as connection:
        connection.execute(text("DROP SCHEMA public CASCADE"))
        connection.execute(text("CREATE SCHEMA public"))
    engine.dispose()


def test_three_daemons_one_killed_every_file_stored_once(pg_server: str,
                                                         tmp_path: Path) -> None:
    reset(pg_server)
    engine = make_engine(DatabaseSettings(url=pg_server))
    migrate.upgrade(engine)
    ledger = Ledger(engine)
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    rng = np.random.default_rng(7)
    for n in range(300):
        PILImage.fromarray(rng.integers(0, 255, (16, 16, 3), np.uint8)).save(
            inbox / f"f{n:03}.png")
    logs = [tmp_path / f"daemon{k}.log" for k in range(3)]
    procs = [standin_daemon(tmp_path / f"d{k}", inbox, pg_server, logs[k], lease=LEASE,
                            seconds=0.1, capacity=8) for k in range(3)]
    try:
        deadline = time.monotonic() + 120
        while ledger.counts()["done"] < 60:
            assert time.monotonic() < deadline, logs[0].read_text()
            assert all(p.poll() is None for p in procs), [log.read_text() for log in logs]
            time.sleep(0.2)
        victim = procs[0]
        with engine.connect() as connection:  # what it holds when it dies
            held = connection.execute(text(
                "SELECT count(*) FROM documents WHERE state = 'processing' AND claimed_by "
                "LIKE :me"), {"me": f"%:{victim.pid}:%"}).scalar_one()
        victim.send_signal(signal.SIGKILL)
        victim.wait(10)
        killed_at = time.monotonic()
        while ledger.counts()["done"] < 300:
            # its leases run out (3 s), a survivor's housekeeping (every 10 s) re-queues them
            assert time.monotonic() - killed_at < 90, ledger.counts()
            assert all(p.poll() is None for p in procs[1:]), [log.read_text() for log in logs]
            time.sleep(0.2)
        with engine.connect() as connection:
            rows = connection.execute(text(
                "SELECT d.attempts, d.page_count, count(p.id) FROM documents d "
                "LEFT JOIN pages p ON p.document_id = d.id GROUP BY d.id")).all()
            paths = connection.execute(text("SELECT count(*) FROM document_paths")).scalar_one()
    finally:
        stop(procs)
        engine.dispose()
    assert ledger.counts() == {"queued": 0, "processing": 0, "done": 300, "failed": 0}
    assert len(rows) == 300 and paths == 300  # one document per file, each path once
    assert all(pages == 1 and stored == 1 for _, pages, stored in rows)  # stored once
    retaken = sum(1 for attempts, _, _ in rows if attempts == 2)
    assert all(attempts in (1, 2) for attempts, _, _ in rows)
    assert retaken <= held + 8  # only what the dead one held (counted, or claimed since)
    for log in logs[1:]:
        text_ = log.read_text()
        assert "Traceback" not in text_, text_
