from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, text

from daemon.config import DatabaseSettings, Settings
from daemon.http import MetricsServer
from daemon.metrics import Metrics
from daemon.store import migrate
from daemon.store.db import make_engine
from daemon.store.ledger import Ledger
from tests.daemons import scratch_database
from tests.support import PG_ADMIN_URL, DaemonProcess


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The daemon's cache (edited models, TensorRT engines) in this run's temporary folder,
    for the tests and the daemons they start, not in the user's ~/.cache."""
    before = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg-cache"))
    yield
    if before is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = before


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests build their settings explicitly; the caller's environment must not leak in."""
    for key in list(os.environ):
        if key.startswith("OCR_DAEMON_") and key != "OCR_DAEMON_TEST_PG_URL":
            monkeypatch.delenv(key)
    monkeypatch.delenv("FORCE_CPU", raising=False)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    """A fresh database on the real PostgreSQL server, dropped afterwards.

    Fails (not skips) when the server is down: the PostgreSQL tests must run in CI."""
    with scratch_database(PG_ADMIN_URL, "ocr_daemon_test") as url:
        yield url


def _reset_pg(engine: Engine) -> None:
    with engine.begin() as connection:
        connection.execute(text("DROP SCHEMA public CASCADE"))
        connection.execute(text("CREATE SCHEMA public"))


@pytest.fixture
def pg_url(pg_server: str) -> str:
    """The scratch PostgreSQL database, emptied for this test."""
    engine = create_engine(pg_server)
    _reset_pg(engine)
    engine.dispose()
    return pg_server


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'ledger.db'}"
        return
    url: str = request.getfixturevalue("pg_server")
    engine = create_engine(url)
    _reset_pg(engine)
    engine.dispose()
    yield url


@pytest.fixture
def ledger(db_url: str) -> Iterator[Ledger]:
    engine = make_engine(DatabaseSettings(url=db_url))
    migrate.upgrade(engine)
    try:
        yield Ledger(engine)
    finally:
        engine.dispose()


@pytest.fixture
def settings_factory(tmp_path: Path) -> object:
    def make(**sections: dict[str, object]) -> Settings:
        data: dict[str, dict[str, object]] = {
            "watch": {"path": tmp_path / "inbox", "settle_seconds": 0.1,
                      "rescan_interval_seconds": 1.0},
            "database": {"url": f"sqlite:///{tmp_path / 'ocr.db'}"},
            "metrics": {"port": 0},
        }
        for section, values in sections.items():
            data.setdefault(section, {}).update(values)
        return Settings.model_validate(data)

    return make


ServerFactory = Callable[..., MetricsServer]


@pytest.fixture
def serve() -> Iterator[ServerFactory]:
    """Start MetricsServers on port 0; every one is stopped after the test."""
    started: list[MetricsServer] = []

    def start(metrics: Metrics, **kwargs: Any) -> MetricsServer:
        server = MetricsServer(metrics, "127.0.0.1", 0, **kwargs)
        server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def daemon_factory(tmp_path: Path) -> Iterator[Callable[..., DaemonProcess]]:
    made: list[DaemonProcess] = []

    def make(env: dict[str, str] | None = None, workdir: Path | None = None,
             unprivileged: bool = False) -> DaemonProcess:
        instance = DaemonProcess(workdir or tmp_path, env, unprivileged)
        instance.inbox.mkdir(parents=True, exist_ok=True)
        made.append(instance)
        return instance

    yield make
    for instance in made:
        instance.cleanup()
