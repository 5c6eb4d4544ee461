"""libpq connection URLs and LSNs: the two small conversions every replication module needs.

The node and the lab hand out SQLAlchemy URLs (``postgresql+psycopg://...``); psycopg and
libpq take the plain ``postgresql://`` form. PostgreSQL writes a WAL position (LSN) as two
hex halves, ``16/B374D848``; comparing two of them needs the 64-bit integer.
"""

from __future__ import annotations

_SQLALCHEMY_SCHEME = "postgresql+psycopg://"


def libpq_url(dsn: str) -> str:
    """`dsn` as libpq takes it: a SQLAlchemy ``postgresql+psycopg://`` URL loses its driver
    suffix; anything else (a libpq URL or ``key=value`` string) is returned unchanged."""
    return dsn.replace(_SQLALCHEMY_SCHEME, "postgresql://", 1)


def lsn_int(lsn: str | None) -> int:
    """An LSN (``hi/lo`` in hex) as an integer, for comparing positions (None or "": 0)."""
    if not lsn:
        return 0
    hi, _, lo = lsn.partition("/")
    return (int(hi, 16) << 32) | int(lo, 16)


def lsn_text(lsn: int) -> str:
    """An integer LSN in PostgreSQL's ``hi/lo`` form (``16/B374D848``)."""
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:08X}"
