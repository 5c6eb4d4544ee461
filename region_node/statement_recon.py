"""Daily statement reconciliation: the channel's settlement statement against our
operations.

Each statement row is matched with the operation of that reference (our operation id),
by the region serving the operation's home region (rows of homes served elsewhere are
left to that region). Every row ends in one category:

- matched: same amount, currency and outcome;
- fixed (matched after a safe fix): the channel booked a final status (captured, paid,
  returned, declined, failed) while we still wait; settled from the statement, once;
- amount_mismatch, status_mismatch: listed for an operator, nothing changes;
- missing_here: a row we have no operation for (listed);
- missing_at_channel: an operation the channel told us it booked on that day that the
  statement does not show (listed).

Listed differences are `reconciliation_items` (takeover epoch 0, a kind starting with
`statement_` or `channel_`), settled with the existing resolutions (`paycluster reconcile
resolve`, region_node/reconciliation.py). An item's id is derived from the reference and
the kind, so running a day again lists nothing twice; `already_listed` tells a difference
an earlier run (or a late callback) had found from a new one. Fees of matched rows are
posted once per operation to the region's fees account (channel_ops.post_fee).
"""

from __future__ import annotations

import uuid
from collections import Counter
from datetime import UTC, date, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from channel.client import StatementRow
from region_node import channel_ops as ops
from region_node.errors import NotFound, RegionUnavailable
from region_node.ids import parse_id
from region_node.node import Node
from region_node.ownership import assert_serving

CATEGORIES = ("matched", "fixed", "missing_here", "missing_at_channel", "amount_mismatch",
              "status_mismatch")
BOOKED = ("captured", "declined", "failed", "paid", "returned")
"""Channel statuses that appear on a statement (an authorization alone does not)."""
_KIND = {"payment": ops.PAYIN, "payout": ops.PAYOUT}


def default_day(lag_days: int) -> date:
    """The statement day the daily job reconciles (UTC)."""
    return datetime.now(UTC).date() - timedelta(days=lag_days)


def served_homes(node: Node) -> list[str]:
    """The home regions this region serves now (its own if the map is empty)."""
    return [o.home_region for o in node.ownership.snapshot()
            if o.serving_region == node.region and not o.banned] or [node.region]


async def _fenced(node: Node, home: str, fn: Any) -> Any:
    async def step(conn: AsyncConnection) -> Any:
        await assert_serving(conn, node.region, home)
        return await fn(conn)
    return await node.db.transaction(step)


def _side(status: str | None, amount: int | None, currency: str | None) -> dict[str, Any]:
    return {"status": status, "amount": amount, "currency": currency}


async def _match(conn: AsyncConnection, region: str, row: StatementRow,
                 op_id: uuid.UUID | None, home: str, day: date) -> dict[str, Any]:
    """Match one statement row inside the owner's transaction."""
    result: dict[str, Any] = {"reference": row.reference, "kind": row.kind,
                              "channel": _side(row.status, row.amount, row.currency),
                              "ours": None, "fixed": None, "fee_posted": 0, "item": None}

    async def listed(kind: str, op: Any, detail: dict[str, Any], key: str | None = None
                     ) -> None:
        new = await ops.list_item(
            conn, region=region, op=op, item_kind=kind, key=key, home_region=home,
            detail={"day": day.isoformat(), "reference": row.reference,
                    "channel": {"status": row.status, "amount": row.amount,
                                "currency": row.currency, "fee": row.fee},
                    **detail},
            amount=row.amount if op is None else None,
            currency=row.currency if op is None else None,
            status=row.status if op is None else None)
        result["item"] = {"item_kind": kind, "already_listed": not new,
                          "item_id": str(ops.item_id(home, key or
                                                     f"{op.id if op is not None else 'none'}"
                                                     f":{kind}"))}

    op = None
    if op_id is not None:
        try:
            op = await ops.get_operation(conn, op_id, for_update=True)
        except NotFound:
            op = None
    if op is None or _KIND.get(row.kind) != op.kind:
        result["category"] = "missing_here"
        await listed("statement_missing_here", None, {}, key=f"{row.reference}:missing_here")
        return result
    result["ours"] = _side(op.status, op.amount, op.currency)
    if row.amount != op.amount or row.currency != op.currency:
        result["category"] = "amount_mismatch"
        await listed("statement_amount_mismatch", op, {"ours": result["ours"]})
        return result
    outcome = ops.outcome_of(op.kind, row.status)
    if outcome is not None and op.status in ops.WAITING:
        settled = await ops.settle_waiting(conn, region=region, op_id=op.id,
                                           channel_status=row.status, by="statement")
        assert settled is not None  # locked above and still waiting
        result["category"], result["fixed"] = "fixed", "settled"
        result["ours"] = _side(settled.status, settled.amount, settled.currency)
    elif outcome is not None and ops.same_money(op.kind, op.status, outcome):
        result["category"] = "matched"
    else:
        result["category"] = "status_mismatch"
        late = (op.failure_code == ops.TIMEOUT_CODE
                and outcome in (ops.SUCCEEDED, ops.PAID))
        # The same key as a late callback's item: one item per difference.
        await listed("channel_late_success" if late else "statement_status_mismatch", op,
                     {"ours": result["ours"], "failure_code": op.failure_code})
        return result
    if row.fee > 0 and await ops.post_fee(conn, region=region, op_id=op.id, fee=row.fee):
        result["fee_posted"] = row.fee
    return result


_EXPECTED = sa.text("""
    select id, status, amount, currency, channel_status, failure_code
      from channel_operations
     where home_region = :home and channel_status = any(:booked)
       and (coalesce(settled_at, updated_at) at time zone 'UTC')::date = :day
     order by id""")


