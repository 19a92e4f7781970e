"""Helpers the test modules share (no test module imports another): waiting for a condition,
and claiming through the ledger's one claim path the way a test needs it."""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import io
import json
import os
import re
import signal
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pypdfium2 as pdfium
import pypdfium2.raw as pdfium_c
from PIL import Image as PILImage
from PIL import ImageDraw, ImageFont
from sqlalchemy import create_engine, select, text

from daemon.config import Settings
from daemon.hardware.providers import ProviderChoice
from daemon.http import MetricsServer, health_document
from daemon.pipeline import Pipeline
from daemon.results import Image, Line, PageResult
from daemon.service import Service
from daemon.store.ledger import Ledger
from daemon.store.models import Document, State
from daemon.store.records import Claim
from daemon.watcher import Watcher


def wait_until(predicate: Callable[[], object], timeout: float = 60.0, interval: float = 0.05
               ) -> bool:
    """Poll `predicate` until it is true or `timeout` seconds pass; its last answer."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return bool(predicate())
        time.sleep(interval)


def claim_one(ledger: Ledger, document_id: int, worker: str = "w", lease_seconds: float = 60
          ) -> Claim | None:
    """Claim this one document through `claim_many` (the daemon's only claim path), every
    other queued document excluded; None when it is not due or someone else has it."""
    with ledger.engine.connect() as conn:
        others = list(conn.scalars(select(Document.id).where(
            Document.state == State.QUEUED, Document.id != document_id)))
    claims = ledger.claim_many(worker, lease_seconds, 1, others)
    assert not claims or claims[0].document_id == document_id
    return claims[0] if claims else None


def claim_next(ledger: Ledger, worker: str = "w", lease_seconds: float = 60,
               exclude: list[int] | None = None) -> Claim | None:
    """The oldest due queued document, as the pipeline's claim of one slot takes it."""
    claims = ledger.claim_many(worker, lease_seconds, 1, exclude or [])
    return claims[0] if claims else None


def paths_of(ledger: Ledger, document_id: int) -> tuple[str, ...]:
    """Every path the ledger knows the document under, in the order they were recorded."""
    from daemon.store.models import DocumentPath

    with ledger.engine.connect() as conn:
        return tuple(conn.scalars(select(DocumentPath.path).where(
            DocumentPath.document_id == document_id).order_by(DocumentPath.id)))


SettingsFactory = Callable[..., Settings]


# what onnxruntime raises for a GPU that fell off the bus
LOST_GPU = "CUDA error: unspecified launch failure (Xid 79: GPU has fallen off the bus)"


class DeviceEngine:
    """A stand-in for one GPU's engine: each page's text names the device that read it; a
    `lost` one raises as a GPU that fell off the bus does."""

    provider = "cuda"
    thread_safe = True

    def __init__(self, device: str, *, lost: bool = False, delay: float = 0.05) -> None:
        self.device = device
        self.lost = lost
        self.delay = delay
        self.pages = 0
        self.warmups = 0
        self._lock = threading.Lock()

    def recognize(self, images: Sequence[Image]) -> list[PageResult]:
        if self.lost:
            raise RuntimeError(LOST_GPU)
        time.sleep(self.delay)
        with self._lock:
            self.pages += len(images)
        box = ((0.0, 0.0), (1.0, 0.0), (1.0, 1.0), (0.0, 1.0))
        return [PageResult(lines=(Line(f"read on device {self.device}", 0.9, box),))
                for _ in images]

    def warmup(self) -> dict[str, float]:
        with self._lock:
            self.warmups += 1
        return {}

    def close(self) -> None:
        pass


def gpu_service(settings: Settings, engines: list[DeviceEngine]) -> Service:
    """The real service with these engines as its GPUs (two workers each, as on a GPU host)."""
    from daemon.service import Hardware

    devices = tuple(int(e.device) for e in engines)
    choice = ProviderChoice("cuda", reason="stand-in engines", devices=devices)
    svc = Service(settings, probe=lambda _settings: Hardware(choice, None, None),
                  build=lambda _s, _c, workers: [engines[k % len(engines)]
                                                 for k in range(workers)])
    svc.start()
    return svc


def mixed_pdf(specs: list[list[str] | None], scan_lines: list[str]) -> bytes:
    """Born-digital pages (their lines as a text layer) and, for None, a scanned page of
    `scan_lines` (an image rendered large enough to read at the daemon's defaults)."""
    import io

    import pypdfium2 as pdfium

    from tests.pages import render_page

    scans = [render_page(scan_lines, size=44, width=1100) for s in specs if s is None]
    buffer = io.BytesIO()
    scans[0].save(buffer, "PDF", resolution=100, save_all=True, append_images=scans[1:])
    scan_doc = pdfium.PdfDocument(buffer.getvalue())
    pdf = pdfium.PdfDocument.new()
    used = 0
    for index, spec in enumerate(specs):
        if spec is None:
            pdf.import_pages(scan_doc, [used], index=index)
            used += 1
        else:
            page = pdf.new_page(*LETTER)
            _add_text(pdf, page, spec)
            page.close()
    out = io.BytesIO()
    pdf.save(out)
    pdf.close()
    scan_doc.close()
    return out.getvalue()


# The daemon's own default engine; detection in "min" mode so small sizes keep tiny pages whole.
ENGINE_ENV = {"OCR_DAEMON_OCR__DET_LIMIT_TYPE": "min"}


# Tiny pages and a small detection size: OCR of one word takes tens of ms on one core.
FAST_ENV = {**ENGINE_ENV, "OCR_DAEMON_OCR__DET_LIMIT_SIDE_LEN": "64"}


FAST_OCR = {"det_limit_type": "min", "det_limit_side_len": 64}


REPO = Path(__file__).resolve().parents[1]
# the PostgreSQL server the tests create their databases on (README: `make test`)
PG_ADMIN_URL = os.environ.get(
    "OCR_DAEMON_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")


_FONT = ImageFont.load_default(size=20)


def tiny_page(word: str, fmt: str = "PNG") -> bytes:
    """A 96x32 image of one short word: distinct words give distinct content."""
    image = PILImage.new("L", (96, 32), 255)
    ImageDraw.Draw(image).text((4, 4), word, fill=0, font=_FONT)
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class DaemonProcess:
    """`ocr-daemon run` as a subprocess in `workdir`, restartable: the one harness for the
    end-to-end, fault, security and scale-out tests. By default its inbox and SQLite database
    are in `workdir` and its OCR is made fast (FAST_ENV); `on_defaults` runs it on the
    built-in defaults instead (./inbox and ./ocr-daemon.db, in `workdir`); `standin` runs
    tests/standin_daemon.py, a stand-in engine, in place of the real one."""

    def __init__(self, workdir: Path, env: dict[str, str] | None = None,
                 unprivileged: bool = False, *, on_defaults: bool = False,
                 standin: bool = False, log: Path | None = None) -> None:
        self.workdir = workdir
        self.inbox = workdir / "inbox"
        self.db_path = workdir / ("ocr-daemon.db" if on_defaults else "ocr.db")
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith("OCR_DAEMON_") and k != "FORCE_CPU"}
        self.env.update({
            "OCR_DAEMON_WATCH__SETTLE_SECONDS": "0.3" if on_defaults else "0.2",
            "OCR_DAEMON_METRICS__PORT": "0",
            "PYTHONUNBUFFERED": "1",
            # this tree's daemon, not whichever copy the interpreter has installed
            "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [
                os.environ.get("PYTHONPATH")])]),
        })
        if not on_defaults:
            self.env.update({"OCR_DAEMON_WATCH__PATH": str(self.inbox),
                             "OCR_DAEMON_DATABASE__URL": f"sqlite:///{self.db_path}",
                             **FAST_ENV})
        self.env.update(env or {})
        self.command = ([sys.executable, str(REPO / "tests" / "standin_daemon.py")] if standin
                        else [sys.executable, "-m", "daemon", "run"])
        self.unprivileged = unprivileged
        self.log = log or workdir / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return self.env["OCR_DAEMON_DATABASE__URL"]

    def start(self, wait_ready: bool = True) -> None:
        self.starts += 1
        with self.log.open("ab") as log:
            log.write(f"=== start {self.starts}\n".encode())
            self.proc = subprocess.Popen(
                [*(DROP_DAC if self.unprivileged else []), *self.command],
                cwd=self.workdir, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        if wait_ready:
            self.wait_for_log("ready", 90, since_start=True)

    def log_text(self, since_start: bool = False) -> str:
        content = self.log.read_text(errors="replace")
        if since_start:
            content = content.rsplit(f"=== start {self.starts}\n", 1)[-1]
        return content

    def wait_for_log(self, needle: str, timeout: float, since_start: bool = False) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            content = self.log_text(since_start)
            if needle in content:
                return content
            assert self.proc is not None and self.proc.poll() is None, content
            time.sleep(0.05)
        raise AssertionError(f"{needle!r} not logged:\n{self.log_text()}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def metrics_port(self) -> int:
        found = re.findall(r"metrics on http://[^:]+:(\d+)/metrics", self.log_text(True))
        assert found, self.log_text()
        return int(found[-1])

    def health(self) -> dict[str, Any]:
        url = f"http://127.0.0.1:{self.metrics_port()}/health"
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                body: dict[str, Any] = json.load(response)
        except urllib.error.HTTPError as exc:  # 503 still carries the JSON body
            body = json.load(exc)
        return body

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """`ocr-daemon ARGS` against this daemon's configuration, as an operator runs it."""
        return subprocess.run([sys.executable, "-m", "daemon", *args], cwd=self.workdir,
                              env=self.env, capture_output=True, text=True, timeout=60)

    def status(self) -> dict[str, int]:
        """`ocr-daemon status --json`'s documents by state."""
        result = self.cli("status", "--json")
        assert result.returncode == 0, result.stderr
        counts: dict[str, int] = json.loads(result.stdout)["documents"]
        return counts

    def cleanup(self) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.kill()
            self.proc.wait()


@dataclass(frozen=True)
class Row:
    id: int
    sha256: str
    state: str
    attempts: int
    page_count: int | None
    reason: str | None
    pages: tuple[int, ...]  # page numbers stored
    paths: tuple[str, ...]


def ledger_rows(url: str) -> dict[str, Row]:
    """Every document by sha256, with its stored page numbers and paths."""
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            docs = connection.execute(text(
                "SELECT id, sha256, state, attempts, page_count, reason FROM documents")).all()
            pages: dict[int, list[int]] = {}
            for doc_id, page_no in connection.execute(text(
                    "SELECT document_id, page_no FROM pages ORDER BY page_no")):
                pages.setdefault(doc_id, []).append(page_no)
            paths: dict[int, list[str]] = {}
            for doc_id, path in connection.execute(text(
                    "SELECT document_id, path FROM document_paths ORDER BY id")):
                paths.setdefault(doc_id, []).append(path)
    finally:
        engine.dispose()
    return {sha: Row(i, sha, state, attempts, count, reason, tuple(pages.get(i, ())),
                     tuple(paths.get(i, ())))
            for i, sha, state, attempts, count, reason in docs}


def count_states(url: str) -> dict[str, int]:
    engine = create_engine(url)
    found: dict[str, int] = {}
    try:
        with engine.connect() as connection:
            found = dict(connection.execute(text(
                "SELECT state, count(*) FROM documents GROUP BY state")).all())
    except Exception:  # the daemon has not created the tables yet
        pass
    finally:
        engine.dispose()
    return {state: int(found.get(state, 0))
            for state in ("queued", "processing", "done", "failed")}


def assert_nothing_half_written(rows: dict[str, Row]) -> None:
    """done <=> every page 1..page_count stored once; any other state: no pages at all."""
    for row in rows.values():
        if row.state == "done":
            assert row.page_count and row.pages == tuple(range(1, row.page_count + 1)), row
        else:
            assert row.pages == (), row


LETTER = (612.0, 792.0)  # points; 8.5 x 11 in


def _add_text(pdf: pdfium.PdfDocument, page: pdfium.PdfPage, lines: Sequence[str]) -> None:
    font = pdfium.PdfFont.load_standard(pdf, "Helvetica")
    y = 720.0
    for line in lines:
        obj = pdfium_c.FPDFPageObj_CreateTextObj(pdf, font, 12.0)
        wide = (line + "\0").encode("utf-16-le")
        utf16 = (ctypes.c_ushort * (len(wide) // 2)).from_buffer_copy(wide)
        assert pdfium_c.FPDFText_SetText(obj, utf16)
        pdfium_c.FPDFPageObj_Transform(obj, 1, 0, 0, 1, 72, y)
        assert pdfium_c.FPDFPage_InsertObject(page, obj)
        y -= 20.0
    page.gen_content()


def encrypted_pdf(user_password: bytes = b"secret", owner_password: bytes = b"owner") -> bytes:
    """A real 40-bit RC4 (Standard security handler, R2) PDF, per PDF 1.7 §7.6.3.

    The single page has no content, so no string or stream needs encrypting; the /O and /U
    entries are computed properly, so a reader given `user_password` opens it.
    """
    file_id = bytes(range(16))
    permissions = -44
    o_key = hashlib.md5((owner_password + _PAD)[:32]).digest()[:5]
    o_entry = _rc4(o_key, (user_password + _PAD)[:32])
    digest = hashlib.md5(
        (user_password + _PAD)[:32] + o_entry + struct.pack("<i", permissions) + file_id
    ).digest()
    u_entry = _rc4(digest[:5], _PAD)
    encrypt = b"<< /Filter /Standard /V 1 /R 2 /Length 40 /P %d /O <%s> /U <%s> >>" % (
        permissions, o_entry.hex().encode(), u_entry.hex().encode(),
    )
    ids = b"<%s>" % file_id.hex().encode()
    return _write_pdf([*ONE_EMPTY_PAGE, encrypt], b"/Encrypt 4 0 R /ID [%s %s]" % (ids, ids))


def looked_twice(watcher: Watcher, timeout: float = 10.0) -> bool:
    """Wait until two full scans have started after this call and a pass of the loop ended
    with nothing left settling after them: by then every file present now was reported,
    refused or ignored. What is not reported by then never will be (no fixed sleep)."""
    target = watcher.scans + 2  # a scan under way now may have missed the newest files
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if watcher.quiet_after_scan >= target:
            return True
        time.sleep(0.02)
    return False


Health = dict[str, Any]


def get(server: MetricsServer, path: str, accept: str | None = None) -> tuple[int, str, str]:
    request = urllib.request.Request(f"http://127.0.0.1:{server.port}{path}")
    if accept:
        request.add_header("Accept", accept)
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:
            return resp.status, resp.headers["Content-Type"], resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.headers["Content-Type"], err.read().decode()


def health(status: str = "healthy", queue_depth: int = 0) -> Health:
    return health_document(status=status, version="9.9.9", gpu_available=False, provider="cpu",
                           uptime=12.5, queue_depth=queue_depth, database="ok")


@contextlib.contextmanager
def pipeline_running(settings: Settings, engine: object, *, stop_seconds: float = 1.0
                     ) -> Iterator[tuple[Pipeline, Ledger, Watcher]]:
    """The real daemon (`Service`) on the CPU provider with `engine` as its one engine: its
    pipeline, ledger and watcher. Stopped on leaving, the documents in flight given
    `stop_seconds` (a test's stalled engine must not hold the stop for the default)."""
    from daemon.service import Hardware

    settings = settings.model_copy(update={"batch": settings.batch.model_copy(
        update={"stop_timeout_seconds": stop_seconds})})
    svc = Service(settings, probe=lambda _settings: Hardware(
        ProviderChoice("cpu", reason="a test's engine"), None, None),
        build=lambda _settings, _choice, _workers: [engine])
    svc.start()
    try:
        assert svc.components is not None
        yield svc.components.pipeline, svc.components.ledger, svc.components.watcher
    finally:
        svc.stop()


_PAD = bytes.fromhex("28BF4E5E4E758A4164004E56FFFA01082E2E00B6D0683E802F0CA9FE6453697A")


def _rc4(key: bytes, data: bytes) -> bytes:
    s = list(range(256))
    j = 0
    for i in range(256):
        j = (j + s[i] + key[i % len(key)]) % 256
        s[i], s[j] = s[j], s[i]
    i = j = 0
    out = bytearray()
    for byte in data:
        i = (i + 1) % 256
        j = (j + s[i]) % 256
        s[i], s[j] = s[j], s[i]
        out.append(byte ^ s[(s[i] + s[j]) % 256])
    return bytes(out)


def _write_pdf(objects: Sequence[bytes], trailer: bytes = b"") -> bytes:
    """Hand-written PDF syntax with a correct xref table."""
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R %s >>\nstartxref\n%d\n%%%%EOF\n" % (
        len(objects) + 1, trailer, xref,
    )
    return bytes(out)


CATALOG = b"<< /Type /Catalog /Pages 2 0 R >>"
ONE_EMPTY_PAGE = [
    CATALOG,
    b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
    b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] >>",
]


# Root reads anything (CAP_DAC_OVERRIDE); without these capabilities mode 000 means unreadable
# even for root, while the daemon still runs the interpreter under /root.
DROP_DAC = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"]


def die_holding_a_segment(size: int) -> None:
    """In a PDF worker: take a render segment, as a page being rendered does, and be killed
    before handing it over (the kernel's OOM killer, pdfium crashing)."""
    from daemon.documents.pdf_workers import new_segment

    new_segment(size).close()
    os.kill(os.getpid(), signal.SIGKILL)
