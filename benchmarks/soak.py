"""The whole daemon for a long while, as a busy drop folder and an operator use it, with a
`kill -9` and a restart in the middle: does every file end done exactly once or failed with a
reason, without a crash, with RSS and /dev/shm flat and /health telling the truth?

    python -m benchmarks soak --minutes 30
    python -m benchmarks soak --minutes 0.5          # the CI smoke run

A producer drops, a few a second: rendered pages (PNG, JPEG), multi-page PDFs with born-digital
and scanned pages, duplicates, broken files (truncated, not what their name says, an
encrypted PDF), and names with control characters or bytes that are not UTF-8. The daemon
writes searchable PDFs and text sidecars, moves done files and quarantines failed ones. An
operator runs `status`, `export --since`, `retry --failed` and `forget` against it. Every 2 s
the daemon's RSS (its worker processes included), the /dev/shm entries and /health are
sampled. At the end the producer stops, the daemon drains and stops, and the ledger is checked
against what was dropped. Uses the real engine at small detection sizes (FAST_ENV): OCR speed
is not what this measures.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks.common import machine

SAMPLE_SECONDS = 2.0


def say(message: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def tree_rss(pid: int) -> int:
    """RSS bytes of `pid` and its live descendants."""
    total, stack = 0, [pid]
    while stack:
        current = stack.pop()
        try:
            for line in Path(f"/proc/{current}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
        except OSError:
            continue
        stack.extend(int(child) for child in children)
    return total


def shm_entries() -> int:
    try:
        return len(os.listdir("/dev/shm"))
    except OSError:
        return 0


class Producer:
    """Drops files into the inbox and remembers what each content should become."""

    def __init__(self, inbox: Path, seed: int) -> None:
        from tests.pages import SENTENCES, page_bytes
        from tests.support import encrypted_pdf, mixed_pdf, tiny_page

        self.inbox = inbox
        self.rng = random.Random(seed)
        self.expected: dict[str, str] = {}  # sha256 -> "done" | "failed"
        self.dropped = 0
        self._n = 0
        self._page, self._tiny, self._sentences = page_bytes, tiny_page, SENTENCES
        self._pdf, self._encrypted = mixed_pdf, encrypted_pdf
        self._kept: list[bytes] = []

    def _name(self, stem: str, suffix: str) -> bytes:
        """A name, now and then one with a colour escape and a newline, or with bytes that
        are not UTF-8."""
        self._n += 1
        odd = self.rng.random()
        if odd < 0.08:
            return f"{stem}-{self._n}\x1b[31m\nforged{suffix}".encode()
        if odd < 0.16:
            return f"{stem}-{self._n}".encode() + b"\xff\xfe" + suffix.encode()
        return f"{stem}-{self._n}{suffix}".encode()

    def drop_one(self) -> None:
        kind = self.rng.random()
        word = f"soak{self._n}{self.rng.randrange(10**6)}"
        if kind < 0.45:
            data, suffix, outcome = self._tiny(word, "PNG"), ".png", "done"
        elif kind < 0.55:
            data, suffix, outcome = self._tiny(word, "JPEG"), ".jpg", "done"
        elif kind < 0.65:
            data = self._pdf([[word, "a born digital page"], None], self._sentences[:2])
            suffix, outcome = ".pdf", "done"
        elif kind < 0.75 and self._kept:
            data, suffix = self.rng.choice(self._kept), ".png"  # a duplicate
            outcome = self.expected[hashlib.sha256(data).hexdigest()]
        elif kind < 0.82:
            data, suffix, outcome = self._tiny(word)[:60], ".png", "failed"  # truncated
        elif kind < 0.88:
            data, suffix, outcome = b"not an image at all " + word.encode(), ".jpg", "failed"
        elif kind < 0.92:
            data, suffix, outcome = b"%PDF-1.4 broken " + word.encode(), ".pdf", "failed"
        else:
            data, suffix, outcome = self._encrypted(word.encode()), ".pdf", "failed"
        sha = hashlib.sha256(data).hexdigest()
        self.expected.setdefault(sha, outcome)
        if outcome == "done" and len(self._kept) < 50:
            self._kept.append(data)
        name = self._name("f", suffix)
        part = os.path.join(os.fsencode(self.inbox), b".part-" + name.replace(b"\n", b"_"))
        with open(part, "wb") as handle:
            handle.write(data)
        os.rename(part, os.path.join(os.fsencode(self.inbox), name))
        self.dropped += 1


def run_cli(env: dict[str, str], cwd: Path, *args: str) -> tuple[int, str]:
    proc = subprocess.run([sys.executable, "-m", "daemon", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)
    return proc.returncode, proc.stdout + proc.stderr


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--rate", type=float, default=3.0, help="files dropped a second")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args(argv)

    from tests.support import DaemonProcess, ledger_rows

    work = args.workdir or Path(tempfile.mkdtemp(prefix="ocr-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    daemon = DaemonProcess(work, {
        "OCR_DAEMON_WATCH__AFTER": "move", "OCR_DAEMON_WATCH__DONE_DIR": str(work / "done"),
        "OCR_DAEMON_WATCH__FAILED_DIR": "failed", "OCR_DAEMON_WATCH__SIDECAR": "txt",
        "OCR_DAEMON_WATCH__OUTPUT_PDF": "pdf", "OCR_DAEMON_WATCH__OUTPUT_DIR": str(work / "pdf"),
        "OCR_DAEMON_QUEUE__MAX_ATTEMPTS": "2", "OCR_DAEMON_QUEUE__RETRY_BACKOFF_SECONDS": "1",
        "OCR_DAEMON_QUEUE__LEASE_SECONDS": "10", "OCR_DAEMON_BATCH__PDF_PROCESSES": "1",
    })
    daemon.inbox.mkdir(parents=True, exist_ok=True)
    producer = Producer(daemon.inbox, args.seed)
    shm_before = shm_entries()
    samples: list[dict[str, Any]] = []
    operator: list[dict[str, Any]] = []
    stop = threading.Event()
    seconds = args.minutes * 60
    start = time.monotonic()

    def produce() -> None:
        while not stop.wait(1 / args.rate):
            producer.drop_one()

    def operate() -> None:
        since = datetime.now(UTC).isoformat()
        while not stop.wait(max(5.0, seconds / 10)):
            for command in (("status", "--json"), ("export", "--since", since),
                            ("retry", "--failed")):
                code, _ = run_cli(daemon.env, work, *command)
                operator.append({"command": command[0], "exit": code})
            done = [sha for sha, want in producer.expected.items() if want == "done"]
            if done:  # forgotten: not checked at the end (a duplicate may bring it back)
                sha = producer.rng.choice(done)
                code, _ = run_cli(daemon.env, work, "forget", sha)
                operator.append({"command": "forget", "exit": code})
                producer.expected[sha] = "any"

    say(f"workdir {work}; {args.minutes} min at {args.rate} files/s")
    daemon.start()
    threads = [threading.Thread(target=produce, daemon=True),
               threading.Thread(target=operate, daemon=True)]
    for thread in threads:
        thread.start()
    killed = False
    while time.monotonic() - start < seconds:
        time.sleep(SAMPLE_SECONDS)
        elapsed = time.monotonic() - start
        if not killed and elapsed >= seconds / 2:
            say("kill -9, then a restart")
            daemon.kill9()
            killed = True
            daemon.start()
            continue
        try:
            health = daemon.health()
        except Exception as exc:
            health = {"status": f"no answer: {exc}"}
        samples.append({"t": round(elapsed, 1), "rss": tree_rss(daemon.pid),
                        "shm": shm_entries(), "status": health.get("status"),
                        "queue_depth": health.get("queue_depth")})
    stop.set()
    for thread in threads:
        thread.join(120)
    say(f"{producer.dropped} files dropped; draining")
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        rows = ledger_rows(daemon.url)
        waiting = [p for p in daemon.inbox.iterdir() if p.is_file()
                   and not p.name.startswith(".") and not p.name.endswith(".txt")]
        if not waiting and not any(row.state in ("queued", "processing")
                                   for row in rows.values()):
            break
        time.sleep(1)
    code = daemon.stop(signal.SIGTERM)
    rows = ledger_rows(daemon.url)
    wrong = {sha: (want, rows[sha].state if sha in rows else "missing")
             for sha, want in producer.expected.items()
             if want != "any" and (sha not in rows or rows[sha].state != want)}
    half = [row.sha256 for row in rows.values()
            if (row.state == "done") != bool(row.pages) or
            (row.state == "done" and row.pages != tuple(range(1, (row.page_count or 0) + 1)))]
    no_reason = [row.sha256 for row in rows.values() if row.state == "failed" and not row.reason]
    warm = [s for s in samples if s["t"] > seconds * 0.1]
    thirds = max(1, len(warm) // 3)
    rss_first = max((s["rss"] for s in warm[:thirds]), default=0)
    rss_last = max((s["rss"] for s in warm[-thirds:]), default=0)
    report = {
        "benchmark": "soak (the real daemon; a producer, an operator, one kill -9)",
        "machine": machine(), "minutes": args.minutes, "files_dropped": producer.dropped,
        "contents": len(producer.expected),
        "done": sum(1 for r in rows.values() if r.state == "done"),
        "failed": sum(1 for r in rows.values() if r.state == "failed"),
        "not_as_expected": len(wrong), "not_as_expected_sample": dict(list(wrong.items())[:5]),
        "half_written": len(half), "failed_without_a_reason": len(no_reason),
        "final_stop_exit_code": code,
        "rss_peak_first_third_bytes": rss_first, "rss_peak_last_third_bytes": rss_last,
        "shm_entries_before": shm_before, "shm_entries_after": shm_entries(),
        "health": {status: sum(1 for s in samples if s["status"] == status)
                   for status in {s["status"] for s in samples}},
        "operator_commands": len(operator),
        "operator_failures": [o for o in operator if o["exit"] not in (0, 1)],
        "log_tracebacks": daemon.log_text().count("Traceback"),
        "workdir": str(work),
    }
    report["ok"] = (not wrong and not half and not no_reason and code == 0
                    and report["shm_entries_after"] <= shm_before
                    and not report["operator_failures"])
    print(json.dumps(report, indent=1, default=str))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
