"""What the benchmarks share: where the project is, the evaluation corpus's images and their
truth, CPU time read from /proc, and the machine a figure was measured on (every JSON a
benchmark prints names it)."""

from __future__ import annotations

import os
import platform
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks.gil_probe import thread_kind

REPO = Path(__file__).resolve().parent.parent
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp"})


def find_images(folder: Path, limit: int | None = None, *, pdfs: bool = False) -> list[Path]:
    """The images of an evaluation folder (its `img/` where it has one, as SROIE does), sorted
    by name, the first `limit`; with `pdfs`, PDFs too."""
    if (folder / "img").is_dir():
        folder = folder / "img"
    suffixes = IMAGE_SUFFIXES | {".pdf"} if pdfs else IMAGE_SUFFIXES
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in suffixes)
    return images[:limit] if limit else images


def stat_cpu_seconds(stat: Path) -> float:
    """User + system CPU seconds from a /proc `stat` file (OSError if it is gone)."""
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def cpu_seconds(pid: int) -> float:
    """CPU time so far of process `pid` (its threads, not its children)."""
    return stat_cpu_seconds(Path(f"/proc/{pid}/stat"))


def thread_cpu_seconds() -> dict[int, tuple[str, float]]:
    """CPU time so far of each thread of this process: native id -> (kind, seconds), the kind
    being the thread's name without its number ("decode", "ocr", "ocr-post", "claim", ...)."""
    names = {thread.native_id: thread.name for thread in threading.enumerate()}
    out: dict[int, tuple[str, float]] = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            seconds = stat_cpu_seconds(task / "stat")
        except OSError:
            continue
        name = names.get(int(task.name), "native (onnxruntime, OpenCV, ...)")
        out[int(task.name)] = (thread_kind(name), seconds)
    return out


def machine() -> dict[str, Any]:
    """The machine a figure is measured on, for the JSON beside it."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"host": platform.node(), "cpu": model, "cores": len(os.sched_getaffinity(0)),
            "python": platform.python_version(),
            "at": datetime.now(UTC).isoformat(timespec="seconds")}
