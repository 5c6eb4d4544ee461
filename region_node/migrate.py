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


def _config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", _to_sqlalchemy(url))
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    """Create the database if needed and migrate it to `revision` (default: the head of
    the one, linear history; `tests/test_migrations.py` holds it to a single head)."""
    ensure_database(url)
    _collapse_old_branches(url)
    command.upgrade(_config(url), revision)


def _collapse_old_branches(url: str) -> None:
    """Databases migrated while the history had three branches (0005, 0006 and 0009 all
    revised 0004) record one row per branch in alembic_version. The history is linear now
    (0005 -> 0006 -> 0009), so only the furthest of those rows is a real position: keep
    it, drop the rows it descends from."""
    with psycopg.connect(_to_libpq(url), autocommit=True) as conn:
        table = conn.execute("select to_regclass('alembic_version')").fetchone()
        if table is None or table[0] is None:
            return
        rows = [r[0] for r in conn.execute("select version_num from alembic_version")]
        if len(rows) > 1:
            conn.execute("delete from alembic_version where version_num <> %s", (max(rows),))
