"""Text sidecars: written atomically, only where asked, never outside the watched or sidecar
folder, and never taken in by the watcher."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from daemon.config import Settings, load_settings
from daemon.errors import ConfigError
from daemon.files import LeadsOutside, open_beneath, read_beneath
from daemon.intake import Intake
from daemon.metrics import Metrics
from daemon.outputs import write_sidecars
from daemon.results import Line, PageResult
from daemon.service import Service
from daemon.store.db import open_ledger
from daemon.store.outage import Outage
from tests.pages import SENTENCES, similarity, write_page
from tests.support import looked_twice

SettingsFactory = Callable[..., Settings]
BOX = ((1.0, 2.0), (30.0, 2.0), (30.0, 9.0), (1.0, 9.0))
PAGES = [PageResult(lines=(Line("first line", 0.91, BOX), Line("second", 0.8, BOX))),
         PageResult(lines=(Line("page two", 0.7, BOX),), source="text_layer")]


def names(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_off_by_default(settings_factory: SettingsFactory) -> None:
    settings = settings_factory()
    assert settings.watch.sidecar == "none"
    inbox = settings.watch.path
    inbox.mkdir()
    assert write_sidecars(settings, inbox / "a.png", PAGES) == []
    assert names(inbox) == []


def test_txt_and_json_next_to_the_file(settings_factory: SettingsFactory) -> None:
    settings = settings_factory(watch={"sidecar": "both"})
    inbox = settings.watch.path
    inbox.mkdir()
    written = write_sidecars(settings, inbox / "scan.png", PAGES, sha256="ab" * 32)
    assert [p.name for p in written] == ["scan.png.txt", "scan.png.json"]
    assert names(inbox) == ["scan.png.json", "scan.png.txt"]  # no temporary files left
    assert (inbox / "scan.png.txt").read_text(encoding="utf-8") == (
        "first line\nsecond\n\f\npage two\n")
    document = json.loads((inbox / "scan.png.json").read_text(encoding="utf-8"))
    assert document["source"] == str(inbox.resolve() / "scan.png")
    assert document["sha256"] == "ab" * 32
    assert [p["page"] for p in document["pages"]] == [1, 2]
    assert document["pages"][1]["source"] == "text_layer"
    assert document["pages"][0]["lines"][0] == {
        "text": "first line", "score": 0.91, "box": [[1.0, 2.0], [30.0, 2.0], [30.0, 9.0],
                                                     [1.0, 9.0]]}
    write_sidecars(settings, inbox / "scan.png", PAGES[:1])  # stored again: replaced whole
    assert (inbox / "scan.png.txt").read_text(encoding="utf-8") == "first line\nsecond\n"
    # readable by the folder's readers, as the error sidecars are (mkstemp alone gives 0600)
    for sidecar in ("scan.png.txt", "scan.png.json"):
        assert (inbox / sidecar).stat().st_mode & 0o777 == 0o644


def test_sidecar_dir_mirrors_sub_folders(settings_factory: SettingsFactory) -> None:
    settings = settings_factory(watch={"sidecar": "txt", "sidecar_dir": "text"})
    inbox = settings.watch.path
    (inbox / "2026" / "march").mkdir(parents=True)
    write_sidecars(settings, inbox / "2026" / "march" / "a.pdf", PAGES)
    write_sidecars(settings, inbox / "a.pdf", PAGES)
    assert names(inbox / "text") == ["2026", "2026/march", "2026/march/a.pdf.txt", "a.pdf.txt"]


def test_nothing_is_written_outside_the_folders(settings_factory: SettingsFactory,
                                                tmp_path: Path) -> None:
    settings = settings_factory(watch={"sidecar": "both"})
    inbox = settings.watch.path
    inbox.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    assert write_sidecars(settings, outside / "a.png", PAGES) == []  # not a watched file
    (inbox / "escape").symlink_to(outside, target_is_directory=True)
    assert write_sidecars(settings, inbox / "escape" / "a.png", PAGES) == []
    assert write_sidecars(settings, inbox / ".." / "outside" / "a.png", PAGES) == []
    victim = outside / "victim.txt"
    victim.write_text("keep me")
    (inbox / "b.png.txt").symlink_to(victim)  # planted link at a sidecar's name
    write_sidecars(settings, inbox / "b.png", PAGES)
    assert victim.read_text() == "keep me"
    assert not (inbox / "b.png.txt").is_symlink()
    assert names(outside) == ["victim.txt"]
    escaping = settings_factory(watch={"sidecar": "txt", "sidecar_dir": "../elsewhere"})
    write_sidecars(escaping, inbox / "c.png", PAGES)  # an explicit folder is used as given
    assert (tmp_path / "elsewhere" / "c.png.txt").is_file()


def test_unwritable_folder_is_logged_not_raised(settings_factory: SettingsFactory,
                                                caplog: pytest.LogCaptureFixture) -> None:
    settings = settings_factory(watch={"sidecar": "txt", "sidecar_dir": "blocked"})
    inbox = settings.watch.path
    inbox.mkdir()
    (inbox / "blocked").write_text("a file where the folder should be")
    assert write_sidecars(settings, inbox / "a.png", PAGES) == []
    assert "sidecar for" in caplog.text


def test_sidecar_extensions_cannot_be_taken_in(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[watch]\nsidecar = "json"\nextensions = [".png", ".json"]\n')
    with pytest.raises(ConfigError, match="extensions"):
        load_settings(config)
    config.write_text('[watch]\nsidecar = "pdf"\n')
    with pytest.raises(ConfigError, match="sidecar"):
        load_settings(config)


def test_daemon_writes_sidecars_and_does_not_take_them_in(
        settings_factory: SettingsFactory) -> None:
    """The real pipeline: text stored, then sidecars beside the file; rescans (every second
    here) see the .txt/.json files and leave them alone."""
    service = Service(settings_factory(watch={"sidecar": "both", "after": "move",
                                              "done_dir": "done"}))
    service.start()
    try:
        inbox = service.settings.watch.path
        write_page(inbox / "letter.png", SENTENCES[:2])
        ledger = service.ledger
        deadline = time.monotonic() + 60
        while not (inbox / "letter.png.json").exists():
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert service.components is not None
        assert looked_twice(service.components.watcher)  # two rescans saw the sidecars
        assert ledger.counts() == {"queued": 0, "processing": 0, "done": 1, "failed": 0}
        assert sorted(p.name for p in inbox.iterdir()) == [
            "done", "letter.png.json", "letter.png.txt"]
        assert similarity((inbox / "letter.png.txt").read_text(encoding="utf-8"),
                          "\n".join(SENTENCES[:2])) > 0.9
        document = json.loads((inbox / "letter.png.json").read_text(encoding="utf-8"))
        assert document["source"] == str(inbox.resolve() / "letter.png")
        assert len(document["pages"]) == 1 and len(document["pages"][0]["lines"]) == 2
    finally:
        service.stop()


def test_a_move_never_overwrites_a_file_that_appeared_meanwhile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two documents named scan.pdf (recursive mode) finishing at once: whatever a check of the
    folder said a moment ago, the second must not replace the first."""
    from daemon.files import move_into

    done = tmp_path / "done"
    done.mkdir()
    (done / "scan.pdf").write_bytes(b"first")  # moved there by another worker just now
    incoming = tmp_path / "sub" / "scan.pdf"
    incoming.parent.mkdir()
    incoming.write_bytes(b"second")
    monkeypatch.setattr(Path, "exists", lambda self: False)  # its check ran before that move
    monkeypatch.setattr(Path, "is_symlink", lambda self: False)
    target = move_into(incoming, done)
    monkeypatch.undo()
    assert (done / "scan.pdf").read_bytes() == b"first"
    assert target.read_bytes() == b"second" and target.name == "scan.1.pdf"
    assert not incoming.exists()


