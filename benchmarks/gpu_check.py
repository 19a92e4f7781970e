"""The device check for a lent GPU machine: the figures that matter first, each stage's JSON
written to $OUT the moment it ends, every stage capped, all inside 540 s. A script, not a test.

    python3 -m benchmarks gpu-check --bundle .gpu-bundle/parts     # there (gpu-bundle's plan)
    python3 -m benchmarks gpu-check --verify .gpu-bundle/parts     # the parts carried so far
    python -m benchmarks gpu-check --rehearse                      # here, on the CPU (CI)

Stages, in order (cap in seconds; a stage gets what is left of the 540 if that is less):
  00 install   45  the bundle unpacked with Python alone (tarfile, lzma, zipfile) into a site
                   folder put first on the children's PYTHONPATH; onnxruntime's providers
  01 doctor    20  `python -m daemon doctor --json`
  02 receipts 120  the GPU daemon on the receipts: ready, a warm pass (F1 from it, read from
                   the ledger in-process), the warm-up's end awaited, then two tagged copies of
                   every receipt at once, timed (receipts/s, p50/p95)
  03 naive     35  RapidOCR's own loop with `use_cuda` on the same receipts (25 s of them)
  04 a4        60  500 rendered dense A4 pages (rendered while the daemon warmed) through the
                   same warm daemon; GPU memory over the stage (flat or not)
  05 tests     60  `pytest -m gpu` (text parity with the CPU path), counts from its JUnit XML
  06 cpu       75  the daemon with FORCE_CPU=true on the same receipts: the GPU's multiple,
                   and F1 against the GPU's
  07 warmup    70  `gpu-warmup --engine`: the engine's warm-up, then the shape sweeps
  08 ceiling   30  `host-ceiling`: the host side on this machine's cores, the device replayed
summary.json: each stage's seconds and figure, and the targets (>= 100 receipts/s, >= 60 A4
pages/s, >= 10x naive use_cuda and >= 10x the CPU path, F1 within 0.002 of the CPU path, GPU
memory flat over the A4 run), met or not. GPU memory is sampled by NVML every 0.5 s the whole
run (gpu-memory.json). Daemon logs go to $OUT/logs.

`--rehearse`: the same stages on the CPU provider with a handful of rendered receipt pages and
2 A4 pages (no bundle: this machine's packages), failing (exit 1) unless every stage wrote its
JSON with its figure; tests/test_gpu_check.py runs it in CI, so it cannot rot unseen.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from benchmarks.common import REPO, machine

TOTAL_S = 540  # a device call may run 600 s; the rest is the start and the way back
STAGES: list[tuple[str, float, str]] = [  # name, cap (s), the key its JSON must hold
    ("install", 45, "onnxruntime"),
    ("doctor", 20, "doctor"),
    ("receipts", 120, "pages_per_s"),
    ("naive", 35, "pages_per_s"),
    ("a4", 60, "pages_per_s"),
    ("tests", 60, "tests"),
    ("cpu", 75, "pages_per_s"),
    ("warmup", 70, "engine"),
    ("ceiling", 30, "runs"),
]
GPU_TEST_FILES = ["tests/test_hardware.py", "tests/test_metrics.py", "tests/test_graphs.py",
                  "tests/test_batch_engine.py", "tests/test_pipeline.py"]
TARGETS = {"receipts_per_s": 100.0, "a4_pages_per_s": 60.0, "x_naive_use_cuda": 10.0,
           "x_cpu_path": 10.0, "f1_within": 0.002, "memory_growth_bytes": 64 * 2**20}


def say(message: str) -> None:
    print(f"== {time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ the bundle


class PartsReader:
    """The parts p00, p01, ... read as one stream (what gpu-bundle cut)."""

    def __init__(self, paths: list[Path]) -> None:
        self._paths = list(paths)
        self._file: Any = None

    def read(self, size: int = -1) -> bytes:
        out = b""
        while size < 0 or len(out) < size:
            if self._file is None:
                if not self._paths:
                    break
                self._file = open(self._paths.pop(0), "rb")  # noqa: SIM115 (closed below)
            chunk = self._file.read(-1 if size < 0 else size - len(out))
            if not chunk:
                self._file.close()
                self._file = None
                continue
            out += chunk
        return out


def verify(bundle: Path) -> dict[str, Any]:
    """Which of the manifest's parts are here, whole (size and SHA-256)."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    report: dict[str, Any] = {"parts": len(manifest["parts"]), "here": [], "missing": []}
    for part in manifest["parts"]:
        path = bundle / part["name"]
        ok = (path.is_file() and path.stat().st_size == part["bytes"]
              and hashlib.sha256(path.read_bytes()).hexdigest() == part["sha256"])
        report["here" if ok else "missing"].append(part["name"])
    return report


