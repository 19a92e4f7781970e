"""The host ceiling of the GPU path, measured without a GPU. A script, not a test.

    python -m benchmarks host-ceiling --images ../shared/ocr-eval/sroie/img --limit 40
    python -m benchmarks host-ceiling --images DIR --cores 1,2 --max-pages 16
    python -m benchmarks host-ceiling --images ../shared/ocr-eval/tesseract-testing --copies 24
    python -m benchmarks host-ceiling --a4 40
    python -m benchmarks host-ceiling --a4-pdf 40 --pdf-processes 0   (and "auto")
    python -m benchmarks host-ceiling --a4 20 --output-pdf --device-ns-per-element 6
    python -m benchmarks host-ceiling --images DIR --postgres postgresql+psycopg://postgres@HOST/postgres

However fast the GPU, the daemon cannot store pages faster than its host work allows: decode,
detection pre-processing, DB box extraction, crops, recognition pre-processing, CTC decoding,
the ledger. This measures that ceiling with the device taken out:

1. record: the batch engine, on the GPU path's shapes (fixed detection buckets, recognition
   width x batch buckets), runs the real models once on the CPU over the pages; every session
   output is recorded per input row (a row's output does not depend on the rest of its batch).
2. replay: for each core count, a subprocess pinned to that many cores (sched_setaffinity) runs
   the daemon's own service — watcher -> ledger -> decode -> engine host stages -> SQLite —
   with every onnxruntime session REPLACED BY A REPLAY of the recorded outputs, reporting a
   GPU provider. The pages are dropped into its inbox at once and timed until the last text is
   stored. The daemon's own queue.capacity (32) unless --capacity: 256 documents in flight
   cost ~2-15% more CPU a page here (claims and lease renewals over more rows, more pages
   held) and kept a stand-in device no busier. With --repeat N, N rounds, each running every
   core count in turn (what drifts on a shared machine drifts for all), the best of each
   count kept.

With --device-ns-per-element N the device's time is stood in for as well: each run takes N ns
per input element on one timeline, after those queued before it (one GPU), its caller asleep
meanwhile, the GIL let go. Then `device_stand_in` says how busy that device was kept and how
fast it alone would go: whether the batches in flight keep a device fed when the host has the
cores to. One figure to scale by: an H100 ran the recogniser's [32, 48, 960, 3] batch in
11.5 ms (NOTES.md), 2.6 ns an element; the detector's time per element there is not
measured. Set N so that the device, not the host, is the bound: the question is then the
busy fraction.

Prints ONE JSON object: per core count, pages/s, host core-ms per page (the process's CPU time
from the drop to the last store, divided by the pages), that of the daemon's process by kind of
thread (decode, ocr loops, ocr-post, claim, watcher), with --gil the GIL's holders (`gil`, on
2 cores and more: how long each kind of thread held it a page, and the pages/s at which the
daemon's own holding would fill it, the bound of one daemon however many cores;
benchmarks/gil_probe.py, its sampler costing ~3% of 2 cores and none of 1, so not on by
default: it would bend the speed-up), the bytes the sessions handed back per page, pages/s of
each round; and the 2-core / 1-core speed-up, of the best and of each round's pair. Each run
also says how long it waited before the watcher took the first file in (the drops settling:
settle_seconds, 0.1 here, and a watcher tick, ~0.2 s with no host work to do however many
cores) and its pages/s from then: the speed-up `once_files_are_ready` is that of host work
alone; a fixed wait bends the other more, the shorter the run. With 1 and 2 cores each round
first times the machine itself (`machine_reference`, --reference-seconds): the same pages
decoded by one process pinned to each core, sharing nothing. On a shared machine that ratio
is not 2 either, and drifts from round to round: read the replay's speed-up beside it.
Recordings are kept in bench-out/replay/.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import pickle
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import REPO, find_images, machine, stat_cpu_seconds, thread_cpu_seconds
from benchmarks.gil_probe import GilProbe, Unavailable

STAND_IN = ("onnxruntime sessions replaced by a replay of outputs recorded from real CPU runs "
            "on the same pages (GPU path shapes); only host work is timed")
GPU_PROVIDERS = ["CUDAExecutionProvider", "CPUExecutionProvider"]

Rows = dict[bytes, tuple[np.ndarray[Any, Any], ...]]


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# Values of an input row its fingerprint reads. The stand-in runs on the OCR loops' threads,
# where a GPU run would let the cores go: 16k took ~55 us a row, ~6 core-ms a receipt, and
# slowed the replay ~11% on 1 and 2 cores alike; 2k takes ~9 us (NOTES.md, tenth round). A
# recording refuses two rows of one fingerprint that were answered differently.
ROW_KEY_SAMPLES = 2048


def row_key(row: np.ndarray[Any, Any]) -> bytes:
    """A fingerprint of one input row: its shape, dtype and ROW_KEY_SAMPLES of its values
    spread over it (hashing whole 960x960 detection inputs would cost the stand-in more than
    the host work it stands beside)."""
    flat = row.reshape(-1)
    sample = flat[:: max(1, flat.size // ROW_KEY_SAMPLES)]
    digest = hashlib.blake2b(digest_size=16)
    digest.update(str((row.shape, row.dtype.str)).encode())
    digest.update(np.ascontiguousarray(sample).tobytes())
    return digest.digest()


def model_kind(path: Path) -> str:
    return "det" if "det" in path.name else "cls" if "cls" in path.name else "rec"


class RecordSession:
    """A real CPU session that records each input row's outputs; reports a GPU provider so
    the engine takes the GPU path (fixed shapes)."""

    def __init__(self, real: Any, rows: Rows, widths: dict[bytes, int]) -> None:
        self.real = real
        self.rows = rows
        self.widths = widths

    def get_inputs(self) -> Any:
        return self.real.get_inputs()

    def get_outputs(self) -> Any:
        return self.real.get_outputs()

    def get_modelmeta(self) -> Any:
        return self.real.get_modelmeta()

    def get_providers(self) -> list[str]:
        return GPU_PROVIDERS

    def run(self, names: Any, feeds: dict[str, np.ndarray[Any, Any]]) -> Any:
        (batch,) = feeds.values()
        outputs = self.real.run(names, feeds)
        for k in range(len(batch)):
            key = row_key(batch[k])
            answer = tuple(np.array(o[k]) for o in outputs)
            known = self.rows.get(key)
            # the same pixels may come back a little differently in another batch (size)
            if known is not None and not all(np.allclose(a, b, atol=1e-3)
                                             for a, b in zip(known, answer, strict=True)):
                raise RuntimeError("record: two inputs of one fingerprint answered differently "
                                   "(raise ROW_KEY_SAMPLES)")
            self.rows[key] = answer
            self.widths[key] = batch.shape[2]  # NHWC pixels: [N, H, W, 3]
        return outputs


class Device:
    """With --device-ns-per-element: a stand-in for one GPU's time. Each run takes its input's
    elements x `ns` on one timeline, after the runs already queued (as work queues on a GPU),
    and its caller sleeps until then, the GIL let go as a real run lets it go; so the figures
    say whether the host keeps such a device busy."""

    def __init__(self, ns: float) -> None:
        self.ns = ns
        self.busy = 0.0
        self.counting = False
        self._free_at = 0.0
        self._lock = threading.Lock()

    def run(self, elements: int) -> None:
        if self.ns <= 0:
            return
        seconds = elements * self.ns * 1e-9
        with self._lock:  # the schedule only: nothing waits on the lock while a run lasts
            end = self._free_at = max(time.perf_counter(), self._free_at) + seconds
            if self.counting:
                self.busy += seconds
        time.sleep(max(0.0, end - time.perf_counter()))


class ReplaySession:
    """Answers each input row with its recorded outputs. Rows never recorded must be padding
    or warm-up (one value throughout): they get zeros of the model's output shapes."""

    def __init__(self, kind: str, rows: Rows, meta: Any, strides: dict[str, int],
                 device: Device | None = None) -> None:
        self.kind = kind
        self.device = device or Device(0)
        self.rows = rows
        self.meta = meta
        self.stride = strides.get(kind, 1)
        self.handed_back = 0
        self.own_seconds = 0.0  # CPU time of the stand-in itself, taken out of the figures
        self.counting = False
        self.probe: GilProbe | None = None
        self._lock = threading.Lock()

    def get_inputs(self) -> Any:
        return [_Named("x")]

    def get_modelmeta(self) -> Any:
        return self.meta

    def get_providers(self) -> list[str]:
        return GPU_PROVIDERS

    def run(self, _names: Any, feeds: dict[str, np.ndarray[Any, Any]]) -> Any:
        if self.probe is not None:
            self.probe.mark(True)  # its GIL samples are the stand-in's, taken out
        start = time.thread_time()
        (batch,) = feeds.values()
        rows = [self._row(batch[k]) for k in range(len(batch))]
        outputs = [np.stack([row[i] for row in rows]) for i in range(len(rows[0]))]
        if self.counting:
            with self._lock:
                self.handed_back += sum(o.nbytes for o in outputs)
                self.own_seconds += time.thread_time() - start
        if self.probe is not None:
            self.probe.mark(False)
        self.device.run(batch.size)
        return outputs

    def _row(self, row: np.ndarray[Any, Any]) -> tuple[np.ndarray[Any, Any], ...]:
        found = self.rows.get(row_key(row))
        if found is not None:
            return found
        if row.min() != row.max():
            raise RuntimeError(f"replay: a {self.kind} input that was not recorded")
        if self.kind == "det":  # [H, W, 3] pixels -> [1, H, W] probabilities
            return (np.zeros((1, *row.shape[:2]), np.float32),)
        if self.kind == "rec":  # [48, W, 3] pixels -> W / stride time steps
            steps = row.shape[1] // self.stride
            return np.zeros(steps, np.int64), np.zeros(steps, np.float32)
        return (np.zeros(2, np.float32),)


