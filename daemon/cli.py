"""`ocr-daemon` subcommands. Settings are loaded once here; this is the one place that turns
exceptions into exit codes."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from daemon import __version__
from daemon.config import Settings, load_settings
from daemon.errors import DaemonError, DocumentError, ExitCode
from daemon.logs import setup_logging

if TYPE_CHECKING:
    from daemon.store.repository import Ledger


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", type=Path, default=None, metavar="PATH",
                        help="config file (default: $OCR_DAEMON_CONFIG or ./config.toml)")
    parser = argparse.ArgumentParser(
        prog="ocr-daemon", parents=[common],
        description="Watch a folder, OCR what lands in it, store the text.")
    parser.add_argument("--version", action="version", version=f"ocr-daemon {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("run", parents=[common], help="run the daemon")
    sub.add_parser("migrate", parents=[common], help="apply database migrations")
    ocr = sub.add_parser("ocr", parents=[common], help="OCR files once, text to stdout")
    ocr.add_argument("files", nargs="+", type=Path, metavar="FILE")
    ocr.add_argument("--json", action="store_true", help="JSON lines: boxes, scores, timings")
    status = sub.add_parser("status", parents=[common], help="documents by state, failures")
    status.add_argument("--json", action="store_true")
    text = sub.add_parser("text", parents=[common], help="stored text of one document")
    text.add_argument("ref", metavar="PATH|SHA256")
    search = sub.add_parser(
        "search", parents=[common], help="find documents by their text",
        description="Pages containing every word of QUERY, best first; a word matches inside "
                    'longer words too. "Double quotes" keep a phrase together; nothing else '
                    "is special. Exit 1 when nothing matched.")
    search.add_argument("query")
    search.add_argument("--json", action="store_true",
                        help="a JSON list: path, sha256, page_no, snippet, score")
    search.add_argument("--limit", type=_positive_int, default=20, metavar="N",
                        help="at most N pages (default 20)")
    doctor = sub.add_parser("doctor", parents=[common], help="hardware, providers, the choice")
    doctor.add_argument("--json", action="store_true")
    check = sub.add_parser("check", parents=[common],
                           help="exit 0 when the running daemon reports healthy")
    check.add_argument("--timeout", type=float, default=3.0)
    return parser


def _positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {number}")
    return number


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = load_settings(args.config)
        setup_logging(settings.log)
        handler = COMMANDS[args.command]
        return handler(settings, args)
    except DaemonError as exc:
        print(f"ocr-daemon: {exc}", file=sys.stderr)
        return int(exc.exit_code)
    except ModuleNotFoundError as exc:
        if exc.name != "onnxruntime":
            raise
        from daemon.hardware.builds import choose_build, driver_cuda_version

        build = choose_build(driver_cuda_version())
        print(f"ocr-daemon: onnxruntime is not installed; for this host ({build.reason}): "
              f"pip install '{build.requirement}' (make setup does it)", file=sys.stderr)
        return int(ExitCode.CONFIG)
    except KeyboardInterrupt:
        return int(ExitCode.INTERRUPTED)
    except BrokenPipeError:
        return int(ExitCode.OK)


def cmd_run(settings: Settings, _args: argparse.Namespace) -> int:
    from daemon.service import run

    run(settings)
    return 0


def cmd_migrate(settings: Settings, _args: argparse.Namespace) -> int:
    from daemon.store import migrate
    from daemon.store.db import open_ledger

    engine, _ = open_ledger(settings, migrate_now=True)
    print(f"database at revision {migrate.current_revision(engine)}")
    engine.dispose()
    return 0


def _ledger(settings: Settings) -> Ledger:
    """The ledger for the read-only commands: the store alone, no engine, no service."""
    from daemon.store.db import open_ledger

    return open_ledger(settings, migrate_now=False)[1]


def cmd_status(settings: Settings, args: argparse.Namespace) -> int:
    report = _ledger(settings).status()
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    docs = report["documents"]
    print("  ".join(f"{state}: {docs[state]}" for state in docs) + f"  pages: {report['pages']}")
    for failure in report["failures"]:
        print(f"failed  {failure['path']}: {failure['reason']}")
    return 0


def path_candidates(ref: str) -> list[str]:
    """The spellings under which a user-given path may have been recorded."""
    given = Path(ref).expanduser()
    candidates = [ref, os.path.abspath(given)]
    with contextlib.suppress(OSError, RuntimeError):
        candidates.append(str(given.resolve()))
    return list(dict.fromkeys(candidates))


def cmd_text(settings: Settings, args: argparse.Namespace) -> int:
    document = _ledger(settings).find(args.ref, path_candidates(args.ref))
    if document.state != "done":
        reason = f": {document.reason}" if document.reason else ""
        print(f"ocr-daemon: {args.ref} is {document.state}{reason}", file=sys.stderr)
        return int(ExitCode.NOT_FOUND)
    sys.stdout.write(document.text + ("\n" if document.text else ""))
    return 0


def cmd_search(settings: Settings, args: argparse.Namespace) -> int:
    """One line per page: path, page, the snippet with its matches [marked]."""
    from daemon.store.search import parse_query

    if not parse_query(args.query):
        print("ocr-daemon: the search query is empty", file=sys.stderr)
        return int(ExitCode.ERROR)
    hits = _ledger(settings).search(args.query, limit=args.limit)
    if args.json:
        print(json.dumps([hit.__dict__ for hit in hits], ensure_ascii=False, indent=2))
    else:
        for hit in hits:
            print(f"{hit.path}\tpage {hit.page_no}\t{hit.snippet}")
    return 0 if hits else 1


def cmd_ocr(settings: Settings, args: argparse.Namespace) -> int:
    from daemon.documents.decode import iter_pages
    from daemon.hardware.providers import choose_provider
    from daemon.ocr.engines import build_engine
    from daemon.results import join_pages, line_json

    logging.getLogger().setLevel(max(logging.WARNING, logging.getLogger().level))
    engine = build_engine(settings, choose_provider(settings), 1)
    status = 0
    for path in args.files:
        start = time.perf_counter()
        try:
            pages = list(iter_pages(path.read_bytes(), settings.ocr))
        except (OSError, DocumentError) as exc:
            print(f"ocr-daemon: {path}: {getattr(exc, 'reason', exc)}", file=sys.stderr)
            status = 1
            continue
        results = [p.text_layer for p in pages if p.text_layer is not None]
        images = [p.image for p in pages if p.image is not None]
        ocr_results = iter(engine.recognize(images))
        results = [p.text_layer if p.text_layer is not None else next(ocr_results)
                   for p in pages]
        seconds = time.perf_counter() - start
        if args.json:
            for number, result in enumerate(results, 1):
                print(json.dumps({
                    "file": str(path), "page": number, "source": result.source,
                    "confidence": result.confidence, "seconds": round(seconds, 4),
                    "timings": result.timings,
                    "lines": [line_json(line) for line in result.lines],
                }, ensure_ascii=False))
        else:
            if len(args.files) > 1:
                print(f"==> {path} <==")
            print(join_pages(result.text for result in results))
    engine.close()
    return status


def cmd_doctor(settings: Settings, args: argparse.Namespace) -> int:
    from daemon.hardware.doctor import doctor_report, format_doctor

    report = doctor_report(settings)
    print(json.dumps(report, indent=2) if args.json else format_doctor(report))
    return 0


def cmd_check(settings: Settings, args: argparse.Namespace) -> int:
    from daemon.http import check_health

    healthy = check_health(settings.metrics.host, settings.metrics.port, timeout=args.timeout)
    return 0 if healthy else int(ExitCode.UNHEALTHY)


COMMANDS = {
    "run": cmd_run, "migrate": cmd_migrate, "ocr": cmd_ocr, "status": cmd_status,
    "text": cmd_text, "search": cmd_search, "doctor": cmd_doctor, "check": cmd_check,
}
