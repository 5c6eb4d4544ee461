"""Apply the schema to a region's database (alembic, driven from code)."""

from __future__ import annotations

from pathlib import Path

import psycopg
from alembic import command
from alembic.config import Config

MIGRATIONS_DIR = Path(__file__).parent / "migrations"


def _to_sqlalchemy(url: str) -> str:
    if url.startswith("postgresql://"):
        return "postgresql+psycopg://" + url[len("postgresql://"):]
    return url


def _to_libpq(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


def ensure_database(url: str) -> None:
    """Create the database named in `url` if it does not exist yet."""
    libpq = _to_libpq(url)
    base, _, rest = libpq.rpartition("/")
    dbname = rest.split("?", 1)[0]
    with psycopg.connect(f"{base}/postgres", autocommit=True) as conn:
        exists = conn.execute("select 1 from pg_database where datname = %s", (dbname,)).fetchone()
        if not exists:
            conn.execute(f'create database "{dbname}"')


def upgrade(url: str, revision: str = "heads") -> None:
    """Create the database if needed and migrate it to `revision` (default: every head, so
    independent revisions branching from the same parent all apply)."""
    ensure_database(url)
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", _to_sqlalchemy(url))
    command.upgrade(cfg, revision)