class _Named:
    def __init__(self, name: str) -> None:
        self.name = name


class _Meta:
    def __init__(self, custom_metadata_map: dict[str, str]) -> None:
        self.custom_metadata_map = custom_metadata_map


# ------------------------------------------------------------------ record


def children_cpu_seconds() -> float:
    """CPU time so far of this process's live children (the engine's host worker processes):
    RUSAGE_CHILDREN counts only children that have exited."""
    total = 0.0
    for task in Path("/proc/self/task").iterdir():
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for pid in children:
            try:
                total += stat_cpu_seconds(Path(f"/proc/{pid}/stat"))
            except OSError:
                continue
    return total


def by_thread_kind(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]],
                   stand_in_seconds: float, pages: int) -> dict[str, float]:
    """Core-ms per page of each kind of daemon thread over the run; the stand-in's own time
    (it runs in the OCR loop threads) is taken out of "ocr", the producer's thread left out."""
    spent: dict[str, float] = {}
    for tid, (kind, seconds) in after.items():
        if kind == "MainThread":
            continue  # this script's producer and poller
        spent[kind] = spent.get(kind, 0.0) + seconds - before.get(tid, (kind, 0.0))[1]
    spent["ocr"] = spent.get("ocr", 0.0) - stand_in_seconds
    per_page = {kind: round(1000 * seconds / max(pages, 1), 1) for kind, seconds in spent.items()}
    return {kind: ms for kind, ms in sorted(per_page.items(), key=lambda item: -item[1]) if ms > 0}


