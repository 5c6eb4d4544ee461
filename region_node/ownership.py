"""Who serves which home region, as this region's store currently says.

Ownership is an append-only log (migration 0004), so no row is ever written by two
regions (which replication would count as an `update_origin_differs` conflict):

- `ownership_epochs(home_region, epoch, serving_region)`: the owner of a home region is
  its row with the highest epoch. Epoch 1 is inserted by the home region itself at its
  first start (`OwnershipMap.bootstrap`); every later epoch by the region that takes over
  (`take`), with the fencing token of the quorum lock `ownership:<home>` as the epoch, so
  two regions never insert the same key (the failover guard, `replication.failover`).
- `ownership_bans(home_region, epoch)`: inserted by the owner of that epoch when a planned
  handover starts (`ban`); no write for the home is accepted under a banned epoch.

Every writing transaction calls `assert_serving` first: it takes the home region's
ownership lock (a transaction-scoped advisory lock) shared, then reads owner and ban.
`ban` takes the same lock exclusive before inserting the ban, so it waits for every
writer that already passed the check, and every writer that comes later queues behind
it and then (READ COMMITTED: its next statement sees the committed ban) is refused. All
writes of an epoch therefore commit before its ban in the owner's WAL, and logical
replication applies an origin's transactions in commit order: a region that sees the
ban has every write made under that epoch.

Reads here are a cached snapshot refreshed every `ownership_refresh_seconds`: a stale
entry costs at most a forwarding hop that the receiving region refuses (503, the client
retries), never a write by the wrong region.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from region_node import schema, write_guard
from region_node.db import Database
from region_node.errors import Conflict, RegionUnavailable

EPOCHS = schema.ownership_epochs
BANS = schema.ownership_bans
log = logging.getLogger(__name__)

CURRENT_ALL = sa.text("""
select distinct on (e.home_region) e.home_region, e.epoch, e.serving_region,
       exists (select 1 from ownership_bans b
                where b.home_region = e.home_region and b.epoch = e.epoch) as banned
  from ownership_epochs e
 order by e.home_region, e.epoch desc
""")


@dataclass(frozen=True)
class Owner:
    """The serving region of a home region, the ownership epoch, and whether writes under
    that epoch are banned (a planned handover is in progress)."""

    home_region: str
    serving_region: str
    epoch: int
    banned: bool = False


@dataclass(frozen=True)
class PeerOwnership:
    """Another region's view of the ownership table (as its gRPC GetOwnership answers:
    no ban flags)."""

    region: str
    entries: tuple[Owner, ...]


class OwnershipMap:
    """Cached view of the current ownership epochs for one region node."""

    def __init__(self, db: Database, region: str, refresh_seconds: float) -> None:
        self.db = db
        self.region = region
        self.refresh_seconds = refresh_seconds
        self._owners: dict[str, Owner] = {}
        self._loaded_at = 0.0
        # The refresh in flight, shared by every request that finds the map stale at
        # the same time (single flight): without it, N concurrent requests ran N
        # identical reads each time the map went stale.
        self._refreshing: asyncio.Task[None] | None = None

    async def bootstrap(self) -> None:
        """Claim our own home region at epoch 1 if nobody did yet (first start of a region).

        Only this region ever inserts (its own name, 1), so the insert cannot collide with
        another region's under replication; a later epoch (a takeover) stays the owner.
        """
        async def step(conn: AsyncConnection) -> None:
            await conn.execute(pg_insert(EPOCHS).values(home_region=self.region, epoch=1,
                                                      serving_region=self.region)
                               .on_conflict_do_nothing())
        await self.db.transaction(step)
        await self.refresh()

    async def refresh(self) -> None:
        """Reload the map from the store."""
        async with self.db.reads.connect() as conn:
            rows = (await conn.execute(CURRENT_ALL)).all()
        self._owners = {r.home_region: Owner(r.home_region, r.serving_region, int(r.epoch),
                                             bool(r.banned))
                        for r in rows}
        self._loaded_at = time.monotonic()

    async def owner(self, home_region: str) -> Owner:
        """Who serves `home_region`; a home not in the table yet is served by itself."""
        if time.monotonic() - self._loaded_at > self.refresh_seconds:
            if self._refreshing is None or self._refreshing.done():
                self._refreshing = asyncio.ensure_future(self.refresh())
            # shield: a cancelled request must not cancel the read the others wait for.
            with contextlib.suppress(Exception):
                await asyncio.shield(self._refreshing)
        return self._owners.get(home_region, Owner(home_region, home_region, 0))

    def snapshot(self) -> list[Owner]:
        """Every known entry, for status output."""
        return sorted(self._owners.values(), key=lambda o: o.home_region)

    async def run(self, stop: asyncio.Event) -> None:
        """Keep the cache fresh in the background: refresh whenever it is
        `refresh_seconds` old (the ownership leases' upkeep refreshes it more often on a
        node of several regions, and then this loop rarely reads)."""
        while not stop.is_set():
            wait = self._loaded_at + self.refresh_seconds - time.monotonic()
            if wait <= 0:
                wait = self.refresh_seconds  # also the retry interval of a failed read
                try:
                    await self.refresh()
                except Exception as exc:
                    log.warning("ownership refresh failed: %s", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), wait)


# Writers of a home region take this advisory lock shared, a ban or takeover takes it
# exclusive. PostgreSQL queues heavyweight locks fairly: once a ban waits, later writers
# queue behind it, so it waits only for the writers in flight (a FOR UPDATE on a row that
# writers share-lock without pause could starve). Class id: "own" in ASCII.
LOCK_CLASS = 0x6F776E
_LOCK_SHARED = sa.text("select pg_advisory_xact_lock_shared(:cls, hashtext(:home))")
# The same, and the transaction may not outlive the lease (PostgreSQL 17+: the session
# is ended and nothing commits if it does; the timer starts here, before the lock wait).
_LOCK_SHARED_BOUNDED = sa.text(
    "select pg_advisory_xact_lock_shared(:cls, hashtext(:home)), "
    "set_config('transaction_timeout', :budget, true)")
_LOCK_EXCLUSIVE = sa.text("select pg_advisory_xact_lock(:cls, hashtext(:home))")
_CURRENT_OF = sa.text("""
select e.epoch, e.serving_region,
       exists (select 1 from ownership_bans b
                where b.home_region = e.home_region and b.epoch = e.epoch) as banned
  from ownership_epochs e
 where e.home_region = :home
 order by e.epoch desc limit 1
