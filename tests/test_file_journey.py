"""How often a file is opened, hashed and decoded on its way through the daemon: settled by
the watcher, hashed by intake, read and decoded by the pipeline, written as a searchable PDF,
moved to the done folder. Counted with the calls wrapped, in the real daemon (`Service`),
so that a change which reads a producer's file once more shows here."""

from __future__ import annotations

import builtins
import hashlib
import os
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from daemon.documents import decode as decode_module
from daemon.documents import searchable as searchable_module
from tests.pages import SENTENCES, write_page
from tests.support import DeviceEngine, SettingsFactory, pipeline_running, wait_until


class Counted:
    """Wraps the calls that open, hash and decode a file, counting those about `path`."""

    def __init__(self, path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.path = path
        self.counts: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._content: bytes | None = None
        real_os_open, real_open = os.open, builtins.open
        real_sha256 = hashlib.sha256
        counted = self

        def os_open(name: Any, flags: int, *args: Any, **kwargs: Any) -> int:
            fd = real_os_open(name, flags, *args, **kwargs)
            if counted._is_it(name, kwargs.get("dir_fd")):
                counted.count("opened")
            return fd

        def open_(name: Any, *args: Any, **kwargs: Any) -> Any:
            if isinstance(name, (str, Path)) and Path(name) == counted.path:
                counted.count("opened")
            return real_open(name, *args, **kwargs)

        class Sha256:
            """hashlib.sha256, counting the digests taken of the file's whole content."""

            def __init__(self, data: bytes = b"", **kwargs: Any) -> None:
                self._hash = real_sha256(data, **kwargs)
                self._fed = [bytes(data)] if data else []

            def update(self, data: bytes) -> None:
                self._hash.update(data)
                self._fed.append(bytes(data))

            def hexdigest(self) -> str:
                if counted._content is not None and b"".join(self._fed) == counted._content:
                    counted.count("hashed")
                return self._hash.hexdigest()

            def digest(self) -> bytes:
                return bytes.fromhex(self.hexdigest())

        def counting(name: str, real: Any) -> Any:
            def call(*args: Any, **kwargs: Any) -> Any:
                counted.count("decoded")
                return real(*args, **kwargs)
            return call

        monkeypatch.setattr(os, "open", os_open)
        monkeypatch.setattr(builtins, "open", open_)
        monkeypatch.setattr(hashlib, "sha256", Sha256)
        # the pipeline's decode, and the searchable PDF's (each reads the file's bytes whole)
        import daemon.pipeline as pipeline_module
        monkeypatch.setattr(pipeline_module, "iter_pages",
                            counting("decode", decode_module.iter_pages))
        monkeypatch.setattr(searchable_module, "scanned_pages",
                            counting("pdf", searchable_module.scanned_pages))

    def _is_it(self, name: Any, dir_fd: int | None) -> bool:
        name = os.fsdecode(name) if isinstance(name, (str, bytes, os.PathLike)) else ""
        if dir_fd is None:
            return Path(name) == self.path
        return name == self.path.name  # `open_beneath`: one component at a time

    def count(self, what: str) -> None:
        with self._lock:
            self.counts[what] += 1

    def expect(self, content: bytes) -> None:
        self._content = content


def test_a_file_is_read_once_for_each_step_that_needs_it(
        settings_factory: SettingsFactory, monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path) -> None:
    settings = settings_factory(watch={"after": "move", "done_dir": str(tmp_path / "done"),
                                       "output_pdf": "pdf",
                                       "output_dir": str(tmp_path / "pdf")})
    staged = write_page(tmp_path / "scan.tif", SENTENCES[:2])  # re-encoded in the PDF
    content = staged.read_bytes()
    path = settings.watch.path / "scan.tif"
    counted = Counted(path, monkeypatch)
    counted.expect(content)
    with pipeline_running(settings, DeviceEngine("cpu", delay=0.0)) as (pipeline, ledger, _):
        staged.rename(path)
        assert wait_until(lambda: ledger.counts()["done"] == 1, 30)
        assert wait_until(lambda: (tmp_path / "done" / "scan.tif").exists(), 10)
        assert (tmp_path / "pdf" / "scan.tif.pdf").exists()
        # the bytes kept for the PDF went back to the memory budget once it was written
        registry = pipeline.metrics.registry
        assert wait_until(lambda: registry.get_sample_value("ocr_queue_bytes") == 0, 10)
    print(f"scan.tif on its way: {dict(counted.counts)}")
    # the watcher's settle check, intake's hash, the pipeline's read, the check before the
    # move; the searchable PDF takes the bytes the pipeline read and checked
    assert counted.counts == {"opened": 4, "hashed": 3, "decoded": 2}