def daemon_capacity() -> int:
    from daemon.config import QueueSettings

    return QueueSettings().capacity


def record(images: list[Path], max_pages: int, out: Path) -> Path:
    from daemon import __version__
    from daemon.config import Settings
    from daemon.documents.decode import iter_pages
    from daemon.hardware.providers import CPU, ProviderChoice
    from daemon.ocr import batch as batch_module
    from daemon.ocr.models import page_bound

    settings = Settings()
    bound = page_bound(settings.ocr)  # the pages as the daemon decodes them
    # a recording is valid for these pages, settings, fingerprint and engine code
    digest = hashlib.sha256(f"{__version__} {max_pages} {settings.ocr!r}".encode())
    digest.update(Path(__file__).read_bytes())
    for source in sorted([*(REPO / "daemon" / "ocr").glob("*.py"),
                          *(REPO / "daemon" / "documents").glob("*.py")]):
        digest.update(source.read_bytes())
    for image in images:
        digest.update(image.read_bytes())
    target = out / f"{digest.hexdigest()[:16]}.pkl"
    if target.is_file():
        say(f"record: using {target}")
        return target

    rows: dict[str, Rows] = {"det": {}, "cls": {}, "rec": {}}
    metas: dict[str, dict[str, str]] = {}
    widths: dict[bytes, int] = {}
    real_create = batch_module.create_session

    def create(path: Path, _choice: Any, ocr: Any, **_: Any) -> RecordSession:
        session = real_create(path, CPU, ocr)
        metas[model_kind(path)] = dict(session.get_modelmeta().custom_metadata_map)
        return RecordSession(session, rows[model_kind(path)], widths)

    batch_module.create_session = create  # type: ignore[assignment]
    try:
        engine = batch_module.BatchEngine(settings.ocr, ProviderChoice("cuda"),
                                          max_pages=max_pages)
        start = time.perf_counter()
        for n, image in enumerate(images, 1):
            pages = [p.image for p in iter_pages(image.read_bytes(), settings.ocr, bound=bound)
                     if p.image is not None]
            engine.recognize(pages)
            say(f"record: {n}/{len(images)} {image.name} ({time.perf_counter() - start:.0f}s)")
        engine.close()
    finally:
        batch_module.create_session = real_create
    # input pixels per output time step of the recogniser (for replaying warm-up shapes)
    sample = next(((k, o) for k, o in rows["rec"].items() if o[0].size), None)
    strides = {"rec": 8} if sample is None else {"rec": widths[sample[0]] // sample[1][0].size}
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target, "wb") as handle:
        pickle.dump({"rows": rows, "metas": metas, "strides": strides}, handle)
    return target


