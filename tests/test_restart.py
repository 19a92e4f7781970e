"""A restart over a kept inbox reads nothing it has already hashed; a done document's file
left in place (a kill between the commit and the move) gets its after-action then."""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage

from daemon import intake as intake_module
from daemon import pipeline as pipeline_module
from daemon.config import Settings
from daemon.files import PathStat
from daemon.pipeline import CLAIM_BATCH, Pipeline
from daemon.results import Image, PageResult
from daemon.service import Service
from daemon.store.db import open_ledger
from daemon.store.ledger import Ledger
from tests.support import (
    DeviceEngine,
    SettingsFactory,
    claim_one,
    gpu_service,
    looked_twice,
    pipeline_running,
    wait_until,
)


class QuickEngine:
    provider = "cpu"
    device = "cpu"

    def recognize(self, images: Sequence[Image]) -> list[PageResult]:
        return [PageResult() for _ in images]

    def close(self) -> None:
        pass


def small_pages(folder: Path, count: int, start: int = 0) -> list[Path]:
    rng = np.random.default_rng(start)
    paths = []
    for n in range(start, start + count):
        path = folder / f"p{n:04}.png"
        PILImage.fromarray(rng.integers(0, 255, (16, 16, 3), np.uint8)).save(path)
        paths.append(path)
    return paths


