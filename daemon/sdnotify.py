"""systemd notify protocol client (sd_notify(3)), without dependencies.

The unit file runs the daemon as `Type=notify` with `WatchdogSec=`: systemd considers the service
started only once it sends `READY=1`, and restarts it when `WATCHDOG=1` stops arriving. Outside
systemd (a shell, Docker, tests) `$NOTIFY_SOCKET` is unset and every call here is a cheap no-op
returning False, so callers never need to ask whether they run under systemd.

The environment is read at each call, not at import, so tests (and a service that is handed a
socket later) see the current value. Sending never raises: a lost notification must not take the
daemon down, the caller only learns it from the False.
"""

from __future__ import annotations

import os
import socket

NOTIFY_SOCKET_ENV = "NOTIFY_SOCKET"
WATCHDOG_USEC_ENV = "WATCHDOG_USEC"
WATCHDOG_PID_ENV = "WATCHDOG_PID"


def _address(raw: str) -> str | None:
    """The socket address for `raw`: a path, or Linux's abstract namespace for '@name'."""
    if raw.startswith("@"):
        return "\0" + raw[1:]
    if raw.startswith("/"):
        return raw
    return None  # systemd only ever hands out absolute paths or '@' names (vsock is not ours)


def notify(message: str) -> bool:
    """Send one datagram of newline-separated `KEY=VALUE` assignments to systemd.

    True when the datagram was sent; False when there is no `$NOTIFY_SOCKET` (not under
    systemd, or a unit without `Type=notify`/`NotifyAccess=`) or the send failed.
    """
    raw = os.environ.get(NOTIFY_SOCKET_ENV, "")
    address = _address(raw) if raw else None
    if address is None or not message:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(message.encode("utf-8"), address)
    except OSError:
        return False
    return True


def ready(status_text: str | None = None) -> bool:
    """Start-up is complete (store open, models warmed, watcher running): `READY=1`."""
    if status_text is None:
        return notify("READY=1")
    return notify(f"READY=1\nSTATUS={_one_line(status_text)}")


def stopping() -> bool:
    """A graceful stop has begun: `STOPPING=1` (systemd shows 'deactivating')."""
    return notify("STOPPING=1")


def watchdog() -> bool:
    """Keep-alive for `WatchdogSec=`: `WATCHDOG=1`. Send it every `watchdog_interval()`."""
    return notify("WATCHDOG=1")


def status(text: str) -> bool:
    """Free-form one-line status shown by `systemctl status`: `STATUS=...`."""
    return notify(f"STATUS={_one_line(text)}")


def extend_timeout(seconds: float) -> bool:
    """Ask for `seconds` more before the start (or stop) timeout fires: `EXTEND_TIMEOUT_USEC=`.

    For slow start-up work of unknown length, such as a first TensorRT engine build; it must be
    repeated before each extension runs out.
    """
    return notify(f"EXTEND_TIMEOUT_USEC={max(0, int(seconds * 1_000_000))}")


def watchdog_interval() -> float | None:
    """Seconds between `watchdog()` calls, or None when no watchdog is armed for this process.

    Half of `$WATCHDOG_USEC`, as sd_watchdog_enabled(3) recommends, so one late ping is not
    fatal. `$WATCHDOG_PID`, when set, must be our PID: the variables may be inherited by a
    child process that systemd does not watch.
    """
    raw_usec = os.environ.get(WATCHDOG_USEC_ENV)
    if not raw_usec:
        return None
    try:
        usec = int(raw_usec)
    except ValueError:
        return None
    if usec <= 0:
        return None
    raw_pid = os.environ.get(WATCHDOG_PID_ENV)
    if raw_pid:
        try:
            if int(raw_pid) != os.getpid():
                return None
        except ValueError:
            return None
    return usec / 2 / 1_000_000


def _one_line(text: str) -> str:
    # A newline would start a new assignment inside the datagram.
    return " ".join(text.splitlines())