# ------------------------------------------------------------------ replay (one subprocess)


def replay(recording: Path, images: list[Path], cores: int, max_pages: int,
           host_processes: str, pdf_processes: str = "auto", copies: int = 1,
           device_ns: float = 0.0, capacity: int | None = None,
           output_pdf: bool = False, postgres: str | None = None, gil: bool = False
           ) -> dict[str, Any]:
    os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[:cores]))
    with open(recording, "rb") as handle:
        data = pickle.load(handle)
    work = Path(tempfile.mkdtemp(prefix="host-ceiling-"))
    (work / "inbox").mkdir()
    from tests.daemons import scratch_database

    database = (scratch_database(postgres, "host_ceiling") if postgres
                else contextlib.nullcontext(f"sqlite:///{work / 'ledger.db'}"))
    with database as url:
        return _replay(data, images, cores, max_pages, host_processes, pdf_processes, copies,
                       device_ns, capacity, output_pdf, work, url, gil)


def _replay(data: dict[str, Any], images: list[Path], cores: int, max_pages: int,
            host_processes: str, pdf_processes: str, copies: int, device_ns: float,
            capacity: int | None, output_pdf: bool, work: Path, url: str, gil: bool
            ) -> dict[str, Any]:
    from daemon import intake as intake_module
    from daemon import service as service_module
    from daemon.config import Settings
    from daemon.hardware.providers import ProviderChoice
    from daemon.ocr import batch as batch_module
    from daemon.service import Hardware, Service

    sessions: list[ReplaySession] = []
    device = Device(device_ns)

    def create(path: Path, _choice: Any, _ocr: Any, **_: Any) -> ReplaySession:
        kind = model_kind(path)
        session = ReplaySession(kind, data["rows"][kind], _Meta(data["metas"].get(kind, {})),
                                data["strides"], device)
        sessions.append(session)
        return session

    def hardware(_settings: Any) -> Hardware:
        return Hardware(ProviderChoice("cuda", reason=STAND_IN), None, None)

    batch_module.create_session = create  # type: ignore[assignment]
    service_module.probe_hardware = hardware  # type: ignore[assignment]
    # when the watcher takes the first file in: before it, the run only waits for the drops
    # to settle (settle_seconds and a tick), with no host work to do on any core count
    first_take: list[float] = []
    take = intake_module.Intake.take

    def timed_take(self: Any, path: Path) -> None:
        if not first_take:
            first_take.append(time.perf_counter())
        take(self, path)

    intake_module.Intake.take = timed_take  # type: ignore[method-assign]
    # the claims made, those that took documents: a statement (a round trip) each
    from daemon.store.ledger import Ledger

    claims = {"statements": 0, "documents": 0}
    claim_many = Ledger.claim_many

    def counted_claim(self: Any, *args: Any, **kwargs: Any) -> Any:
        claimed = claim_many(self, *args, **kwargs)
        if claimed:
            claims["statements"] += 1
            claims["documents"] += len(claimed)
        return claimed

    Ledger.claim_many = counted_claim  # type: ignore[method-assign]
    probe: GilProbe | None = None
    no_probe = ("not sampled on one core: the sampler's wake-ups took ~20% of it, and there "
                "every thread waits for the core, a GIL holder too")
    if gil and cores > 1:
        try:
            probe = GilProbe.open()  # before the daemon's threads start: its checks want the GIL
        except Unavailable as exc:
            no_probe = str(exc)

    inbox = work / "inbox"
    settings = Settings(
        watch={"path": inbox, "settle_seconds": 0.1, "rescan_interval_seconds": 3600,
               **({"output_pdf": "pdf", "output_dir": work / "pdf"} if output_pdf else {})},
        database={"url": url},
        metrics={"enabled": False},
        batch={"max_pages": max_pages, "host_processes": host_processes,
               "pdf_processes": pdf_processes},
        queue={} if capacity is None else {"capacity": capacity},
    )
    service = Service(settings)
    service.start()
    for session in sessions:
        session.counting = True
        session.probe = probe
    device.counting = True
    try:
        from benchmarks.bench import tagged

        # hidden while copied, then renamed in: one event each; copies are new documents
        drops = [(image, copy, f"{image.stem}-{copy}{image.suffix}")
                 for copy in range(copies) for image in images]
        for image, copy, name in drops:
            (inbox / f".{name}.part").write_bytes(tagged(image, copy))
        cpu_before = resource.getrusage(resource.RUSAGE_SELF)
        threads_before = thread_cpu_seconds()
        children_before = children_cpu_seconds()
        own_before = time.thread_time()  # this thread drops and polls: not the daemon's work
        if probe is not None:
            probe.start()
        start = time.perf_counter()
        for _, _, name in drops:
            os.rename(inbox / f".{name}.part", inbox / name)
        # Polled from the metrics, not the ledger: a query every few ms from this thread took
        # ~40% of the GIL (py-spy --gil, which counts low: NOTES.md) from the daemon it
        # times, and skewed the core scaling.
        finished = [service.metrics.files_total.labels(status) for status in ("done", "failed")]
        while sum(counter._value.get() for counter in finished) < len(drops):
            time.sleep(0.005)
        wall = time.perf_counter() - start
        sampled = probe.stop() if probe is not None else None
        ledger = service.ledger
        counts = ledger.counts()
        cpu_after = resource.getrusage(resource.RUSAGE_SELF)
        threads_after = thread_cpu_seconds()
        children = children_cpu_seconds() - children_before
        producer = time.thread_time() - own_before
        pages = int(ledger.status()["pages"])
        failed = counts["failed"]
    finally:
        service.stop()
        shutil.rmtree(work, ignore_errors=True)
    cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    cpu += children
    stand_in = sum(s.own_seconds for s in sessions) + producer
    handed_back = sum(s.handed_back for s in sessions)
    return {
        "cores": cores,
        "files": len(drops),
        "failed": failed,
        "pages": pages,
        "seconds": round(wall, 3),
        "pages_per_second": round(pages / wall, 2),
        "seconds_until_the_first_file_is_ready": round(first_take[0] - start, 3),
        "pages_per_second_once_files_are_ready": round(pages / (wall - first_take[0] + start),
                                                       2),
        "host_core_ms_per_page": round(1000 * (cpu - stand_in) / max(pages, 1), 1),
        "of_which_in_host_worker_processes": round(1000 * children / max(pages, 1), 1),
        "replay_and_producer_core_ms_per_page_taken_out": round(1000 * stand_in / max(pages, 1),
                                                                 1),
        # the claim statements that took documents, over the documents they took
        "documents_a_claim": round(claims["documents"] / max(claims["statements"], 1), 2),
        "daemon_process_core_ms_per_page_by_thread": by_thread_kind(
            threads_before, threads_after, sum(s.own_seconds for s in sessions), pages),
        **({"device_stand_in": {
            "ns_per_element": device_ns, "busy_seconds": round(device.busy, 3),
            "busy_fraction": round(device.busy / wall, 3),
            # what the device alone would allow: the ceiling the host is measured against
            "device_bound_pages_per_second": round(pages / max(device.busy, 1e-9), 2)}}
           if device_ns > 0 else {}),
        # with --gil; the producer and poller (this script's main thread) left out, as its
        # CPU is
        **({"gil": sampled.figures(pages, leave_out=("MainThread",)) if sampled is not None
            else {"unavailable": no_probe}} if gil else {}),
        "bytes_handed_back_per_page": int(handed_back / max(pages, 1)),
        "by_model_bytes_per_page": {  # a model has a session per shape on a GPU
            kind: int(sum(s.handed_back for s in sessions if s.kind == kind) / max(pages, 1))
            for kind in sorted({s.kind for s in sessions})},
    }


