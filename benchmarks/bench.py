"""Throughput and accuracy of the OCR paths, side by side in one run. A script, not a test.

    python -m benchmarks bench --images ../shared/ocr-eval/sroie/img --limit 30 --modes a,b
    python -m benchmarks bench --render 12 --modes a,b,c
    python -m benchmarks bench --render 1000 --a4 --modes c

Modes (each runs in its own subprocess, so peak RSS is that mode's alone):
  a  naive loop: `RapidOCR()` once per page, on the CPU
  b  the batch engine alone, fed `--batch` pages per call
  c  the whole daemon end to end (`python -m daemon run` on a temporary inbox and SQLite
     database); latency is from the file's drop into the inbox to its text being stored; with
     `--rounds N` the files go in once to warm the daemon up (`first_round`), then N-1 more
     times at once, made new documents by a comment, and only those are timed
  d  the naive loop with RapidOCR's `EngineConfig.onnxruntime.use_cuda=True` (GPU only)
  e  the whole daemon end to end as c, on onnxruntime's CPU provider (FORCE_CPU=true,
     ocr.provider = cpu)
  f  the whole daemon end to end as c, on OpenVINO (FORCE_CPU=true, ocr.provider = openvino:
     bf16 where the CPU has it)

Modes b and c use the provider the daemon would choose (a GPU where there is one).

Ground truth, where it exists: SROIE `box/NAME.csv` beside `img/` (the text is what follows
the eighth comma), or `NAME.txt` beside `NAME.tif` (a `NAME-rotated-X.png` variant is scored
against `NAME.txt`). Scoring is bag of words: lower-cased, outer punctuation stripped,
micro-averaged precision/recall/F1 over all pages.

Prints ONE JSON object on stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import sqlite3
import statistics
import string
import struct
import subprocess
import sys
import tempfile
import threading
import time
import unicodedata
import zlib
from collections import Counter
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from benchmarks.common import REPO, find_images, machine

ALL_MODES = ("a", "b", "c", "d", "e", "f")
# the daemon modes: (FORCE_CPU, ocr.provider) of each; c as the daemon chooses
DAEMON_MODES: dict[str, tuple[bool, str | None]] = {"c": (False, None), "e": (True, "cpu"),
                                                    "f": (True, "openvino")}


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ------------------------------------------------------------------ data and scoring


def truth_for(image: Path) -> str | None:
    box = image.parent.parent / "box" / f"{image.stem}.csv"
    if image.parent.name == "img" and box.is_file():
        rows = box.read_text(encoding="utf-8", errors="replace").splitlines()
        return "\n".join(row.split(",", 8)[8] for row in rows if row.count(",") >= 8)
    for stem in (image.stem, image.stem.split("-rotated")[0]):
        txt = image.with_name(f"{stem}.txt")
        if txt.is_file():
            return txt.read_text(encoding="utf-8", errors="replace")
    return None


def _is_punct(char: str) -> bool:
    return char in string.punctuation or unicodedata.category(char).startswith("P")


# Han characters (CJK Unified Ideographs, Extension A, Compatibility) and kana: scripts written
# without spaces, so each character is a word of its own for the bag-of-words score
_CJK = re.compile(r"([\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff])")


def words(text: str) -> Counter[str]:
    """The bag of words a text holds: lower-cased, split at spaces and around every CJK
    character, punctuation stripped from each end."""
    bag: Counter[str] = Counter()
    for token in _CJK.sub(r" \1 ", text).lower().split():
        start, end = 0, len(token)
        while start < end and _is_punct(token[start]):
            start += 1
        while end > start and _is_punct(token[end - 1]):
            end -= 1
        if start < end:
            bag[token[start:end]] += 1
    return bag


def score(pairs: list[tuple[str, str]]) -> dict[str, float] | None:
    """Micro-averaged bag-of-words precision/recall/F1 over (predicted, truth) pairs."""
    if not pairs:
        return None
    hits = predicted = expected = 0
    for text, truth in pairs:
        got, want = words(text), words(truth)
        hits += sum((got & want).values())
        predicted += sum(got.values())
        expected += sum(want.values())
    precision = hits / predicted if predicted else 0.0
    recall = hits / expected if expected else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": round(precision, 4), "recall": round(recall, 4), "f1": round(f1, 4),
            "pages": len(pairs)}


def source_images(args: argparse.Namespace, tmp: Path) -> list[Path]:
    """The pages a script's `--images DIR` or `--render N [--a4 | --zh]` (rendered into `tmp`)
    name, at most `--limit`."""
    if args.render and getattr(args, "zh", False):
        render_zh_dataset(args.render, tmp)
        return find_images(tmp, args.limit)
    if args.render:
        render_dataset(args.render, tmp, a4=args.a4)
        return find_images(tmp, args.limit)
    if args.images:
        return find_images(args.images, args.limit)
    raise SystemExit("give --images DIR or --render N")


def render_dataset(count: int, folder: Path, *, a4: bool = False, pdf: bool = False) -> None:
    """Pages rendered with Pillow's scalable font, each with a NAME.txt ground truth: small
    pages of 8-27 lines as PNG, or (`a4`) dense A4 pages as a 300-dpi scanner writes them
    (grey JPEG, or with `pdf` that JPEG as a one-page PDF)."""
    folder.mkdir(parents=True, exist_ok=True)
    if a4:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(os.cpu_count()) as pool:  # ~0.1 s a page: 1,000 on 16 cores
            list(pool.map(_render_a4, range(count), [folder] * count, [pdf] * count,
                          chunksize=8))
        return
    from PIL import Image as PILImage

    from tests.rendering import random_lines, render_page

    for i in range(count):
        lines = random_lines(1000 + i, 8 + (i * 7) % 20)
        page = render_page(lines, width=700 + (i * 137) % 900, font_size=18 + (i * 5) % 22)
        PILImage.fromarray(page[:, :, ::-1]).save(folder / f"page{i:03d}.png")
        (folder / f"page{i:03d}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


A4_300_DPI = (2480, 3508)

# Traditional Chinese as receipts, invoices and forms in Taiwan and Hong Kong print it: lines of
# a few words run together (no spaces), some with an amount, a date or a code
ZH_WORDS = (
    "統一發票", "電子發票證明聯", "營業人統編", "交易明細", "品名", "數量", "單價", "金額",
    "小計", "總計", "合計", "現金", "找零", "信用卡", "悠遊卡", "發票號碼", "隨機碼", "賣方",
    "買方", "地址", "電話", "臺北市", "新北市", "臺中市", "高雄市", "中正區", "大安區",
    "信義區", "忠孝東路", "復興南路", "民生東路", "鮮奶", "豆漿", "燒餅", "油條", "便當",
    "咖啡", "紅茶", "綠茶", "麵包", "蛋糕", "礦泉水", "衛生紙", "洗髮精", "牙膏", "電池",
    "雜誌", "報紙", "會員", "點數", "優惠", "折扣", "退貨", "請保留收據", "謝謝光臨",
    "歡迎再度光臨", "營業時間", "服務專線", "訂單編號", "出貨日期", "應付金額", "稅額",
    "含稅", "備註", "經手人", "簽收", "客戶名稱", "聯絡人", "傳真", "銀行", "帳號", "匯款",
    "轉帳", "繳費期限", "診所", "藥局", "處方", "劑量", "門診", "掛號費", "健保", "圖書館",
    "借閱", "歸還", "書籍", "檔案", "掃描", "辨識", "文件", "頁數", "區公所", "戶籍謄本",
    "證明書", "申請書", "身分證", "香港", "九龍", "灣仔", "銅鑼灣", "尖沙咀", "彌敦道",
    "樓層", "號碼", "營業額", "發貨單", "報價單", "請款單", "說明", "檢驗", "維修", "運費",
)
# CJK fonts Debian installs (fonts-noto-cjk, fonts-arphic-uming): (path, face name)
ZH_FONTS = (
    ("/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc", "Noto Sans CJK TC"),
    ("/usr/share/fonts/opentype/noto/NotoSerifCJK-Regular.ttc", "Noto Serif CJK TC"),
    ("/usr/share/fonts/truetype/arphic/uming.ttc", "AR PL UMing TW"),
)


def zh_lines(seed: int, count: int) -> list[str]:
    """`count` lines of Traditional Chinese: 2-5 words, half with an amount, a date or a code."""
    import random

    rng = random.Random(seed)
    lines = []
    for _ in range(count):
        line = "".join(rng.choice(ZH_WORDS) for _ in range(rng.randint(2, 5)))
        extra = rng.random()
        if extra < 0.25:
            line += f" NT${rng.randint(10, 9999)}"
        elif extra < 0.4:
            line += f" {rng.randint(2019, 2026)}/{rng.randint(1, 12):02d}/{rng.randint(1, 28):02d}"
        elif extra < 0.5:
            line += f" {rng.choice('ABCDEFGHKMPQRTXYZ')}{rng.choice('ABCDEFGHKMPQRTXYZ')}-" \
                    f"{rng.randint(0, 99999999):08d}"
        lines.append(line)
    return lines


def zh_fonts() -> list[tuple[str, int]]:
    """(path, face index) of each Traditional Chinese face of ZH_FONTS on this machine."""
    from PIL import ImageFont

    found = []
    for path, name in ZH_FONTS:
        for index in range(16):
            try:
                font = ImageFont.truetype(path, 20, index=index)
            except OSError:
                break
            if font.getname()[0] == name:
                found.append((path, index))
                break
    if not found:
        raise SystemExit("no Traditional Chinese font: install Debian's fonts-noto-cjk or "
                         "fonts-arphic-uming")
    return found


def render_zh_dataset(count: int, folder: Path) -> None:
    """Traditional Chinese pages of 8-27 lines, each with its NAME.txt ground truth, in the CJK
    faces found (`zh_fonts`) taken in turn, at 14-35 px; every other page made to look scanned
    (turned by up to 1.5 degrees, blurred, grain added, saved as a JPEG of quality 50), the rest
    clean PNGs."""
    import numpy as np
    from PIL import Image as PILImage
    from PIL import ImageFilter, ImageFont

    from tests.rendering import render_page

    folder.mkdir(parents=True, exist_ok=True)
    fonts = zh_fonts()
    for i in range(count):
        lines = zh_lines(3000 + i, 8 + (i * 7) % 20)
        size = 14 + (i * 5) % 22
        path, index = fonts[i % len(fonts)]
        font = ImageFont.truetype(path, size, index=index)
        width = max(700, int(max(font.getlength(line) for line in lines)) + 80)
        page = PILImage.fromarray(render_page(lines, width=width, font_size=size,
                                              font=font)[:, :, ::-1])
        if i % 2:
            page = page.convert("L").rotate(((i * 37) % 31 - 15) / 10, expand=True,
                                            resample=PILImage.BICUBIC, fillcolor=255)
            page = page.filter(ImageFilter.GaussianBlur(0.7))
            grain = np.random.default_rng(i).normal(0, 12, (page.height, page.width))
            pixels = np.clip(np.asarray(page, np.float32) + grain, 0, 255).astype(np.uint8)
            PILImage.fromarray(pixels).save(folder / f"zh{i:03d}.jpg", quality=50)
        else:
            page.save(folder / f"zh{i:03d}.png")
        (folder / f"zh{i:03d}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _render_a4(i: int, folder: Path, pdf: bool = False) -> None:
    """One dense A4 page at 300 dpi: ~45 lines of 11-point text (46 px), grey JPEG (in a PDF
    with `pdf`)."""
    from PIL import Image as PILImage

    from tests.rendering import random_lines, render_page

    width, height = A4_300_DPI
    lines = random_lines(5000 + i, 44, words_per_line=(9, 13))
    rendered = render_page(lines, width=width, font_size=46, margin=200, line_gap=22)
    page = PILImage.new("L", A4_300_DPI, 255)
    page.paste(PILImage.fromarray(rendered[: min(height, rendered.shape[0]), :, 1]), (0, 0))
    if pdf:
        page.save(folder / f"a4-{i:04d}.pdf", "PDF", resolution=300)
    else:
        page.save(folder / f"a4-{i:04d}.jpg", quality=90, dpi=(300, 300))
    (folder / f"a4-{i:04d}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


# ------------------------------------------------------------------ resource probes


class GpuMemoryProbe:
    """Peak GPU memory while a mode runs: this process tree's use per NVML, else the device's
    used memory above what it was at the start. `peak_bytes` is None without NVML or GPU."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.peak_bytes: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml: Any = pynvml
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            self._base = pynvml.nvmlDeviceGetMemoryInfo(self._handle).used
            self.peak_bytes = 0
        except Exception:
            self._nvml = None

    def _sample(self) -> None:
        nvml = self._nvml
        try:
            procs = nvml.nvmlDeviceGetComputeRunningProcesses(self._handle)
            mine = [p.usedGpuMemory or 0 for p in procs if p.pid in self.pids]
            used = sum(mine) if mine else (
                nvml.nvmlDeviceGetMemoryInfo(self._handle).used - self._base
            )
        except Exception:
            return
        self.peak_bytes = max(self.peak_bytes or 0, int(used))

    def __enter__(self) -> GpuMemoryProbe:
        if self._nvml is not None:
            def loop() -> None:
                while not self._stop.wait(0.1):
                    self._sample()

            self._thread = threading.Thread(target=loop, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._sample()


def gpu_present() -> bool:
    try:
        import pynvml

        pynvml.nvmlInit()
        return bool(pynvml.nvmlDeviceGetCount())
    except Exception:
        return False


def run_child(argv: list[str], env: dict[str, str] | None = None) -> tuple[str, int, int, float]:
    """Run a child to completion: (stdout, exit status, its peak RSS in bytes, CPU seconds).

    CPU seconds (user + system) are steadier than wall time on a shared machine."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, env=env)
    assert proc.stdout is not None
    out = proc.stdout.read().decode()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return out, proc.returncode, usage.ru_maxrss * 1024, usage.ru_utime + usage.ru_stime


# ------------------------------------------------------------------ the modes (in a child)


def ocr_settings(args: argparse.Namespace) -> Any:
    from daemon.config import OcrSettings

    return OcrSettings(
        use_cls=args.use_cls,
        det_limit_side_len=args.det_limit_side_len,
        det_limit_type=args.det_limit_type,
    )


def load_pages(path: Path, ocr: Any) -> list[Any]:
    """The pages as the daemon decodes them for OCR (large JPEGs smaller)."""
    from daemon.documents.decode import iter_pages
    from daemon.ocr.models import page_bound

    return [page.image for page in iter_pages(path.read_bytes(), ocr, bound=page_bound(ocr))
            if page.image is not None]


def mode_naive(args: argparse.Namespace, images: list[Path], cuda: bool) -> dict[str, Any]:
    from rapidocr import RapidOCR

    from daemon.hardware.providers import CPU, ProviderChoice
    from daemon.ocr.rapid import rapidocr_params, to_page_result

    ocr = ocr_settings(args)
    choice = ProviderChoice("cuda") if cuda else CPU
    start = time.perf_counter()
    engine = RapidOCR(params=rapidocr_params(ocr, choice))
    engine(load_pages(images[0], ocr)[0])  # RapidOCR loads its models lazily, on first use
    load_s = time.perf_counter() - start
    texts: list[str | None] = []
    latencies: list[float] = []
    pages, decode_s = 0, 0.0
    start = time.perf_counter()
    for path in images:
        if args.mode_seconds and time.perf_counter() - start > args.mode_seconds:
            break
        t0 = time.perf_counter()
        frames = load_pages(path, ocr)
        decode_s += time.perf_counter() - t0
        doc = []
        for frame in frames:
            t1 = time.perf_counter()
            doc.append(to_page_result(engine(frame), 0.0).text)
            latencies.append(time.perf_counter() - t1 + (t1 - t0) / len(frames))
        texts.append("\n".join(doc))
        pages += len(frames)
    seconds = time.perf_counter() - start
    done = len(texts)
    texts += [None] * (len(images) - done)  # not reached within --mode-seconds: not scored
    return {"texts": texts, "latencies": latencies, "pages": pages, "seconds": seconds,
            "load_seconds": load_s, "decode_seconds": decode_s, "files_done": done}


def mode_batch(args: argparse.Namespace, images: list[Path]) -> dict[str, Any]:
    from daemon.config import Settings
    from daemon.hardware.providers import CPU, choose_provider
    from daemon.ocr.batch import BatchEngine

    ocr = ocr_settings(args)
    start = time.perf_counter()
    choice = choose_provider(Settings(ocr=ocr)) if args.provider == "auto" else CPU
    engine = BatchEngine(ocr, choice, max_pages=args.batch)
    if engine.provider != "cpu":
        engine.warmup()  # as the daemon does on a GPU
    load_s = time.perf_counter() - start
    owners: list[int] = []
    frames: list[Any] = []
    stage: Counter[str] = Counter()
    texts: list[list[str]] = [[] for _ in images]
    latencies: list[float] = []
    decode_s = 0.0
    start = time.perf_counter()

    def flush() -> None:
        t0 = time.perf_counter()
        results = engine.recognize(frames)
        took = time.perf_counter() - t0
        for owner, result in zip(owners, results, strict=True):
            texts[owner].append(result.text)
            latencies.append(took)
            stage.update(result.timings)
        owners.clear()
        frames.clear()

    done = len(images)
    for index, path in enumerate(images):
        if args.mode_seconds and time.perf_counter() - start > args.mode_seconds:
            done = index
            break
        t0 = time.perf_counter()
        for frame in load_pages(path, ocr):
            frames.append(frame)
            owners.append(index)
        decode_s += time.perf_counter() - t0
        if len(frames) >= args.batch:
            flush()
    if frames:
        flush()
    seconds = time.perf_counter() - start
    engine.close()
    return {"texts": ["\n".join(t) if k < done else None for k, t in enumerate(texts)],
            "latencies": latencies, "pages": len(latencies), "seconds": seconds,
            "load_seconds": load_s, "decode_seconds": decode_s, "files_done": done,
            "stage_seconds": {k: round(v, 3) for k, v in stage.items()}}


def worker_main(args: argparse.Namespace) -> None:
    images = [Path(p) for p in json.loads(Path(args.worker_files).read_text())]
    probe = GpuMemoryProbe([os.getpid()])
    with probe:
        if args.worker == "a":
            result = mode_naive(args, images, cuda=False)
        elif args.worker == "d":
            result = mode_naive(args, images, cuda=True)
        else:
            result = mode_batch(args, images)
    result["gpu_peak_bytes"] = probe.peak_bytes
    print(json.dumps(result))


# ------------------------------------------------------------------ mode c: the daemon


def daemon_env(inbox: Path, db: Path, args: argparse.Namespace, *, force_cpu: bool = False,
               provider: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("OCR_DAEMON_") and k != "FORCE_CPU"}
    if force_cpu:
        env["FORCE_CPU"] = "true"
    if provider is not None:
        env["OCR_DAEMON_OCR__PROVIDER"] = provider
    env.update({
        "OCR_DAEMON_WATCH__PATH": str(inbox),
        "OCR_DAEMON_DATABASE__URL": f"sqlite:///{db}",
        "OCR_DAEMON_METRICS__PORT": "0",
        "OCR_DAEMON_WATCH__SETTLE_SECONDS": "0.2",
        "OCR_DAEMON_OCR__USE_CLS": str(args.use_cls).lower(),
        "OCR_DAEMON_OCR__DET_LIMIT_SIDE_LEN": str(args.det_limit_side_len),
        "OCR_DAEMON_OCR__DET_LIMIT_TYPE": args.det_limit_type,
        "OCR_DAEMON_BATCH__MAX_PAGES": str(args.batch),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(args.daemon_root),
                                                    os.environ.get("PYTHONPATH")])),
    })
    for setting in args.set or []:  # --set ocr.cudnn_conv_algo_search=DEFAULT
        key, equals, value = setting.partition("=")
        section, _, name = key.partition(".")
        if not (equals and section and name):
            raise SystemExit(f"--set wants SECTION.KEY=VALUE, got {setting!r}")
        env[f"OCR_DAEMON_{section.upper()}__{name.upper()}"] = value
    return env


def texts_from_db(db: Path, paths: list[str]) -> list[str]:
    """The stored text of each path (as `ocr-daemon text` prints it, pages in order), read
    from the ledger in this process: one query, where a `python -m daemon text` process each
    cost ~1 s a document (100 s for the receipts, 1,000 s for an A4 run)."""
    from daemon.results import join_pages

    found: dict[str, list[str]] = {path: [] for path in paths}
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30) as conn:
        marks = ",".join("?" * len(paths))
        for path, text in conn.execute(
                "SELECT dp.path, p.text FROM document_paths dp JOIN pages p "
                f"ON p.document_id = dp.document_id WHERE dp.path IN ({marks}) "
                "ORDER BY dp.path, p.page_no", paths):
            found[path].append(text)
    return [join_pages(found[path]) for path in paths]


def ledger_counts(db: Path) -> dict[str, int] | None:
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
            rows = dict(conn.execute("SELECT state, count(*) FROM documents GROUP BY state"))
            pages = conn.execute("SELECT count(*) FROM pages").fetchone()[0]
    except sqlite3.Error:
        return None
    counts = {state: int(rows.get(state, 0)) for state in
              ("queued", "processing", "done", "failed")}
    counts["pages"] = int(pages)
    return counts


def latencies_from_db(db: Path, dropped: dict[str, float]) -> list[float] | None:
    """finished_at - drop time per file, if the ledger's tables are the ones we know."""
    try:
        with sqlite3.connect(db) as conn:
            rows = conn.execute(
                "SELECT p.path, d.finished_at FROM documents d "
                "JOIN document_paths p ON p.document_id = d.id WHERE d.finished_at IS NOT NULL"
            ).fetchall()
    except sqlite3.Error:
        return None
    out = []
    for path, finished in rows:
        name = Path(path).name
        if name in dropped and finished:
            at = datetime.fromisoformat(str(finished))
            stamp = at.timestamp() if at.tzinfo else at.replace(tzinfo=None).timestamp()
            out.append(stamp - dropped[name])
    return out or None


class DaemonRun:
    """One `python -m daemon run` on a temporary inbox and SQLite ledger, fed files in
    batches while it runs (`feed`): modes c, e and f take one daemon for one set of files, the GPU
    check (gpu_check.py) takes the same warm daemon through the receipts and then A4 pages."""

    def __init__(self, args: argparse.Namespace, *, force_cpu: bool = False,
                 provider: str | None = None) -> None:
        self.args = args
        self.force_cpu = force_cpu
        self.provider = provider
        self.tmp = Path(tempfile.mkdtemp(prefix="ocr-bench-"))
        self.inbox, self.db = self.tmp / "inbox", self.tmp / "db.sqlite"
        self.log = self.tmp / "daemon.log"
        self.inbox.mkdir()
        self.completions: list[float] = []  # when each finished document was seen
        self.proc: subprocess.Popen[bytes] | None = None
        self.provider_used: dict[str, str] | None = None  # what its "ready:" line says

    def start(self, timeout: float = 600) -> float:
        """Start the daemon and wait for "ready:" (models loaded; a GPU warms on meanwhile);
        returns the seconds that took."""
        env = daemon_env(self.inbox, self.db, self.args, force_cpu=self.force_cpu,
                         provider=self.provider)
        command = [sys.executable, "-m", "daemon", "run"]
        if self.args.gil:  # the same daemon, run by the GIL probe (benchmarks/gil_probe.py)
            env["OCR_GIL_PROBE_OUT"] = str(self.tmp / "gil.json")
            command = [sys.executable, str(Path(__file__).with_name("gil_probe.py")), "daemon",
                       "run"]
        start = time.monotonic()
        self.proc = subprocess.Popen(command, env=env, cwd=self.args.daemon_root,
                                     stdout=subprocess.DEVNULL,
                                     stderr=open(self.log, "wb"))  # noqa: SIM115
        while "ready:" not in self.log.read_text(errors="replace"):
            if self.proc.poll() is not None or time.monotonic() - start > timeout:
                raise RuntimeError(f"daemon did not start; see {self.log}")
            time.sleep(0.2)
        found = re.search(r"ready: provider (\S+) \((.*)\), \d+ worker",
                          self.log.read_text(errors="replace"))
        self.provider_used = {"name": found[1], "reason": found[2]} if found else None
        return time.monotonic() - start

    def wait_warm(self, timeout: float) -> dict[str, Any]:
        """Wait (at most `timeout` s) for a GPU daemon's background warm-up to end, read
        from its log: {"state": "done" | "failed" | "none (not an NVIDIA GPU)" |
        "still warming",
        "waited_s": ...}."""
        start = time.monotonic()
        while True:
            text = self.log.read_text(errors="replace")
            state = ("done" if "warmed up every shape bucket" in text
                     else "failed" if "warm-up failed" in text
                     else "none (not an NVIDIA GPU)" if re.search(
                         r"ready: provider (cpu|openvino) ", text)
                     else None)
            if state or time.monotonic() - start >= timeout or self._proc().poll() is not None:
                return {"state": state or "still warming",
                        "waited_s": round(time.monotonic() - start, 1)}
            time.sleep(0.2)

    def counts(self) -> dict[str, int]:
        counts = ledger_counts(self.db) or {"done": 0, "failed": 0, "pages": 0}
        return {"finished": counts["done"] + counts["failed"], "failed": counts["failed"],
                "pages": counts["pages"]}

    def feed(self, images: list[Path], tags: Sequence[int] = (0,), *,
             timeout: float | None = None) -> dict[str, Any]:
        """Drop every image once per tag, all at once (tag 0: the file as it is; n > 0: a copy
        made a new document, `r{n}-NAME`), and wait until they are all stored or failed, or
        `timeout` (then `timed_out` and the figures cover what was stored). Texts are those
        of the tag-0 files (None for others), read from the ledger in this process."""
        base = self.counts()
        dropped: dict[str, float] = {}
        start = time.perf_counter()
        for tag in tags:
            for path in images:
                drop(path, self.inbox, f"r{tag}-{path.name}" if tag else path.name, dropped,
                     tag=tag)
        total = base["finished"] + len(images) * len(tags)
        timed_out = wait_stored(self.db, total, self._proc(), start,
                                        self.args.timeout if timeout is None else timeout,
                                        self.completions)
        seconds = time.perf_counter() - start
        texts: list[str | None] = [None] * len(images)
        if 0 in tags:
            texts = list(texts_from_db(self.db, [str(self.inbox / path.name)
                                                 for path in images]))
        latencies = latencies_from_db(self.db, dropped)
        source = "database"
        if latencies is None:  # fall back: the n-th completion seen belongs to the n-th drop
            drops = sorted(dropped.values())
            seen = self.completions[base["finished"]:]
            latencies = [c - d for c, d in zip(seen, drops, strict=False)]
            source = "status-polling"
        counts = self.counts()
        out: dict[str, Any] = {
            "texts": texts, "latencies": latencies, "latency_source": source,
            "pages": counts["pages"] - base["pages"], "seconds": seconds,
            "files": len(images) * len(tags),
            "failed": counts["failed"] - base["failed"]}
        if timed_out:
            out["timed_out"] = {"after_s": round(seconds, 1),
                                "files_finished": counts["finished"] - base["finished"]}
        return out

    def stop(self) -> tuple[int | None, float | None]:
        """Stop the daemon (its log kept in --log-dir); its peak RSS and CPU seconds."""
        rss: int | None = None
        cpu: float | None = None
        if self.proc is not None:
            self.proc.terminate()
            deadline = time.monotonic() + 30  # reaped here, by wait4, for its rusage
            try:
                while True:
                    pid, _, usage = os.wait4(self.proc.pid, os.WNOHANG)
                    if pid:
                        rss, cpu = usage.ru_maxrss * 1024, usage.ru_utime + usage.ru_stime
                        break
                    if time.monotonic() > deadline:
                        self.proc.kill()
                        deadline = float("inf")
                    time.sleep(0.05)
            except ChildProcessError:
                pass
            self.proc.returncode = self.proc.returncode or 0
        if self.args.log_dir is not None:  # the daemon's own account, kept for a failed run
            self.args.log_dir.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(self.log, self.args.log_dir / (
                f"daemon-{self.provider or ('cpu' if self.force_cpu else 'auto')}-"
                f"{self.tmp.name}.log"))
        shutil.rmtree(self.tmp, ignore_errors=True)
        return rss, cpu

    def _proc(self) -> subprocess.Popen[bytes]:
        if self.proc is None:
            raise RuntimeError("the daemon has not started")
        return self.proc


def mode_daemon(args: argparse.Namespace, images: list[Path], *, force_cpu: bool = False,
                provider: str | None = None) -> dict[str, Any]:
    run = DaemonRun(args, force_cpu=force_cpu, provider=provider)
    gil: dict[str, Any] | None = None
    probe = None
    try:
        run.start()
        probe = GpuMemoryProbe([run._proc().pid])
        with probe:
            out = run.feed(images)
            first: dict[str, Any] = {}
            if args.rounds > 1:  # that round warmed the daemon up: the rest at once, timed
                first = {"pages": out["pages"], "seconds": out["seconds"]}
                texts = out["texts"]
                gil_start(run._proc(), run.tmp, args)
                out = run.feed(images, range(2, args.rounds + 1))
                out["texts"] = texts
                gil = gil_stop(run._proc(), run.tmp, args, out["pages"])
    finally:
        rss, cpu = run.stop()
    if "timed_out" in out:
        raise RuntimeError(f"timed out: {out['timed_out']}")
    out.update({"daemon_peak_rss_bytes": rss, "cpu_seconds": cpu,
                "gpu_peak_bytes": probe.peak_bytes if probe else None})
    if gil is not None:
        out["gil"] = gil
    if first:
        out["first_round"] = {"pages": first["pages"], "seconds": round(first["seconds"], 3),
                              "pages_per_s": round(first["pages"] / first["seconds"], 4)}
        out["rounds_timed"] = args.rounds - 1
        out["pages_stored"] = first["pages"] + out["pages"]  # what cpu_seconds was spent on
    return out


def gil_start(daemon: subprocess.Popen[bytes], tmp: Path, args: argparse.Namespace) -> None:
    """With --gil: the probe in the daemon starts sampling (its main thread acknowledges
    within ~0.5 s, the timed round waits for that)."""
    if not args.gil or (tmp / "gil.json").exists():  # no probe there: the reason is written
        return
    _signal_until(daemon, signal.SIGUSR1, tmp / "gil.json.started", "start")


def gil_stop(daemon: subprocess.Popen[bytes], tmp: Path, args: argparse.Namespace,
             pages: int) -> dict[str, Any] | None:
    """With --gil: the GIL's holders in the daemon over the timed rounds, in ms a page."""
    if not args.gil:
        return None
    from benchmarks.gil_probe import Sampled

    out = tmp / "gil.json"
    if (tmp / "gil.json.started").exists():
        _signal_until(daemon, signal.SIGUSR2, out, "report")
    data = json.loads(out.read_text())
    if "unavailable" in data:
        return data
    return Sampled.from_json(data).figures(pages)


def _signal_until(daemon: subprocess.Popen[bytes], signum: int, appears: Path,
                  what: str) -> None:
    daemon.send_signal(signum)
    deadline = time.monotonic() + 10
    while not appears.exists():
        if time.monotonic() > deadline or daemon.poll() is not None:
            raise RuntimeError(f"the daemon's GIL probe did not {what}")
        time.sleep(0.02)


def drop(path: Path, inbox: Path, name: str, dropped: dict[str, float], tag: int = 0) -> None:
    """Copy `path` into `inbox` as `name`, atomically (a hidden .part renamed, as a scanner
    should); `tag` > 0 makes the copy a new document with the same pixels (`tagged`)."""
    part = inbox / f".{name}.part"  # ignored until renamed
    part.write_bytes(tagged(path, tag))
    part.rename(inbox / name)
    dropped[name] = time.time()


def tagged(path: Path, tag: int) -> bytes:
    """`path`'s bytes; `tag` > 0: a new document with the same pixels, so the ledger (which
    knows files by their SHA-256) does not take it for the one already stored. A JPEG comment
    or a PNG text chunk saying the round; a TIFF's IFDs point at absolute offsets, so bytes
    after them are read by nobody."""
    data = path.read_bytes()
    if not tag:
        return data
    note = f"ocr-daemon benchmark round {tag}".encode()
    if data[:2] == b"\xff\xd8":
        return data[:2] + b"\xff\xfe" + struct.pack(">H", len(note) + 2) + note + data[2:]
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        body = b"tEXt" + b"Comment\x00" + note
        chunk = struct.pack(">I", len(body) - 4) + body + struct.pack(">I", zlib.crc32(body))
        end_ihdr = 8 + 8 + 13 + 4
        return data[:end_ihdr] + chunk + data[end_ihdr:]
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return data + note
    raise SystemExit(f"copies of one page need JPEG, PNG or TIFF files, not {path.name}")


def wait_stored(db: Path, total: int, daemon: subprocess.Popen[bytes], start: float,
                timeout: float, completions: list[float]) -> bool:
    """Wait until `total` documents are done or failed, or `timeout` s after `start`
    (perf_counter): True if it timed out. Appends the time each completion was seen to
    `completions`."""
    while True:
        # read the ledger in-process: a `status` subprocess four times a second would take a
        # good part of a 2-core machine away from the daemon being measured
        counts = ledger_counts(db)
        if counts is not None:
            finished = counts["done"] + counts["failed"]
            completions += [time.time()] * (finished - len(completions))
            if finished >= total:
                return False
        if daemon.poll() is not None:
            raise RuntimeError("daemon exited; see its log")
        if time.perf_counter() - start > timeout:
            return True
        time.sleep(0.05)


# ------------------------------------------------------------------ the parent


def summarise(mode: str, raw: dict[str, Any], rss: int | None, truths: list[str | None],
              names: list[str] | None = None) -> dict[str, Any]:
    lat = sorted(raw["latencies"])
    pairs = [(t, g) for t, g in zip(raw["texts"], truths, strict=True)
             if g is not None and t is not None]  # None: a file a mode did not reach
    out: dict[str, Any] = {
        "pages": raw["pages"],
        "seconds": round(raw["seconds"], 3),
        "pages_per_s": round(raw["pages"] / raw["seconds"], 4) if raw["seconds"] else None,
        "p50_s": round(statistics.median(lat), 3) if lat else None,
        "p95_s": round(lat[min(len(lat) - 1, int(0.95 * len(lat)))], 3) if lat else None,
        "peak_rss_bytes": rss,
        "peak_gpu_bytes": raw.get("gpu_peak_bytes"),
        "bow": score(pairs),
    }
    if names is not None:
        out["per_file"] = {
            name: score([(text, truth)])
            for name, text, truth in zip(names, raw["texts"], truths, strict=True)
            if truth is not None and text is not None
        }
    if raw.get("cpu_seconds") is not None:
        out["cpu_seconds"] = round(raw["cpu_seconds"], 2)
        stored = raw.get("pages_stored", raw["pages"])  # every round's, with --rounds
        out["cpu_seconds_per_page"] = round(raw["cpu_seconds"] / max(1, stored), 3)
    for key in ("load_seconds", "decode_seconds", "stage_seconds", "latency_source", "failed",
                "files_done", "first_round", "rounds_timed", "pages_stored", "gil"):
        if key in raw:
            out[key] = raw[key]
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--images", type=Path, help="folder of images (with ground truth)")
    source.add_argument("--render", type=int, metavar="N", help="benchmark N rendered pages")
    parser.add_argument("--a4", action="store_true",
                        help="with --render: dense 300-dpi A4 pages (grey JPEG) instead")
    parser.add_argument("--zh", action="store_true",
                        help="with --render: Traditional Chinese pages instead (scored a "
                             "character a word)")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--modes", default=",".join(ALL_MODES))
    parser.add_argument("--batch", type=int, default=4, help="pages per engine call (b, c)")
    parser.add_argument("--use-cls", action=argparse.BooleanOptionalAction, default=False)
    from daemon.config import OcrSettings

    defaults = OcrSettings()  # the daemon's own defaults unless told otherwise
    parser.add_argument("--det-limit-side-len", type=int, default=defaults.det_limit_side_len)
    parser.add_argument("--det-limit-type", choices=("min", "max"),
                        default=defaults.det_limit_type)
    parser.add_argument("--provider", choices=("auto", "cpu"), default="auto",
                        help="mode b: the daemon's provider choice, or the CPU")
    parser.add_argument("--per-file", action="store_true", help="also score each file alone")
    parser.add_argument("--daemon-root", type=Path, default=REPO,
                        help="checkout whose `python -m daemon` mode c runs")
    parser.add_argument("--timeout", type=float, default=3600, help="mode c: give up after")
    parser.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                        help="modes c, e, f: a daemon setting (repeatable)")
    parser.add_argument("--log-dir", type=Path, help="modes c, e, f: keep the daemon's log here")
    parser.add_argument("--gil", action="store_true",
                        help="modes c, e, f with --rounds 2+: the daemon run by "
                             "benchmarks/gil_probe.py, how long each kind of its threads held "
                             "the GIL a page over the timed rounds (`gil`)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="modes c, e, f: drop the files once to warm the daemon up, then "
                             "ROUNDS-1 more times at once (copies made new documents by a "
                             "comment), timing those: steady throughput on a fast device")
    parser.add_argument("--mode-seconds", type=float, default=0,
                        help="modes a, b, d: take no new file after this long (0: no limit); "
                             "their figures then cover the files done (files_done)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-files", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.gil and args.rounds < 2:
        parser.error("--gil samples the timed rounds: it wants --rounds 2 or more")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker_main(args)
        return 0
    # stopped from outside (`timeout`, Ctrl-C): unwind, so a daemon started here is stopped
    # and its log kept rather than left running, holding the GPU, after this script is gone
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = set(modes) - set(ALL_MODES)
    if unknown:
        raise SystemExit(f"unknown modes: {sorted(unknown)}")
    tmp = Path(tempfile.mkdtemp(prefix="ocr-bench-data-"))
    try:
        images = source_images(args, tmp / "rendered")
        truths = [truth_for(p) for p in images]
        files = tmp / "files.json"
        files.write_text(json.dumps([str(p) for p in images]))
        report: dict[str, Any] = {
            "images": str(args.images or f"{args.render} rendered"), "files": len(images),
            "with_ground_truth": sum(t is not None for t in truths),
            "settings": {"use_cls": args.use_cls, "det_limit_side_len": args.det_limit_side_len,
                         "det_limit_type": args.det_limit_type, "batch": args.batch},
            "cpu_count": os.cpu_count(), "modes": {}, "notes": [],
        }
        for mode in modes:
            if mode == "d" and not gpu_present():
                report["modes"]["d"] = None
                report["notes"].append("mode d skipped: no NVIDIA GPU found through NVML")
                continue
            say(f"mode {mode}: {len(images)} files ...")
            try:
                if mode in DAEMON_MODES:
                    force_cpu, provider = DAEMON_MODES[mode]
                    raw = mode_daemon(args, images, force_cpu=force_cpu, provider=provider)
                    rss = raw.pop("daemon_peak_rss_bytes")
                else:
                    passthrough = [a for a in (argv if argv is not None else sys.argv[1:])]
                    out, code, rss, cpu = run_child(
                        [sys.executable, "-m", "benchmarks.bench", *passthrough, "--worker", mode,
                         "--worker-files", str(files)]
                    )
                    if code != 0:
                        raise RuntimeError(f"worker exited with {code}")
                    raw = json.loads(out.strip().splitlines()[-1])
                    raw["cpu_seconds"] = cpu
            except Exception as exc:
                report["modes"][mode] = None
                report["notes"].append(f"mode {mode} failed: {exc}")
                say(f"mode {mode} failed: {exc}")
                continue
            names = [p.name for p in images] if args.per_file else None
            report["modes"][mode] = summarise(mode, raw, rss, truths, names)
            say(f"mode {mode}: {json.dumps(report['modes'][mode])}")
        report["ratios"] = ratios(report["modes"])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps({**report, "machine": machine()}, indent=2, ensure_ascii=False))
    return 0


def ratios(modes: dict[str, Any]) -> dict[str, float | None]:
    """Throughput ratios (pages/s) from this same run."""
    def rate(mode: str) -> float | None:
        entry = modes.get(mode)
        return entry["pages_per_s"] if entry else None

    out: dict[str, float | None] = {}
    for top, bottom in (("b", "a"), ("c", "a"), ("c", "d"), ("c", "e"), ("e", "a"),
                        ("f", "a"), ("f", "e")):
        x, y = rate(top), rate(bottom)
        out[f"{top}/{bottom}"] = round(x / y, 3) if x and y else None
    return out


if __name__ == "__main__":
    raise SystemExit(main())
