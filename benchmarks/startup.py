"""Seconds from the daemon's start to its first stored page while a GPU's shape buckets warm,
with a STAND-IN for the GPU's session builds. A script, not a test.

    python -m benchmarks startup --build-seconds 2

The real service, pipeline and batch engine run on this machine's CPU with the GPU path's
shapes and a session per shape (`ShapeSessions`), told they are a GPU; only each shape's
session build is a stand-in: it holds the process's session-build lock for --build-seconds (a
GPU's session build and cuDNN planning: 0.7-3.7 s a shape on an H100) and hands back the
model's one real CPU session, whose first run of each shape is the warm-up's real work. One
receipt-sized page is dropped:
  serving   at once, as the daemon does now (it serves while it warms, the most used shapes
            first; a batch whose shape is cold builds that shape itself)
  after     once the warm-up has ended: what it did before, when the watcher started only
            after every shape was warm
Prints ONE JSON object.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.common import machine


class TakenForAGpu:
    """A CPU batch engine that the service takes for a GPU's (its warm-up in full)."""

    def __init__(self, engine: Any) -> None:
        self._engine = engine

    provider = "cuda"
    device = "0"

    def warmup(self) -> dict[str, float]:
        spent: dict[str, float] = self._engine.warmup(full=True)
        return spent

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)


class SharedSession:
    """A shape's "own" session: the model's one CPU session under another name."""

    def __init__(self, base: Any) -> None:
        self._base = base

    def __getattr__(self, name: str) -> Any:
        return getattr(self._base, name)


def stand_in_builder(base: Any, seconds: float) -> Callable[[tuple[int, ...]], Any]:
    from daemon.hardware import sessions

    def build(shape: tuple[int, ...]) -> Any:
        with sessions._building:  # as a real build holds it: one at a time in the process
            time.sleep(seconds)
        return SharedSession(base)

    return build


def one_start(folder: Path, page: Path, build_seconds: float, *, serve_first: bool
              ) -> dict[str, Any]:
    from daemon.config import Settings
    from daemon.hardware.providers import ProviderChoice
    from daemon.ocr.batch import BatchEngine
    from daemon.ocr.device_runs import ShapeSessions
    from daemon.service import Hardware, Service

    inbox = folder / "inbox"
    inbox.mkdir(parents=True)
    settings = Settings(watch={"path": inbox, "settle_seconds": 0.1},
                        database={"url": f"sqlite:///{folder / 'db.sqlite'}"},
                        metrics={"enabled": False}, ocr={"warmup_seconds": 600},
                        batch={"max_pages": 4})
    engines: list[Any] = []

    def build(settings: Settings, choice: Any, workers: int) -> list[Any]:
        engine = BatchEngine(settings.ocr, ProviderChoice("cpu"), max_pages=4,
                             fixed_shapes=True, shape_sessions=True)
        for session in engine.sessions.values():
            if isinstance(session, ShapeSessions):
                session._make = stand_in_builder(session._base, build_seconds)
        engines.append(TakenForAGpu(engine))
        return engines * workers

    choice = ProviderChoice("cuda", reason="stand-in: a CPU engine taken for a GPU",
                            devices=(0,))
    start = time.monotonic()
    service = Service(settings, probe=lambda _s: Hardware(choice, None, None), build=build)
    service.start()
    ready = time.monotonic() - start
    try:
        if not serve_first:
            while service.warmup["state"] == "warming":
                time.sleep(0.05)
        dropped = time.monotonic() - start
        (inbox / ".page.part").write_bytes(page.read_bytes())
        (inbox / ".page.part").rename(inbox / page.name)
        while service.ledger.counts()["done"] < 1:
            if time.monotonic() - start > 3600:
                raise RuntimeError("the page was not stored within an hour")
            time.sleep(0.02)
        stored = time.monotonic() - start
        while service.warmup["state"] == "warming":
            time.sleep(0.05)
        warmed = time.monotonic() - start
        shapes = service.health()["warmup"]
    finally:
        service.stop()
    return {"ready_s": round(ready, 2), "dropped_s": round(dropped, 2),
            "first_page_stored_s": round(stored, 2), "warmup_ended_s": round(warmed, 2),
            "warmup": shapes}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--build-seconds", type=float, default=2.0,
                        help="each shape's stand-in session build (default 2)")
    parser.add_argument("--rec-widths", type=int, default=None,
                        help="warm only the first N recogniser widths (a smaller run)")
    args = parser.parse_args(argv)
    from benchmarks.bench import render_dataset
    from daemon.ocr import buckets

    if args.rec_widths:
        buckets.REC_WIDTHS = buckets.REC_WIDTHS[:args.rec_widths]
    with tempfile.TemporaryDirectory(prefix="ocr-startup-") as tmp:
        render_dataset(1, Path(tmp) / "page")
        page = next((Path(tmp) / "page").glob("*.png"))
        runs = {name: one_start(Path(tmp) / name, page, args.build_seconds,
                                serve_first=name == "serving")
                for name in ("serving", "after")}
    serving, after = runs["serving"]["first_page_stored_s"], runs["after"]["first_page_stored_s"]
    print(json.dumps({
        "benchmark": "start to first stored page while the shapes warm",
        "stand_in": f"each shape's session build: {args.build_seconds:g} s holding the "
                    "session-build lock, then the model's real CPU session (a CPU engine "
                    "taken for a GPU)",
        "runs": runs, "after_over_serving": round(after / serving, 2) if serving else None,
        "machine": machine()}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
