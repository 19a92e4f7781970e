"""The daemon as a subprocess: drop rendered pages, read the text back through the CLI,
stop it with SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.pages import SENTENCES, render_page, similarity, write_page

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent


class Daemon:
    def __init__(self, workdir: Path, extra_env: dict[str, str] | None = None) -> None:
        self.workdir = workdir
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith("OCR_DAEMON_") and k != "FORCE_CPU"}
        self.env.update({
            "OCR_DAEMON_WATCH__SETTLE_SECONDS": "0.3",
            "OCR_DAEMON_METRICS__PORT": "0",
            "PYTHONUNBUFFERED": "1",
            # this tree's daemon, whatever copy of the package the interpreter has installed
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
            **(extra_env or {}),
        })
        self.log = workdir / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "daemon", "run"], cwd=self.workdir, env=self.env,
            stdout=self.log.open("wb"), stderr=subprocess.STDOUT)
        self.wait_for_log("ready", 90)

    def wait_for_log(self, needle: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if needle in self.log.read_text(errors="replace"):
                return
            assert self.proc is not None and self.proc.poll() is None, self.log.read_text()
            time.sleep(0.1)
        raise AssertionError(f"{needle!r} not logged:\n{self.log.read_text()}")

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "daemon", *args], cwd=self.workdir,
                              env=self.env, capture_output=True, text=True, timeout=60)

    def status(self) -> dict[str, int]:
        result = self.cli("status", "--json")
        assert result.returncode == 0, result.stderr
        counts: dict[str, int] = json.loads(result.stdout)["documents"]
        return counts

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        return self.proc.wait(60)


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    instance = Daemon(tmp_path)
    yield instance
    if instance.proc is not None and instance.proc.poll() is None:
        instance.proc.kill()
        instance.proc.wait()


def test_drop_pages_read_text_back_and_stop_cleanly(daemon: Daemon) -> None:
    daemon.start()
    inbox = daemon.workdir / "inbox"  # the default ./inbox, created by the daemon
    pages = {"scan.png": SENTENCES[0:3], "letter.jpg": SENTENCES[3:6],
             "memo.tif": SENTENCES[1:3]}
    dropped = time.monotonic()
    for name, lines in pages.items():
        write_page(inbox / name, lines)
    deadline = time.monotonic() + 120
    while daemon.status()["done"] < len(pages):
        assert time.monotonic() < deadline, daemon.log.read_text()
        time.sleep(0.3)
    print(f"3 pages stored {time.monotonic() - dropped:.1f}s after the drop")

    for name, lines in pages.items():
        result = daemon.cli("text", f"inbox/{name}")
        assert result.returncode == 0, result.stderr
        assert similarity(result.stdout, "\n".join(lines)) > 0.9, result.stdout
    found = daemon.cli("search", "lighthouse")
    assert found.returncode == 0
    assert {line.split("\t")[0] for line in found.stdout.splitlines()} == {
        str(inbox / "letter.jpg")}
    assert daemon.cli("search", "no such words anywhere").returncode == 1

    assert daemon.stop(signal.SIGTERM) == 0
    log = daemon.log.read_text()
    assert "stopped" in log and "Traceback" not in log


def test_second_signal_exits_at_once(tmp_path: Path) -> None:
    """The second signal arrives while the first stop is waiting for a document in flight
    (a 30-page TIFF, seconds of CPU OCR; batch.stop_timeout_seconds = 120): the daemon exits
    130 at once, not 0 after the stop, and the document is not lost."""
    daemon = Daemon(tmp_path, {"OCR_DAEMON_BATCH__STOP_TIMEOUT_SECONDS": "120"})
    try:
        daemon.start()
        assert daemon.proc is not None
        frames = [render_page(SENTENCES[i % 4 : i % 4 + 3]) for i in range(30)]
        temp = tmp_path / "inbox" / "long.tif.part"
        frames[0].save(temp, "TIFF", save_all=True, append_images=frames[1:])
        temp.rename(tmp_path / "inbox" / "long.tif")
        deadline = time.monotonic() + 60
        while daemon.status()["processing"] != 1:
            assert time.monotonic() < deadline, daemon.log.read_text()
            time.sleep(0.2)
        daemon.proc.send_signal(signal.SIGINT)
        daemon.wait_for_log("SIGINT received: stopping", 10)
        daemon.proc.send_signal(signal.SIGINT)
        code = daemon.proc.wait(30)
        assert code == 130, daemon.log.read_text()
        status = daemon.status()  # stored in the meantime, or still there to be done
        assert status["failed"] == 0
        assert status["done"] + status["queued"] + status["processing"] == 1, status
    finally:
        if daemon.proc is not None and daemon.proc.poll() is None:
            daemon.proc.kill()
            daemon.proc.wait()
