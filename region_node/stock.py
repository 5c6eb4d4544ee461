"""Global stock without overselling: per-region allotments (escrow) and grants between them.

A SKU's stock is split into allotments, one per region. A region sells from its own
allotment with a local transaction (`reserve`, then `confirm` or `release`), so most
orders never cross a region, and the store itself refuses to sell beyond the allotment
(`sold + reserved <= allotted` is a CHECK constraint). When an allotment runs low the
region asks another region to *give* it units (`give`, run by the giver, under the quorum
lock's fencing token) and then *receives* them (`receive_grant`, exactly once per grant).
Units in flight between give and receive belong to nobody, so they can never be sold
twice; summed over the cluster, allotted units plus units in flight always equal the
stock.

Every row has one writer: the SKU row its home region, an allotment row its region, a
grant the giving region, a receipt the receiving region.
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection

from region_node import schema
from region_node.errors import Conflict, InvalidRequest, NotFound

S = schema.skus
AL = schema.sku_allotments
G = schema.stock_grants
GR = schema.stock_grant_receipts

# The stock mover's poll (every `transfer_poll_seconds`, usually finding nothing):
# prebuilt, no SQLAlchemy compilation or cache-key work per poll.
_GRANTS_PENDING = sa.text("""
    select g.* from stock_grants g
      left join stock_grant_receipts r on r.grant_id = g.id
     where g.to_region = :me and r.grant_id is null
     order by g.created_at limit :limit
""")

MODES = ("escrow", "strict")


class StaleFence(Conflict):
    """A grant request carried a fencing token older than one this allotment has seen."""

    code = "stale_fencing_token"


@dataclass(frozen=True)
class Grant:
    """Units one region gave another."""

    id: uuid.UUID
    sku: str
    from_region: str
    to_region: str
    units: int
    fence: int

    @classmethod
    def from_row(cls, row: Row[Any]) -> Grant:
        """From a `stock_grants` row."""
        return cls(row.id, row.sku, row.from_region, row.to_region, row.units, row.fence)


@dataclass(frozen=True)
class GrantRequest:
    """A region asking a donor for units of a SKU, under its quorum-lock fencing token."""

    grant_id: uuid.UUID
    sku: str
    to_region: str
    wanted: int
    fence: int


def split(stock: int, regions: list[str], mode: str, home: str) -> dict[str, int]:
    """Initial allotments: equal shares in escrow mode (the remainder to the first
    regions), everything at the SKU's home region in strict mode."""
    if mode == "strict":
        return {r: (stock if r == home else 0) for r in regions}
    share, extra = divmod(stock, len(regions))
    return {r: share + (1 if i < extra else 0) for i, r in enumerate(sorted(regions))}


def home_for(sku: str, regions: list[str]) -> str:
    """The region that creates (and so owns) a SKU's row: a stable hash of its name, so
    two regions asked to create the same SKU send both requests to the same place."""
    ordered = sorted(regions)
    digest = int.from_bytes(hashlib.sha256(sku.encode()).digest()[:8], "big")
    return ordered[digest % len(ordered)]


async def create_sku(conn: AsyncConnection, *, sku: str, stock: int, mode: str,
                     home_region: str, regions: list[str]) -> Row[Any]:
    """Create a SKU and this (home) region's allotment; 409 if it exists."""
    initial = split(stock, regions, mode, home_region)
    row = (await conn.execute(
        pg_insert(S).values(sku=sku, home_region=home_region, stock=stock, mode=mode,
                            initial_split=initial)
        .on_conflict_do_nothing().returning(*S.c))).one_or_none()
    if row is None:
        raise Conflict(f"SKU '{sku}' already exists", code="sku_exists", param="sku")
    await ensure_allotment(conn, sku_row=row, region=home_region)
    return row


async def get_sku(conn: AsyncConnection, sku: str) -> Row[Any]:
    """The SKU row (this region's copy); NotFound if unknown here."""
    row = (await conn.execute(sa.select(S).where(S.c.sku == sku))).one_or_none()
    if row is None:
        raise NotFound(f"No such SKU: '{sku}'", param="sku")
    return row


async def ensure_allotment(conn: AsyncConnection, *, sku_row: Row[Any], region: str) -> None:
    """Create this region's allotment row from the SKU's initial split, once."""
    units = int(sku_row.initial_split.get(region, 0))
    await conn.execute(pg_insert(AL).values(sku=sku_row.sku, region=region, allotted=units)
                       .on_conflict_do_nothing())


async def reserve(conn: AsyncConnection, *, sku: str, region: str, quantity: int) -> bool:
    """Reserve units from this region's allotment; False when it has too few."""
    row = (await conn.execute(
        AL.update().where(AL.c.sku == sku, AL.c.region == region,
                          AL.c.allotted - AL.c.sold - AL.c.reserved >= quantity)
        .values(reserved=AL.c.reserved + quantity, updated_at=sa.func.now())
        .returning(AL.c.sku))).first()
    return row is not None


async def confirm(conn: AsyncConnection, *, sku: str, region: str, quantity: int) -> None:
    """Reserved units are sold (the order's payment succeeded)."""
    await conn.execute(AL.update().where(AL.c.sku == sku, AL.c.region == region)
                       .values(reserved=AL.c.reserved - quantity, sold=AL.c.sold + quantity,
                               updated_at=sa.func.now()))


async def release(conn: AsyncConnection, *, sku: str, region: str, quantity: int) -> None:
    """Reserved units go back to the allotment (the order's payment failed)."""
    await conn.execute(AL.update().where(AL.c.sku == sku, AL.c.region == region)
                       .values(reserved=AL.c.reserved - quantity, updated_at=sa.func.now()))