# ------------------------------------------------------------------ machine reference


def reference_worker(images: list[Path], cpu: int, start_at: float, seconds: float) -> float:
    """Pages/s one process pinned to `cpu` decodes the pages at (the daemon's iter_pages,
    OpenCV on one thread), timed from `start_at` (wall clock, the same for every process of
    a reference) for `seconds`."""
    import cv2

    from daemon.config import Settings
    from daemon.documents.decode import iter_pages
    from daemon.ocr.models import page_bound

    os.sched_setaffinity(0, {cpu})
    cv2.setNumThreads(1)
    ocr = Settings().ocr
    bound = page_bound(ocr)
    data = [image.read_bytes() for image in images]

    def one_pass() -> int:
        return sum(1 for raw in data for _ in iter_pages(raw, ocr, bound=bound))

    one_pass()  # warm: imports, caches
    time.sleep(max(0.0, start_at - time.time()))
    pages, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        pages += one_pass()
    return pages / (time.perf_counter() - start)


def machine_reference(args: argparse.Namespace, cores: int) -> float:
    """Pages/s of `cores` reference workers at once, one pinned to each of the cores a replay
    on `cores` gets: what this machine's cores give work that shares nothing (the same page
    decoding), to read the replay's speed-up beside."""
    cpus = sorted(os.sched_getaffinity(0))[:cores]
    start_at = time.time() + 3.0  # after every worker has loaded and decoded once
    procs = [subprocess.Popen(
        [sys.executable, "-m", "benchmarks.host_ceiling", "--images", str(args.images),
         "--reference-worker", f"{cpu}:{start_at}:{args.reference_seconds}"]
        + (["--limit", str(args.limit)] if args.limit else []),
        stdout=subprocess.PIPE, text=True) for cpu in cpus]
    rates = []
    for proc in procs:
        out, _ = proc.communicate()
        if proc.returncode != 0:
            raise SystemExit(f"the machine reference on {cores} cores failed")
        rates.append(float(out.strip().splitlines()[-1]))
    return round(sum(rates), 2)


