"""sd_notify client against a real bound AF_UNIX datagram socket, as systemd would hold it."""

from __future__ import annotations

import os
import socket
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from daemon import sdnotify

Receiver = Callable[[], str]


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.fixture
def path_socket(clean_env: pytest.MonkeyPatch) -> Iterator[Receiver]:
    # A short directory: AF_UNIX paths are limited to 108 bytes, pytest's tmp_path can be longer.
    with tempfile.TemporaryDirectory(prefix="sdn-") as tmp:
        path = Path(tmp) / "notify"
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
            server.bind(str(path))
            server.settimeout(2.0)
            clean_env.setenv("NOTIFY_SOCKET", str(path))
            yield lambda: server.recv(4096).decode("utf-8")


@pytest.fixture
def abstract_socket(clean_env: pytest.MonkeyPatch) -> Iterator[Receiver]:
    name = f"ocr-daemon-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind("\0" + name)
        server.settimeout(2.0)
        clean_env.setenv("NOTIFY_SOCKET", "@" + name)
        yield lambda: server.recv(4096).decode("utf-8")


def test_unset_socket_is_a_no_op(clean_env: pytest.MonkeyPatch) -> None:
    assert sdnotify.notify("READY=1") is False
    assert sdnotify.ready() is False
    assert sdnotify.watchdog() is False
    assert sdnotify.stopping() is False
    assert sdnotify.status("x") is False


def test_ready_reaches_a_path_socket(path_socket: Receiver) -> None:
    assert sdnotify.ready() is True
    assert path_socket() == "READY=1"


def test_ready_reaches_an_abstract_socket(abstract_socket: Receiver) -> None:
    assert sdnotify.ready() is True
    assert abstract_socket() == "READY=1"


def test_every_helper_sends_its_assignment(path_socket: Receiver) -> None:
    assert sdnotify.watchdog()
    assert path_socket() == "WATCHDOG=1"
    assert sdnotify.stopping()
    assert path_socket() == "STOPPING=1"
    assert sdnotify.status("12 queued, provider cuda")
    assert path_socket() == "STATUS=12 queued, provider cuda"
    assert sdnotify.ready("warmed up")
    assert path_socket() == "READY=1\nSTATUS=warmed up"
    assert sdnotify.extend_timeout(90)
    assert path_socket() == "EXTEND_TIMEOUT_USEC=90000000"


def test_status_text_cannot_inject_a_second_assignment(path_socket: Receiver) -> None:
    assert sdnotify.status("line one\nREADY=1")
    assert path_socket() == "STATUS=line one READY=1"


def test_missing_socket_returns_false_instead_of_raising(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("NOTIFY_SOCKET", f"/nonexistent/{uuid.uuid4().hex}")
    assert sdnotify.notify("READY=1") is False


def test_relative_socket_path_is_refused(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("NOTIFY_SOCKET", "relative/notify")
    assert sdnotify.notify("READY=1") is False


def test_watchdog_interval_is_half_the_timeout(clean_env: pytest.MonkeyPatch) -> None:
    assert sdnotify.watchdog_interval() is None
    clean_env.setenv("WATCHDOG_USEC", "30000000")
    assert sdnotify.watchdog_interval() == 15.0
    clean_env.setenv("WATCHDOG_PID", str(os.getpid()))
    assert sdnotify.watchdog_interval() == 15.0


@pytest.mark.parametrize(
    ("usec", "pid"),
    [("0", None), ("-5", None), ("soon", None), ("30000000", "1"), ("30000000", "x")],
)
def test_watchdog_interval_not_armed(
    clean_env: pytest.MonkeyPatch, usec: str, pid: str | None
) -> None:
    clean_env.setenv("WATCHDOG_USEC", usec)
    if pid is not None:
        clean_env.setenv("WATCHDOG_PID", pid)
    assert sdnotify.watchdog_interval() is None
