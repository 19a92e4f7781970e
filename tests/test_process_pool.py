"""The one worker-process pool: its workers go with the daemon, a dead one is replaced."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from daemon.process_pool import ProcessPool, WorkerDied, alive
from tests.support import wait_until


def test_workers_exit_when_the_daemon_is_killed() -> None:
    """After `kill -9` of the daemon its workers lived on under PID 1, holding memory and
    shared segments; now each exits within about a second of its parent."""
    script = textwrap.dedent("""
        import os, sys, time
        from daemon.process_pool import ProcessPool
        pool = ProcessPool(2, "a test worker")
        pool.warmup()
        print(" ".join(str(pid) for pid in pool._executor._processes), flush=True)
        time.sleep(120)
    """)
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert parent.stdout is not None
        workers = [int(pid) for pid in parent.stdout.readline().split()]
        assert len(workers) == 2 and all(alive(pid) for pid in workers)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(10)
        assert wait_until(lambda: not any(alive(pid) for pid in workers), 10), workers
    finally:
        parent.kill()
        parent.wait(10)


def test_a_dead_worker_fails_its_task_and_the_pool_is_rebuilt() -> None:
    pool = ProcessPool(1, "a test worker")
    try:
        with pytest.raises(WorkerDied):
            pool.call(os._exit, 1)
        assert pool.call(os.getpid) != os.getpid()  # a fresh worker took the next task
    finally:
        pool.close()
