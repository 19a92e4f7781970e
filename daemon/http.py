"""The daemon's one small HTTP server, and the `check` client that asks it.

Endpoints (one threaded server, bound to 127.0.0.1 unless configured):
  /metrics           Prometheus text (OpenMetrics when the scraper asks for it)
  /health, /health/  JSON from the `health` callable; 200 for "healthy"/"degraded", 503 else
  /ready             200 once `ready()` is true (models loaded, store open), 503 before

`check` imports this module and nothing heavier: one HTTP GET, no onnxruntime loaded.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import sys
import threading
import urllib.request
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client.exposition import choose_encoder

from daemon.metrics import Metrics

log = logging.getLogger(__name__)

HEALTHY_STATUSES = ("healthy", "degraded")
# A request must arrive whole and be answered within this long (its connection is closed then,
# however it trickles in: a header line every few seconds reset a timeout a read), and at most
# MAX_CONNECTIONS are served at once, MAX_PER_CLIENT from one address (one thread each): slow
# clients cannot pile up threads, and the health check of Docker or systemd, from another
# address or once they time out, gets through.
REQUEST_TIMEOUT_SECONDS = 10.0
MAX_CONNECTIONS = 32
MAX_PER_CLIENT = 8

HEALTH_KEYS = ("status", "version", "gpu_available", "provider", "uptime", "queue_depth",
               "database")


def health_document(
    *,
    status: str,
    version: str,
    gpu_available: bool,
    provider: str,
    uptime: float,
    queue_depth: int,
    database: str,
    **extra: Any,
) -> dict[str, Any]:
    """The /health body with every agreed key, so the service cannot forget one.

    `status` is "healthy", "degraded" (working, but e.g. on the CPU after a GPU fallback or
    with retries piling up) or "unhealthy" (workers dead, database unreachable); `uptime` is
    in seconds; `database` is e.g. "ok" or the last error.
    """
    if status not in (*HEALTHY_STATUSES, "unhealthy"):
        raise ValueError(f"health status must be healthy, degraded or unhealthy: {status!r}")
    return {
        "status": status,
        "version": version,
        "gpu_available": gpu_available,
        "provider": provider,
        "uptime": round(uptime, 3),
        "queue_depth": queue_depth,
        "database": database,
        **extra,
    }


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    # the listen backlog: socketserver's 5 left a burst of connections half-open in the kernel
    # for seconds (SYN-ACKs retransmitted), neither served nor refused
    request_queue_size = 2 * MAX_CONNECTIONS

    def __init__(
        self,
        address: tuple[str, int],
        metrics: Metrics,
        health: Callable[[], dict[str, Any]],
        ready: Callable[[], bool],
        *,
        request_timeout: float = REQUEST_TIMEOUT_SECONDS,
        max_connections: int = MAX_CONNECTIONS,
        max_per_client: int = MAX_PER_CLIENT,
    ) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.metrics = metrics
        self.health = health
        self.ready = ready
        self.request_timeout = request_timeout
        self.max_connections = max_connections
        self.max_per_client = max_per_client
        self._connections = threading.BoundedSemaphore(max_connections)
        self._per_client: dict[str, int] = {}
        self._per_client_lock = threading.Lock()
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        client = str(client_address[0])
        with self._per_client_lock:
            mine = self._per_client.get(client, 0)
            if mine < self.max_per_client:
                self._per_client[client] = mine + 1
        if mine >= self.max_per_client:
            log.warning("metrics/health server: %d connections from one address already: "
                        "refusing one", self.max_per_client)
            self.shutdown_request(request)
            return
        if not self._connections.acquire(blocking=False):
            self._client_done(client)
            log.warning("metrics/health server busy (%d connections): refusing one",
                        self.max_connections)
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._connections.release()
            self._client_done(str(client_address[0]))

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A connection cut at its deadline, or by its client, is no error of the server's."""
        if isinstance(sys.exc_info()[1], OSError):
            log.debug("connection from %s ended: %s", client_address[0], sys.exc_info()[1])
            return
        log.exception("metrics/health request from %s failed", client_address[0])

    def _client_done(self, client: str) -> None:
        with self._per_client_lock:
            left = self._per_client.get(client, 1) - 1
            if left > 0:
                self._per_client[client] = left
            else:
                self._per_client.pop(client, None)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(self.server.request_timeout)  # for every read and write

    def handle_one_request(self) -> None:
        """One request, read and answered within `request_timeout` as a whole: past it the
        connection is shut down, which ends a read however slowly the client trickles."""
        deadline = threading.Timer(self.server.request_timeout, self._expire)
        deadline.daemon = True
        deadline.start()
        try:
            super().handle_one_request()
        finally:
            deadline.cancel()

    def _expire(self) -> None:
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
            self._send(HTTPStatus.OK, encoder(self.server.metrics.registry), content_type)
        elif path in ("/health", "/health/"):
            self._health()
        elif path in ("/ready", "/ready/"):
            ok = self._call_ready()
            status = HTTPStatus.OK if ok else HTTPStatus.SERVICE_UNAVAILABLE
            self._json(status, {"ready": ok})
        else:
            self._json(HTTPStatus.NOT_FOUND, {"error": f"no such path: {path}"})

    def _health(self) -> None:
        try:
            body = dict(self.server.health())
        except Exception as exc:  # a health check that crashes says "unhealthy", not 500
            log.exception("health callable failed")
            body = {"status": "unhealthy", "error": str(exc)}
        ok = body.get("status") in HEALTHY_STATUSES
        self._json(HTTPStatus.OK if ok else HTTPStatus.SERVICE_UNAVAILABLE, body)

    def _call_ready(self) -> bool:
        try:
            return bool(self.server.ready())
        except Exception:
            log.exception("ready callable failed")
            return False

    def _json(self, status: HTTPStatus, body: dict[str, Any]) -> None:
        data = json.dumps(body, default=str).encode()
        self._send(status, data, "application/json")

    def _send(self, status: HTTPStatus, data: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)