def test_a_move_across_file_systems_leaves_no_partial_file(tmp_path: Path) -> None:
    from daemon.files import move_into

    other = Path("/dev/shm") / f"ocr-daemon-test-{os.getpid()}"
    if os.stat("/dev/shm").st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("/dev/shm and the test folder are one file system here")
    try:
        source = tmp_path / "scan.png"
        source.write_bytes(b"x" * 100_000)
        link = tmp_path / "link.png"
        link.symlink_to("/etc/hostname")
        moved = move_into(source, other)
        moved_link = move_into(link, other)
        assert moved.read_bytes() == b"x" * 100_000 and not source.exists()
        assert moved_link.is_symlink() and os.readlink(moved_link) == "/etc/hostname"
        assert sorted(p.name for p in other.iterdir()) == ["link.png", "scan.png"]  # no temp
    finally:
        shutil.rmtree(other, ignore_errors=True)


# --- open once, never through a link out of the folder -------------------------------------


def test_open_beneath_follows_links_only_inside_the_folder(tmp_path: Path) -> None:
    root = (tmp_path / "inbox").resolve()
    (root / "sub").mkdir(parents=True)
    outside = tmp_path / "secret.png"
    outside.write_bytes(b"secret")
    (root / "sub" / "page.png").write_bytes(b"page")
    os.symlink("sub/page.png", root / "relative.png")
    os.symlink(root / "sub" / "page.png", root / "absolute.png")
    os.symlink("../relative.png", root / "sub" / "chain.png")
    os.symlink(outside, root / "escape.png")
    os.symlink("../secret.png", root / "dotdot.png")
    os.symlink(tmp_path, root / "door")  # a folder link out, used as a path component
    os.symlink("loop.png", root / "loop.png")
    os.mkfifo(root / "pipe.png")
    for name in ("sub/page.png", "relative.png", "absolute.png", "sub/chain.png"):
        assert read_beneath(root / name, root, 100)[0] == b"page", name
    for name in ("escape.png", "dotdot.png", "door/secret.png", "sub/../../secret.png"):
        with pytest.raises(LeadsOutside):
            open_beneath(root / name, root)
    with pytest.raises(OSError) as loop:
        open_beneath(root / "loop.png", root)
    assert loop.value.errno == errno.ELOOP
    with pytest.raises(OSError) as fifo:  # refused at once, not a read that blocks
        open_beneath(root / "pipe.png", root)
    assert fifo.value.errno == errno.EINVAL
    with pytest.raises(IsADirectoryError):
        open_beneath(root / "sub", root)
    with pytest.raises(FileNotFoundError):
        open_beneath(root / "missing.png", root)


