"""Apply Alembic migrations programmatically (`ocr-daemon migrate`, and `run` on start)."""

from __future__ import annotations

import importlib
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine

from daemon.store.access import is_postgresql


def migrations_dir() -> Path:
    """`migrations/`: shipped inside an installed package as `daemon.migrations`; beside the
    package when the daemon runs from a source tree that was never installed."""
    try:
        package = importlib.import_module("daemon.migrations")
        return Path(str(package.__file__)).parent
    except ImportError:
        return Path(__file__).resolve().parents[2] / "migrations"


def _alembic_config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    return cfg


def upgrade(engine: Engine, revision: str = "head") -> None:
    cfg = _alembic_config()
    with engine.begin() as connection:
        if is_postgresql(engine.url):  # an index built on a large table takes long
            connection.exec_driver_sql("SET LOCAL statement_timeout = 0")
        cfg.attributes["connection"] = connection
        command.upgrade(cfg, revision)


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def head_revision() -> str | None:
    return ScriptDirectory.from_config(_alembic_config()).get_current_head()


def is_up_to_date(engine: Engine) -> bool:
    return current_revision(engine) == head_revision()