async def reconcile(node: Node, rows: list[StatementRow], *, day: date) -> dict[str, Any]:
    """Reconcile `rows` (the statement of `day`) for the home regions this region serves;
    returns the report (JSON-able): summary, every difference, fixes, fees."""
    homes = served_homes(node)
    results: list[dict[str, Any]] = []
    elsewhere = 0
    seen: set[str] = set()
    for row in rows:
        op_id = parse_id(row.reference)
        home = node.home_of(op_id) if op_id is not None else None
        if home is not None and home not in homes:
            elsewhere += 1  # the region serving that home reconciles it
            continue
        seen.add(row.reference)
        target = home or node.region

        async def match(conn: AsyncConnection, row: StatementRow = row,
                        op_id: uuid.UUID | None = op_id, target: str = target
                        ) -> dict[str, Any]:
            return await _match(conn, node.region, row, op_id, target, day)
        try:
            results.append(await _fenced(node, target, match))
        except RegionUnavailable as exc:
            results.append({"reference": row.reference, "kind": row.kind,
                            "category": "skipped", "error": str(exc)})
    for home in homes:
        async with node.db.engine.connect() as conn:
            expected = (await conn.execute(_EXPECTED, {"home": home, "booked": list(BOOKED),
                                                       "day": day})).all()
        for op in expected:
            if str(op.id) in seen:
                continue

            async def missing(conn: AsyncConnection, op_id: uuid.UUID = op.id,
                              home: str = home) -> dict[str, Any]:
                current = await ops.get_operation(conn, op_id)
                new = await ops.list_item(conn, region=node.region, op=current,
                                          item_kind="statement_missing_at_channel",
                                          detail={"day": day.isoformat(),
                                                  "channel_status": current.channel_status})
                return {"reference": str(op_id), "kind": current.kind,
                        "category": "missing_at_channel", "channel": None,
                        "ours": _side(current.status, current.amount, current.currency),
                        "fixed": None, "fee_posted": 0,
                        "item": {"item_kind": "statement_missing_at_channel",
                                 "already_listed": not new,
                                 "item_id": str(ops.item_id(
                                     home, f"{op_id}:statement_missing_at_channel"))}}
            results.append(await _fenced(node, home, missing))
    counts = Counter(r["category"] for r in results)
    fees: dict[str, int] = {}
    for r in results:
        if r.get("fee_posted"):
            cur = r["channel"]["currency"]
            fees[cur] = fees.get(cur, 0) + int(r["fee_posted"])
    differences = [r for r in results if r["category"] not in ("matched", "fixed")]
    return {
        "region": node.region, "day": day.isoformat(), "homes": homes,
        "statement_rows": len(rows), "rows_of_other_regions": elsewhere,
        "summary": {c: counts.get(c, 0) for c in (*CATEGORIES, "skipped")},
        "fees_posted": fees,
        "items_new": sum(1 for r in differences if r.get("item")
                         and not r["item"]["already_listed"]),
        "items_already_listed": sum(1 for r in differences if r.get("item")
                                    and r["item"]["already_listed"]),
        "differences": differences,
        "fixed": [r for r in results if r["category"] == "fixed"],
    }


def to_markdown(report: dict[str, Any]) -> str:
    """The report as a markdown page (for the operator's ticket or the daily mail)."""
    lines = [f"# Channel statement {report['day']}, region {report['region']}", "",
             f"{report['statement_rows']} statement rows "
             f"({report['rows_of_other_regions']} of homes served elsewhere).", "",
             "| category | count |", "|---|---|"]
    lines += [f"| {c} | {n} |" for c, n in report["summary"].items()]
    fees = ", ".join(f"{v} {k}" for k, v in sorted(report["fees_posted"].items())) or "none"
    lines += ["", f"Fees posted: {fees}. New items: {report['items_new']}; "
              f"already listed: {report['items_already_listed']}.", ""]
    if report["differences"]:
        lines += ["## Differences", "",
                  "| reference | category | ours | channel | item |", "|---|---|---|---|---|"]
        for d in report["differences"]:
            ours, theirs = d.get("ours") or {}, d.get("channel") or {}
            item = d.get("item") or {}
            lines.append(
                f"| {d['reference']} | {d['category']} | {ours.get('status', '-')} "
                f"{ours.get('amount', '')} | {theirs.get('status', '-')} "
                f"{theirs.get('amount', '')} | {item.get('item_kind', '')}"
                f"{' (known)' if item.get('already_listed') else ''} |")
    if report["fixed"]:
        lines += ["", "## Fixed", ""]
        lines += [f"- {f['reference']}: settled {f['ours']['status']} from the statement"
                  for f in report["fixed"]]
    return "\n".join(lines) + "\n"


_OPEN = sa.text("""
    select i.item_kind, count(*) as n from reconciliation_items i
      left join reconciliation_resolutions r using (home_region, takeover_epoch, item_id)
     where r.item_id is null and i.takeover_epoch = 0
       and (i.item_kind like 'statement\\_%' or i.item_kind like 'channel\\_%')
     group by i.item_kind order by i.item_kind""")


async def open_items(conn: AsyncConnection) -> dict[str, int]:
    """Open channel reconciliation items by kind (this region's copy)."""
    return {str(r.item_kind): int(r.n) for r in (await conn.execute(_OPEN)).all()}


async def operation_counts(conn: AsyncConnection) -> dict[str, dict[str, int]]:
    """Channel operations by kind and status (this region's copy)."""
    rows = (await conn.execute(sa.text(
        "select kind, status, count(*) as n from channel_operations group by kind, status"))
    ).all()
    out: dict[str, dict[str, int]] = {}
    for r in rows:
        out.setdefault(str(r.kind), {})[str(r.status)] = int(r.n)
    return out
