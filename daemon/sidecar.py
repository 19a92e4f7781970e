"""Text sidecars: a stored document's text also written as files, for tools that read folders
rather than databases (`watch.sidecar`, `watch.sidecar_dir`).

`scan.png` gets `scan.png.txt` (pages separated by a form feed, as `ocr-daemon text` prints
them) and/or `scan.png.json` (pages, lines, scores, boxes). The full name is kept so that
`scan.png` and `scan.pdf` do not share one sidecar. Files are written to a hidden temporary
name and renamed, so a reader never sees half a sidecar; the watcher takes neither in (not in
`watch.extensions`, which config validation enforces; the temporary name is hidden).

The text is already in the database when this runs: a sidecar that cannot be written is
logged, never a failure of the document.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from daemon.config import Settings
from daemon.ocr.types import PageResult

log = logging.getLogger("daemon.sidecar")

PAGE_SEPARATOR = "\n\f\n"


def sidecar_paths(settings: Settings, source_path: Path) -> list[Path]:
    """Where the sidecars of `source_path` go; empty when sidecars are off or the file is
    not inside the watched folder (nothing is ever written outside the watched folder or
    `watch.sidecar_dir`)."""
    kind = settings.watch.sidecar
    if kind == "none":
        return []
    root = settings.watch.path.resolve()
    folder = Path(os.path.abspath(source_path)).parent
    try:
        relative = folder.resolve().relative_to(root)
    except (ValueError, OSError, RuntimeError):
        return []
    if settings.watch.sidecar_dir is not None:
        base = (root / settings.watch.sidecar_dir).resolve()
        folder = base / relative
    else:
        base = root
    suffixes = {"txt": [".txt"], "json": [".json"], "both": [".txt", ".json"]}[kind]
    return [_inside(base, folder / (source_path.name + suffix)) for suffix in suffixes]


def _inside(base: Path, target: Path) -> Path:
    resolved_parent = target.parent.resolve()
    if resolved_parent != base and base not in resolved_parent.parents:
        raise _Outside(f"{target} resolves outside {base}")
    return resolved_parent / target.name


class _Outside(Exception):
    pass


def render_txt(pages: Sequence[PageResult]) -> str:
    text = PAGE_SEPARATOR.join(page.text for page in pages)
    return text + "\n" if text else ""


def render_json(source_path: Path, pages: Sequence[PageResult], sha256: str | None) -> str:
    document: dict[str, Any] = {
        "source": os.path.abspath(source_path),
        "sha256": sha256,
        "pages": [
            {
                "page": number,
                "source": page.source,
                "confidence": page.confidence,
                "text": page.text,
                "lines": [{"text": line.text, "score": round(line.score, 5),
                           "box": [[round(x, 1), round(y, 1)] for x, y in line.box]}
                          for line in page.lines],
            }
            for number, page in enumerate(pages, 1)
        ],
    }
    return json.dumps(document, ensure_ascii=False, indent=1) + "\n"


def write_atomic(target: Path, content: str) -> None:
    """Temporary file in the target's folder (created exclusively, hidden from the watcher),
    then rename: replaces the name itself, never follows a link planted at it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
            handle.write(content)
        os.replace(temp, target)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def write_sidecars(settings: Settings, source_path: Path, pages: Sequence[PageResult],
                   sha256: str | None = None) -> list[Path]:
    """Write the sidecars `watch.sidecar` asks for; returns the paths written. Never raises:
    it runs on an OCR worker thread after the text is safely stored."""
    try:
        targets = sidecar_paths(settings, source_path)
        for target in targets:
            content = (render_txt(pages) if target.suffix == ".txt"
                       else render_json(source_path, pages, sha256))
            write_atomic(target, content)
        return targets
    except _Outside as exc:
        log.warning("sidecar for %s not written: %s", source_path, exc)
    except OSError as exc:
        log.warning("sidecar for %s not written: %s", source_path, exc)
    except Exception:
        log.exception("sidecar for %s not written", source_path)
    return []
