"""Imports point the way DESIGN.md says: downstream or to side concerns, never back up.

A small AST walk over `daemon/`: every `import` and `from ... import`, at module level or inside
a function (a lazy import is still a dependency), becomes an edge between two daemon modules.
The checker is proven able to fail on a copy of the package with a wrong import planted in it.
"""

from __future__ import annotations

import ast
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "daemon"

# (importer prefix, imported prefix, why not). A prefix names a module and everything below it.
NEVER = [
    ("daemon.watcher", "daemon.ocr", "the watcher knows files, not the engine"),
    ("daemon.watcher", "daemon.store", "the watcher hands files to intake, it keeps no ledger"),
    ("daemon.watcher", "daemon.hardware", "the watcher knows files, not the hardware"),
    ("daemon.ocr", "daemon.store", "the engine returns results; the pipeline stores them"),
    ("daemon.store", "daemon.ocr", "the store keeps results (daemon.results), not the engine"),
    ("daemon.store", "daemon.hardware", "the store knows nothing of the hardware"),
    ("daemon.metrics", "daemon.ocr", "metrics get readers from the service"),
    ("daemon.metrics", "daemon.hardware", "metrics get readers from the service"),
    ("daemon.documents", "daemon.ocr", "decoding knows nothing of models"),
    ("daemon.documents", "daemon.hardware", "decoding knows nothing of the hardware"),
    ("daemon.documents", "daemon.store", "decoding knows nothing of the ledger"),
    ("daemon.hardware", "daemon.ocr", "the engine asks the hardware for sessions, not back"),
    ("daemon.hardware", "daemon.store", "the hardware knows nothing of the ledger"),
    ("daemon.files", "daemon.store", "file writes act on paths the pipeline hands them"),
    ("daemon.files", "daemon.ocr", "file writes act on results, not the engine"),
    ("daemon.http", "daemon.ocr", "`check` must not load onnxruntime"),
    ("daemon.http", "daemon.hardware", "`check` must not load onnxruntime"),
    ("daemon.http", "daemon.store", "`check` must not open the database"),
    ("daemon.results", "daemon", "results.py is a leaf"),
    ("daemon.config", "daemon.", "settings are a side concern everything may import"),
    ("daemon.errors", "daemon", "errors are a leaf"),
]
ALLOWED_FROM_CONFIG = {"daemon.errors"}  # config raises ConfigError


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, root: Path, known: set[str]) -> Iterator[str]:
    """The daemon modules `path` imports, as dotted names that exist in `known`."""
    this = module_name(path, root)
    package = this if path.name == "__init__.py" else this.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            # `from daemon.ocr import buckets` imports the module daemon.ocr.buckets
            targets = [f"{prefix}.{alias.name}" if f"{prefix}.{alias.name}" in known else prefix
                       for alias in node.names]
        else:
            continue
        for target in targets:
            if target.split(".")[0] == root.name and target in known and target != this:
                yield target


def import_graph(root: Path) -> dict[str, set[str]]:
    files = sorted(root.rglob("*.py"))
    known = {module_name(f, root) for f in files}
    return {module_name(f, root): set(imports_of(f, root, known)) for f in files}


def under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix.rstrip(".") + ".")


def wrong_way(graph: dict[str, set[str]]) -> list[str]:
    found = []
    for importer, targets in sorted(graph.items()):
        for target in sorted(targets):
            for source, forbidden, why in NEVER:
                if not (under(importer, source) and under(target, forbidden)):
                    continue
                if importer == "daemon.config" and target in ALLOWED_FROM_CONFIG:
                    continue
                if under(target, source):
                    continue  # inside its own package
                found.append(f"{importer} imports {target}: {why}")
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan), plus self-imports."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return groups


def test_imports_point_downstream() -> None:
    graph = import_graph(PACKAGE)
    assert len(graph) > 30  # the walk found the package
    assert wrong_way(graph) == []


def test_no_two_modules_import_each_other() -> None:
    assert cycles(import_graph(PACKAGE)) == []


@pytest.mark.parametrize(("module", "planted", "expected"), [
    ("store/ledger.py", "from daemon.ocr.batch import BatchEngine",
     "daemon.store.ledger imports daemon.ocr.batch"),
    ("watcher.py", "from daemon.store import models",
     "daemon.watcher imports daemon.store.models"),
    ("metrics.py", "    from daemon.hardware.nvml import NvmlReader",
     "daemon.metrics imports daemon.hardware.nvml"),
])
def test_a_planted_wrong_import_is_caught(tmp_path: Path, module: str, planted: str,
                                          expected: str) -> None:
    copy = tmp_path / "daemon"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    target = copy / module
    if planted.startswith(" "):  # a lazy import, inside a function
        planted = f"\n\ndef _planted() -> None:\n{planted}\n"
    target.write_text(target.read_text() + "\n" + planted + "\n")
    assert any(line.startswith(expected) for line in wrong_way(import_graph(copy)))


def test_a_planted_cycle_is_caught(tmp_path: Path) -> None:
    copy = tmp_path / "daemon"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    planted = "\n\ndef _planted() -> None:\n    from daemon import pipeline\n"
    (copy / "files.py").write_text((copy / "files.py").read_text() + planted)
    found = cycles(import_graph(copy))
    assert any({"daemon.files", "daemon.pipeline"} <= set(cycle) for cycle in found)


def test_every_package_is_shipped_in_the_wheel() -> None:
    """pyproject lists its packages by hand (migrations/ ships as daemon.migrations): a new
    sub-package missing there would be absent from every installed daemon."""
    import tomllib

    listed = set(tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())
                 ["tool"]["setuptools"]["packages"])
    on_disk = {module_name(init.parent / "__init__.py", PACKAGE)
               for init in PACKAGE.rglob("__init__.py")}
    assert on_disk <= listed, sorted(on_disk - listed)
