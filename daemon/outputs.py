"""What a stored document leaves beside its file: text sidecars and searchable PDFs.

Text sidecars (`watch.sidecar`, `watch.sidecar_dir`): `scan.png` gets `scan.png.txt` (pages
separated by a form feed, as `ocr-daemon text` prints them) and/or `scan.png.json` (pages,
lines, scores, boxes). The full name is kept so that `scan.png` and `scan.pdf` do not share one
sidecar. They are written to a hidden temporary name and renamed (`files.write_atomic`), so a
reader never sees half a sidecar; the watcher takes neither in (not in `watch.extensions`,
which config validation enforces; the temporary name is hidden). Searchable PDFs
(`watch.output_pdf`) go to `watch.output_dir`. The text is in the database before any of
this runs: an output that cannot be written is logged, never a failure of the document.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from daemon.config import Settings
from daemon.errors import DocumentError
from daemon.files import base_of, path_key, read_beneath, write_atomic
from daemon.results import PageResult, join_pages, lines_json

log = logging.getLogger("daemon.outputs")


def _relative_folder(source_path: Path, root: Path) -> Path | None:
    """The file's sub-folder in the watched folder, as named (links not followed: the writes
    walk it from the watched folder and refuse one); None for a file not inside it."""
    folder = Path(os.path.abspath(source_path)).parent
    if folder != root and root not in folder.parents:
        return None
    return folder.relative_to(root)


def sidecar_paths(settings: Settings, source_path: Path) -> list[Path]:
    """Where the sidecars of `source_path` go; empty when sidecars are off or the file is
    not inside the watched folder (nothing is ever written outside the watched folder or
    `watch.sidecar_dir`)."""
    kind = settings.watch.sidecar
    if kind == "none":
        return []
    root = settings.watch.path.resolve()
    relative = _relative_folder(source_path, root)
    if relative is None:
        return []
    base = root if settings.watch.sidecar_dir is None else root / settings.watch.sidecar_dir
    suffixes = {"txt": [".txt"], "json": [".json"], "both": [".txt", ".json"]}[kind]
    return [base / relative / (source_path.name + suffix) for suffix in suffixes]


def render_txt(pages: Sequence[PageResult]) -> str:
    text = join_pages(page.text for page in pages)
    return text + "\n" if text else ""


def render_json(source_path: Path, pages: Sequence[PageResult], sha256: str | None) -> str:
    document: dict[str, Any] = {
        "source": path_key(source_path),
        "sha256": sha256,
        "pages": [
            {
                "page": number,
                "source": page.source,
                "confidence": page.confidence,
                "text": page.text,
                "lines": lines_json(page.lines),
            }
            for number, page in enumerate(pages, 1)
        ],
    }
    return json.dumps(document, ensure_ascii=False, indent=1) + "\n"


def wanted(settings: Settings) -> bool:
    """Whether a stored document leaves anything beside its files."""
    return settings.watch.sidecar != "none" or settings.watch.output_pdf != "none"


def write_outputs(settings: Settings, source_path: Path, pages: Sequence[PageResult],
                  sha256: str, root: Path, data: bytes | None = None) -> None:
    """Everything a stored document leaves beside one of its paths: the sidecars and the
    searchable PDF (from `data`, its content already read and checked, else read again).
    Every path of a document gets its own: a duplicate (`b.png` holding `a.png`'s content)
    got none. Never raises: the text is stored."""
    write_sidecars(settings, source_path, pages, sha256)
    write_searchable_pdf(settings, source_path, pages, sha256, root, data)


def write_sidecars(settings: Settings, source_path: Path, pages: Sequence[PageResult],
                   sha256: str | None = None) -> list[Path]:
    """Write the sidecars `watch.sidecar` asks for; returns the paths written. Never raises:
    it runs on an OCR worker thread after the text is safely stored."""
    root = settings.watch.path.resolve()
    try:
        targets = sidecar_paths(settings, source_path)
        for target in targets:
            content = (render_txt(pages) if target.suffix == ".txt"
                       else render_json(source_path, pages, sha256))
            write_atomic(target, content, base=base_of(target.parent, root))
        return targets
    except OSError as exc:  # LeadsOutside among them: a link planted on the way
        log.warning("sidecar for %s not written: %s", source_path, exc)
    except Exception:
        log.exception("sidecar for %s not written", source_path)
    return []


def searchable_pdf_path(settings: Settings, source_path: Path, root: Path) -> Path | None:
    """`output_dir`/<the file's sub-folder>/`pdf_name`; None when off or the file is not
    inside the watched folder. A relative output_dir is inside the watched folder."""
    out = settings.watch.output_dir
    if settings.watch.output_pdf == "none" or out is None:
        return None
    relative = _relative_folder(source_path, root)
    if relative is None:
        return None
    base = out if out.is_absolute() else root / out
    return base / relative / pdf_name(source_path.name, settings.watch.extensions)


def pdf_name(name: str, extensions: Sequence[str]) -> str:
    """The searchable PDF's name: a PDF keeps its own (`report.pdf`), anything else gains
    `.pdf` after its whole name (`scan.jpg.pdf`; `scan.png` and `scan.jpg` both became
    `scan.pdf`, the second replacing the first), and so does a PDF whose name without `.pdf`
    is an input's (`scan.png.pdf` -> `scan.png.pdf.pdf`): no two names in a folder share one."""
    stem, _, suffix = name.rpartition(".")
    if suffix.lower() == "pdf" and not stem.lower().endswith(tuple(extensions)):
        return name
    return name + ".pdf"


def write_searchable_pdf(settings: Settings, source_path: Path, pages: Sequence[PageResult],
                         sha256: str, root: Path, data: bytes | None = None) -> Path | None:
    """The stored document as a searchable PDF (`watch.output_pdf`), from `data`, the bytes
    the pipeline read and checked against `sha256` (else from the file read again through
    `open_beneath` and checked). Never raises: the text is stored."""
    try:
        target = searchable_pdf_path(settings, source_path, root)
        if target is None:
            return None
        if data is None:
            data, _ = read_beneath(source_path, root, settings.watch.max_file_bytes)
            if hashlib.sha256(data).hexdigest() != sha256:
                log.info("no searchable PDF for %s: it holds new content now", source_path)
                return None
        from daemon.documents.decode import sniff
        from daemon.documents.searchable import (
            scanned_pages,
            searchable_from_pdf,
            searchable_pdf,
        )

        if sniff(data) == "pdf":
            pdf = searchable_from_pdf(data, pages, settings.ocr)
        else:
            pdf = searchable_pdf(scanned_pages(data, pages, settings.ocr))
        write_atomic(target, pdf, base=base_of(target.parent, root))
        return target
    except (OSError, DocumentError) as exc:  # LeadsOutside among them
        log.warning("searchable PDF for %s not written: %s", source_path, exc)
    except Exception:
        log.exception("searchable PDF for %s not written", source_path)
    return None