def count_hashing(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """From now on, one entry per file the intake reads to hash."""
    hashed: list[int] = []
    real = intake_module.sha256_handle

    def counting(handle: object, max_bytes: int) -> tuple[str, int]:
        hashed.append(1)
        return real(handle, max_bytes)  # type: ignore[arg-type]

    monkeypatch.setattr(intake_module, "sha256_handle", counting)
    return hashed


def test_a_restart_hashes_nothing_it_has_seen(settings_factory: SettingsFactory,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    settings = settings_factory()
    inbox = settings.watch.path
    inbox.mkdir(parents=True, exist_ok=True)
    small_pages(inbox, 200)
    with pipeline_running(settings, QuickEngine()) as (_, ledger, _):
        assert wait_until(lambda: ledger.counts()["done"] == 200, 120)

    hashed = count_hashing(monkeypatch)
    with pipeline_running(settings, QuickEngine()) as (_, ledger, watcher):  # restart
        assert looked_twice(watcher, 60)  # every kept file seen, twice over
        assert hashed == []
        (inbox / "p0007.png").touch()  # changed (ctime, mtime): read again, same content
        small_pages(inbox, 1, start=500)  # a new one
        assert wait_until(lambda: ledger.counts()["done"] == 201, 60)
        assert looked_twice(watcher, 60)
        assert len(hashed) == 2


def test_a_done_document_left_in_place_is_moved_at_the_next_start(
        settings_factory: SettingsFactory) -> None:
    """The text was committed, then the daemon was killed before the move: the next start sees
    the file unchanged, its document done, and moves it."""
    settings = settings_factory(watch={"after": "move", "done_dir": "done"})
    inbox = settings.watch.path
    inbox.mkdir(parents=True, exist_ok=True)
    [path] = small_pages(inbox, 1)
    _, ledger = open_ledger(settings, migrate_now=True)
    data = path.read_bytes()
    reg = ledger.register(os.path.abspath(path), hashlib.sha256(data).hexdigest(), len(data),
                          stat=PathStat.of(path.stat()))
    assert claim_one(ledger, reg.document_id, "killed", 60) is not None
    assert ledger.complete(reg.document_id, "killed", [PageResult()], 0.1, "cpu")
    with pipeline_running(settings, QuickEngine()) as (_, ledger, _):
        assert wait_until(lambda: (inbox / "done" / path.name).exists(), 30)
        assert wait_until(lambda: not path.exists(), 10)  # linked there, then unlinked here
        assert ledger.counts()["done"] == 1


def test_a_second_daemon_on_one_sqlite_file_refuses_to_start(
        settings_factory: SettingsFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Never silent double work: the second would re-queue the first one's documents as
    left over by a dead run. It says why and how to run several."""
    from daemon.errors import DatabaseError

    settings = settings_factory()
    first = gpu_service(settings, [DeviceEngine("0")])
    try:
        with pytest.raises(DatabaseError, match=r"another ocr-daemon is running.*PostgreSQL"):
            second = Service(settings)
            try:
                second.start()
            finally:
                second.stop()
        assert first.health()["status"] == "healthy"
    finally:
        first.stop()
    again = gpu_service(settings, [DeviceEngine("0")])  # the lock went with it
    again.stop()


def test_a_duplicate_dropped_while_processing_gets_the_after_action_too(
        settings_factory: SettingsFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """The after-action uses the paths in the ledger when it runs, not those known when the
    document was claimed."""

    settings = settings_factory(watch={"after": "move", "done_dir": "done"})
    svc = gpu_service(settings, [DeviceEngine("0", delay=2.0)])
    try:
        inbox = settings.watch.path
        [first] = small_pages(inbox, 1)
        assert wait_until(lambda: svc.ledger.counts()["processing"] == 1, 20)
        (inbox / "copy.png").write_bytes(first.read_bytes())  # same content, while OCR runs
        assert wait_until(lambda: (inbox / "done" / "copy.png").exists()
                          and (inbox / "done" / first.name).exists(), 30)
        assert svc.ledger.counts() == {"queued": 0, "processing": 0, "done": 1, "failed": 0}
    finally:
        svc.stop()


def test_status_shows_the_live_workers(settings_factory: SettingsFactory,
                                       monkeypatch: pytest.MonkeyPatch) -> None:

    settings = settings_factory(queue={"lease_seconds": 1.5})
    svc = gpu_service(settings, [DeviceEngine("0"), DeviceEngine("1")])
    try:
        assert svc.components is not None
        assert wait_until(lambda: bool(svc.ledger.status()["workers"]), 10)
        [worker] = svc.ledger.status()["workers"]
        assert worker["id"] == svc.components.pipeline.worker_id
        assert (worker["provider"], worker["devices"], worker["pid"]) == ("cuda", "0,1",
                                                                          os.getpid())
        assert worker["seconds_since_heartbeat"] < 5
        assert svc.metrics.workers._value.get() == 1
    finally:
        svc.stop()
    _, ledger = open_ledger(settings, migrate_now=False)
    assert ledger.status()["workers"] == []  # a clean stop takes its row away


def test_a_restart_over_5000_kept_files_reads_none_and_serves_a_new_drop_first(
        settings_factory: SettingsFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """5,000 files stored by an earlier run (rows written straight into the ledger, as that
    run left them): the restart hashes none of them, looks them up in the ledger a batch at
    a time, and a file dropped while it is still looking them over is stored before it has
    finished."""
    from datetime import UTC, datetime

    from daemon.store.models import Document, DocumentPath

    settings = settings_factory()
    inbox = settings.watch.path
    inbox.mkdir(parents=True, exist_ok=True)
    database, _ = open_ledger(settings, migrate_now=True)
    now = datetime.now(UTC)
    documents, paths = [], []
    for n in range(5000):
        path = inbox / f"kept{n:04}.png"
        path.write_bytes(n.to_bytes(4, "big"))
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        documents.append({"id": n + 1, "sha256": digest, "size_bytes": 4, "state": "done",
                          "attempts": 1, "first_seen_at": now, "page_count": 1})
        paths.append({"document_id": n + 1, "path": os.path.abspath(path),
                      "first_seen_at": now, "last_seen_at": now,
                      **PathStat.of(path.stat()).columns()})
    with database.begin() as connection:
        connection.execute(Document.__table__.insert(), documents)
        connection.execute(DocumentPath.__table__.insert(), paths)
    database.dispose()

    hashed = count_hashing(monkeypatch)
    lookups = {"one": 0, "batch": 0}
    one, batch = Ledger.known_path, Ledger.known_paths

    def known_path(self: Ledger, path: str, stat: PathStat) -> object:
        lookups["one"] += 1
        return one(self, path, stat)

    def known_paths(self: Ledger, paths: Sequence[str]) -> object:
        lookups["batch"] += 1
        return batch(self, paths)

    monkeypatch.setattr(Ledger, "known_path", known_path)
    monkeypatch.setattr(Ledger, "known_paths", known_paths)
    with pipeline_running(settings, QuickEngine()) as (_, ledger, watcher):
        assert wait_until(lambda: watcher.scans >= 1, 30)  # the start-up scan found them all
        small_pages(inbox, 1, start=9000)
        assert wait_until(lambda: ledger.counts()["done"] == 5001, 60)
        assert watcher.quiet_after_scan < 1, "the new file waited for the whole backlog"
        assert looked_twice(watcher, 120)
        assert len(hashed) == 1  # the new file only
        # looked up TAKE_BATCH (64) at a time, not one by one: a round trip a batch (a pass
        # may end inside a batch, and the new file is a batch of its own)
        assert lookups["one"] == 0 and 5001 / 64 < lookups["batch"] < 5001 / 16


def test_queued_documents_are_claimed_several_a_statement(
        settings_factory: SettingsFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Documents already queued when the pipeline starts (a restart's, a burst's) are claimed
    as many a statement as slots are free, CLAIM_BATCH at most: each once, done once, in far
    fewer claims than documents, the slots of a short claim given back."""
    settings = settings_factory()
    queue_documents(settings, 40)
    claimed = count_claims(monkeypatch)
    with pipeline_running(settings, QuickEngine()) as (pipeline, ledger, _):
        assert wait_until(lambda: ledger.counts()["done"] == 40, 60)
        assert sum(claimed) == 40 and len(claimed) < 20
        assert max(claimed) == CLAIM_BATCH
        # a document's slot is given back just after it is stored: wait for the last
        assert wait_until(lambda: pipeline.table._slots._value  # type: ignore[attr-defined]
                          == settings.queue.capacity, 10)
        assert pipeline.inflight_count() == 0


class GatedEngine(QuickEngine):
    """Reads a batch only once the test lets it: documents finish when the test says."""

    def __init__(self) -> None:
        self.gate = threading.Semaphore(0)

    def recognize(self, images: Sequence[Image]) -> list[PageResult]:
        self.gate.acquire()
        return super().recognize(images)


def queue_documents(settings: Settings, count: int) -> None:
    inbox = settings.watch.path
    inbox.mkdir(parents=True, exist_ok=True)
    database, ledger = open_ledger(settings, migrate_now=True)
    for path in small_pages(inbox, count):
        ledger.register(os.path.abspath(path), hashlib.sha256(path.read_bytes()).hexdigest(),
                        path.stat().st_size)
    database.dispose()


def count_claims(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """From now on, the documents each claim that got any took."""
    claimed: list[int] = []
    real = Ledger.claim_many

    def claim_many(self: Ledger, worker: str, lease_seconds: float, limit: int,
                   exclude: Sequence[int] = ()) -> object:
        claims = real(self, worker, lease_seconds, limit, exclude)
        if claims:
            claimed.append(len(claims))
        return claims

    monkeypatch.setattr(Ledger, "claim_many", claim_many)
    return claimed


@contextlib.contextmanager
def gated_pipeline(settings_factory: SettingsFactory, monkeypatch: pytest.MonkeyPatch,
                   capacity: int, gather_seconds: float
                   ) -> Iterator[tuple[GatedEngine, Pipeline, list[int]]]:
    """40 documents queued, a pipeline of `capacity` reading a page a batch with a gated
    engine, CLAIM_GATHER_SECONDS set: the engine, the pipeline and the claims made. On leaving,
    every document is let through and all 40 must be done, each claimed once."""
    settings = settings_factory(queue={"capacity": capacity}, batch={"max_pages": 1})
    queue_documents(settings, 40)
    claimed = count_claims(monkeypatch)
    monkeypatch.setattr(pipeline_module, "CLAIM_GATHER_SECONDS", gather_seconds)
    engine = GatedEngine()
    with pipeline_running(settings, engine) as (pipeline, ledger, _):
        try:
            assert wait_until(lambda: pipeline.inflight_count() == capacity, 30)
            yield engine, pipeline, claimed
            for _ in range(40):
                engine.gate.release()
            assert wait_until(lambda: ledger.counts()["done"] == 40, 30)
            assert sum(claimed) == 40
        finally:
            for _ in range(40):
                engine.gate.release()


def test_a_full_pipeline_claims_the_slots_its_documents_free_together(
        settings_factory: SettingsFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the pipeline full, documents stored one by one free a slot each; with twice
    CLAIM_BATCH or more still in flight (work for the engines meanwhile), a freed slot waits
    for more (CLAIM_GATHER_SECONDS, long here) and they are claimed in one statement, not one
    each."""
    with gated_pipeline(settings_factory, monkeypatch, 3 * CLAIM_BATCH, 30.0) as (
            engine, pipeline, claimed):
        assert claimed == [CLAIM_BATCH] * 3
        for done in range(1, CLAIM_BATCH + 1):  # one document at a time
            engine.gate.release()
            assert wait_until(lambda: pipeline.ledger.counts()["done"] == done,  # noqa: B023
                              30)
        assert wait_until(lambda: sum(claimed) == 4 * CLAIM_BATCH, 30)
        assert claimed == [CLAIM_BATCH] * 4


def test_a_pipeline_with_few_documents_ahead_claims_a_freed_slot_at_once(
        settings_factory: SettingsFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fewer than twice CLAIM_BATCH still to recognise, and the engines could run dry while
    slots gathered: a freed slot is claimed for at once, not held for others (here
    CLAIM_GATHER_SECONDS would outlast the test)."""
    with gated_pipeline(settings_factory, monkeypatch, 2 * CLAIM_BATCH, 600.0) as (
            engine, _pipeline, claimed):
        engine.gate.release()  # one document stored: 15 ahead
        assert wait_until(lambda: sum(claimed) == 2 * CLAIM_BATCH + 1, 30)
        assert claimed == [CLAIM_BATCH, CLAIM_BATCH, 1]


def test_a_document_failed_by_its_lease_is_quarantined_with_its_reason(
        settings_factory: SettingsFactory) -> None:
    """A document whose worker died with it once too often ends failed through its lease,
    and skipped the failed folder and the error sidecar that any other failure gets."""
    settings = settings_factory(queue={"max_attempts": 1}, watch={"failed_dir": "failed"})
    inbox = settings.watch.path
    inbox.mkdir(parents=True, exist_ok=True)
    [path] = small_pages(inbox, 1)
    _, ledger = open_ledger(settings, migrate_now=True)
    registration = ledger.register(os.path.abspath(path),
                                   hashlib.sha256(path.read_bytes()).hexdigest(),
                                   path.stat().st_size)
    assert claim_one(ledger, registration.document_id, "killed", 60) is not None  # then died
    ledger.close()
    with pipeline_running(settings, QuickEngine()) as (_, ledger, _):
        assert ledger.counts()["failed"] == 1
        moved = inbox / "failed" / path.name
        assert wait_until(moved.exists, 10)
        sidecar = moved.with_name(moved.name + ".error.txt")
        assert "died while processing it" in sidecar.read_text()
        assert ledger.find(registration.sha256).paths[-1] == str(moved)
