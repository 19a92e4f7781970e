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
    ("daemon.files", "daemon.documents", "files.py is file-system primitives: what a stored "
     "document leaves beside its file is daemon.outputs'"),
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


# -- one room, one job: what stays true after the redesign ----------------------------------

TESTS = PACKAGE.parent / "tests"
MODULE_LINES_MAX = 500
# modules allowed past MODULE_LINES_MAX, each with the one job that keeps it whole
LONG_MODULES = {
    "daemon/ocr/batch.py": "one engine call's flow (prepare, detect, classify, recognise, "
                           "finish) and the warm-up of the very shapes it feeds",
    "daemon/files.py": "every read of a producer's file and every write into a producer's "
                       "folder on one pair of walks that never follow a link out "
                       "(open_beneath, open_dir): their rules read in one place",
}


def external_imports(path: Path) -> set[str]:
    """The top-level packages `path` imports (at module level or inside a function)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found.add(node.module.split(".")[0])
    return found


def modules_saying(text: str) -> list[str]:
    """The daemon modules whose source holds `text`."""
    return sorted(str(path.relative_to(PACKAGE.parent)) for path in PACKAGE.rglob("*.py")
                  if text in path.read_text())


def test_no_module_is_long_without_its_reason() -> None:
    long = {str(path.relative_to(PACKAGE.parent)): len(path.read_text().splitlines())
            for path in PACKAGE.rglob("*.py")}
    long = {name: lines for name, lines in long.items() if lines > MODULE_LINES_MAX}
    assert set(long) <= set(LONG_MODULES), long


def test_only_the_store_imports_sqlalchemy() -> None:
    """The store's edge turns SQLAlchemy's errors into the project's own: nothing else needs
    the driver's names (and the outage policy lives in the store)."""
    outside = [str(path.relative_to(PACKAGE.parent)) for path in PACKAGE.rglob("*.py")
               if "sqlalchemy" in external_imports(path)
               and not path.is_relative_to(PACKAGE / "store")]
    assert outside == []


@pytest.mark.parametrize("fact", [
    "vanished before it was read", "permission denied", "symlink points outside",
    "a directory, not a file",
])
def test_why_a_file_cannot_be_read_is_said_in_one_place(fact: str) -> None:
    assert modules_saying(f'"{fact}') == ["daemon/files.py"]


@pytest.mark.parametrize("fact", ["sched_getaffinity", "cpu_count", "def usable_cores"])
def test_the_cores_are_counted_in_one_place(fact: str) -> None:
    assert modules_saying(fact) == ["daemon/sizing.py"]


@pytest.mark.parametrize("fact", ["def write_atomic", "OpenCC(", "ProcessPoolExecutor(",
                                  "class PathStat"])
def test_one_of_each(fact: str) -> None:
    assert len(modules_saying(fact)) == 1, modules_saying(fact)


def test_no_test_module_imports_another() -> None:
    """Shared helpers live in tests/support.py (fixtures in conftest.py), not in test modules
    that others import."""
    found = []
    for path in sorted(TESTS.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module and \
                    node.module.startswith("tests.test_"):
                found.append(f"{path.name} imports {node.module}")
    assert found == []
