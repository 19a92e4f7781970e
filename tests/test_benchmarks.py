"""Every benchmark of the suite runs on tiny input, end to end, through its one entry point
(`python -m benchmarks NAME`), and its JSON holds its figure and the machine: none can rot
unseen between the sessions that measure with them (~50 s for all on 2 cores). What they
measure is not judged here: figures live in benchmarks/NOTES.md, not in timed tests."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest

from tests.support import PG_ADMIN_URL, REPO

Check = Callable[[dict[str, Any]], bool]

SMOKE: list[tuple[str, list[str], Check]] = [
    ("bench", ["--render", "2", "--modes", "a,c", "--mode-seconds", "1"],
     lambda out: all(out["modes"][m]["pages"] == 2 and out["modes"][m]["bow"]["f1"] > 0.9
                     for m in "ac")),
    ("host-ceiling", ["--a4", "2", "--cores", "1", "--repeat", "1", "--reference-seconds", "0"],
     lambda out: out["runs"]["1"]["pages"] == 2 and out["runs"]["1"]["failed"] == 0
     and out["runs"]["1"]["host_core_ms_per_page"] > 0),
    ("intake", ["--kept", "20", "--new", "10"],
     lambda out: out["new_drops"]["files"] == 10 and out["restart"]["kept_files_read_again"] == 0),
    ("pdf-pages", ["--pages", "2", "--repeat", "1", "--threads", "1"],
     lambda out: out["render_scans"]["pages"] == 2 and out["text_layer"]["pages"] == 2),
    ("rec-padding", ["--render", "1"], lambda out: out["pages"] == 1 and out["runs"] > 0),
    ("rec-widths", ["--render", "1", "--variants", "cpu"],
     lambda out: out["pages"] == 1 and "cpu" in out["variants"]),
    ("gpu-warmup", ["--algos", "HEURISTIC"],  # on the CPU here: it runs, it measures nothing
     lambda out: bool(out["modes"]["HEURISTIC"]["one_session_s"])),
    ("startup", ["--build-seconds", "0.05", "--rec-widths", "1"],
     lambda out: all(run["first_page_stored_s"] > 0 and run["warmup"]["state"] == "done"
                     and run["warmup"]["shapes_warm"] == run["warmup"]["shapes"] > 0
                     for run in out["runs"].values())),
    ("gil-probe", [], lambda out: len(out["gil_probe_calibration"]) > 0),
    ("soak", ["--minutes", "0.2"], lambda out: out["ok"] and out["files_dropped"] > 10
     and out["not_as_expected"] == 0),
]


def run(name: str, args: list[str]) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-m", "benchmarks", name, *args], cwd=REPO,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out: dict[str, Any] = json.loads(proc.stdout)
    assert out["machine"]["cores"] >= 1 and out["machine"]["cpu"], out["machine"]
    return out


@pytest.mark.parametrize(("name", "args", "check"), SMOKE, ids=[s[0] for s in SMOKE])
def test_each_benchmark_runs_on_tiny_input(name: str, args: list[str], check: Check) -> None:
    out = run(name, args)
    assert check(out), json.dumps(out)[:3000]


@pytest.mark.postgres
def test_scale_out_runs_on_tiny_input() -> None:
    out = run("scale-out", ["--admin-url", PG_ADMIN_URL, "--daemons", "1", "--files", "10"])
    [one] = out["runs"]
    assert one["files"] == 10 and one["failed"] == 0


def test_the_suite_lists_every_benchmark_module() -> None:
    """A module added to benchmarks/ without an entry (or a smoke run) would rot unseen."""
    from benchmarks.__main__ import SUITE

    modules = {path.stem for path in (REPO / "benchmarks").glob("*.py")} - {
        "__init__", "__main__", "common"}
    assert {module for module, _ in SUITE.values()} == modules
    # scale-out has its own test here; gpu-check and gpu-bundle theirs (test_gpu_check.py)
    assert {name for name, _, _ in SMOKE} | {"scale-out", "gpu-check", "gpu-bundle"} == set(SUITE)
    listing = subprocess.run([sys.executable, "-m", "benchmarks"], cwd=REPO,
                             capture_output=True, text=True, timeout=60)
    assert listing.returncode == 0 and all(name in listing.stdout for name in SUITE)
