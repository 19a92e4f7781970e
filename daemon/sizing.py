"""Every thread and process count the daemon derives from the machine, in one place, from one
reading of it (`usable_cores`): decoding threads, PDF render processes, store loops, OCR
workers and their intra-op threads, host-stage processes, warm-up threads. A setting other
than "auto" (or 0 where 0 means "auto") always wins."""

from __future__ import annotations

import os

from daemon.config import NVIDIA_PROVIDERS, Settings

DECODE_THREADS_MAX = 16  # "auto" on a GPU provider: one per usable core, at most this many
PDF_PROCESSES_MAX = 8
PDF_PROCESSES_MIN_CORES = 4
STORE_THREADS_POSTGRESQL = 4  # store loops on PostgreSQL: its round trips overlap (store_threads)
# Per GPU: the device runs one batch while the host works on the others'. With a stand-in
# device (benchmarks/host_ceiling.py --device-ns-per-element 6, 2 cores, the device the bound)
# two kept it 81% busy, three 88%, four 91% (NOTES.md); each more holds a batch more of pages
# and of GPU activations.
GPU_BATCHES_IN_FLIGHT = 3
# "auto" host processes: one per core, at most this many. Measured (benchmarks/host_ceiling.py,
# receipts): a worker extracts boxes and crops for ~40 pages/s and holds ~75 MB RSS, while the
# daemon's main process feeds ~25 pages/s today: past 8 only memory grows.
HOST_PROCESSES_MAX = 8
WARMUP_THREADS_MAX = 8  # shapes built at once at start-up (each its own session)


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity (a container's cpuset, `taskset`,
    systemd's CPUAffinity=), not the machine's count, which `os.cpu_count()` gives."""
    return len(os.sched_getaffinity(0))


def decode_threads(settings: Settings, provider: str) -> int:
    """Decoding threads: as configured, or for "auto" two on the CPU provider (inference uses
    the cores there) and one per usable core on a GPU provider. There decoding is the largest
    host stage (a 300-dpi page is 20-120 ms, a 600-dpi photo 150 ms) and runs outside the GIL,
    so two threads alone would hold a 16-core GPU host to ~10-50 pages/s."""
    threads = settings.batch.decode_threads
    if threads != "auto":
        return threads
    if provider not in NVIDIA_PROVIDERS:
        return 2
    return max(2, min(usable_cores(), DECODE_THREADS_MAX))


def pdf_processes(settings: Settings, provider: str) -> int:
    """PDF worker processes: as configured, or for "auto" one per decoding thread (at most
    PDF_PROCESSES_MAX: ~60 MB each) on a GPU provider with PDF_PROCESSES_MIN_CORES or more,
    else none. In one process pdfium renders one page at a time: a 300-dpi A4 scan in a PDF
    takes ~54 ms, so a daemon read at most ~18 such pages/s whatever its cores. A worker
    costs ~10-30% more per page (the page travels through shared memory): on 2 cores the
    whole daemon read 14.0 PDF pages/s in-process against 12.0 in workers
    (benchmarks/host_ceiling.py --a4-pdf 40), so below 4 cores the lock is not what limits."""
    processes = settings.batch.pdf_processes
    if processes != "auto":
        return processes
    if provider not in NVIDIA_PROVIDERS or usable_cores() < PDF_PROCESSES_MIN_CORES:
        return 0
    return min(decode_threads(settings, provider), PDF_PROCESSES_MAX)


def store_threads(settings: Settings, provider: str, *, postgresql: bool) -> int:
    """Store loops: one for the ledger alone on SQLite (a receipt's text is ~0.5 ms there,
    and it takes one writer at a time); STORE_THREADS_POSTGRESQL on PostgreSQL, where a
    store is six round trips in one transaction, so one loop stores at most ~1 / (6 x the
    round trip) documents a second: with the server 10.8 ms away one loop held the daemon to
    14.4 receipts/s, four let it reach 28 (benchmarks/NOTES.md). As many as the decoding
    threads, if more, when searchable PDFs are written (from the bytes the pipeline read):
    3-6 ms a receipt or a 300-dpi A4 page whose JPEG, PNG or one-strip G4 TIFF goes in as it
    is; 82 ms the A4 page as a G4 TIFF in strips and 139 ms as a grey LZW one (decoded, their
    pixels compressed again)."""
    ledger = STORE_THREADS_POSTGRESQL if postgresql else 1
    if settings.watch.output_pdf == "none":
        return ledger
    return max(ledger, decode_threads(settings, provider))


def ocr_workers(settings: Settings, provider: str, gpus: int) -> int:
    """OCR worker threads: `GPU_BATCHES_IN_FLIGHT` per GPU, so each GPU has a batch to run while
    the host works on the others'; on the CPU two, so decoding, post-processing and inference
    of different pages overlap on a small machine, capped by the cores there are."""
    if settings.batch.workers:
        return settings.batch.workers
    if provider in NVIDIA_PROVIDERS:
        return GPU_BATCHES_IN_FLIGHT * max(1, gpus)
    return max(1, min(2, usable_cores()))


def intra_op_threads(workers: int) -> int:
    """onnxruntime threads of each CPU engine: the cores shared between the workers rather
    than each taking them all (oversubscribed, they slow each other down)."""
    return max(1, usable_cores() // workers)


def host_processes(devices: int = 1) -> int:
    """Host worker processes for each of `devices` engines when host_processes = "auto"."""
    return max(1, min(usable_cores(), HOST_PROCESSES_MAX) // devices)


def warmup_threads() -> int:
    return min(usable_cores(), WARMUP_THREADS_MAX)
