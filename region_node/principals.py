"""Principals and their API keys: creation, listing, revocation, authentication.

Key format: ``pck_<prefix>_<secret>``: `prefix` is 12 characters from [a-z0-9] (it names
the key, is stored in clear and shown in listings and logs), `secret` is 40 characters
from [A-Za-z0-9] (~238 bits), both drawn from `secrets`. A key is shown once, in the
response that created it; the store keeps only SHA-256 of the whole key (a fast hash is
right for a random secret of this size, see migration 0005). Authentication looks the key
up by its prefix and compares the hashes in constant time (`hmac.compare_digest`).

Every table is insert-only and replicated: a revocation is a row of its own.

Authenticated keys are cached in memory for `cache_seconds` (default 5 s), because every
request authenticates and the benchmark runs ~200 payments/s on one key. The bound on a
revocation is therefore: at once on the node that revoked it (it drops its cache entry),
within `cache_seconds` on other nodes of that region, and within replication lag plus
`cache_seconds` in other regions.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import string
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from region_node import schema
from region_node.errors import InvalidRequest, NotFound, Unauthenticated

P = schema.principals
K = schema.api_keys
R = schema.api_key_revocations

ROLES = ("admin", "merchant", "customer")
KEY_PREFIX = "pck_"
PREFIX_LENGTH = 12
SECRET_LENGTH = 40
_PREFIX_ALPHABET = string.ascii_lowercase + string.digits
_SECRET_ALPHABET = string.ascii_letters + string.digits
KEY_PATTERN = re.compile(r"^pck_([a-z0-9]{12})_([A-Za-z0-9]{40})$")
"""The exact shape of an API key (other modules, e.g. log masking, rely on it)."""


@dataclass(frozen=True)
class Principal:
    """Who is calling: the principal behind an authenticated key."""

    id: uuid.UUID
    name: str
    role: str
    key_id: uuid.UUID
    rate_per_second: float | None
    rate_burst: int | None

    @property
    def is_admin(self) -> bool:
        """Admins may act on every resource and use the admin API."""
        return self.role == "admin"

    def to_json(self) -> dict[str, Any]:
        """A JSON-able form (carried between regions with a forwarded request)."""
        return {"id": str(self.id), "name": self.name, "role": self.role,
                "key_id": str(self.key_id), "rate_per_second": self.rate_per_second,
                "rate_burst": self.rate_burst}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Principal:
        """The inverse of `to_json`."""
        rate = doc.get("rate_per_second")
        burst = doc.get("rate_burst")
        return cls(id=uuid.UUID(str(doc["id"])), name=str(doc["name"]), role=str(doc["role"]),
                   key_id=uuid.UUID(str(doc["key_id"])),
                   rate_per_second=float(rate) if rate is not None else None,
                   rate_burst=int(burst) if burst is not None else None)


@dataclass(frozen=True)
class NewKey:
    """A freshly made key: the full key (show it once) and what the store keeps."""

    key: str
    prefix: str
    hash: str


def hash_key(key: str) -> str:
    """SHA-256 (hex) of a whole key: what the store keeps instead of the key."""
    return hashlib.sha256(key.encode()).hexdigest()


def make_key() -> NewKey:
    """A new random key ``pck_<prefix>_<secret>`` and its hash."""
    prefix = "".join(secrets.choice(_PREFIX_ALPHABET) for _ in range(PREFIX_LENGTH))
    secret = "".join(secrets.choice(_SECRET_ALPHABET) for _ in range(SECRET_LENGTH))
    key = f"{KEY_PREFIX}{prefix}_{secret}"
    return NewKey(key=key, prefix=prefix, hash=hash_key(key))


def key_prefix(key: str) -> str | None:
    """The prefix of a well-formed key, None for anything else."""
    match = KEY_PATTERN.match(key)
    return match.group(1) if match else None


def check_role(role: str) -> str:
    """A known role, else 400."""
    if role not in ROLES:
        raise InvalidRequest(f"role must be one of {', '.join(ROLES)}", code="invalid_value",
                             param="role")
    return role


def principal_to_api(row: Any) -> dict[str, Any]:
    """The public JSON shape of a principal row."""
    m = row._mapping
    return {"id": str(m["id"]), "object": "principal", "name": m["name"], "role": m["role"],
            "rate_per_second": m["rate_per_second"], "rate_burst": m["rate_burst"],
            "home_region": m["home_region"], "created_at": m["created_at"].isoformat()}


def key_to_api(key_id: uuid.UUID, principal_id: uuid.UUID, prefix: str, created_at: datetime,
               revoked_at: datetime | None, secret: str | None = None) -> dict[str, Any]:
    """The public JSON shape of a key; `secret` (the whole key) only when just created."""
    out: dict[str, Any] = {"id": str(key_id), "object": "api_key",
                           "principal_id": str(principal_id), "prefix": prefix,
                           "created_at": created_at.isoformat(),
                           "revoked": revoked_at is not None,
                           "revoked_at": revoked_at.isoformat() if revoked_at else None}
    if secret is not None:
        out["key"] = secret
    return out


async def create_principal(conn: AsyncConnection, *, principal_id: uuid.UUID, name: str,
                           role: str, home_region: str, rate_per_second: float | None = None,
                           rate_burst: int | None = None) -> dict[str, Any]:
    """Insert a principal; its public shape."""
    row = (await conn.execute(P.insert().values(
        id=principal_id, name=name, role=check_role(role), home_region=home_region,
        rate_per_second=rate_per_second, rate_burst=rate_burst).returning(*P.c))).one()
    return principal_to_api(row)


async def get_principal(conn: AsyncConnection, principal_id: uuid.UUID) -> dict[str, Any]:
    """One principal's public shape; NotFound if there is none."""
    row = (await conn.execute(sa.select(P).where(P.c.id == principal_id))).one_or_none()
    if row is None:
        raise NotFound(f"No such principal: '{principal_id}'")
    return principal_to_api(row)


