"""Trustworthy under faults and load: kill -9 at random moments, a database outage through a
proxy that cuts every connection, a burst into a tiny queue, transient vs permanent failures,
SIGTERM in the middle of a batch.

The daemon runs as a subprocess on tiny one-word pages with a small detection size, so OCR
costs tens of milliseconds and the tests measure the daemon, not the model. The invariant
checked everywhere: a document is either `done` with exactly its pages, or has no pages.
"""

from __future__ import annotations

import contextlib
import io
import os
import random
import select
import shutil
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

from daemon.config import DatabaseSettings
from daemon.store import migrate
from daemon.store.db import make_engine
from daemon.store.ledger import Ledger
from tests.pages import SENTENCES, page_bytes
from tests.support import (
    ENGINE_ENV,
    DaemonProcess,
    assert_nothing_half_written,
    count_states,
    encrypted_pdf,
    ledger_rows,
    sha256,
    tiny_page,
    wait_until,
)

# -- the daemon as a subprocess ---------------------------------------------------------------


# -- reading the ledger directly ----------------------------------------------------------------


# -- 1. kill -9 anywhere ------------------------------------------------------------------------


@pytest.mark.slow
def test_kill_9_at_random_moments_loses_and_duplicates_nothing(
        daemon_factory: Callable[..., DaemonProcess]) -> None:
    rng = random.Random(20260312)
    distinct = {f"w{i:03d}.png": tiny_page(f"k{i:03d}") for i in range(90)}
    copies = {f"copy {i}.png": distinct[f"w{i * 7:03d}.png"] for i in range(10)}
    files = {**distinct, **copies}
    names = list(files)
    rng.shuffle(names)
    daemon = daemon_factory({"OCR_DAEMON_QUEUE__CAPACITY": "8"})
    for name in names[:40]:  # some present before the first start, the rest dropped later
        (daemon.inbox / name).write_bytes(files[name])
    daemon.start()
    dropped = 40
    kills = 0
    left_processing = 0
    while kills < 6:
        for name in names[dropped:dropped + 12]:
            (daemon.inbox / name).write_bytes(files[name])  # non-atomic writes, on purpose
        dropped = min(len(names), dropped + 12)
        pause = rng.uniform(0.05, 1.2)
        time.sleep(pause)  # a random moment: this is the fault being injected, not a wait
        counts = count_states(daemon.url)
        if counts["done"] == len(distinct) and dropped == len(names):
            break
        daemon.kill9()
        kills += 1
        stuck = count_states(daemon.url)["processing"]
        left_processing += stuck
        daemon.start()
        if stuck:  # re-queued on start, before the daemon says it is ready
            assert f"re-queued {stuck} documents left in processing" in daemon.log_text(True)
    for name in names[dropped:]:
        (daemon.inbox / name).write_bytes(files[name])
    assert wait_until(lambda: count_states(daemon.url)["done"] == len(distinct), 60), \
        count_states(daemon.url)
    assert daemon.stop() == 0
    print(f"{kills} kills; {left_processing} documents were left in processing by them")
    assert kills >= 3

    rows = ledger_rows(daemon.url)
    assert set(rows) == {sha256(data) for data in distinct.values()}  # one row per content
    assert all(row.state == "done" and row.pages == (1,) for row in rows.values()), rows
    assert_nothing_half_written(rows)
    recorded = {Path(p).name for row in rows.values() for p in row.paths}
    assert recorded == set(files)  # every name it arrived under, nothing missing
    assert "Traceback" not in daemon.log_text()


# -- 2. database outage ----------------------------------------------------------------------


