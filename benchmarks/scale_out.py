"""Several daemons on one folder and one PostgreSQL: what coordination costs. A script, not a
test.

    python -m benchmarks scale-out --admin-url postgresql+psycopg://postgres@127.0.0.1/postgres
    python -m benchmarks scale-out --daemons 1,2,3 --files 600

For each daemon count, a fresh database, `--files` small images dropped at once into one
folder, and that many real daemon processes (`ocr-daemon run`) whose OCR engine is a STAND-IN
that answers at once (tests/standin_daemon.py, STANDIN_SECONDS=0): only the daemon's own work is
timed — watching, hashing, claiming, leases, storing. Prints one JSON object: per count, files/s
from the drop to the last store, the database transactions and rows written per file
(pg_stat_database), and the daemons' CPU per file (ms) — the cost of a claim at scale.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image as PILImage
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from benchmarks.common import cpu_seconds, machine

STAND_IN = "OCR engine replaced by a stand-in that answers at once; only the daemon's own work"


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def db_stats(admin: Any, name: str) -> dict[str, int]:
    with admin.connect() as connection:
        row = connection.execute(text(
            "SELECT xact_commit, tup_inserted, tup_updated, tup_deleted FROM pg_stat_database "
            "WHERE datname = :n"), {"n": name}).one()
    return {"commits": row[0], "inserted": row[1], "updated": row[2], "deleted": row[3]}


def run(admin_url: str, daemons: int, files: int, lease: float) -> dict[str, Any]:
    from daemon.config import DatabaseSettings
    from daemon.store import migrate
    from daemon.store.db import make_engine
    from daemon.store.ledger import Ledger
    from tests.daemons import scratch_database, standin_daemon, stop

    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")  # pg_stat_database
    with scratch_database(admin_url, "ocr_daemon_bench") as url:
        name = str(make_url(url).database)
        engine = make_engine(DatabaseSettings(url=url))
        migrate.upgrade(engine)
        ledger = Ledger(engine)
        work = Path(tempfile.mkdtemp(prefix="scale-out-"))
        inbox, staging = work / "inbox", work / "staging"
        inbox.mkdir()
        staging.mkdir()
        rng = np.random.default_rng(daemons)
        for n in range(files):
            PILImage.fromarray(rng.integers(0, 255, (16, 16, 3), np.uint8)).save(
                staging / f"f{n:05}.png")
        procs = []
        try:
            for k in range(daemons):
                procs.append(standin_daemon(work / f"d{k}", inbox, url, work / f"d{k}.log",
                                            lease=lease, seconds=0))
            deadline = time.monotonic() + 120
            while not all("ready" in (work / f"d{k}.log").read_text() for k in range(daemons)):
                if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                    raise SystemExit((work / "d0.log").read_text())
                time.sleep(0.1)
            before = db_stats(admin, name)
            cpu_before = sum(cpu_seconds(p.pid) for p in procs)
            start = time.perf_counter()
            for path in sorted(staging.iterdir()):
                path.rename(inbox / path.name)
            polls = 0
            while ledger.counts()["done"] < files:  # each poll is a transaction: taken out below
                polls += 1
                if time.perf_counter() - start > 600:
                    raise SystemExit(f"not done: {ledger.counts()}")
                time.sleep(0.05)
            wall = time.perf_counter() - start
            polls += 1
            cpu = sum(cpu_seconds(p.pid) for p in procs) - cpu_before
            after = db_stats(admin, name)
            attempts = ledger.status()
        finally:
            stop(procs)
            engine.dispose()
    admin.dispose()
    delta = {k: after[k] - before[k] for k in after}
    delta["commits"] -= polls
    return {
        "daemons": daemons,
        "files": files,
        "seconds": round(wall, 2),
        "files_per_second": round(files / wall, 1),
        "daemon_cpu_ms_per_file": round(1000 * cpu / files, 2),
        "db_commits_per_file": round(delta["commits"] / files, 2),
        "db_rows_written_per_file": round(
            (delta["inserted"] + delta["updated"] + delta["deleted"]) / files, 2),
        "failed": attempts["documents"]["failed"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--admin-url", default=os.environ.get(
        "OCR_DAEMON_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"))
    parser.add_argument("--daemons", default="1,2,3")
    parser.add_argument("--files", type=int, default=600)
    parser.add_argument("--lease", type=float, default=60.0)
    args = parser.parse_args(argv)
    runs = []
    for count in (int(n) for n in args.daemons.split(",")):
        say(f"{count} daemon(s), {args.files} files")
        runs.append(run(args.admin_url, count, args.files, args.lease))
    print(json.dumps({"benchmark": "scale-out coordination", "machine": machine(),
                      "stand_in": STAND_IN,
                      "cores": len(os.sched_getaffinity(0)), "runs": runs}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
