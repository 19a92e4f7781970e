"""Nothing outside the watched, done and failed folders is ever read, moved, deleted or written,
whatever a producer with write access to the inbox plants there; Pillow's pixel limit is set;
metrics listen on localhost unless configured otherwise."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image as PILImage

from daemon.config import Settings, load_settings
from daemon.files import after_done
from daemon.service import Service
from tests.support import (
    FAST_OCR,
    DaemonProcess,
    count_states,
    ledger_rows,
    sha256,
    tiny_page,
    wait_until,
)

pytestmark = pytest.mark.slow


def fingerprint(path: Path) -> tuple[bytes, int, int]:
    st = path.stat()
    return path.read_bytes(), st.st_mtime_ns, st.st_ino


@pytest.mark.parametrize("after", ["delete", "move"])
def test_outside_files_are_never_touched(daemon_factory: Callable[..., DaemonProcess],
                                         tmp_path: Path, after: str) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "secret.png"
    secret.write_bytes(tiny_page("secret"))
    planted = outside / "planted.txt"
    planted.write_text("do not overwrite\n")
    before = {p: fingerprint(p) for p in (secret, planted)}
    daemon = daemon_factory({"OCR_DAEMON_WATCH__AFTER": after,
                             "OCR_DAEMON_WATCH__DONE_DIR": "done",
                             "OCR_DAEMON_WATCH__FAILED_DIR": "failed"})
    inbox = daemon.inbox
    (inbox / "failed").mkdir()
    # a producer plants a sidecar name that points out of the folder...
    (inbox / "failed" / "bad.png.error.txt").symlink_to(planted)
    # ...and links to outside files, directly and through '..'
    (inbox / "link.png").symlink_to(secret)
    (inbox / "dotdot.png").symlink_to(Path("..") / "outside" / "secret.png")
    daemon.start()
    (inbox / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (inbox / "good.png").write_bytes(tiny_page("good"))
    assert wait_until(lambda: count_states(daemon.url)["done"] == 1
                      and count_states(daemon.url)["failed"] == 3, 30), daemon.log_text()
    assert daemon.stop() == 0
    assert "metrics on http://127.0.0.1:" in daemon.log_text()  # localhost by default

    assert {p: fingerprint(p) for p in (secret, planted)} == before
    assert sorted(os.listdir(outside)) == ["planted.txt", "secret.png"]
    rows = ledger_rows(daemon.url)
    assert sha256(tiny_page("secret")) not in rows  # never read, so never hashed
    reasons = {os.path.basename(p): r.reason for r in rows.values() for p in r.paths}
    assert reasons["link.png"] == reasons["dotdot.png"] == \
        "symlink points outside the watched folder"
    # the failure's own sidecar went somewhere safe, inside the failed folder
    sidecars = [p for p in (inbox / "failed").iterdir()
                if p.name.startswith("bad") and p.name.endswith(".txt") and not p.is_symlink()]
    assert sidecars and "not a readable image" in sidecars[0].read_text()


@pytest.mark.parametrize("folder", ["failed", "done"])
def test_a_planted_folder_link_does_not_move_files_out(
        daemon_factory: Callable[..., DaemonProcess], tmp_path: Path,
        folder: str) -> None:
    """The done/failed folder, configured inside the inbox, replaced by a link out of it."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    daemon = daemon_factory({"OCR_DAEMON_WATCH__AFTER": "move",
                             "OCR_DAEMON_WATCH__DONE_DIR": "done",
                             "OCR_DAEMON_WATCH__FAILED_DIR": "failed"})
    (daemon.inbox / folder).symlink_to(elsewhere, target_is_directory=True)
    daemon.start()
    (daemon.inbox / "bad.png").write_bytes(b"")
    (daemon.inbox / "good.png").write_bytes(tiny_page("good"))
    assert wait_until(lambda: count_states(daemon.url)["done"] == 1
                      and count_states(daemon.url)["failed"] == 1, 30), daemon.log_text()
    assert daemon.stop() == 0
    assert list(elsewhere.iterdir()) == []
    assert "outside the watched folder" in daemon.log_text()


def test_pillow_pixel_limit_is_set(tmp_path: Path) -> None:
    settings = Settings.model_validate({
        "watch": {"path": tmp_path / "inbox"},
        "database": {"url": f"sqlite:///{tmp_path / 'ocr.db'}"},
        "metrics": {"port": 0},
        "ocr": {**FAST_OCR, "max_image_pixels": 12_345_678},
    })
    assert Settings().metrics.host == "127.0.0.1"
    saved = PILImage.MAX_IMAGE_PIXELS
    service = Service(settings)
    try:
        service.start()
        assert PILImage.MAX_IMAGE_PIXELS == 12_345_678
    finally:
        service.stop()
        PILImage.MAX_IMAGE_PIXELS = saved


@pytest.mark.parametrize("planted", ["searchable", "text", "done", "failed"])
def test_a_planted_link_leads_no_write_outside(tmp_path: Path, planted: str) -> None:
    """`ln -s /elsewhere inbox/searchable` with `output_dir = "searchable"`, and
    /elsewhere/img0.pdf was overwritten: a relative output, sidecar, done or failed folder was
    resolved and then trusted. Every write under the watched folder now walks it without
    following a link, so nothing is written or moved outside."""
    from daemon.files import quarantine
    from daemon.outputs import write_outputs
    from daemon.results import Line, PageResult

    inbox = (tmp_path / "inbox").resolve()
    inbox.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    victim = elsewhere / "img0.png.pdf"
    victim.write_bytes(b"precious")
    (inbox / planted).symlink_to(elsewhere)
    settings = load_settings(None, watch={
        "path": inbox, "output_pdf": "pdf", "output_dir": "searchable", "sidecar": "txt",
        "sidecar_dir": "text", "after": "move", "done_dir": "done", "failed_dir": "failed"})
    source = inbox / "img0.png"
    source.write_bytes(tiny_page("img0"))
    sha = sha256(source.read_bytes())
    box = ((0.0, 0.0), (10.0, 0.0), (10.0, 5.0), (0.0, 5.0))
    write_outputs(settings, source, [PageResult(lines=(Line("img0", 0.9, box),))], sha, inbox,
                  source.read_bytes())
    if planted == "done":
        after_done(source, sha, settings, inbox)
    if planted == "failed":
        assert quarantine(source, "broken", settings, inbox, sha256=sha) is None
    assert victim.read_bytes() == b"precious"
    assert sorted(p.name for p in elsewhere.iterdir()) == ["img0.png.pdf"]  # nothing added
    assert source.exists()  # not moved through the link either
