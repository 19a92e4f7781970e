"""Who holds the GIL, sampled from outside the interpreter. A benchmark instrument, not a test.

    python -m benchmarks gil-probe      calibrates it: threads of known duty, alone and beside
                                        native threads that let the GIL go
    python -m benchmarks gil-probe build     builds the sampler (bench-out/), prints its path
    OCR_GIL_PROBE_OUT=F python -m benchmarks gil-probe daemon run
                                        `python -m daemon run` with the probe: SIGUSR1 starts
                                        sampling, SIGUSR2 stops it and writes F (JSON, what
                                        `Sampled.to_json` gives); bench.py --gil does this

On a GPU host with many cores, one daemon stops where the work that holds its GIL adds up to
a second each second, whatever the cores. Neither thread CPU time nor py-spy says how much
that is: a thread's CPU time includes native work that lets the GIL go (JPEG decoding, numpy
copies, SQLite's steps), and py-spy's `--gil`, sampling from a process scheduled like the rest,
counted a thread that held the GIL 33% of the time at 13% beside a native thread (NOTES.md).

This probe reads the interpreter's own GIL state (`locked` and `last_holder`, found at start by
their values and checked, below) from C (`gil_probe.c`, built with the machine's `cc` into
bench-out/) in a thread of its own that has let the GIL go and runs at SCHED_FIFO's lowest
priority (granted to root or CAP_SYS_NICE: otherwise it says so, and counts busy threads low),
every 50 us. Each sample files the holder's thread; `mark` tags a thread's samples while it is
in a benchmark's stand-in, so they can be taken out.

What a share means: the time a thread held the GIL, including time it held it while the kernel
ran something else on its core. On a machine with fewer cores than busy threads that is more
than its work alone would take; on a GPU host's many cores, close to it.

Where it cannot be trusted it refuses (`GilProbe.open` raises `Unavailable`): no C compiler, an
interpreter whose GIL is laid out otherwise (CPython 3.11 and 3.12 have `interval`,
`last_holder`, `locked` in a row; 3.13 does not), a value not found exactly once, or a
`locked` that does not read 1 while the GIL is held and 0 while it is not.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import struct
import subprocess
import sys
import sysconfig
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "gil_probe.c"
BUILD = HERE.parent / "bench-out" / "gil-probe"
PERIOD_US = 200  # 50 slowed a 2-core replay ~20% (a wake-up, a preemption, each time)
SLOTS = 512
MARKS = 64
SEARCH_BYTES = 2 << 20  # from _PyRuntime on: 3.12 keeps the main interpreter's GIL inside it


class Unavailable(RuntimeError):
    """The probe cannot give figures to trust here: why."""


@dataclass
class Sampled:
    samples: int
    seconds: float
    fifo: bool  # SCHED_FIFO granted: samples even in time
    by_thread: dict[str, int] = field(default_factory=dict)  # held samples by thread name
    stand_in: dict[str, int] = field(default_factory=dict)  # of them, in the stand-in

    @property
    def held(self) -> int:
        return sum(self.by_thread.values())

    def fraction(self, count: int) -> float:
        return count / max(self.samples, 1)

    def to_json(self) -> dict[str, Any]:
        return {"samples": self.samples, "seconds": self.seconds, "fifo": self.fifo,
                "by_thread": self.by_thread, "stand_in": self.stand_in}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Sampled:
        return cls(data["samples"], data["seconds"], data["fifo"], data["by_thread"],
                   data["stand_in"])

    def figures(self, pages: int, leave_out: tuple[str, ...] = ()) -> dict[str, Any]:
        """In ms a page over the sampled time: how long each kind of thread held the GIL (a
        thread's name without its number), the stand-in's share and the threads of
        `leave_out` taken out; and the pages a second at which that holding would fill the
        GIL, were the GIL all that bound the process (waits for it grow before that)."""
        def per_page(count: int) -> float:
            return 1000 * self.seconds * self.fraction(count) / max(pages, 1)

        kinds: dict[str, float] = {}
        for name, count in self.by_thread.items():
            kind = thread_kind(name)
            if kind not in leave_out:
                kinds[kind] = kinds.get(kind, 0.0) + per_page(count - self.stand_in.get(name, 0))
        total = sum(kinds.values())
        return {
            "method": f"the interpreter's GIL holder read every ~{PERIOD_US} us from a "
                      "SCHED_FIFO thread (benchmarks/gil_probe.py); a share counts time held "
                      "while preempted too",
            "fifo": self.fifo,
            "samples": self.samples,
            "held_fraction": round(self.fraction(self.held), 3),
            "ms_per_page": round(total, 2),
            "ms_per_page_by_thread": {
                kind: round(ms, 2) for kind, ms in sorted(kinds.items(), key=lambda kv: -kv[1])
                if ms >= 0.005},
            **({"stand_in_ms_per_page": round(per_page(sum(self.stand_in.values())), 2)}
               if self.stand_in else {}),
            **{f"{kind}_ms_per_page_left_out": round(per_page(sum(
                c for n, c in self.by_thread.items() if thread_kind(n) == kind)), 2)
               for kind in leave_out},
            "pages_per_second_this_gil_share_allows": round(1000 / max(total, 1e-9), 1),
        }


def thread_kind(name: str) -> str:
    """A thread's name without its number: "decode", "ocr", "ocr-post", "store", ..."""
    return name.rstrip("0123456789_-")


def build() -> Path:
    """The compiled sampler, built once per source into bench-out/ (it links no Python: the
    one gpu_bundle.sh builds here serves a GPU machine that has no compiler)."""
    library = BUILD / library_name()
    if library.exists():
        return library
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        raise Unavailable("no C compiler (cc) to build benchmarks/gil_probe.c")
    BUILD.mkdir(parents=True, exist_ok=True)
    partial = library.with_suffix(f".{os.getpid()}.part")
    proc = subprocess.run([compiler, "-O2", "-shared", "-fPIC", "-o", str(partial), str(SOURCE),
                           "-lpthread"], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise Unavailable(f"building gil_probe.c failed: {proc.stderr.strip()[-500:]}")
    partial.rename(library)
    return library


def library_name() -> str:
    return f"gil_probe-{hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:12]}.so"


def _mapped_end(address: int) -> int:
    """Where the mapping that holds `address` ends (so the search reads nothing unmapped)."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            low, high = (int(part, 16) for part in line.split()[0].split("-"))
            if low <= address < high:
                # the next mappings may follow without a gap (.data then .bss)
                end = high
                for rest in maps:
                    nlow, nhigh = (int(part, 16) for part in rest.split()[0].split("-"))
                    if nlow != end:
                        break
                    end = nhigh
                return end
    raise Unavailable("_PyRuntime is in no mapping of /proc/self/maps")


def _words_equal(start: int, length: int, value: int) -> set[int]:
    data = ctypes.string_at(start, length)
    return {start + offset for offset in range(0, length - 7, 8)
            if struct.unpack_from("Q", data, offset)[0] == value}


class GilProbe:
    """Open before the threads to watch start: the checks want the GIL to themselves."""

    def __init__(self, library: Path, locked: int, holder: int, ident_offset: int) -> None:
        self._free = ctypes.CDLL(str(library))  # calls let the GIL go
        self._free.gil_sample.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long,
                                          ctypes.POINTER(ctypes.c_int)]
        self._free.gil_sample.restype = ctypes.c_int64
        self._free.gil_mark.argtypes = [ctypes.c_int, ctypes.c_void_p]
        self._keys = (ctypes.c_uint64 * SLOTS).in_dll(self._free, "gil_keys")
        self._counts = (ctypes.c_int64 * SLOTS).in_dll(self._free, "gil_counts")
        self._locked, self._holder, self._ident_offset = locked, holder, ident_offset
        self._slots: dict[int, int] = {}
        self._names: dict[int, str] = {}  # thread state address -> thread name
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._result: list[tuple[int, float, int]] = []

    @classmethod
    def open(cls) -> GilProbe:
        if sys.implementation.name != "cpython" or not (3, 11) <= sys.version_info[:2] <= (3, 12):
            raise Unavailable(f"the GIL's layout is known for CPython 3.11-3.12, not {sys.version}")
        if sysconfig.get_config_var("Py_GIL_DISABLED"):
            raise Unavailable("a free-threaded interpreter has no GIL to sample")
        library = build()
        held = ctypes.PyDLL(str(library))  # calls keep the GIL
        free = ctypes.CDLL(str(library))
        for lib in (held, free):
            lib.gil_read.argtypes = [ctypes.c_void_p]
        runtime = ctypes.addressof(ctypes.c_char.in_dll(ctypes.pythonapi, "_PyRuntime"))
        length = min(SEARCH_BYTES, _mapped_end(runtime) - runtime)
        before = sys.getswitchinterval()
        # the switch interval, in microseconds, is the first field of the GIL's state
        found = _words_equal(runtime, length, round(before * 1e6))
        try:
            sys.setswitchinterval(0.0077)
            found &= _words_equal(runtime, length, 7700)
        finally:
            sys.setswitchinterval(before)
        if len(found) != 1:
            raise Unavailable(f"the GIL's switch interval found {len(found)} times, not once")
        (interval,) = found
        holder, locked = interval + 8, interval + 16
        ctypes.pythonapi.PyThreadState_Get.restype = ctypes.c_void_p
        me = ctypes.pythonapi.PyThreadState_Get()
        if ctypes.c_void_p.from_address(holder).value != me:
            raise Unavailable("last_holder is not this thread's state while it holds the GIL")
        if held.gil_read(locked) != 1 or sum(free.gil_read(locked) for _ in range(20)) > 2:
            raise Unavailable("`locked` does not follow the GIL (1 held, 0 let go)")
        state = ctypes.string_at(me, 1024)
        ident = threading.get_ident()
        offsets = [k for k in range(0, 1024 - 7, 8)
                   if struct.unpack_from("Q", state, k)[0] == ident]
        if not offsets:
            raise Unavailable("no thread id found in this thread's state")
        return cls(library, locked, holder, offsets[0])

    # ------------------------------------------------------------ use

    def mark(self, inside: bool) -> None:
        """Tag the calling thread's samples as the stand-in's while `inside`."""
        ident = threading.get_ident()
        with self._lock:
            slot = self._slots.setdefault(ident, len(self._slots))
        self._free.gil_mark(slot, ctypes.pythonapi.PyThreadState_Get() if inside else None)

    def start(self, period_us: int = PERIOD_US) -> None:
        def run() -> None:
            fifo = ctypes.c_int(0)
            start = time.perf_counter()
            samples = self._free.gil_sample(self._locked, self._holder, period_us * 1000,
                                            ctypes.byref(fifo))
            self._result.append((samples, time.perf_counter() - start, fifo.value))

        self._result.clear()
        self._thread = threading.Thread(target=run, name="gil-probe", daemon=True)
        self._thread.start()

    def name_threads(self) -> None:
        """Note the name of each live thread's state (before threads that will end do)."""
        api = ctypes.pythonapi
        api.PyInterpreterState_Get.restype = ctypes.c_void_p
        api.PyInterpreterState_ThreadHead.restype = ctypes.c_void_p
        api.PyInterpreterState_ThreadHead.argtypes = [ctypes.c_void_p]
        api.PyThreadState_Next.restype = ctypes.c_void_p
        api.PyThreadState_Next.argtypes = [ctypes.c_void_p]
        names = {thread.ident: thread.name for thread in threading.enumerate()}
        state = api.PyInterpreterState_ThreadHead(api.PyInterpreterState_Get())
        while state:
            ident = ctypes.c_ulong.from_address(state + self._ident_offset).value
            if ident in names:
                self._names[state] = names[ident]
            state = api.PyThreadState_Next(state)

    def stop(self) -> Sampled:
        assert self._thread is not None
        self.name_threads()
        self._free.gil_stop()
        self._thread.join()
        samples, seconds, fifo = self._result[0]
        out = Sampled(samples, seconds, fifo == 0)
        for key, count in zip(self._keys, self._counts, strict=True):
            if count and key:
                name = self._names.get(key & ~1, "(a thread now gone)")
                out.by_thread[name] = out.by_thread.get(name, 0) + count
                if key & 1:
                    out.stand_in[name] = out.stand_in.get(name, 0) + count
        return out


# ------------------------------------------------------------------ calibration


def _calibrate() -> int:
    """Threads of known duty (busy in Python `duty` of each 3 ms), alone and beside two threads
    sorting in numpy (the GIL let go): the probe's share against each thread's CPU time."""
    import json

    import numpy as np

    probe = GilProbe.open()
    rows = []
    for duty, natives in ((1 / 3, 0), (1 / 3, 2), (2 / 3, 0), (2 / 3, 2)):
        stop = threading.Event()
        spent: list[float] = []

        def busy(duty: float = duty, stop: threading.Event = stop,
                 spent: list[float] = spent) -> None:
            cpu = time.thread_time()
            while not stop.is_set():
                until = time.perf_counter() + 0.003 * duty
                while time.perf_counter() < until:
                    pass
                time.sleep(0.003 * (1 - duty))
            spent.append(time.thread_time() - cpu)

        def native(stop: threading.Event = stop) -> None:
            values = np.random.default_rng(0).random(2_000_000)
            while not stop.is_set():
                np.sort(values)

        threads = [threading.Thread(target=busy, name="busy")] + [
            threading.Thread(target=native, name=f"native-{k}") for k in range(natives)]
        for thread in threads:
            thread.start()
        start = time.perf_counter()
        probe.start()
        time.sleep(2.0)
        sampled = probe.stop()
        wall = time.perf_counter() - start
        stop.set()
        for thread in threads:
            thread.join()
        rows.append({
            "busy_duty": round(duty, 3), "native_threads": natives,
            "cores": len(os.sched_getaffinity(0)), "fifo": sampled.fifo,
            "samples": sampled.samples, "sample_period_us": round(1e6 * sampled.seconds
                                                                 / max(sampled.samples, 1), 1),
            "busy_gil_share": round(sampled.fraction(sampled.by_thread.get("busy", 0)), 3),
            "busy_cpu_share": round(spent[0] / wall, 3),
            "natives_gil_share": round(sum(sampled.fraction(c) for n, c in
                                           sampled.by_thread.items() if n.startswith("native")), 3),
        })
    from benchmarks.common import machine

    print(json.dumps({"gil_probe_calibration": rows, "machine": machine()}, indent=1))
    return 0


# ------------------------------------------------------------------ the daemon, probed


def _daemon(argv: list[str]) -> None:
    """`python -m daemon ARGV` with the probe opened first (no thread of the daemon's yet),
    sampling between SIGUSR1 and SIGUSR2; the figures go to $OCR_GIL_PROBE_OUT."""
    import json
    import runpy
    import signal

    out = Path(os.environ["OCR_GIL_PROBE_OUT"])
    try:
        probe = GilProbe.open()
    except Unavailable as exc:
        out.write_text(json.dumps({"unavailable": str(exc)}))
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # a late signal must not stop it
        signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    else:
        def begin(_signum: int, _frame: Any) -> None:
            probe.start()
            out.with_name(out.name + ".started").touch()  # the sender waits for it

        def end(_signum: int, _frame: Any) -> None:
            partial = out.with_name(out.name + ".part")
            partial.write_text(json.dumps(probe.stop().to_json()))
            partial.rename(out)

        signal.signal(signal.SIGUSR1, begin)
        signal.signal(signal.SIGUSR2, end)
    sys.argv = ["daemon", *argv]
    runpy.run_module("daemon", run_name="__main__", alter_sys=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["build"]:  # gpu_bundle.sh: the library's path, built if need be
        print(build())
        return 0
    if argv[:1] == ["daemon"]:
        _daemon(argv[1:])  # the daemon's code from PYTHONPATH (bench.py --daemon-root)
        return 0
    return _calibrate()


if __name__ == "__main__":  # also run as a file, from another tree's root (bench.py --gil)
    raise SystemExit(main())