def install(bundle: Path, site: Path, work: Path) -> dict[str, Any]:
    """Unpack the bundle: onnxruntime-gpu and the wheels into `site`, the receipts into
    `work`/eval. Python alone: the machine may have no `xz`, and pip is not needed."""
    found = verify(bundle)
    if found["missing"]:
        raise RuntimeError(f"parts missing or damaged: {found['missing']} (the machine was "
                           "given back between calls? carry them again)")
    manifest = json.loads((bundle / "manifest.json").read_text())
    shutil.rmtree(site, ignore_errors=True)
    site.mkdir(parents=True)
    unpacked = work / "bundle"
    shutil.rmtree(unpacked, ignore_errors=True)
    reader = PartsReader([bundle / part["name"] for part in manifest["parts"]])
    with tarfile.open(fileobj=reader, mode="r|") as tar:  # type: ignore[call-overload]
        tar.extractall(unpacked, filter="data")
    with tarfile.open(unpacked / "ort-gpu.tar.xz", "r:xz") as tar:
        tar.extractall(site, filter="data")
    wheels = sorted((unpacked / "whl").glob("*.whl"))
    for wheel in wheels:
        install_wheel(wheel, site)
    eval_dir = work / "eval"
    shutil.rmtree(eval_dir, ignore_errors=True)
    if (unpacked / "eval").is_dir():
        shutil.move(unpacked / "eval", eval_dir)
    shutil.rmtree(unpacked, ignore_errors=True)
    return {"wheels": len(wheels), "receipts": manifest.get("receipts"),
            "bundle_bytes": sum(p["bytes"] for p in manifest["parts"])}


def install_wheel(wheel: Path, site: Path) -> None:
    """A wheel unpacked into `site` as pip would for a --target install: its files, and its
    .data/purelib and platlib folders' contents moved beside them."""
    with zipfile.ZipFile(wheel) as zf:
        for info in zf.infolist():
            target = site / info.filename
            if not target.resolve().is_relative_to(site.resolve()):
                raise RuntimeError(f"{wheel.name}: {info.filename} escapes the site folder")
            zf.extract(info, site)
            if info.filename.endswith(".so") or ".so." in info.filename:
                target.chmod(0o755)
    for data in site.glob("*.data"):
        for kind in ("purelib", "platlib"):
            for item in (data / kind).glob("*") if (data / kind).is_dir() else []:
                shutil.copytree(item, site / item.name, dirs_exist_ok=True) if item.is_dir() \
                    else shutil.copy2(item, site / item.name)
        shutil.rmtree(data)


# ------------------------------------------------------------------ GPU memory