async def list_principals(conn: AsyncConnection, *, limit: int,
                          starting_after: uuid.UUID | None = None) -> dict[str, Any]:
    """Principals, oldest first (ids are time-ordered), cursor paging."""
    query = sa.select(P).order_by(P.c.id).limit(limit + 1)
    if starting_after is not None:
        query = query.where(P.c.id > starting_after)
    rows = (await conn.execute(query)).all()
    data = [principal_to_api(r) for r in rows[:limit]]
    return {"object": "list", "data": data, "has_more": len(rows) > limit,
            "next_cursor": data[-1]["id"] if len(rows) > limit else None}


async def create_key(conn: AsyncConnection, *, key_id: uuid.UUID, principal_id: uuid.UUID,
                     home_region: str) -> dict[str, Any]:
    """Make and store a key for an existing principal; the response shows the key once."""
    await get_principal(conn, principal_id)
    new = make_key()
    row = (await conn.execute(K.insert().values(
        id=key_id, principal_id=principal_id, prefix=new.prefix, hash=new.hash,
        home_region=home_region).returning(K.c.created_at))).one()
    return key_to_api(key_id, principal_id, new.prefix, row.created_at, None, secret=new.key)


def _revoked_at() -> sa.ScalarSelect[Any]:
    return (sa.select(sa.func.min(R.c.revoked_at)).where(R.c.key_id == K.c.id)
            .scalar_subquery())


async def list_keys(conn: AsyncConnection, principal_id: uuid.UUID) -> dict[str, Any]:
    """A principal's keys (never their secrets): id, prefix, created, revoked."""
    await get_principal(conn, principal_id)
    rows = (await conn.execute(
        sa.select(K.c.id, K.c.principal_id, K.c.prefix, K.c.created_at,
                  _revoked_at().label("revoked_at"))
        .where(K.c.principal_id == principal_id).order_by(K.c.id))).all()
    return {"object": "list", "data": [key_to_api(r.id, r.principal_id, r.prefix, r.created_at,
                                                  r.revoked_at) for r in rows],
            "has_more": False}


async def revoke_key(conn: AsyncConnection, *, key_id: uuid.UUID, revocation_id: uuid.UUID,
                     region: str) -> dict[str, Any]:
    """Revoke a key by appending a revocation row (a second revocation changes nothing)."""
    row = (await conn.execute(
        sa.select(K.c.id, K.c.principal_id, K.c.prefix, K.c.created_at,
                  _revoked_at().label("revoked_at")).where(K.c.id == key_id))).one_or_none()
    if row is None:
        raise NotFound(f"No such key: '{key_id}'")
    revoked_at = row.revoked_at
    if revoked_at is None:
        revoked_at = (await conn.execute(R.insert().values(
            id=revocation_id, key_id=key_id, region=region).returning(R.c.revoked_at))).scalar_one()
    return key_to_api(row.id, row.principal_id, row.prefix, row.created_at, revoked_at)


