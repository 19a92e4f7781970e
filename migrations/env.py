"""Alembic environment. Run through `ocr-daemon migrate` (or `run`, which migrates on start):
the daemon passes an open connection in `config.attributes["connection"]`. Plain `alembic`
with `-x url=...` works too."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from daemon.store.models import Base

config = context.config
target_metadata = Base.metadata


def run_with(connection: object) -> None:
    context.configure(
        connection=connection,  # type: ignore[arg-type]
        target_metadata=target_metadata,
        render_as_batch=True,  # SQLite ALTER TABLE support for later migrations
    )
    with context.begin_transaction():
        context.run_migrations()


connection = config.attributes.get("connection")
if connection is not None:
    run_with(connection)
else:
    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option(
        "sqlalchemy.url"
    )
    if not url:
        raise SystemExit(
            "pass the database URL: alembic -x url=sqlite:///./ocr-daemon.db upgrade head")
    with create_engine(url).begin() as conn:
        run_with(conn)
