"""Worker processes, one way for every pool the daemon runs (the engine's host stages, PDF
rendering):

- spawned: forking a process that holds onnxruntime sessions and threads is unsafe;
- deaf to SIGINT and SIGTERM: the daemon decides when its workers stop (after the documents
  in flight), so a Ctrl-C to the terminal's process group or systemd's SIGTERM to the whole
  cgroup must not kill them under a batch, nor print a traceback from each;
- gone with the daemon: a worker whose parent died (`kill -9`, the OOM killer) exits within
  PARENT_CHECK_SECONDS rather than living on under PID 1 with its memory and shared segments;
- rebuilt when one dies: the task it was running fails (`WorkerDied`), the next gets fresh
  workers;
- closed one way: what is running gets `timeout` seconds, then its process is killed (pdfium
  looping on a hostile file, a stuck host stage must not hold up the daemon's stop).

What travels between the processes (shared-memory segments, their ownership) stays with each
pool's user: the pages of `ocr.host` and `documents.pdf_workers` differ.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")

PARENT_CHECK_SECONDS = 1.0
CLOSE_TIMEOUT = 5.0


def alive(pid: int) -> bool:
    """Whether process `pid` runs: a zombie (dead, not yet reaped by its parent) does not."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            return handle.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except FileNotFoundError:
        return False
    except OSError:  # no /proc here
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


class WorkerDied(Exception):
    """The worker process running a task died (crashed, killed for memory); the pool has been
    rebuilt."""


class ProcessPool:
    def __init__(self, processes: int, what: str,
                 initializer: Callable[..., None] | None = None,
                 initargs: tuple[Any, ...] = ()) -> None:
        self._processes = processes
        self._what = what  # as the log names a worker: "a PDF worker", "a host worker"
        self._initializer = initializer
        self._initargs = initargs
        self._lock = threading.Lock()
        self._closed = False
        self._executor = self._start()

    @property
    def processes(self) -> int:
        return self._processes

    @property
    def closed(self) -> bool:
        return self._closed

    def _start(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(
            self._processes, mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker,
            initargs=(os.getpid(), self._initializer, self._initargs))

    def _rebuild(self, broken: ProcessPoolExecutor) -> None:
        """Fresh workers in place of `broken` (once, however many tasks saw it break)."""
        with self._lock:
            if self._executor is not broken or self._closed:
                return
            log.warning("%s process died; starting new ones", self._what)
            broken.shutdown(wait=False, cancel_futures=True)
            self._executor = self._start()
        self._after_a_death()

    def _after_a_death(self) -> None:
        """What a dead worker leaves to clean up (its pool's own kind of leftovers)."""

    def submit(self, fn: Callable[..., T], /, *args: Any) -> Future[T]:
        """`fn(*args)` in a worker. A pool found broken here is rebuilt first; one that breaks
        under the task shows at its `result()` as BrokenProcessPool."""
        with self._lock:
            executor = self._executor
        try:
            return executor.submit(fn, *args)
        except BrokenProcessPool:
            self._rebuild(executor)
            with self._lock:
                executor = self._executor
            return executor.submit(fn, *args)

    def call(self, fn: Callable[..., T], /, *args: Any) -> T:
        """`fn(*args)` in a worker, waited for. Raises WorkerDied when its worker died (the
        pool is rebuilt for the next), RuntimeError when the pool is closed."""
        with self._lock:
            executor = self._executor
        try:
            return executor.submit(fn, *args).result()
        except BrokenProcessPool:  # before RuntimeError: it is one
            self._rebuild(executor)
            raise WorkerDied(f"{self._what} process died") from None

    def warmup(self) -> None:
        """Start every worker now (imports take a second each), not on the first task."""
        for future in [self.submit(_ready) for _ in range(self._processes * 2)]:
            future.result()

    def close(self, timeout: float = CLOSE_TIMEOUT) -> None:
        """Stop the workers: what is running gets `timeout` seconds, then its process is
        killed."""
        with self._lock:
            self._closed = True
            executor = self._executor
        processes = list(executor._processes.values())
        executor.shutdown(wait=False, cancel_futures=True)
        deadline = time.monotonic() + timeout
        for process in processes:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                log.warning("%s had not stopped %.0f s into the stop: killed", self._what,
                            timeout)
                process.kill()
                process.join(1.0)
        self._after_a_death()


# --- in the worker -----------------------------------------------------------------------


def _init_worker(parent: int, initializer: Callable[..., None] | None,
                 initargs: tuple[Any, ...]) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    threading.Thread(target=_exit_with, args=(parent,), name="parent-watch",
                     daemon=True).start()
    if initializer is not None:
        initializer(*initargs)


def _exit_with(parent: int) -> None:
    """The worker's parent is the daemon: once it is gone (the worker re-parented), so is
    the worker, at once and without clean-up (its tasks' owner is dead)."""
    while os.getppid() == parent:
        time.sleep(PARENT_CHECK_SECONDS)
    os._exit(0)


def _ready() -> bool:
    return True
