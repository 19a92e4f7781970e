"""A corpus of bad input, made by the test, dropped on the running daemon (a subprocess, with
`failed_dir` set) among healthy files: each bad file gets a clear reason in the ledger and the
log and is quarantined with a sidecar; the daemon stays alive; the healthy files are stored."""

from __future__ import annotations

import io
import os
import random
import shutil
import struct
import zlib
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
    DaemonProcess,
    Row,
    assert_nothing_half_written,
    count_states,
    ledger_rows,
    sha256,
    tiny_page,
    wait_until,
)

pytestmark = pytest.mark.slow


def png_bomb(side: int = 30000) -> bytes:
    """A side x side 1-bit PNG of zeros: ~110 MB of pixels in ~100 KB, written row by row."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))

    compressor = zlib.compressobj(9)
    row = b"\x00" * (1 + (side + 7) // 8)  # filter byte, then the packed bits
    idat = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat)
            + chunk(b"IEND", b""))


def image_bytes(size: tuple[int, int], fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, "white").save(buffer, fmt)
    return buffer.getvalue()


def by_name(rows: dict[str, Row]) -> dict[str, Row]:
    return {Path(path).name: row for row in rows.values() for path in row.paths}


def test_bad_input_corpus_is_failed_with_reasons_and_the_rest_is_stored(
        daemon_factory: Callable[..., DaemonProcess], tmp_path: Path) -> None:
    rng = random.Random(7)
    unprivileged = os.geteuid() == 0 and shutil.which("setpriv") is not None
    daemon = daemon_factory({"OCR_DAEMON_WATCH__FAILED_DIR": "failed",
                             "OCR_DAEMON_QUEUE__MAX_ATTEMPTS": "2",
                             "OCR_DAEMON_QUEUE__RETRY_BACKOFF_SECONDS": "0.2",
                             # a directory makes no file event: the rescan finds it
                             "OCR_DAEMON_WATCH__RESCAN_INTERVAL_SECONDS": "2"},
                            unprivileged=unprivileged)
    inbox = daemon.inbox
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "secret.png"
    secret.write_bytes(tiny_page("secret"))

    # Two cases need the ledger to already hold the file when the daemon starts: its content
    # vanishes, or is rewritten, between intake and the read.
    vanishing, rewritten_old, rewritten_new = (tiny_page("gone"), tiny_page("old"),
                                               tiny_page("new"))
    engine = make_engine(DatabaseSettings(url=daemon.url))
    migrate.upgrade(engine)
    ledger = Ledger(engine)
    ledger.register(str(inbox / "vanished.png"), sha256(vanishing), len(vanishing))
    ledger.register(str(inbox / "rewritten.png"), sha256(rewritten_old), len(rewritten_old))
    engine.dispose()
    (inbox / "rewritten.png").write_bytes(rewritten_new)

    healthy = {"healthy.png": tiny_page("fine"), "with space.png": tiny_page("space"),
               "ünïcødé 文字.png": tiny_page("uni"), "new\nline.png": tiny_page("nl")}
    jpeg = page_bytes(SENTENCES[:2], "JPEG")
    bad: dict[str, tuple[bytes, str]] = {
        "empty.png": (b"", "empty file (0 bytes)"),
        "truncated.png": (page_bytes(SENTENCES[:2])[:3000], "corrupt or truncated image"),
        "truncated.jpg": (jpeg[: len(jpeg) // 2], "corrupt or truncated image"),
        "random.jpg": (rng.randbytes(4096), "not a readable image"),
        "page.pdf": (b"<!DOCTYPE html><html><body>not a pdf</body></html>",
                     "not a readable image (content looks like: unknown)"),
        "one-pixel.png": (image_bytes((1, 1), "PNG"), "too small to OCR (1x1)"),
        "bomb.png": (png_bomb(), "decompression bomb refused"),
    }
    daemon.start()
    for name, data in healthy.items():
        (inbox / name).write_bytes(data)
    for name, (data, _) in bad.items():
        (inbox / name).write_bytes(data)
    (inbox / "outside-link.png").symlink_to(secret)
    (inbox / "loop-a.png").symlink_to(inbox / "loop-b.png")
    (inbox / "loop-b.png").symlink_to(inbox / "loop-a.png")
    (inbox / "x.png").mkdir()
    blink = inbox / "blink.png"  # deleted between its event and its read
    blink.write_bytes(tiny_page("blink"))
    blink.unlink()
    if unprivileged:
        (inbox / "unreadable.png").write_bytes(tiny_page("locked"))
        (inbox / "unreadable.png").chmod(0o000)
    rejected = {
        "outside-link.png": "symlink points outside the watched folder",
        "loop-a.png": "symlink loop",
        "loop-b.png": "symlink loop",
        "x.png": "a directory, not a file",
        **({"unreadable.png": "permission denied"} if unprivileged else {}),
    }
    expected_failed = len(bad) + len(rejected) + 2  # + vanished, + the rewritten old content

    def settled() -> bool:
        assert daemon.alive(), daemon.log_text()
        counts = count_states(daemon.url)
        return counts["done"] == len(healthy) + 1 and counts["failed"] == expected_failed

    assert wait_until(settled, 60), (count_states(daemon.url), daemon.log_text())
    health = daemon.health()
    assert health["status"] in ("healthy", "degraded") and health["database"] == "ok", health
    assert daemon.stop() == 0

    rows = ledger_rows(daemon.url)
    assert_nothing_half_written(rows)
    names = by_name(rows)
    log = daemon.log_text()
    failed = inbox / "failed"
    for name, data in healthy.items():
        assert names[name].state == "done" and names[name].sha256 == sha256(data), name
    for name, reason in [*((n, r) for n, (_, r) in bad.items()), *rejected.items()]:
        row = names[name]
        if name == "loop-b.png" and "dangling" in (row.reason or ""):
            reason = "dangling symlink"  # its partner was quarantined first: no loop now
        assert row.state == "failed" and reason in (row.reason or ""), (name, row)
        assert f"failed {inbox / name}: " in log, name
        if name == "x.png":  # a directory is left where it is
            assert (inbox / name).is_dir()
            continue
        assert not os.path.lexists(inbox / name), name
        assert os.path.lexists(failed / name), name
        assert reason in (failed / f"{name}.error.txt").read_text(), name
    assert "blink.png" not in names  # gone before it was read: nothing to record

    vanished = rows[sha256(vanishing)]
    assert vanished.state == "failed" and vanished.attempts == 2
    assert "vanished before it was read" in (vanished.reason or "")

    old, new = rows[sha256(rewritten_old)], rows[sha256(rewritten_new)]
    assert old.state == "failed" and "content changed" in (old.reason or "")
    assert old.attempts == 1
    assert new.state == "done"
    # the new content is not quarantined for the old content's failure
    assert not (failed / "rewritten.png").exists()
    assert secret.read_bytes() == tiny_page("secret")  # the outside target untouched
    assert "Traceback" not in log