class MemorySampler:
    """The GPU's used memory (NVML, device 0) every `every` seconds for the whole run."""

    def __init__(self, every: float = 0.5) -> None:
        self.every = every
        self.samples: list[tuple[float, int]] = []
        self.device: str | None = None
        self.unavailable: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._start = time.monotonic()
        try:
            import pynvml

            pynvml.nvmlInit()
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            name = pynvml.nvmlDeviceGetName(self._handle)
            self.device = name.decode() if isinstance(name, bytes) else str(name)
            self._read: Callable[[], int] = (
                lambda: int(pynvml.nvmlDeviceGetMemoryInfo(self._handle).used))
        except Exception as exc:
            self.unavailable = f"no NVML GPU: {type(exc).__name__}: {exc}"

    def start(self) -> None:
        if self.unavailable is None:
            self._thread = threading.Thread(target=self._loop, name="nvml", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            with contextlib.suppress(Exception):
                self.samples.append((round(time.monotonic() - self._start, 2), self._read()))

    def now(self) -> float:
        return time.monotonic() - self._start

    def window(self, since: float, until: float) -> dict[str, Any]:
        """Used memory between two of `now()`'s times: start, peak, end, and the growth (the
        last third's peak less the first third's)."""
        if self.unavailable is not None:
            return {"unavailable": self.unavailable}
        used = [b for t, b in self.samples if since <= t <= until]
        if len(used) < 3:
            return {"samples": len(used)}
        third = max(1, len(used) // 3)
        return {"samples": len(used), "start_bytes": used[0], "peak_bytes": max(used),
                "end_bytes": used[-1], "growth_bytes": max(used[-third:]) - max(used[:third])}

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.unavailable is not None:
            return {"unavailable": self.unavailable}
        return {"device": self.device, "every_s": self.every, "samples": self.samples}


# ------------------------------------------------------------------ stages


class Check:
    """Runs the stages in order, each under its cap and what is left of TOTAL_S, writing
    NN-name.json as each ends (its figures, its seconds, or its error)."""

    def __init__(self, out: Path, total: float) -> None:
        self.out = out
        self.deadline = time.monotonic() + total
        self.results: dict[str, dict[str, Any]] = {}
        self.index = {name: n for n, (name, _, _) in enumerate(STAGES)}

    def left(self) -> float:
        return self.deadline - time.monotonic()

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[tuple[dict[str, Any], float]]:
        """(the stage's JSON to fill, its cap in seconds)."""
        _, cap, _ = STAGES[self.index[name]]
        cap = min(cap, max(0.0, self.left()))
        result: dict[str, Any] = {"stage": name, "cap_s": round(cap, 1)}
        say(f"{name} (cap {cap:.0f} s)")
        start = time.monotonic()
        try:
            if cap <= 1:
                raise TimeoutError("no time left of the check's budget")
            yield result, cap
        except Exception as exc:
            result["error"] = f"{type(exc).__name__}: {exc}"
            say(f"{name} failed: {result['error']}")
        finally:
            result["seconds"] = round(time.monotonic() - start, 1)
            self.results[name] = result
            path = self.out / f"{self.index[name]:02d}-{name}.json"
            path.write_text(json.dumps(result, indent=2, ensure_ascii=False))
            brief = {k: v for k, v in result.items() if not isinstance(v, dict | list)}
            say(f"{name}: {json.dumps(brief)[:400]}")

    def missing_figures(self) -> list[str]:
        return [name for name, _, key in STAGES
                if self.results.get(name, {}).get(key) in (None, {}, [])]


def child_env(site: Path | None, *, force_cpu: bool = False) -> dict[str, str]:
    env = dict(os.environ)
    path = [str(site)] if site else []
    env["PYTHONPATH"] = os.pathsep.join([*path, str(REPO), *filter(None, [
        os.environ.get("PYTHONPATH")])])
    env["PYTHONUNBUFFERED"] = "1"
    if force_cpu:
        env["FORCE_CPU"] = "true"
    return env


def run_json(command: list[str], env: dict[str, str], timeout: float, log: Path, *,
             any_exit: bool = False) -> dict[str, Any]:
    """A child that prints one JSON object; its stderr kept in `log`. On timeout, the JSON
    lines it printed to stderr as it went (a benchmark's parts as each finished), if any."""
    with open(log, "wb") as err:
        try:
            proc = subprocess.run(command, env=env, cwd=REPO, stdout=subprocess.PIPE,
                                  stderr=err, timeout=timeout)
        except subprocess.TimeoutExpired:
            partial = {}
            for line in log.read_text(errors="replace").splitlines():
                with contextlib.suppress(ValueError):
                    found = json.loads(line)
                    if isinstance(found, dict):
                        partial.update(found)
            return {**partial, "timed_out_s": round(timeout, 1)}
    if proc.returncode != 0 and not (any_exit and proc.stdout.strip()):
        tail = log.read_text(errors="replace")[-800:]
        raise RuntimeError(f"exit {proc.returncode}: {tail}")
    text = proc.stdout.decode(errors="replace").strip()
    try:
        found = json.loads(text)
    except ValueError:  # something printed before it: the object is the last line
        found = json.loads(text.splitlines()[-1])
    if not isinstance(found, dict):
        raise RuntimeError("not a JSON object")
    return found


def bench_args(args: argparse.Namespace, out: Path) -> argparse.Namespace:
    """bench.py's options as its daemon modes read them (the daemon's own defaults)."""
    from benchmarks.bench import parse_args

    return parse_args(["--batch", "8", "--log-dir", str(out / "logs"),
                       "--timeout", str(TOTAL_S)])


def receipts(args: argparse.Namespace, folder: Path) -> list[Path]:
    from benchmarks.bench import render_dataset
    from benchmarks.common import find_images

    if args.eval is not None:
        return find_images(args.eval / "sroie", args.receipts)
    render_dataset(args.receipts, folder)  # rehearsal: rendered pages with their truth
    return find_images(folder)


def daemon_figures(raw: dict[str, Any], images: list[Path], texts: list[str | None]
                   ) -> dict[str, Any]:
    from benchmarks.bench import summarise, truth_for

    raw = {**raw, "texts": texts}
    out = summarise("c", raw, None, [truth_for(p) for p in images])
    for key in ("files", "timed_out"):
        if key in raw:
            out[key] = raw[key]
    return out


def naive(args: argparse.Namespace, images: list[Path], env: dict[str, str], cap: float,
          out: Path) -> dict[str, Any]:
    """RapidOCR's own loop, `use_cuda` (on the CPU in a rehearsal), as bench.py's worker."""
    from benchmarks.bench import summarise, truth_for

    files = out / "logs" / "naive-files.json"
    files.write_text(json.dumps([str(p) for p in images]))
    mode = "a" if args.rehearse else "d"
    seconds = max(1.0, min(25.0, cap - 10))
    raw = run_json([sys.executable, "-m", "benchmarks.bench", "--images", str(images[0].parent),
                    "--mode-seconds", str(seconds), "--worker", mode, "--worker-files",
                    str(files)], env, cap, out / "logs" / "naive.log")
    if "texts" not in raw:
        raise RuntimeError(f"no figures: {raw}")
    result = summarise(mode, raw, None, [truth_for(p) for p in images])
    result["mode"] = "RapidOCR use_cuda" if mode == "d" else "RapidOCR on the CPU (rehearsal)"
    result["files_done"] = raw.get("files_done")
    return result


def gpu_tests(env: dict[str, str], cap: float, out: Path) -> dict[str, Any]:
    xml = out / "tests.xml"
    with open(out / "tests.txt", "wb") as log:
        try:
            subprocess.run([sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider",
                            "-m", "gpu", "-rs", f"--junitxml={xml}", *GPU_TEST_FILES],
                           env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                           timeout=cap)
        except subprocess.TimeoutExpired:
            return {"timed_out_s": round(cap, 1), "see": "tests.txt"}
    suite = ET.parse(xml).getroot()
    suite = suite if suite.tag == "testsuite" else suite[0]
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    failed = [f"{case.get('classname')}::{case.get('name')}" for case in suite.iter("testcase")
              if case.find("failure") is not None or case.find("error") is not None]
    return {"tests": counts, "passed": counts["tests"] - counts["failures"] - counts["errors"]
            - counts["skipped"], "failed": failed}


def targets(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The issue's targets from this run's figures (None where a figure is missing)."""
    def rate(stage: str) -> float | None:
        value = results.get(stage, {}).get("pages_per_s")
        return float(value) if value else None

    def f1(stage: str) -> float | None:
        bow = results.get(stage, {}).get("bow") or {}
        return bow.get("f1")

    gpu, naive_rate, cpu, a4 = rate("receipts"), rate("naive"), rate("cpu"), rate("a4")
    growth = results.get("a4", {}).get("gpu_memory", {}).get("growth_bytes")
    f1_gpu, f1_cpu = f1("receipts"), f1("cpu")
    figures: dict[str, Any] = {
        "receipts_per_s": gpu, "a4_pages_per_s": a4,
        "x_naive_use_cuda": round(gpu / naive_rate, 2) if gpu and naive_rate else None,
        "x_cpu_path": round(gpu / cpu, 2) if gpu and cpu else None,
        "f1_gpu_minus_cpu": round(f1_gpu - f1_cpu, 4) if f1_gpu is not None
        and f1_cpu is not None else None,
        "memory_growth_bytes": growth,
    }
    met = {
        "receipts_per_s": gpu is not None and gpu >= TARGETS["receipts_per_s"],
        "a4_pages_per_s": a4 is not None and a4 >= TARGETS["a4_pages_per_s"],
        "x_naive_use_cuda": (figures["x_naive_use_cuda"] or 0) >= TARGETS["x_naive_use_cuda"],
        "x_cpu_path": (figures["x_cpu_path"] or 0) >= TARGETS["x_cpu_path"],
        "f1_within": figures["f1_gpu_minus_cpu"] is not None
        and abs(figures["f1_gpu_minus_cpu"]) <= TARGETS["f1_within"],
        "memory_flat": growth is not None and growth <= TARGETS["memory_growth_bytes"],
    }
    return {"targets": TARGETS, "figures": figures, "met": met}


# ------------------------------------------------------------------ the run


def run(args: argparse.Namespace) -> int:
    out: Path = args.out
    (out / "logs").mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="ocr-gpu-check-"))  # this run's own, removed after
    try:
        return _run(args, out, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run(args: argparse.Namespace, out: Path, work: Path) -> int:
    check = Check(out, args.total)
    site: Path | None = None
    sampler = MemorySampler()
    sampler.start()

    with check.stage("install") as (result, cap):
        if args.bundle is not None:
            site = work / "site"
            result.update(install(args.bundle, site, work))
            if args.eval is None and (work / "eval" / "sroie").is_dir():
                args.eval = work / "eval"
        else:
            result["bundle"] = "none: this machine's packages"
        probe = run_json([sys.executable, "-c", "import json, onnxruntime as o; print(json.dumps("
                          "{'onnxruntime': o.__version__, 'providers': "
                          "o.get_available_providers(), 'at': o.__file__}))"],
                         child_env(site), cap, out / "logs" / "install.log")
        result.update(probe)
    env = child_env(site)
    # the children (bench.py's daemon runs, the tests) and this process see the same packages
    os.environ["PYTHONPATH"] = env["PYTHONPATH"]
    if site is not None:
        sys.path.insert(0, str(site))

    with check.stage("doctor") as (result, cap):
        # the report is the figure, whatever the exit status
        result["doctor"] = run_json([sys.executable, "-m", "daemon", "doctor", "--json"], env,
                                    cap, out / "logs" / "doctor.log", any_exit=True)

    images: list[Path] = []
    a4_dir = work / "a4"
    rendering: threading.Thread | None = None
    daemon = None
    b_args = bench_args(args, out)
    try:
        with check.stage("receipts") as (result, cap):
            from benchmarks.bench import DaemonRun, render_dataset

            images = receipts(args, work / "receipts")
            shutil.rmtree(a4_dir, ignore_errors=True)
            # the A4 pages, rendered on the host's cores while the daemon loads and warms
            rendering = threading.Thread(target=render_dataset, args=(args.a4, a4_dir),
                                         kwargs={"a4": True}, daemon=True)
            rendering.start()
            began = time.monotonic()
            daemon = DaemonRun(b_args, force_cpu=args.rehearse)
            result["ready_s"] = round(daemon.start(timeout=cap), 1)
            result["provider"] = daemon.provider_used
            left = lambda: cap - (time.monotonic() - began)  # noqa: E731
            first = daemon.feed(images, timeout=max(1.0, left() - 20))
            result["first_pass"] = daemon_figures(first, images, first["texts"])
            result["warmup"] = daemon.wait_warm(max(0.0, left() - 25))
            timed = daemon.feed(images, (2, 3), timeout=max(1.0, left()))
            figures = daemon_figures(timed, images, first["texts"])
            result.update(figures)
        with check.stage("naive") as (result, cap):
            result.update(naive(args, images, env, cap, out))
        with check.stage("a4") as (result, cap):
            if daemon is None or daemon.proc is None or daemon.proc.poll() is not None:
                raise RuntimeError("no daemon running (the receipts stage failed)")
            if rendering is not None:
                rendering.join(max(0.0, cap / 4))
            from benchmarks.common import find_images

            pages = find_images(a4_dir)
            if rendering is not None and rendering.is_alive():
                raise RuntimeError(f"the A4 pages are not rendered yet ({len(pages)} so far)")
            since = sampler.now()
            raw = daemon.feed(pages, (0,), timeout=max(1.0, cap - 5))
            result.update(daemon_figures(raw, pages, raw["texts"]))
            result["gpu_memory"] = sampler.window(since, sampler.now())
    finally:
        if daemon is not None:
            daemon.stop()

    with check.stage("tests") as (result, cap):
        result.update(gpu_tests(env, cap, out))

    with check.stage("cpu") as (result, cap):
        from benchmarks.bench import DaemonRun

        began = time.monotonic()
        cpu_daemon = DaemonRun(b_args, force_cpu=True)
        try:
            result["ready_s"] = round(cpu_daemon.start(timeout=cap), 1)
            result["provider"] = cpu_daemon.provider_used
            left = lambda: cap - (time.monotonic() - began)  # noqa: E731
            first = cpu_daemon.feed(images, timeout=max(1.0, left() / 2))
            result["first_pass"] = daemon_figures(first, images, first["texts"])
            timed = cpu_daemon.feed(images, (2,), timeout=max(1.0, left() - 3))
            result.update(daemon_figures(timed, images, first["texts"]))
        finally:
            cpu_daemon.stop()

    with check.stage("warmup") as (result, cap):
        # the engine's figures come first (a line on stderr, kept should the cap cut it)
        sweep = "0" if args.rehearse else "5"
        result.update(run_json([sys.executable, "-m", "benchmarks", "gpu-warmup", "--algos",
                                "HEURISTIC", "--engine", "--warmup-seconds",
                                str(min(30, max(1, cap - 35))), "--sweep-seconds", sweep],
                               env, cap, out / "logs" / "warmup.log"))

    with check.stage("ceiling") as (result, cap):
        source = (["--images", str(images[0].parent), "--limit", "12", "--copies", "16",
                   "--cores", "4,16"] if not args.rehearse else
                  ["--a4", "1", "--cores", "1", "--repeat", "1", "--reference-seconds", "0"])
        result.update(run_json([sys.executable, "-m", "benchmarks", "host-ceiling", *source,
                                "--out", str(work / "replay")], env, cap,
                               out / "logs" / "ceiling.log"))

    memory = sampler.stop()
    (out / "gpu-memory.json").write_text(json.dumps(memory))
    summary = {
        "device": memory.get("device") or memory.get("unavailable"),
        "rehearsal": args.rehearse,
        "stages": {name: {"seconds": r.get("seconds"), "error": r.get("error")}
                   for name, r in check.results.items()},
        "seconds": round(sum(r.get("seconds", 0) for r in check.results.values()), 1),
        "missing_figures": check.missing_figures(),
        **targets(check.results),
        "machine": machine(),
    }
    if args.rehearse:  # the stages ran; what a CPU measures is no verdict on a GPU's targets
        summary["met"] = "not judged: a rehearsal on the CPU"
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    return 1 if summary["missing_figures"] else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", type=Path, help="the carried parts (gpu-bundle's folder)")
    parser.add_argument("--verify", type=Path, metavar="BUNDLE",
                        help="only say which parts are here and whole")
    parser.add_argument("--eval", type=Path, help="evaluation set with sroie/ (default: the "
                        "bundle's receipts; a rehearsal renders its own)")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu-check-out")))
    parser.add_argument("--rehearse", action="store_true",
                        help="on the CPU, a handful of pages: every stage must write its JSON")
    parser.add_argument("--receipts", type=int, default=None)
    parser.add_argument("--a4", type=int, default=None, help="A4 pages (default 500)")
    parser.add_argument("--total", type=float, default=TOTAL_S)
    args = parser.parse_args(argv)
    if args.verify is not None:
        print(json.dumps(verify(args.verify)))
        return 0
    if args.receipts is None:
        args.receipts = 4 if args.rehearse else 100
    if args.a4 is None:
        args.a4 = 2 if args.rehearse else 500
    # stopped from outside: unwind, so the daemon started here is stopped, not left holding
    # the GPU
    import signal

    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