def test_a_file_swapped_for_a_link_out_after_the_check_is_not_read(
        settings_factory: SettingsFactory, tmp_path: Path) -> None:
    """The watcher checked a regular file; by the time it is hashed the name is a link to a
    file outside (a producer racing the daemon). Its content must not reach the ledger."""
    settings = settings_factory()
    ledger = open_ledger(settings, migrate_now=True)[1]
    rejected: list[str] = []
    intake = Intake(settings, ledger, Metrics("test"), outage=Outage(ledger),
                    notify=lambda: None)
    intake.reject = lambda path, reason: rejected.append(reason)  # type: ignore[method-assign]
    inbox = settings.watch.path
    inbox.mkdir(parents=True, exist_ok=True)
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"not for the daemon")
    os.symlink(secret, inbox / "scan.png")  # swapped in after the check
    intake.take(inbox / "scan.png")
    assert rejected == ["symlink points outside the watched folder"]
    assert ledger.counts()["queued"] == 0


@pytest.mark.parametrize(("key", "value"), [
    ("output_dir", "."), ("output_dir", ".."), ("done_dir", "."), ("failed_dir", "/"),
    ("done_dir", "{inbox}"),
])
def test_a_folder_setting_over_the_inbox_is_refused_at_start(tmp_path: Path, key: str,
                                                             value: str) -> None:
    """The watcher skips the done, failed and output folders: set to the watched folder or
    above it, they switched ingestion off while the daemon said it was healthy."""
    inbox = tmp_path / "inbox"
    watch = {"path": str(inbox), "after": "move", "output_pdf": "pdf", "output_dir": "pdf",
             key: value.format(inbox=inbox)}
    with pytest.raises(ConfigError, match=key):
        load_settings(None, watch=watch)
    watch[key] = "elsewhere"  # inside it, or outside: fine
    assert load_settings(None, watch=watch).watch.path == inbox


