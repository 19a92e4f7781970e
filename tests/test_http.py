"""The HTTP server's /health and /ready, and the `check` client, over real sockets."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from daemon.config import MetricsSettings
from daemon.http import HEALTH_KEYS, MetricsServer, check_health
from daemon.metrics import Metrics
from tests.conftest import ServerFactory
from tests.support import Health, get, health, wait_until

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", ["/health", "/health/"])
@pytest.mark.parametrize(("state", "code"), [("healthy", 200), ("degraded", 200),
                                             ("unhealthy", 503)])
def test_health(serve: ServerFactory, path: str, state: str, code: int) -> None:
    server = serve(Metrics("1", gpu_reader=list), health=lambda: health(state, queue_depth=4))
    status, content_type, text = get(server, path)
    assert (status, content_type) == (code, "application/json")
    body = json.loads(text)
    assert tuple(body) == HEALTH_KEYS
    assert body["status"] == state and body["queue_depth"] == 4 and body["version"] == "9.9.9"
    assert check_health("127.0.0.1", server.port) is (code == 200)


def test_health_that_raises_is_unhealthy(serve: ServerFactory) -> None:
    def broken() -> Health:
        raise RuntimeError("database gone")

    server = serve(Metrics("1", gpu_reader=list), health=broken)
    status, _, text = get(server, "/health")
    assert status == 503
    assert json.loads(text) == {"status": "unhealthy", "error": "database gone"}
    assert check_health("127.0.0.1", server.port) is False


def test_ready_follows_the_callable(serve: ServerFactory) -> None:
    ready = False
    server = serve(Metrics("1", gpu_reader=list), ready=lambda: ready)
    assert get(server, "/ready")[0] == 503
    ready = True
    status, _, text = get(server, "/ready")
    assert status == 200 and json.loads(text) == {"ready": True}
    assert get(server, "/nope")[0] == 404


def test_check_health_false_after_stop_and_when_nothing_listens() -> None:
    metrics = Metrics("1", gpu_reader=list)
    with MetricsServer(metrics, "127.0.0.1", 0, health=health) as server:
        port = server.port
        assert check_health("127.0.0.1", port)
        assert check_health("0.0.0.0", port)  # a wildcard bind is checked on loopback
    assert check_health("127.0.0.1", port) is False

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    assert check_health("127.0.0.1", free, timeout=1.0) is False


def test_check_health_false_for_something_else_on_the_port() -> None:
    metrics = Metrics("1", gpu_reader=list)
    with MetricsServer(metrics, "127.0.0.1", 0,
                       health=lambda: {"status": "sort of"}) as server:
        assert check_health("127.0.0.1", server.port) is False


def test_default_bind_is_loopback() -> None:
    assert MetricsSettings().host == "127.0.0.1"
    assert MetricsServer(Metrics("1", gpu_reader=list)).host == "127.0.0.1"


def test_health_document_rejects_unknown_status() -> None:
    with pytest.raises(ValueError, match="healthy, degraded or unhealthy"):
        health("fine")


def test_check_loads_neither_the_engine_nor_the_store(tmp_path: Path) -> None:
    """`ocr-daemon check` runs as a Docker HEALTHCHECK every few seconds: one HTTP GET."""
    script = (
        "import sys; from daemon.cli import main\n"
        "code = main(['check', '--timeout', '0.5'])\n"
        "heavy = sorted(m for m in ('onnxruntime', 'sqlalchemy', 'numpy', 'rapidocr')"
        " if m in sys.modules)\n"
        "print(code, heavy)\n"
    )
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO),
           "OCR_DAEMON_METRICS__PORT": str(free_port())}
    out = subprocess.run([sys.executable, "-c", script], cwd=str(tmp_path), env=env,
                         capture_output=True, text=True, timeout=60, check=True).stdout
    assert out.split() == ["7", "[]"]  # unhealthy (nothing listens), nothing heavy imported


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _closed_by_server(sock: socket.socket, timeout: float) -> bool:
    """The server closed `sock` (recv sees the end) within `timeout` seconds."""
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except (TimeoutError, ConnectionResetError):
        return False


def test_idle_connections_are_closed_and_capped() -> None:
    """Clients that connect and say nothing cannot hold the server's threads for good: each
    is closed after the request timeout, and past the cap new ones are refused at once."""
    metrics = Metrics("1", gpu_reader=list)
    with MetricsServer(metrics, "127.0.0.1", 0, health=health, request_timeout=0.5,
                       max_connections=2) as server:
        idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(2)]
        assert wait_until(lambda: _busy(server.port), 5)  # both slots taken: refused
        for sock in idle:
            assert _closed_by_server(sock, 5)  # timed out by the server
            sock.close()
        assert wait_until(lambda: check_health("127.0.0.1", server.port, timeout=2), 5)


def _busy(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        return _closed_by_server(sock, 0.3)


def test_slow_clients_cannot_hold_health_for_long() -> None:
    """32 connections sending a header line every few seconds refused /health for as long
    as they kept it up (compose binds 0.0.0.0): the timeout was a read's, not the
    request's. Now a request has a deadline as a whole, and one address gets
    MAX_PER_CLIENT connections: a health check from another address is answered at once,
    and each slow connection is closed at its deadline however it trickles."""
    from daemon.http import MAX_PER_CLIENT

    metrics = Metrics("1", gpu_reader=list)
    with MetricsServer(metrics, "127.0.0.1", 0, health=health, request_timeout=5,
                       max_connections=32) as server:
        slow = []
        for _ in range(32):
            sock = socket.socket()
            sock.bind(("127.0.0.2", 0))  # another address on the loopback
            sock.connect(("127.0.0.1", server.port))
            sock.sendall(b"GET /health HTTP/1.1\r\n")
            slow.append(sock)
        assert check_health("127.0.0.1", server.port, timeout=2)  # at once: not their turn
        # the refused are closed at once (which ones: the kernel's accept order)
        assert wait_until(lambda: sum(not _ended(sock, 0) for sock in slow) == MAX_PER_CLIENT,
                          3)
        served = [sock for sock in slow if not _ended(sock, 0)]
        for _ in range(14):  # a header line every 0.5 s: each read well inside its timeout
            for sock in served:
                with contextlib.suppress(OSError):
                    sock.sendall(b"X-Slow: 1\r\n")
            time.sleep(0.5)
        assert all(_ended(sock, 3) for sock in served)  # closed at the deadline
        for sock in slow:
            sock.close()


def _ended(sock: socket.socket, timeout: float) -> bool:
    """The server ended `sock` within `timeout` seconds: closed it, or reset it (a request
    it had not read when it closed)."""
    sock.settimeout(timeout)  # 0: only what has happened already
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except (TimeoutError, BlockingIOError):
        return False