# ------------------------------------------------------------------ main


def speedups(rates: dict[str, list[float]]) -> tuple[float, list[float]]:
    """2 cores over 1: of the best rounds, and of each round's pair (run back to back)."""
    return (round(max(rates["2"]) / max(rates["1"]), 2),
            [round(two / one, 2) for one, two in zip(rates["1"], rates["2"], strict=True)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", type=Path)
    source.add_argument("--a4", type=int, metavar="N",
                        help="N dense 300-dpi A4 pages rendered by bench.py (kept in --out)")
    source.add_argument("--a4-pdf", type=int, metavar="N",
                        help="the same pages, each a one-page PDF (the PDF path: pdfium)")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--copies", type=int, default=1,
                        help="drop each page this many times, each copy a new document with "
                             "the same pixels: long enough a run to time a few pages")
    parser.add_argument("--cores", default="1,2", help="core counts to replay on (default 1,2)")
    parser.add_argument("--max-pages", type=int, default=4, help="batch.max_pages (default 4)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="rounds, each replaying every core count (the best kept)")
    parser.add_argument("--host-processes", default="auto",
                        help='batch.host_processes: "auto" (one per core) or a number; 0 = threads')
    parser.add_argument("--pdf-processes", default="auto",
                        help='batch.pdf_processes: "auto" (one per core) or a number; 0 = none')
    parser.add_argument("--device-ns-per-element", type=float, default=0.0,
                        help="stand in for one GPU's time too: each run sleeps this many ns "
                             "per input element, one run at a time (default 0: none)")
    parser.add_argument("--capacity", type=int, default=None,
                        help="queue.capacity, documents in flight (default: the daemon's own)")
    parser.add_argument("--postgres", metavar="ADMIN_URL", default=None,
                        help="keep the ledger on PostgreSQL: a scratch database on the server "
                             "of ADMIN_URL for each replay (dropped after it), not SQLite")
    parser.add_argument("--gil", action="store_true",
                        help="on 2 cores and more, sample the GIL's holders in the daemon "
                             "(benchmarks/gil_probe.py; ~3%% of 2 cores)")
    parser.add_argument("--output-pdf", action="store_true",
                        help='write a searchable PDF of every stored file (watch.output_pdf = '
                             '"pdf"), as the daemon does after storing its text')
    parser.add_argument("--out", type=Path, default=REPO / "bench-out" / "replay")
    parser.add_argument("--recording", type=Path, default=None,
                        help="replay this recording (of the same pages and max_pages) instead "
                             "of recording: to time two versions of the host code side by side")
    parser.add_argument("--reference-seconds", type=float, default=3.0,
                        help="with 1 and 2 cores, each round first times the machine itself: "
                             "the pages decoded by one process per core, sharing nothing, "
                             "this long (default 3; 0: not)")
    parser.add_argument("--replay-worker", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--reference-worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.a4 or args.a4_pdf:
        from benchmarks.bench import render_dataset

        count = args.a4 or args.a4_pdf
        args.images = args.out.parent / (f"a4-{count}" if args.a4 else f"a4-pdf-{count}")
        if not args.images.is_dir():
            say(f"rendering {count} A4 pages into {args.images}")
            partial = args.images.with_name(args.images.name + ".part")
            shutil.rmtree(partial, ignore_errors=True)
            render_dataset(count, partial, a4=True, pdf=bool(args.a4_pdf))
            partial.rename(args.images)
    folder = args.images / "img" if (args.images / "img").is_dir() else args.images
    images = find_images(folder, args.limit)
    if not images:
        parser.error(f"no images in {folder}")

    if args.replay_worker is not None:
        result = replay(args.replay_worker, images, int(args.cores), args.max_pages,
                        args.host_processes, args.pdf_processes, args.copies,
                        args.device_ns_per_element, args.capacity, args.output_pdf,
                        args.postgres, args.gil)
        print(json.dumps(result))
        return 0

    if args.reference_worker is not None:
        cpu, start_at, seconds = args.reference_worker.split(":")
        print(reference_worker(images, int(cpu), float(start_at), float(seconds)))
        return 0

    recording = args.recording or record(images, args.max_pages, args.out)
    available = len(os.sched_getaffinity(0))
    counts = []
    for cores in (int(c) for c in args.cores.split(",")):
        if cores > available:
            say(f"skip {cores} cores: only {available} here")
        else:
            counts.append(cores)
    # rounds outside, core counts inside: what drifts on a shared machine drifts for each
    runs: dict[str, Any] = {}
    every: dict[str, list[float]] = {str(cores): [] for cores in counts}
    every_ready: dict[str, list[float]] = {str(cores): [] for cores in counts}
    reference: dict[str, list[float]] = {"1": [], "2": []}
    with_reference = args.reference_seconds > 0 and {1, 2} <= set(counts)
    for attempt in range(args.repeat):
        if with_reference:
            say(f"the machine itself on 1 and 2 cores, round {attempt + 1}")
            for cores in (1, 2):
                reference[str(cores)].append(machine_reference(args, cores))
        for cores in counts:
            say(f"replay on {cores} core(s), round {attempt + 1}")
            proc = subprocess.run(
                [sys.executable, "-m", "benchmarks.host_ceiling", "--images", str(args.images),
                 "--cores", str(cores), "--max-pages", str(args.max_pages),
                 "--replay-worker", str(recording),
                 "--host-processes", args.host_processes, "--pdf-processes", args.pdf_processes,
                 "--copies", str(args.copies),
                 "--device-ns-per-element", str(args.device_ns_per_element)]
                + (["--capacity", str(args.capacity)] if args.capacity else [])
                + (["--output-pdf"] if args.output_pdf else [])
                + (["--gil"] if args.gil else [])
                + (["--postgres", args.postgres] if args.postgres else [])
                + (["--limit", str(args.limit)] if args.limit else []),
                capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                say(proc.stderr[-3000:])
                raise SystemExit(f"replay on {cores} cores failed")
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            every[str(cores)].append(result["pages_per_second"])
            every_ready[str(cores)].append(result["pages_per_second_once_files_are_ready"])
            best = runs.get(str(cores))
            if best is None or result["pages_per_second"] > best["pages_per_second"]:
                runs[str(cores)] = result
    for key, rates in every.items():
        runs[key]["pages_per_second_each_round"] = rates
    report: dict[str, Any] = {
        "benchmark": "host ceiling (GPU path, device replayed)",
        "stand_in": STAND_IN + (
            f"; the device's time stood in for by a sleep of {args.device_ns_per_element} ns "
            "per input element, one run at a time" if args.device_ns_per_element > 0 else ""),
        "images": str(args.images),
        "files": len(images),
        "copies": args.copies,
        "max_pages": args.max_pages,
        "capacity": args.capacity or daemon_capacity(),
        "host_processes": args.host_processes,
        "pdf_processes": args.pdf_processes,
        "output_pdf": args.output_pdf,
        "ledger": "postgresql" if args.postgres else "sqlite",
        "runs": runs,
    }
    if "1" in runs and "2" in runs:
        report["speedup_2_over_1_cores"], report["speedup_2_over_1_each_round"] = (
            speedups(every))
        # the same with the wait for the drops to settle left out: host work only
        (report["speedup_2_over_1_once_files_are_ready"],
         report["speedup_2_over_1_once_files_are_ready_each_round"]) = speedups(every_ready)
    if with_reference:
        best, each = speedups(reference)
        report["machine_reference"] = {
            "what": "the same pages decoded (iter_pages, OpenCV on one thread) by one process "
                    "pinned to each core, sharing nothing, for "
                    f"{args.reference_seconds:g} s just before each round's replays: the "
                    "speed-up this machine gives work that needs no other thread",
            "pages_per_second_each_round": reference,
            "speedup_2_over_1": best,
            "speedup_2_over_1_each_round": each,
        }
    print(json.dumps({**report, "machine": machine()}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