class CuttableProxy:
    """TCP proxy 127.0.0.1:port <-> the PostgreSQL server. `cut()` drops every connection and
    refuses new ones (the listening socket is closed); `resume()` listens again on the same
    port. The real server is never touched."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.port = 0
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self.resume()

    def resume(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self.port = listener.getsockname()[1]
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            conns, self._conns = self._conns, []
        if listener is not None:
            listener.close()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()

    close = cut

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # closed by cut()
            try:
                server = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._listener is not listener:
                    client.close()
                    server.close()
                    return
                self._conns += [client, server]
            threading.Thread(target=self._pump, args=(client, server), daemon=True).start()

    @staticmethod
    def _pump(a: socket.socket, b: socket.socket) -> None:
        peer = {a: b, b: a}
        try:
            while True:
                readable, _, _ = select.select([a, b], [], [], 1.0)
                for sock in readable:
                    data = sock.recv(65536)
                    if not data:
                        return
                    peer[sock].sendall(data)
        except (OSError, ValueError):
            return
        finally:
            for sock in (a, b):
                with contextlib.suppress(OSError):
                    sock.close()


@pytest.mark.slow
@pytest.mark.postgres
def test_database_outage_is_waited_out_and_nothing_is_lost(
        daemon_factory: Callable[..., DaemonProcess], pg_url: str) -> None:
    from sqlalchemy.engine import make_url

    real = make_url(pg_url)
    proxy = CuttableProxy((real.host or "127.0.0.1", real.port or 5432))
    try:
        through_proxy = real.set(host="127.0.0.1", port=proxy.port)
        daemon = daemon_factory({
            "OCR_DAEMON_DATABASE__URL": through_proxy.render_as_string(hide_password=False)})
        daemon.start()
        before = {f"before{i}.png": tiny_page(f"b{i}") for i in range(5)}
        during = {f"during{i}.png": tiny_page(f"d{i}") for i in range(10)}
        for name, data in before.items():
            (daemon.inbox / name).write_bytes(data)
        assert wait_until(lambda: count_states(pg_url)["done"] == 5, 30), daemon.log_text()
        assert daemon.health()["status"] == "healthy"

        proxy.cut()
        cut_at = time.monotonic()
        for name, data in during.items():
            (daemon.inbox / name).write_bytes(data)
        daemon.wait_for_log("database unavailable", 15, since_start=True)
        health = daemon.health()
        assert health["status"] == "degraded" and health["database"] != "ok", health
        # the outage itself is the fault under test: keep it cut for a while
        time.sleep(max(0.0, 6 - (time.monotonic() - cut_at)))
        assert daemon.alive()
        assert count_states(pg_url)["done"] == 5  # nothing could be stored meanwhile
        proxy.resume()

        assert wait_until(lambda: count_states(pg_url)["done"] == 15, 60), daemon.log_text()
        assert wait_until(lambda: daemon.health()["status"] == "healthy", 10)
        assert daemon.stop() == 0
    finally:
        proxy.close()
    rows = ledger_rows(pg_url)
    assert {r.sha256 for r in rows.values()} == {sha256(d) for d in {**before, **during}.values()}
    # the outage cost no attempt: nothing was failed or retried because of it
    assert all(r.state == "done" and r.attempts == 1 for r in rows.values()), rows
    assert_nothing_half_written(rows)


# -- 3. burst and backpressure -----------------------------------------------------------------

BURST_FILES = int(os.environ.get("OCR_DAEMON_TEST_BURST_FILES", "800"))


def vm_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"{field} not in /proc/{pid}/status")


@pytest.mark.slow
def test_burst_into_a_tiny_queue_is_all_processed_in_bounded_memory(
        daemon_factory: Callable[..., DaemonProcess]) -> None:
    """OCR_DAEMON_TEST_BURST_FILES=2000 for the full burst (about 2.5 minutes on 2 cores)."""
    daemon = daemon_factory({"OCR_DAEMON_QUEUE__CAPACITY": "4",
                             "OCR_DAEMON_WATCH__RESCAN_INTERVAL_SECONDS": "3"})
    files = {f"burst{i:05d}.png": tiny_page(f"{i:05d}") for i in range(BURST_FILES)}
    names = list(files)
    half = len(names) // 2
    for name in names[:half]:  # present before start: only the start-up scan finds these
        (daemon.inbox / name).write_bytes(files[name])
    daemon.start()
    ready_hwm = vm_kib(daemon.pid, "VmHWM")
    started = time.monotonic()
    for name in names[half:]:
        (daemon.inbox / name).write_bytes(files[name])
    samples: dict[str, int] = {}

    def all_done() -> bool:
        assert daemon.alive(), daemon.log_text()
        counts = count_states(daemon.url)
        # the queue bounds what is claimed, whatever waits in the folder and the ledger
        assert counts["processing"] <= 4, counts
        if counts["done"] >= len(files) // 4:
            samples.setdefault("quarter", vm_kib(daemon.pid, "VmHWM"))
        if counts["done"] >= len(files) // 2:
            samples.setdefault("half", vm_kib(daemon.pid, "VmHWM"))
        return counts["done"] == len(files)

    assert wait_until(all_done, 600, interval=0.5), count_states(daemon.url)
    elapsed = time.monotonic() - started
    peak = vm_kib(daemon.pid, "VmHWM")
    assert daemon.stop() == 0
    print(f"{len(files)} files with queue.capacity=4: {elapsed:.1f}s "
          f"({len(files) / elapsed:.1f} files/s); peak RSS (VmHWM) {peak / 1024:.0f} MiB; "
          f"{samples['quarter'] / 1024:.0f} MiB after the first quarter, "
          f"{samples['half'] / 1024:.0f} MiB at half, "
          f"{ready_hwm / 1024:.0f} MiB at ready")
    rows = ledger_rows(daemon.url)
    assert len(rows) == len(files)
    assert all(r.state == "done" and r.pages == (1,) for r in rows.values())
    # Memory plateaus once the engine has seen the shapes the pages bring: the second half of
    # the burst adds little (a file waiting in the folder or the ledger costs nothing in the
    # daemon), however many files wait.
    assert peak - samples["half"] < 48 * 1024, (peak, samples)
    assert peak < 1024 * 1024


# -- 4. transient vs permanent -----------------------------------------------------------------


@pytest.mark.slow
def test_slow_writer_is_read_once_settled_and_permanent_errors_fail_at_once(
        daemon_factory: Callable[..., DaemonProcess]) -> None:
    daemon = daemon_factory({"OCR_DAEMON_WATCH__SETTLE_SECONDS": "0.6",
                             "OCR_DAEMON_WATCH__FAILED_DIR": "failed",
                             "OCR_DAEMON_QUEUE__MAX_ATTEMPTS": "3",
                             "OCR_DAEMON_QUEUE__RETRY_BACKOFF_SECONDS": "0.2"})
    daemon.start()
    slow = tiny_page("slowly")
    gif = io.BytesIO()
    Image.new("L", (64, 64), 255).save(gif, "GIF")
    permanent = {
        "corrupt.png": (tiny_page("cut")[:200], "corrupt or truncated image"),
        "animation.png": (gif.getvalue(), "unsupported image format GIF"),
        "locked.pdf": (encrypted_pdf(), "encrypted PDF (password required)"),
    }
    for name, (data, _) in permanent.items():
        (daemon.inbox / name).write_bytes(data)
    with (daemon.inbox / "slow.png").open("wb") as handle:  # a scanner writing over 2 s
        for start in range(0, len(slow), len(slow) // 6 + 1):
            handle.write(slow[start:start + len(slow) // 6 + 1])
            handle.flush()
            time.sleep(0.4)  # the slow writer itself, not a wait
    assert wait_until(lambda: count_states(daemon.url)["done"] == 1
                      and count_states(daemon.url)["failed"] == 3, 30), daemon.log_text()
    assert daemon.stop() == 0
    rows = ledger_rows(daemon.url)
    # only the complete content was ever hashed: no row for a partly written file
    assert set(rows) == {sha256(slow)} | {sha256(d) for d, _ in permanent.values()}
    assert rows[sha256(slow)].state == "done"
    log = daemon.log_text()
    for name, (data, reason) in permanent.items():
        row = rows[sha256(data)]
        assert row.state == "failed" and row.attempts == 1 and reason in (row.reason or ""), row
        assert f"failed {daemon.inbox / name}: {reason}" in log
        sidecar = daemon.inbox / "failed" / f"{name}.error.txt"
        assert reason in sidecar.read_text() and not (daemon.inbox / name).exists()
    assert_nothing_half_written(rows)


def needs_root_to_drop_privileges() -> None:
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to run the daemon without its file-access override")


@pytest.mark.slow
def test_permission_flapping_after_intake_is_retried_with_backoff(
        daemon_factory: Callable[..., DaemonProcess]) -> None:
    """The file is already queued in the ledger (its intake happened) when it becomes
    unreadable; it comes back later. The daemon runs without CAP_DAC_OVERRIDE."""
    needs_root_to_drop_privileges()
    daemon = daemon_factory({"OCR_DAEMON_QUEUE__MAX_ATTEMPTS": "6",
                             "OCR_DAEMON_QUEUE__RETRY_BACKOFF_SECONDS": "0.5",
                             "OCR_DAEMON_WATCH__RESCAN_INTERVAL_SECONDS": "1"},
                            unprivileged=True)
    data = tiny_page("flap")
    path = daemon.inbox / "flap.png"
    path.write_bytes(data)
    engine = make_engine(DatabaseSettings(url=daemon.url))
    migrate.upgrade(engine)
    Ledger(engine).register(str(path), sha256(data), len(data))
    engine.dispose()
    path.chmod(0o000)
    daemon.start()
    daemon.wait_for_log("permission denied", 30)
    assert wait_until(lambda: "retrying" in daemon.log_text() and "attempt 2 of 6"
                      in daemon.log_text(), 30), daemon.log_text()
    path.chmod(0o644)
    assert wait_until(lambda: count_states(daemon.url)["done"] == 1, 30), daemon.log_text()
    assert daemon.stop() == 0
    rows = ledger_rows(daemon.url)
    row = rows[sha256(data)]
    assert row.state == "done" and 3 <= row.attempts < 6, row
    # the stored file has no stale failure beside it (the watcher refused it while unreadable)
    assert [r for r in rows.values() if r.state == "failed"] == [], rows


# -- 5. graceful stop ------------------------------------------------------------------------


@pytest.mark.slow
def test_sigterm_during_a_batch_stops_within_the_timeout_and_leaves_nothing_half_written(
        daemon_factory: Callable[..., DaemonProcess]) -> None:
    stop_timeout = 2.0
    daemon = daemon_factory({**ENGINE_ENV,  # full-size detection: seconds per page
                             "OCR_DAEMON_OCR__DET_LIMIT_SIDE_LEN": "736",
                             "OCR_DAEMON_BATCH__STOP_TIMEOUT_SECONDS": str(stop_timeout)})
    files = {f"page{i}.png": page_bytes([SENTENCES[i % 6], f"page {i}"], width=900)
             for i in range(8)}
    for name, data in files.items():
        (daemon.inbox / name).write_bytes(data)
    daemon.start()
    assert wait_until(lambda: count_states(daemon.url)["processing"] >= 2, 30)
    asked = time.monotonic()
    assert daemon.stop(signal.SIGTERM) == 0
    took = time.monotonic() - asked
    print(f"stopped {took:.1f}s after SIGTERM (stop_timeout_seconds={stop_timeout})")
    rows = ledger_rows(daemon.url)
    assert_nothing_half_written(rows)
    assert count_states(daemon.url)["processing"] == 0  # handed back, not left to a lease
    assert "handed" in daemon.log_text() or count_states(daemon.url)["queued"] == 0
    assert took < stop_timeout + 3, took

    daemon.start()  # what was handed back is done on the next run, attempts not wasted
    assert wait_until(lambda: count_states(daemon.url)["done"] == len(files), 120)
    assert daemon.stop() == 0
    rows = ledger_rows(daemon.url)
    assert all(r.state == "done" and r.attempts == 1 for r in rows.values()), rows
    assert_nothing_half_written(rows)


def _descendants(pid: int) -> set[int]:
    found, stack = set(), [pid]
    while stack:
        current = stack.pop()
        try:
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
        except OSError:
            continue
        for child in map(int, children):
            if child not in found:
                found.add(child)
                stack.append(child)
    return found


@pytest.mark.slow
def test_kill_9_of_the_daemon_leaves_no_process_and_no_shared_memory(
        daemon_factory: Callable[..., DaemonProcess]) -> None:
    """After `kill -9` of the daemon its PDF worker, host worker and resource tracker lived on
    under PID 1, holding shared-memory and semaphore entries. Its workers now exit with it,
    and the tracker, its last holder gone, removes what was left."""
    from daemon.process_pool import alive
    from tests.support import mixed_pdf

    shm_before = set(os.listdir("/dev/shm"))
    daemon = daemon_factory({"OCR_DAEMON_BATCH__PDF_PROCESSES": "1",
                             "OCR_DAEMON_BATCH__HOST_PROCESSES": "1"})
    daemon.start()
    (daemon.inbox / "doc.pdf.part").write_bytes(mixed_pdf([None, ["born digital"]],
                                                           SENTENCES[:2]))
    (daemon.inbox / "doc.pdf.part").rename(daemon.inbox / "doc.pdf")
    assert wait_until(lambda: count_states(daemon.url)["done"] == 1, 60), daemon.log_text()
    children = _descendants(daemon.pid)
    assert children  # its worker processes (the PDF worker, the resource tracker, ...)
    daemon.kill9()
    assert wait_until(lambda: not any(alive(pid) for pid in children), 15), [
        pid for pid in children if alive(pid)]
    assert wait_until(lambda: set(os.listdir("/dev/shm")) <= shm_before, 10), (
        set(os.listdir("/dev/shm")) - shm_before)