def test_a_name_that_is_not_utf8_is_read_stored_and_moved(
        settings_factory: SettingsFactory, tmp_path: Path) -> None:
    """`bad\\xff\\xfename.png` was never registered: every rescan logged "surrogates not
    allowed" with two tracebacks, and status said nothing. Its path is now recorded
    losslessly (`raw:`, its bytes escaped), it is OCR'd like any other and moved, and the
    commands find it by the name as given."""
    from daemon.cli import path_candidates
    from daemon.files import RAW_PATH, path_of
    from tests.support import DeviceEngine, pipeline_running, wait_until

    settings = settings_factory(watch={"after": "move", "done_dir": str(tmp_path / "done")})
    inbox = settings.watch.path
    inbox.mkdir(parents=True, exist_ok=True)
    name = os.fsdecode(b"bad\xff\xfename.png")
    staged = write_page(tmp_path / "staged.png", SENTENCES[:1])
    with pipeline_running(settings, DeviceEngine("cpu", delay=0.0)) as (_, ledger, _):
        staged.rename(inbox / name)
        assert wait_until(lambda: ledger.counts()["done"] == 1, 30), ledger.status()
        assert wait_until((tmp_path / "done" / name).exists, 10)
        doc = ledger.find(str(inbox / name), path_candidates(str(inbox / name)))
        assert doc.text == "read on device cpu"
        [recorded] = doc.paths
        assert recorded == f"{RAW_PATH}{inbox}/bad\\xff\\xfename.png"
        assert path_of(recorded) == inbox / name


@pytest.mark.parametrize("after", ["delete", "move"])
def test_a_file_renamed_onto_the_name_after_the_check_is_not_taken(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, after: str) -> None:
    """Between the after-action's check that the name still leads to the file it read and
    its unlink or link, a new file renamed onto the same name was deleted or moved unread.
    Now the name is set aside first and checked there: the new file stays, unread."""
    import daemon.files as files_module
    from daemon.files import after_done

    inbox = (tmp_path / "inbox").resolve()
    inbox.mkdir()
    settings = load_settings(None, watch={"path": inbox, "after": after, "done_dir": "done"})
    path = inbox / "scan.png"
    path.write_bytes(b"the stored content")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    swapped: list[bool] = []

    def swap() -> None:
        if not swapped:
            swapped.append(True)
            new = inbox / ".incoming"
            new.write_bytes(b"a new scan, never read")
            new.rename(path)

    real_stat, real_open_dir = Path.stat, files_module.open_dir

    def stat_then_swap(self: Path, *args: Any, **kwargs: Any) -> Any:  # the old check
        result = real_stat(self, *args, **kwargs)
        if self == path:
            swap()
        return result

    def open_dir_then_swap(*args: Any, **kwargs: Any) -> int:  # the new one's first step
        fd = real_open_dir(*args, **kwargs)
        swap()
        return fd

    monkeypatch.setattr(Path, "stat", stat_then_swap)
    monkeypatch.setattr(files_module, "open_dir", open_dir_then_swap)
    after_done(path, digest, settings, inbox)
    monkeypatch.undo()
    assert swapped and path.read_bytes() == b"a new scan, never read"
    assert not (inbox / "done" / "scan.png").exists() or \
        (inbox / "done" / "scan.png").read_bytes() == b"the stored content"