""")


async def _current(conn: AsyncConnection, home_region: str, *,
                   exclusive: bool, budget_ms: int | None = None) -> sa.Row[Any, Any] | None:
    """Lock the home region's ownership (shared for writers, exclusive for a ban or a
    takeover), then read its current epoch. Two statements: under READ COMMITTED the read
    takes its snapshot after the lock is granted, so it sees a ban committed meanwhile.
    `budget_ms` bounds the whole transaction (`transaction_timeout`)."""
    params: dict[str, Any] = {"cls": LOCK_CLASS, "home": home_region}
    if exclusive:
        await conn.execute(_LOCK_EXCLUSIVE, params)
    elif budget_ms is not None:
        await conn.execute(_LOCK_SHARED_BOUNDED, {**params, "budget": str(budget_ms)})
    else:
        await conn.execute(_LOCK_SHARED, params)
    return (await conn.execute(_CURRENT_OF, {"home": home_region})).one_or_none()


async def serving_region(conn: AsyncConnection, home_region: str) -> str:
    """Inside a transaction: the region serving `home_region` now (the home itself while
    it is not in the log), with the home's ownership lock held shared until commit, so no
    ban or takeover at this region commits before the caller does."""
    row = await _current(conn, home_region, exclusive=False)
    return str(row.serving_region) if row is not None else home_region


async def assert_serving(conn: AsyncConnection, region: str, home_region: str) -> int:
    """Inside a writing transaction: fail unless `region` serves `home_region` under an
    epoch that is not banned; returns the epoch (0: the home is not in the log yet and
    serves itself). The home's ownership lock is held shared until commit, so a ban or
    takeover at this region cannot commit between the check and the write.

    With a write guard registered for `region` (a node's ownership leases), the region
    must also hold a valid lease whose token is that epoch, with more than the lease
    margin left, and the transaction is bounded to end before the lease does
    (`region_node.leases`); else 503 ``lease_lost``."""
    guard = write_guard.guard_for(region)
    budget = guard.budget_ms(home_region) if guard is not None else None
    row = await _current(conn, home_region, exclusive=False, budget_ms=budget)
    serving = row.serving_region if row is not None else home_region
    if serving != region:
        raise RegionUnavailable(
            f"Region {region} does not serve home region {home_region} (served by {serving})",
            code="not_owner")
    if row is None:
        return 0
    epoch = int(row.epoch)
    if row.banned:
        raise RegionUnavailable(
            f"Writes for home region {home_region} are paused for a handover; retry shortly",
            code="ownership_handover")
    if guard is not None:
        guard.check(home_region, epoch)
    return epoch


async def ban(db: Database, region: str, home_region: str) -> int:
    """At the owner: ban writes under the current epoch of `home_region`; returns it.

    Waits for the writers that already passed `assert_serving` (the home's ownership lock,
    exclusive; later writers queue behind it and then see the ban). Idempotent. Conflict
    (409) if this region is not the owner.
    """
    async def step(conn: AsyncConnection) -> int:
        row = await _current(conn, home_region, exclusive=True)
        if row is None or row.serving_region != region:
            raise Conflict(f"Region {region} does not own home region {home_region}",
                           code="not_owner")
        await conn.execute(pg_insert(BANS).values(home_region=home_region, epoch=row.epoch,
                                                  banned_by=region)
                           .on_conflict_do_nothing())
        return int(row.epoch)
    return await db.transaction(step)


async def current(db: Database, home_region: str) -> tuple[int, str, bool] | None:
    """(epoch, serving region, banned) of `home_region` in this store; None if unknown."""
    async with db.engine.connect() as conn:
        row = (await conn.execute(_CURRENT_OF, {"home": home_region})).one_or_none()
    return None if row is None else (int(row.epoch), str(row.serving_region), bool(row.banned))


async def check_takeable(db: Database, region: str, home_region: str) -> None:
    """Conflict (409 ``not_banned``) unless a planned take of `home_region` by `region`
    could succeed now: the current epoch is ours, or banned in this store (caught up)."""
    row = await current(db, home_region)
    if row is not None and row[1] != region and not row[2]:
        raise Conflict(f"Epoch {row[0]} of {home_region} (served by {row[1]}) is not banned "
                       "here yet", code="not_banned")


async def take(db: Database, region: str, home_region: str, epoch: int, *,
               forced: bool = False, takeover: dict[str, Any] | None = None) -> int:
    """Make `region` the owner of `home_region` under `epoch` (the fencing token of the
    lease ``ownership:<home>``, held by `region`: `region_node.leases`); returns it.

    Refused (409) unless `epoch` is above the current one and the current epoch, as this
    region's store has it, is banned (which proves this store holds every write made
    under it) or is already this region's. `forced` (a crash or partition takeover: the
    old owner cannot ban) skips the ban check; the takeover is then recorded in
    ``ownership_takeovers`` with `takeover` (from_region, from_epoch, positions,
    detail). Idempotent for the same (region, epoch).
    """
    async def step(conn: AsyncConnection) -> int:
        row = await _current(conn, home_region, exclusive=True)
        if row is not None and int(row.epoch) == epoch and row.serving_region == region:
            return epoch
        if row is not None and int(row.epoch) >= epoch:
            # epoch=<digits>: 16-digit epochs must survive the card masker (redact.py).
            raise Conflict(f"epoch={epoch} of {home_region} is not above the current "
                           f"epoch={row.epoch}", code="stale_epoch")
        if (not forced and row is not None and row.serving_region != region
                and not row.banned):
            raise Conflict(f"epoch={row.epoch} of {home_region} (served by "
                           f"{row.serving_region}) is not banned here yet", code="not_banned")
        await conn.execute(EPOCHS.insert().values(home_region=home_region, epoch=epoch,
                                                  serving_region=region))
        if forced or takeover is not None:
            info = dict(takeover or {})
            await conn.execute(_TAKEOVER, {
                "home": home_region, "epoch": epoch, "region": region,
                "from_region": info.get("from_region",
                                        row.serving_region if row is not None else None),
                "from_epoch": info.get("from_epoch", int(row.epoch) if row is not None
                                       else None),
                "forced": forced, "positions": json.dumps(info.get("positions") or {}),
                "detail": info.get("detail")})
        return epoch
    return await db.transaction(step)


_TAKEOVER = sa.text("""
insert into ownership_takeovers (home_region, epoch, serving_region, from_region, from_epoch,
                                 forced, positions, detail)
values (:home, :epoch, :region, :from_region, :from_epoch, :forced,
        cast(:positions as jsonb), :detail)
on conflict do nothing
""")
