"""The daemon as a subprocess: drop rendered pages, read the text back through the CLI,
stop it with SIGTERM."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.pages import SENTENCES, render_page, similarity, write_page
from tests.support import DaemonProcess

pytestmark = pytest.mark.slow


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[DaemonProcess]:
    """The daemon on its built-in defaults (./inbox, ./ocr-daemon.db) in `tmp_path`."""
    instance = DaemonProcess(tmp_path, on_defaults=True)
    yield instance
    instance.cleanup()


def test_drop_pages_read_text_back_and_stop_cleanly(daemon: DaemonProcess) -> None:
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
    daemon = DaemonProcess(tmp_path, {"OCR_DAEMON_BATCH__STOP_TIMEOUT_SECONDS": "120"},
                           on_defaults=True)
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