async def donors(conn: AsyncConnection, *, sku: str, me: str) -> list[tuple[str, int]]:
    """Other regions by what they could give, most first (from this region's replica,
    which may be stale: the giver decides with its own numbers)."""
    rows = (await conn.execute(
        sa.select(AL.c.region, (AL.c.allotted - AL.c.sold - AL.c.reserved).label("free"))
        .where(AL.c.sku == sku, AL.c.region != me))).all()
    known = {r.region: int(r.free) for r in rows}
    sku_row = await get_sku(conn, sku)
    for region, units in sku_row.initial_split.items():
        known.setdefault(region, int(units))  # its allotment row has not replicated yet
    known.pop(me, None)
    return sorted(((r, f) for r, f in known.items() if f > 0), key=lambda x: -x[1])


async def give(conn: AsyncConnection, *, grant_id: uuid.UUID, sku: str, me: str, to_region: str,
               wanted: int, fence: int) -> Grant | None:
    """Giver side: move up to `wanted` free units out of this region's allotment.

    Refuses a fencing token not greater than the newest this allotment has seen (a lock
    holder that was paused past its lease, while a newer holder acted here). Returns
    None when nothing is free. Idempotent per grant id.
    """
    if wanted <= 0:
        raise InvalidRequest("units must be positive", param="units")
    existing = (await conn.execute(sa.select(G).where(G.c.id == grant_id))).one_or_none()
    if existing is not None:
        return Grant.from_row(existing)
    sku_row = await get_sku(conn, sku)
    await ensure_allotment(conn, sku_row=sku_row, region=me)
    mine = (await conn.execute(sa.select(AL).where(AL.c.sku == sku, AL.c.region == me)
                               .with_for_update())).one()
    if fence <= mine.fence:
        # fence=<digits>: 16-digit tokens must survive the card masker (redact.py).
        raise StaleFence(f"Fencing token fence={fence} is older than fence={mine.fence} "
                         f"for '{sku}'")
    free = mine.allotted - mine.sold - mine.reserved
    units = min(wanted, free)
    await conn.execute(AL.update().where(AL.c.sku == sku, AL.c.region == me)
                       .values(allotted=AL.c.allotted - max(units, 0), fence=fence,
                               updated_at=sa.func.now()))
    if units <= 0:
        return None
    row = (await conn.execute(G.insert().values(
        id=grant_id, sku=sku, from_region=me, to_region=to_region, units=units, fence=fence)
        .returning(*G.c))).one()
    return Grant.from_row(row)


async def grant(conn: AsyncConnection, *, request: GrantRequest, me: str) -> Grant:
    """Giver side of a peer's request (`give`): the answer names the request's grant,
    SKU, regions and fence; units 0 when nothing is free."""
    given = await give(conn, grant_id=request.grant_id, sku=request.sku, me=me,
                       to_region=request.to_region, wanted=request.wanted,
                       fence=request.fence)
    return Grant(request.grant_id, request.sku, me, request.to_region,
                 given.units if given else 0, request.fence)


async def receive_grant(conn: AsyncConnection, *, grant: Grant, me: str) -> bool:
    """Receiver side: add a grant's units to this region's allotment, exactly once."""
    if grant.to_region != me:
        raise InvalidRequest(f"grant {grant.id} is for {grant.to_region}, not {me}")
    inserted = (await conn.execute(
        pg_insert(GR).values(grant_id=grant.id, sku=grant.sku, to_region=me, units=grant.units)
        .on_conflict_do_nothing().returning(GR.c.grant_id))).first()
    if inserted is None:
        return False
    sku_row = await get_sku(conn, grant.sku)
    await ensure_allotment(conn, sku_row=sku_row, region=me)
    await conn.execute(AL.update().where(AL.c.sku == grant.sku, AL.c.region == me)
                       .values(allotted=AL.c.allotted + grant.units, updated_at=sa.func.now()))
    return True


async def grants_pending(conn: AsyncConnection, *, me: str, limit: int = 100) -> list[Grant]:
    """Grants to this region (replicated in) that it has not received yet."""
    rows = (await conn.execute(_GRANTS_PENDING, {"me": me, "limit": limit})).all()
    return [Grant.from_row(r) for r in rows]


async def view(conn: AsyncConnection, sku: str) -> dict[str, Any]:
    """`GET /v1/skus/{sku}`: stock, sold, reserved and every region's allotment, as this
    region's copy shows them (units in flight between regions are listed separately)."""
    sku_row = await get_sku(conn, sku)
    rows = (await conn.execute(sa.select(AL).where(AL.c.sku == sku).order_by(AL.c.region))
            ).all()
    in_flight = (await conn.execute(
        sa.select(sa.func.coalesce(sa.func.sum(G.c.units), 0))
        .select_from(G.outerjoin(GR, GR.c.grant_id == G.c.id))
        .where(G.c.sku == sku, GR.c.grant_id.is_(None)))).scalar_one()
    allotments = {r.region: {"allotted": r.allotted, "sold": r.sold, "reserved": r.reserved,
                             "available": r.allotted - r.sold - r.reserved} for r in rows}
    for region, units in sku_row.initial_split.items():
        allotments.setdefault(region, {"allotted": int(units), "sold": 0, "reserved": 0,
                                       "available": int(units)})
    return {
        "object": "sku", "sku": sku, "stock": sku_row.stock, "mode": sku_row.mode,
        "home_region": sku_row.home_region,
        "sold": sum(a["sold"] for a in allotments.values()),
        "reserved": sum(a["reserved"] for a in allotments.values()),
        "in_flight": int(in_flight), "allotments": allotments,
    }
