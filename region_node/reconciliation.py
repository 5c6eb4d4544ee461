"""Settling reconciliation items: the operator's side of a lost tail.

`replication.reconcile.lost_tail` lists what a returning region committed and no survivor
has (``reconciliation_items``); nothing there is ever applied by the system. An operator
settles each item once, with one of:

- ``acknowledge`` (any item): settled outside the system, e.g. the customer was told a
  lost payment did not happen. A note says how; no money moves.
- ``claw_back`` (orphan credits only): take the credit back from the payee, who must have
  the available funds (402 ``insufficient_funds`` otherwise, nothing written): payee
  -amount, suspense +amount.
- ``write_off`` (orphan credits, also orphan refund credits): the house absorbs it:
  funding -amount, suspense +amount.

Both money resolutions need the credit parked in suspense first (`region_node.suspense`;
409 ``not_parked``), and either brings that suspense balance back to zero.

The resolution row (``reconciliation_resolutions``, replicated, insert-only) is keyed
like the item, so an item is settled once cluster-wide (409 ``already_resolved``). That
key must only ever be inserted by ONE region (`resolver`), fenced by an ownership epoch:
for an orphan credit the region serving the payee's home right now (a claw-back writes the
payee's account, which only that region may write), for an orphan refund credit the
region whose clearing account paid it (it alone writes its suspense and funding accounts),
for every other item the region serving the item's home region. The row, the posting and
the caller's audit row commit in one transaction; concurrent resolves of one item queue
on the row's key and all but one get 409.

Suspense accounts are per region, like clearing accounts: the credit region parked the
orphan credit in ITS suspense account (-amount), and a claw-back or write-off posts
+amount into the RESOLVING region's suspense account. When those differ (the payee's home
moved since, e.g. by a planned handover), each region's suspense balance stays non-zero
and their sum per currency is zero, exactly as the clearing accounts of a settled
cross-region payment: the open exposure is the cluster-wide sum, which the invariants
(`cluster.invariants`) and the reconciliation listing count.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from region_node import ledger, ownership, schema, suspense
from region_node.errors import Conflict, InvalidRequest, NotFound
from region_node.ids import parse_id

R = schema.reconciliation_resolutions

ACKNOWLEDGE = "acknowledge"
CLAW_BACK = "claw_back"
WRITE_OFF = "write_off"
RESOLUTIONS = (ACKNOWLEDGE, CLAW_BACK, WRITE_OFF)
MOVES_MONEY = (CLAW_BACK, WRITE_OFF)


@dataclass(frozen=True)
class Item:
    """One listed reconciliation item (the columns a resolution needs)."""

    home_region: str
    takeover_epoch: int
    item_id: uuid.UUID
    item_kind: str
    currency: str | None
    amount: int | None
    detail: dict[str, Any]

    @property
    def is_orphan_credit(self) -> bool:
        """A credit whose debit was lost (parked in its region's suspense account)."""
        return self.item_kind == suspense.ITEM_KIND

    @property
    def is_orphan_refund_credit(self) -> bool:
        """A payer's refund credit whose merchant debit was lost (parked the same way)."""
        return self.item_kind == suspense.REFUND_ITEM_KIND

    def key(self) -> dict[str, Any]:
        """The item's (and its resolution's) primary key as bind parameters."""
        return {"home": self.home_region, "epoch": self.takeover_epoch, "item": self.item_id}


def payee_home(detail: dict[str, Any]) -> str | None:
    """The home region of an orphan credit's payee, as the lost transfer named it
    (``to_home``); the same in every region's copy of the item."""
    value = detail.get("to_home")
    return str(value) if value else None


def resolver_region(item_kind: str, detail: dict[str, Any], serving_home: str,
                    serving_payee_home: str | None = None) -> str | None:
    """The one region allowed to settle an item of `item_kind` with `detail`.

    An orphan credit: `serving_payee_home` (the region serving the payee's home region
    right now), else, for an item that names no payee home, its credit region (None if it
    names none either). An orphan refund credit: its credit region. Any other item:
    `serving_home` (the region serving the item's home region right now)."""
    if item_kind == suspense.ITEM_KIND and serving_payee_home:
        return serving_payee_home
    if item_kind in (suspense.ITEM_KIND, suspense.REFUND_ITEM_KIND):
        value = detail.get("credit_region")
        return str(value) if value else None
    return serving_home


def resolver(item: Item, serving_home: str, serving_payee_home: str | None = None) -> str:
    """`resolver_region` of `item`; Conflict if an orphan credit names no region."""
    region = resolver_region(item.item_kind, item.detail, serving_home, serving_payee_home)
    if region is None:
        raise Conflict(f"Orphan credit {item.item_id} names no credit region",
                       code="not_resolvable")
    return region


_ITEM = sa.text("""
    select home_region, takeover_epoch, item_id, item_kind, currency, amount, detail
      from reconciliation_items
     where home_region = :home and takeover_epoch = :epoch and item_id = :item""")


async def get_item(conn: AsyncConnection, home_region: str, takeover_epoch: int,
                   item_id: uuid.UUID) -> Item:
    """One item as this region's store has it; NotFound (it may not have replicated yet)."""
    row = (await conn.execute(_ITEM, {"home": home_region, "epoch": takeover_epoch,
                                      "item": item_id})).one_or_none()
    if row is None:
        raise NotFound(f"No reconciliation item ({home_region}, {takeover_epoch}, {item_id}) "
                       "in this region's store", param="item_id")
    detail = row.detail if isinstance(row.detail, dict) else json.loads(row.detail or "{}")
    return Item(str(row.home_region), int(row.takeover_epoch), row.item_id,
                str(row.item_kind), row.currency, None if row.amount is None
                else int(row.amount), detail)


async def _serving_payee_home(conn: AsyncConnection, item: Item) -> str | None:
    """The region serving an orphan credit's payee's home now (None for other items, or
    an orphan credit that names no payee)."""
    if not item.is_orphan_credit:
        return None
    home = payee_home(item.detail)
    if home is None:
        payee = parse_id(str(item.detail.get("payee", "")))
        if payee is None:
            return None
        home = (await ledger.get_account(conn, payee)).home_region
    return await ownership.serving_region(conn, home)


def _check_allowed(item: Item, resolution: str) -> None:
    if resolution not in RESOLUTIONS:
        raise InvalidRequest(f"Unknown resolution '{resolution}'", code="invalid_value",
                             param="resolution")
    if resolution == WRITE_OFF and item.is_orphan_refund_credit:
        pass  # the house absorbs a refund paid twice over, like any orphan credit
    elif resolution in MOVES_MONEY and not item.is_orphan_credit:
        raise InvalidRequest(f"{resolution} settles orphan credits only; a "
                             f"'{item.item_kind}' item can only be acknowledged",
                             code="resolution_not_allowed", param="resolution")
    if resolution in MOVES_MONEY and (not item.amount or not item.currency):
        raise InvalidRequest(f"Item {item.item_id} has no amount to move",
                             code="resolution_not_allowed", param="resolution")


async def _payment_of(conn: AsyncConnection, item: Item) -> uuid.UUID:
    """The lost payment of an orphan credit, which must be parked in suspense."""
    try:
        payment_id = uuid.UUID(str(item.detail["payment_id"]))
    except (KeyError, ValueError) as exc:
        raise Conflict(f"Orphan credit {item.item_id} names no payment",
                       code="not_resolvable") from exc
    if item.is_orphan_refund_credit:
        parked = await suspense.is_refund_credit_parked(conn, item.item_id)
    else:
        parked = await suspense.is_parked(conn, payment_id)
    if not parked:
        raise Conflict(f"Orphan credit {item.item_id} is not parked in suspense yet (its "
                       "region parks it once the item has replicated there); retry shortly",
                       code="not_parked")
    return payment_id


async def _move(conn: AsyncConnection, *, region: str, item: Item, resolution: str,
                journal_id: uuid.UUID) -> None:
    """Post a claw-back or write-off of an orphan credit into `region`'s suspense account,
    which brings the parked amount back to zero."""
    assert item.amount is not None and item.currency is not None
    payment_id = await _payment_of(conn, item)
    sus = await ledger.system_account(conn, region=region, kind="suspense",
                                      currency=item.currency)
    if resolution == CLAW_BACK:
        try:
            payee = uuid.UUID(str(item.detail["payee"]))
        except (KeyError, ValueError) as exc:
            raise Conflict(f"Orphan credit {item.item_id} names no payee",
                           code="not_resolvable") from exc
        # lock_accounts orders user accounts before system accounts (no deadlock with a
        # payment or a transfer touching the payee).
        locked = await ledger.lock_accounts(conn, [payee, sus])
        ledger.require_spendable(locked[payee], item.amount, param="payee")
        legs = [(payee, -item.amount), (sus, item.amount)]
    else:
        funding = await ledger.system_account(conn, region=region, kind="funding",
                                              currency=item.currency)
        await ledger.lock_accounts(conn, [funding, sus])
        legs = [(funding, -item.amount), (sus, item.amount)]
    await ledger.post(conn, legs=legs, currency=item.currency, entry_type=resolution,
                      payment_id=payment_id, region=region, journal_id=journal_id)


async def resolve(conn: AsyncConnection, *, region: str, item: Item, resolution: str,
                  note: str, resolved_by: uuid.UUID | None,
                  journal_id: uuid.UUID) -> dict[str, Any]:
    """Settle `item` at `region` in the caller's transaction; returns the resolution.

    The caller has fenced the home region whose accounts this writes and that makes it
    the item's resolver (the item's home for a non-orphan item, the payee's home for an
    orphan credit): `region` serves it. `journal_id` (an id stamped with `region`) names
    the posting of a claw-back or write-off. Errors roll everything back: 400 (resolution
    not allowed for the item's kind), 409 ``wrong_region``, ``already_resolved`` or
    ``not_parked``, 402 ``insufficient_funds`` (claw-back)."""
    _check_allowed(item, resolution)
    # Under the caller's fence `region` serves the homes it was asked to act for, so it
    # stands in for "the region serving them" here.
    allowed = resolver(item, region, await _serving_payee_home(conn, item))
    if allowed != region:
        raise Conflict(f"Item {item.item_id} is settled by region {allowed}, not {region}: "
                       f"ask {allowed}", code="wrong_region")
    moves = resolution in MOVES_MONEY
    # Insert first: a concurrent resolve of the same item waits on this key until we
    # commit (then finds it taken) or roll back (then goes ahead).
    inserted = (await conn.execute(pg_insert(R).values(
        home_region=item.home_region, takeover_epoch=item.takeover_epoch,
        item_id=item.item_id, resolution=resolution, note=note, resolved_by=resolved_by,
        region=region, journal_id=journal_id if moves else None,
        amount=item.amount if moves else None, currency=item.currency if moves else None,
    ).on_conflict_do_nothing().returning(*R.c))).one_or_none()
    if inserted is None:
        existing = (await conn.execute(sa.select(R.c.resolution, R.c.region).where(
            R.c.home_region == item.home_region, R.c.takeover_epoch == item.takeover_epoch,
            R.c.item_id == item.item_id))).one_or_none()
        how = f" ({existing.resolution} at {existing.region})" if existing else ""
        raise Conflict(f"Item {item.item_id} is already resolved{how}",
                       code="already_resolved")
    if moves:
        await _move(conn, region=region, item=item, resolution=resolution,
                    journal_id=journal_id)
    return resolution_to_api(item, inserted._mapping)


def resolution_to_api(item: Item, row: Any) -> dict[str, Any]:
    """The public JSON shape of a resolution."""
    created = row["created_at"]
    return {"id": f"{item.home_region}/{item.takeover_epoch}/{item.item_id}",
            "object": "reconciliation_resolution", "home_region": item.home_region,
            "takeover_epoch": item.takeover_epoch, "item_id": str(item.item_id),
            "item_kind": item.item_kind, "resolution": row["resolution"], "note": row["note"],
            "resolved_by": str(row["resolved_by"]) if row["resolved_by"] else None,
            "region": row["region"],
            "journal_id": str(row["journal_id"]) if row["journal_id"] else None,
            "amount": row["amount"], "currency": row["currency"],
            "created_at": created.isoformat() if hasattr(created, "isoformat") else created}


_LIST = sa.text("""
    select i.home_region, i.takeover_epoch, i.item_id::text as item_id, i.item_kind,
           i.lost_region, i.listed_by, i.epoch, i.status, i.currency, i.amount,
           i.committed_at, i.detail,
           r.resolution, r.note, r.resolved_by::text as resolved_by, r.region as resolved_in,
           r.journal_id::text as resolution_journal_id, r.created_at as resolved_at
      from reconciliation_items i
      left join reconciliation_resolutions r using (home_region, takeover_epoch, item_id)
     order by i.home_region, i.takeover_epoch, i.committed_at""")


def _plain(value: Any) -> Any:
    return value.isoformat() if hasattr(value, "isoformat") else value


async def list_items(conn: AsyncConnection) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every item with its resolution (None while open), and a summary: open items and
    their amounts per kind and currency, and how many are resolved, per resolution."""
    rows = (await conn.execute(_LIST)).mappings().all()
    items: list[dict[str, Any]] = []
    open_by: dict[tuple[str, str | None], dict[str, Any]] = {}
    resolved_by: dict[str, int] = {}
    for r in rows:
        item = {k: _plain(r[k]) for k in (
            "home_region", "takeover_epoch", "item_id", "item_kind", "lost_region",
            "listed_by", "epoch", "status", "currency", "amount", "committed_at", "detail")}
        if r["resolution"] is None:
            item["resolution"] = None
            group = open_by.setdefault((r["item_kind"], r["currency"]), {
                "item_kind": r["item_kind"], "currency": r["currency"], "count": 0,
                "amount": 0})
            group["count"] += 1
            group["amount"] += int(r["amount"] or 0)
        else:
            item["resolution"] = {
                "resolution": r["resolution"], "note": r["note"],
                "resolved_by": r["resolved_by"], "region": r["resolved_in"],
                "journal_id": r["resolution_journal_id"],
                "created_at": _plain(r["resolved_at"])}
            resolved_by[r["resolution"]] = resolved_by.get(r["resolution"], 0) + 1
        items.append(item)
    summary = {"items": len(items), "open": sum(g["count"] for g in open_by.values()),
               "open_by_kind_and_currency": sorted(
                   open_by.values(), key=lambda g: (g["item_kind"], g["currency"] or "")),
               "resolved_by_resolution": resolved_by}
    return items, summary
