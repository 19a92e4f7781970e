"""`ocr-daemon` subcommands. Settings are loaded once here; this is the one place that turns
exceptions into exit codes."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from daemon import __version__
from daemon.config import Settings, load_settings
from daemon.errors import DaemonError, DatabaseUnavailable, DocumentError, ExitCode, StoreError
from daemon.logs import setup_logging

if TYPE_CHECKING:
    from daemon.store.ledger import Ledger


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
    retry = sub.add_parser(
        "retry", parents=[common], help="re-queue failed documents",
        description="Failed documents back in the queue with their attempts reset (the reason "
                    "each had stays in its history). A running daemon takes them within a "
                    "second; a file refused before it was read is read again now.")
    retry.add_argument("refs", nargs="*", metavar="PATH|SHA256")
    retry.add_argument("--failed", action="store_true", help="every failed document")
    forget = sub.add_parser(
        "forget", parents=[common], help="remove a document and its text from the ledger",
        description="The document, its paths and its text are removed (its history stays). "
                    "Its file, if still in the watched folder, is OCR'd again when next seen "
                    "(changed, or at the daemon's next start).")
    forget.add_argument("ref", metavar="PATH|SHA256")
    export = sub.add_parser(
        "export", parents=[common], help="every stored document, for other tools",
        description="Done documents to stdout in id order, in constant memory: JSON lines "
                    "(paths, sha256, pages with text, lines, boxes and scores, provider, "
                    "timings) or plain text.")
    export.add_argument("--since", type=_timestamp, default=None, metavar="TIME",
                        help="only documents finished at or after TIME (ISO 8601, UTC if no "
                             "zone: 2026-11-27 or 2026-11-27T08:00:00+01:00)")
    export.add_argument("--format", choices=("jsonl", "txt"), default="jsonl")
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


def _timestamp(value: str) -> datetime:
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {value!r}") from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


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
    except StoreError as exc:  # a command's statement failed: the database's, not a usage error
        what = "unreachable" if isinstance(exc, DatabaseUnavailable) else "error"
        print(f"ocr-daemon: database {what}: {exc}", file=sys.stderr)
        return int(ExitCode.DATABASE)
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
    report = _ledger(settings).status(live_seconds=settings.queue.lease_seconds)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    from daemon.logs import escape_controls as shown  # names come from producers

    docs = report["documents"]
    print("  ".join(f"{state}: {docs[state]}" for state in docs) + f"  pages: {report['pages']}")
    for failure in report["failures"]:
        print(f"failed  {shown(str(failure['path']))}: {shown(str(failure['reason']))}")
    for worker in report["workers"]:
        if not worker["alive"]:
            print(shown(f"gone    {worker['id']} on {worker['host']}: no heartbeat for "
                        f"{worker['seconds_since_heartbeat']}s (its documents return to the "
                        "queue as their leases run out)"))
            continue
        print(shown(f"worker  {worker['id']} on {worker['host']}: {worker['provider']} "
                    f"(devices {worker['devices']}), {worker['documents_held']} held, "
                    f"{worker['pages_per_second']} pages/s, heartbeat "
                    f"{worker['seconds_since_heartbeat']}s ago"))
    return 0


def path_candidates(ref: str) -> list[str]:
    """The spellings under which a user-given path may have been recorded."""
    given = Path(ref).expanduser()
    from daemon.files import path_key, recordable

    candidates = [recordable(ref), path_key(given)]
    with contextlib.suppress(OSError, RuntimeError):
        candidates.append(path_key(given.resolve()))
    return list(dict.fromkeys(candidates))


def cmd_text(settings: Settings, args: argparse.Namespace) -> int:
    document = _ledger(settings).find(args.ref, path_candidates(args.ref))
    if document.state != "done":
        reason = f": {document.reason}" if document.reason else ""
        print(f"ocr-daemon: {args.ref} is {document.state}{reason}", file=sys.stderr)
        return int(ExitCode.NOT_FOUND)
    sys.stdout.write(document.text + ("\n" if document.text else ""))
    return 0


def cmd_retry(settings: Settings, args: argparse.Namespace) -> int:
    from daemon import __version__
    from daemon.errors import NotFoundError
    from daemon.intake import Intake
    from daemon.logs import escape_controls
    from daemon.metrics import Metrics
    from daemon.store.outage import Outage

    if bool(args.refs) == args.failed:
        print("ocr-daemon: retry takes PATH|SHA256 ... or --failed", file=sys.stderr)
        return int(ExitCode.USAGE)
    ledger = _ledger(settings)
    status = 0
    ids: list[int] | None = None
    if args.refs:
        ids = []
        for ref in args.refs:
            try:
                document = ledger.find(ref, path_candidates(ref))
            except NotFoundError:
                print(f"ocr-daemon: no document for {escape_controls(ref)}", file=sys.stderr)
                status = int(ExitCode.NOT_FOUND)
                continue
            if document.state != "failed":
                print(f"{escape_controls(ref)}: {document.state}, not failed: nothing to retry")
                status = status or int(ExitCode.ERROR)
                continue
            ids.append(document.id)
        if not ids:
            return status
    queued = 0
    intake = Intake(settings, ledger, Metrics(__version__), outage=Outage(ledger),
                    notify=lambda: None)
    for item in ledger.retry(ids):
        where = escape_controls(item.paths[-1] if item.paths else item.sha256)
        if item.rejected:
            outcome, ok = intake.read_again(item.paths)
            queued += ok
            print(f"{where}: {outcome}")
            continue
        queued += 1
        print(f"re-queued {where} (it had failed: {escape_controls(item.reason or '?')})")
    print(f"{queued} document{'' if queued == 1 else 's'} re-queued")
    return status if queued else status or int(ExitCode.ERROR)


def cmd_export(settings: Settings, args: argparse.Namespace) -> int:
    from daemon.logs import escape_controls
    from daemon.store.db import open_ledger
    from daemon.store.export import iter_documents

    engine, _ = open_ledger(settings, migrate_now=False)
    out = sys.stdout
    count = 0
    try:
        for document in iter_documents(engine, args.since):
            if args.format == "jsonl":
                out.write(json.dumps(document, ensure_ascii=False) + "\n")
            else:
                where = escape_controls(document["paths"][-1]) if document["paths"] else ""
                out.write(f"==> {where} ({document['sha256']}) <==\n{document['text']}\n")
            count += 1
    finally:
        engine.dispose()
    out.flush()
    print(f"{count} document{'' if count == 1 else 's'} exported", file=sys.stderr)
    return 0


def cmd_forget(settings: Settings, args: argparse.Namespace) -> int:
    from daemon.logs import escape_controls

    ledger = _ledger(settings)
    document = ledger.find(args.ref, path_candidates(args.ref))
    if not ledger.forget(document.id):
        print(f"{escape_controls(args.ref)}: already gone")
        return int(ExitCode.NOT_FOUND)
    pages = f", {len(document.pages)} pages of text" if document.pages else ""
    print(f"forgot {document.sha256[:12]} ({document.state}{pages}): "
          f"{', '.join(escape_controls(p) for p in document.paths) or 'no path'}")
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
        from daemon.logs import escape_controls as shown  # a name or a text layer may hold
        for hit in hits:  # terminal escapes, a tab or a newline that would forge a column
            print(f"{shown(hit.path)}\tpage {hit.page_no}\t{shown(hit.snippet)}")
    return 0 if hits else 1


def cmd_ocr(settings: Settings, args: argparse.Namespace) -> int:
    from daemon.documents.decode import iter_pages
    from daemon.hardware.providers import choose_provider
    from daemon.ocr.engines import build_engine
    from daemon.ocr.models import page_bound
    from daemon.results import join_pages, lines_json

    logging.getLogger().setLevel(max(logging.WARNING, logging.getLogger().level))
    engine = build_engine(settings, choose_provider(settings), 1)
    bound = page_bound(settings.ocr)
    status = 0
    for path in args.files:
        start = time.perf_counter()
        try:
            pages = list(iter_pages(path.read_bytes(), settings.ocr, bound=bound))
        except (OSError, DocumentError) as exc:
            print(f"ocr-daemon: {path}: {getattr(exc, 'reason', exc)}", file=sys.stderr)
            status = 1
            continue
        results = [p.text_layer for p in pages if p.text_layer is not None]
        images = [p.image for p in pages if p.image is not None]
        ocr_results = iter(engine.recognize(images))
        results = [p.text_layer if p.text_layer is not None
                   else next(ocr_results).scaled(*p.scale) for p in pages]
        seconds = time.perf_counter() - start
        if args.json:
            for number, result in enumerate(results, 1):
                print(json.dumps({
                    "file": str(path), "page": number, "source": result.source,
                    "confidence": result.confidence, "seconds": round(seconds, 4),
                    "timings": result.timings,
                    "lines": lines_json(result.lines),
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
    "retry": cmd_retry, "forget": cmd_forget, "export": cmd_export,
}
