"""Admin routes for reconciliation items (a lost tail, `replication.reconcile`): list
them with their resolutions, and settle one (`region_node.reconciliation`). Admins only
(every path here is under /v1/admin/, see api/auth.py).

An item is settled by one region only (`reconciliation.resolver`: for an orphan credit the
region serving the payee's home, wherever that is now); a resolve that arrives elsewhere
is forwarded there over gRPC like any other write (api/routing.py), so an operator may
call any region.
"""

from __future__ import annotations

import uuid
from typing import Any

import sqlalchemy as sa
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from sqlalchemy.ext.asyncio import AsyncConnection

from region_node import ledger, reconciliation
from region_node.api.auth import caller, principal_of
from region_node.api.models import ResolveReconciliationItem
from region_node.api.mutation import Result, node_of, run_mutation
from region_node.api.routing import forward
from region_node.errors import NotFound
from region_node.ids import parse_id

router = APIRouter(prefix="/v1/admin", tags=["admin"], dependencies=[Depends(caller)])


@router.get("/reconciliation")
async def reconciliation_items(request: Request) -> JSONResponse:
    """Items listed for reconciliation after a forced takeover (a returning region's
    transactions no survivor had), each with its resolution (None while open) and the
    region that may settle it (`resolver_region`); a summary of the open items and
    amounts per kind and currency; and the forced takeovers. This region's copy."""
    node = node_of(request)
    async with node.db.engine.connect() as conn:
        items, summary = await reconciliation.list_items(conn)
        takeovers = (await conn.execute(sa.text(
            "select home_region, epoch, serving_region, from_region, from_epoch, forced, "
            "positions, detail, created_at from ownership_takeovers order by created_at")
        )).mappings().all()
    for item in items:
        serving = (await node.ownership.owner(item["home_region"])).serving_region
        payee_home = reconciliation.payee_home(item["detail"] or {})
        serving_payee = (None if payee_home is None
                         else (await node.ownership.owner(payee_home)).serving_region)
        item["resolver_region"] = reconciliation.resolver_region(
            item["item_kind"], item["detail"] or {}, serving, serving_payee)

    def plain(row: Any) -> dict[str, Any]:
        return {k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in row.items()}

    return JSONResponse({"region": node.region, "items": items, "summary": summary,
                         "takeovers": [plain(r) for r in takeovers]})


@router.post("/reconciliation/resolve", status_code=201)
async def resolve(body: ResolveReconciliationItem, request: Request) -> Response:
    """Settle one item: `acknowledge` (any item, no money moves), `claw_back` or
    `write_off` (orphan credits, once parked in suspense). Once per item cluster-wide:
    409 ``already_resolved`` after that. Forwarded to the region that settles the item."""
    node = node_of(request)
    item_id = parse_id(body.item_id)
    if item_id is None:
        raise NotFound(f"No reconciliation item '{body.item_id}'", param="item_id")
    async with node.db.engine.connect() as conn:
        item = await reconciliation.get_item(conn, body.home_region, body.takeover_epoch,
                                             item_id)
        # An orphan credit is settled where the payee's home is served (a claw-back writes
        # the payee's account): a resolve arriving elsewhere goes to that owner like any
        # write, which keeps one inserter of the resolution's key, fenced by the payee
        # home's epoch. The listing names the payee's home; an item that does not is
        # looked up by its payee's account.
        payee_home = None
        if item.is_orphan_credit:
            payee_home = reconciliation.payee_home(item.detail)
            payee = parse_id(str(item.detail.get("payee", "")))
            if payee_home is None and payee is not None:
                payee_home = (await ledger.get_account(conn, payee)).home_region
    serving = (await node.ownership.owner(item.home_region)).serving_region
    serving_payee = (None if payee_home is None
                     else (await node.ownership.owner(payee_home)).serving_region)
    region = reconciliation.resolver(item, serving, serving_payee)
    if region != node.region:
        return await forward(request, region)
    # The ownership fence of what is written and of who may insert the resolution: the
    # payee's home for an orphan credit (our own suspense and funding accounts besides);
    # our own system accounts only for an orphan refund credit (or an orphan credit that
    # names no payee: its credit region settles it); the item's home for anything else.
    home = (payee_home or node.region) if item.is_orphan_credit \
        else node.region if item.is_orphan_refund_credit else item.home_region
    principal = principal_of(request)
    journal_id: uuid.UUID = node.new_id(node.region)

    async def step(conn: AsyncConnection) -> Result:
        current = await reconciliation.get_item(conn, item.home_region, item.takeover_epoch,
                                                item.item_id)
        return 201, await reconciliation.resolve(
            conn, region=node.region, item=current, resolution=body.resolution,
            note=body.note, resolved_by=principal.id, journal_id=journal_id)

    return await run_mutation(request, step, home=home)