class MetricsServer:
    """One small threaded HTTP server for /metrics, /health and /ready."""

    def __init__(
        self,
        metrics: Metrics,
        host: str = "127.0.0.1",
        port: int = 9464,
        health: Callable[[], dict[str, Any]] | None = None,
        ready: Callable[[], bool] | None = None,
        *,
        request_timeout: float = REQUEST_TIMEOUT_SECONDS,
        max_connections: int = MAX_CONNECTIONS,
        max_per_client: int = MAX_PER_CLIENT,
    ) -> None:
        self._metrics = metrics
        self._request_timeout = request_timeout
        self._max_connections = max_connections
        self._max_per_client = max_per_client
        self._host = host
        self._requested_port = port
        self._health = health or (lambda: {"status": "healthy", "version": metrics.version})
        self._ready = ready or (lambda: True)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def host(self) -> str:
        return self._host

    @property
    def port(self) -> int:
        """The bound port (the ephemeral one when started with port 0)."""
        if self._server is None:
            return self._requested_port
        return int(self._server.server_address[1])

    def start(self) -> None:
        if self._server is not None:
            return
        self._server = _Server((self._host, self._requested_port), self._metrics, self._health,
                               self._ready, request_timeout=self._request_timeout,
                               max_connections=self._max_connections,
                               max_per_client=self._max_per_client)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.2},
            name="metrics-http",
            daemon=True,
        )
        self._thread.start()
        log.info("Metrics and health listening on http://%s:%d", self._host, self.port)

    def stop(self, timeout: float = 5.0) -> None:
        server, thread = self._server, self._thread
        if server is None:
            return
        server.shutdown()  # waits for serve_forever to notice, at most one poll_interval (0.2 s)
        server.server_close()
        if thread is not None:
            thread.join(timeout)
        self._server = self._thread = None

    def __enter__(self) -> MetricsServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _client_host(host: str) -> str:
    """Where to reach a server bound to `host`: a wildcard bind is reached on loopback."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "::1"
    return host


def check_health(host: str, port: int, timeout: float = 3.0) -> bool:
    """True when the daemon at host:port answers /health as "healthy" or "degraded".

    "degraded" counts as alive (e.g. running on the CPU after a GPU fallback, or the database
    slow): the daemon still makes progress, and a container restart would not fix it. Anything
    else — unreachable, timeout, HTTP error, "unhealthy", a body that is not our JSON — is False.
    """
    target = _client_host(host)
    if ":" in target:
        target = f"[{target}]"
    try:
        with urllib.request.urlopen(f"http://{target}:{port}/health", timeout=timeout) as resp:
            body = json.loads(resp.read())
    except (OSError, ValueError):  # URLError, HTTPError (503) and timeouts are OSErrors
        return False
    return isinstance(body, dict) and body.get("status") in HEALTHY_STATUSES