async def key_home(conn: AsyncConnection, key_id: uuid.UUID) -> str | None:
    """The home region a key was created in (None if it is unknown here)."""
    home: str | None = (await conn.execute(
        sa.select(K.c.home_region).where(K.c.id == key_id))).scalar_one_or_none()
    return home


_LOOKUP = (
    sa.select(K.c.id, K.c.hash, K.c.principal_id, P.c.name, P.c.role, P.c.rate_per_second,
              P.c.rate_burst,
              sa.exists().where(R.c.key_id == K.c.id).label("revoked"))
    .select_from(K.join(P, P.c.id == K.c.principal_id))
    .where(K.c.prefix == sa.bindparam("prefix")))


class Authenticator:
    """Turns a bearer key into a Principal, with a short in-memory cache (see the module
    docstring for what that means for revocation)."""

    def __init__(self, engine: AsyncEngine, cache_seconds: float = 5.0,
                 max_entries: int = 10_000) -> None:
        self.engine = engine
        self.cache_seconds = cache_seconds
        self.max_entries = max_entries
        # prefix -> (hash of the whole key, principal, monotonic expiry)
        self._cache: dict[str, tuple[str, Principal, float]] = {}

    async def authenticate(self, key: str) -> Principal:
        """The principal of a valid, unrevoked key; Unauthenticated otherwise. The error
        message never repeats the key."""
        prefix = key_prefix(key)
        if prefix is None:
            raise Unauthenticated("Malformed API key: expected 'pck_<prefix>_<secret>'")
        digest = hash_key(key)
        now = time.monotonic()
        cached = self._cache.get(prefix)
        if cached is not None and cached[2] > now:
            if hmac.compare_digest(cached[0], digest):
                return cached[1]
            raise Unauthenticated("Invalid API key provided")
        async with self.engine.connect() as conn:
            row = (await conn.execute(_LOOKUP, {"prefix": prefix})).one_or_none()
        if row is None or not hmac.compare_digest(str(row.hash), digest):
            raise Unauthenticated("Invalid API key provided")
        if row.revoked:
            raise Unauthenticated("This API key has been revoked", code="api_key_revoked")
        principal = Principal(id=row.principal_id, name=row.name, role=row.role, key_id=row.id,
                              rate_per_second=row.rate_per_second, rate_burst=row.rate_burst)
        if len(self._cache) >= self.max_entries:
            self._cache = {p: e for p, e in self._cache.items() if e[2] > now}
            if len(self._cache) >= self.max_entries:
                self._cache.clear()
        self._cache[prefix] = (digest, principal, now + self.cache_seconds)
        return principal

    def forget(self, key_id: uuid.UUID) -> None:
        """Drop a key from the cache at once (called where it is revoked)."""
        self._cache = {p: e for p, e in self._cache.items() if e[1].key_id != key_id}


@dataclass(frozen=True)
class BootstrapAdmin:
    """The first admin of a cluster: its principal id, key id and key (shown once)."""

    principal_id: uuid.UUID
    key_id: uuid.UUID
    key: str


def bootstrap_admin_sync(dsn: str, region: str, name: str = "bootstrap-admin"
                         ) -> BootstrapAdmin:
    """Create the first admin principal and its key in the store at `dsn` (libpq URL),
    homed in `region`; for `paycluster up` and test fixtures, before any node runs."""
    return create_principal_sync(dsn, region, name, "admin")


def create_principal_sync(dsn: str, region: str, name: str, role: str) -> BootstrapAdmin:
    """Create a principal with `role` and one key for it in the store at `dsn` (libpq
    URL), homed in `region`, in one transaction; for the lab's own principals (the
    bootstrap admin, the geo routers) before or beside the nodes."""
    import psycopg

    from region_node.ids import new_id
    from region_node.regions import RegionCatalog

    catalog = RegionCatalog()
    principal_id = catalog.stamp(new_id(), region)
    key_id = catalog.stamp(new_id(), region)
    new = make_key()
    with psycopg.connect(dsn) as conn:
        conn.execute("insert into principals (id, name, role, home_region) "
                     "values (%s, %s, %s, %s)", (principal_id, name, role, region))
        conn.execute("insert into api_keys (id, principal_id, prefix, hash, home_region) "
                     "values (%s, %s, %s, %s, %s)",
                     (key_id, principal_id, new.prefix, new.hash, region))
    return BootstrapAdmin(principal_id=principal_id, key_id=key_id, key=new.key)
