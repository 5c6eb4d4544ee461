"""Who serves which home region, as this region's store currently says.

`region_ownership` replicates between regions and is edited only by failover
(replication/ guard, under a majority lease). Reads here are a cached snapshot refreshed
every `ownership_refresh_seconds`: a stale entry costs at most a forwarding hop that the
receiving region refuses, never a write by the wrong region, because the writing
transaction re-checks ownership under lock (see `assert_serving`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from region_node import schema
from region_node.db import Database
from region_node.errors import RegionUnavailable

OWN = schema.region_ownership
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Owner:
    """The serving region of a home region and the ownership epoch."""

    home_region: str
    serving_region: str
    epoch: int


class OwnershipMap:
    """Cached view of `region_ownership` for one region node."""

    def __init__(self, db: Database, region: str, refresh_seconds: float) -> None:
        self.db = db
        self.region = region
        self.refresh_seconds = refresh_seconds
        self._owners: dict[str, Owner] = {}
        self._loaded_at = 0.0

    async def bootstrap(self) -> None:
        """Claim our own home region if nobody serves it yet (first start of a region).

        Only this region ever inserts the row keyed by its own name, so the insert cannot
        collide with another region's under replication.
        """
        async def step(conn: AsyncConnection) -> None:
            await conn.execute(pg_insert(OWN).values(home_region=self.region,
                                                   serving_region=self.region, epoch=1)
                               .on_conflict_do_nothing())
        await self.db.transaction(step)
        await self.refresh()

    async def refresh(self) -> None:
        """Reload the map from the store."""
        async with self.db.engine.connect() as conn:
            rows = (await conn.execute(sa.select(OWN))).all()
        self._owners = {r.home_region: Owner(r.home_region, r.serving_region, r.epoch)
                        for r in rows}
        self._loaded_at = time.monotonic()

    async def owner(self, home_region: str) -> Owner:
        """Who serves `home_region`; a home not in the table yet is served by itself."""
        if time.monotonic() - self._loaded_at > self.refresh_seconds:
            with contextlib.suppress(Exception):
                await self.refresh()
        return self._owners.get(home_region, Owner(home_region, home_region, 0))

    def snapshot(self) -> list[Owner]:
        """Every known entry, for status output."""
        return sorted(self._owners.values(), key=lambda o: o.home_region)

    async def run(self, stop: asyncio.Event) -> None:
        """Keep the cache fresh in the background."""
        while not stop.is_set():
            try:
                await self.refresh()
            except Exception as exc:
                log.warning("ownership refresh failed: %s", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.refresh_seconds)


async def assert_serving(conn: AsyncConnection, region: str, home_region: str) -> int:
    """Inside a writing transaction: fail unless `region` serves `home_region`; returns the
    epoch. The row is share-locked so a takeover cannot commit between check and write."""
    row = (await conn.execute(sa.select(OWN).where(OWN.c.home_region == home_region)
                              .with_for_update(read=True))).one_or_none()
    serving = row.serving_region if row is not None else home_region
    if serving != region:
        raise RegionUnavailable(
            f"Region {region} does not serve home region {home_region} (served by {serving})",
            code="not_owner")
    return int(row.epoch) if row is not None else 0
