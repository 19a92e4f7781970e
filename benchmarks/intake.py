"""The watcher's side of the ledger, timed: a restart over a kept inbox, and a burst of new
drops. A script, not a test.

    python -m benchmarks intake --kept 5000 --new 500
    python -m benchmarks intake --postgres postgresql+psycopg://postgres@HOST/postgres

The daemon's own watcher and intake (daemon.watcher, daemon.intake) on the ledger, without the
OCR pipeline: nothing is claimed, so only what the watcher's thread does is timed.

1. restart: `--kept` files an earlier run stored (written straight into the ledger, with the
   stat they were hashed at, as that run leaves them) lie in the inbox; the watcher starts,
   scans them, lets them settle, and looks each up. Timed from its start until every one has
   been looked over (its first scan quiet); none is read again.
2. new drops: `--new` files, hidden while written, renamed in at once (an event each); timed
   until the ledger has them all queued: each is looked up and hashed, and registered with
   the new files of its batch.

Every file is a few bytes, so the round trips to the ledger and the watcher's own work are
what is timed, not the hashing. settle_seconds is 0.1 (the restart's figure includes one
settle, ~0.1 s). Against a PostgreSQL server farther away, put a proxy that delays traffic
between this and the server. Prints one JSON object: seconds and ms a file for each, and the
watcher thread's CPU a file.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from benchmarks.common import machine, thread_cpu_seconds

T = TypeVar("T")


def thread_cpu(kind: str) -> float:
    """CPU seconds so far of this process's threads of `kind` ("watcher")."""
    return sum(seconds for found, seconds in thread_cpu_seconds().values() if found == kind)


def wait(condition: Callable[[], bool], seconds: float) -> None:
    deadline = time.perf_counter() + seconds
    while not condition():
        if time.perf_counter() > deadline:
            raise SystemExit("timed out")
        time.sleep(0.002)


def run(url: str, work: Path, kept: int, new: int) -> dict[str, Any]:
    from daemon import intake as intake_module
    from daemon.config import Settings
    from daemon.files import PathStat
    from daemon.metrics import Metrics
    from daemon.store.db import open_ledger
    from daemon.store.models import Document, DocumentPath
    from daemon.store.outage import Outage
    from daemon.watcher import Watcher

    inbox = work / "inbox"
    inbox.mkdir()
    settings = Settings(watch={"path": inbox, "settle_seconds": 0.1,
                               "rescan_interval_seconds": 3600},
                        database={"url": url}, metrics={"enabled": False})
    database, ledger = open_ledger(settings, migrate_now=True)
    now = datetime.now(UTC)
    documents, paths = [], []
    for n in range(kept):
        path = inbox / f"kept{n:05}.png"
        path.write_bytes(b"kept" + n.to_bytes(4, "big"))
        documents.append({"id": n + 1, "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                          "size_bytes": 8, "state": "done", "attempts": 1,
                          "first_seen_at": now, "page_count": 1})
        paths.append({"document_id": n + 1, "path": os.path.abspath(path),
                      "first_seen_at": now, "last_seen_at": now,
                      **PathStat.of(path.stat()).columns()})
    if kept:
        with database.begin() as connection:
            connection.execute(Document.__table__.insert(), documents)
            connection.execute(DocumentPath.__table__.insert(), paths)
        if database.dialect.name == "postgresql":  # the ids were given: move the sequence on
            with database.begin() as connection:
                connection.exec_driver_sql(
                    f"SELECT setval(pg_get_serial_sequence('documents', 'id'), {kept})")
    hashed = [0]
    real_hash = intake_module.sha256_handle

    def counting(handle: Any, max_bytes: int) -> tuple[str, int]:
        hashed[0] += 1
        return real_hash(handle, max_bytes)

    intake_module.sha256_handle = counting  # type: ignore[assignment]

    queued = [0]  # counted as the intake tells the pipeline: polling the ledger would cost

    def notify() -> None:
        queued[0] += 1

    intake = intake_module.Intake(settings, ledger, Metrics("bench"), outage=Outage(ledger),
                                  notify=notify)
    watcher = Watcher(settings.watch, intake.take, intake.reject, look_up=intake.look_up)
    out: dict[str, Any] = {}
    start = time.perf_counter()
    watcher.start()
    try:
        wait(lambda: watcher.quiet_after_scan >= 1, 600)
        seconds = time.perf_counter() - start
        cpu = thread_cpu("watcher")
        out["restart"] = {"kept_files": kept, "seconds": round(seconds, 3),
                          "ms_per_kept_file": round(1000 * seconds / max(kept, 1), 3),
                          "watcher_cpu_ms_per_kept_file": round(1000 * cpu / max(kept, 1), 3),
                          "kept_files_read_again": hashed[0]}
        for n in range(new):
            (inbox / f".new{n:05}.part").write_bytes(b"new" + n.to_bytes(4, "big"))
        cpu_before = thread_cpu("watcher")
        start = time.perf_counter()
        for n in range(new):
            os.rename(inbox / f".new{n:05}.part", inbox / f"new{n:05}.png")
        wait(lambda: queued[0] >= new, 600)
        seconds = time.perf_counter() - start
        cpu = thread_cpu("watcher") - cpu_before
        out["new_drops"] = {"files": new, "seconds": round(seconds, 3),
                            "files_per_second": round(new / seconds, 1),
                            "watcher_cpu_ms_per_file": round(1000 * cpu / max(new, 1), 3)}
    finally:
        watcher.stop()
        database.dispose()
        ledger.engine.dispose()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kept", type=int, default=5000, help="files kept from a run before")
    parser.add_argument("--new", type=int, default=500, help="new files dropped at once")
    parser.add_argument("--postgres", metavar="ADMIN_URL", default=None,
                        help="a PostgreSQL server's admin URL: a scratch database on it is "
                             "the ledger (default: SQLite)")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="intake-bench-"))
    from tests.daemons import scratch_database

    database = (scratch_database(args.postgres, "intake_bench") if args.postgres
                else contextlib.nullcontext(f"sqlite:///{work / 'ledger.db'}"))
    try:
        with database as url:
            figures = run(url, work, args.kept, args.new)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({"benchmark": "watcher and intake (no OCR)", "machine": machine(),
                      "ledger": "postgresql" if args.postgres else "sqlite",
                      **figures}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
