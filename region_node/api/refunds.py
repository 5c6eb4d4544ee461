"""Routes: refunds (create through `POST /v1/payments/{id}/refunds`, read, list per payment).

A refund is executed by the region serving the payee's home (region_node/refunds.py). The
payment id is stamped with the payer's home, so the entry region first finds the payee's
home: from its copy of the payment, else from its own credit of the payee, else by asking
the payer home's owner for the payment (a strong read over gRPC). The refund is then
forwarded there like any write, so one idempotency scope (the payee's home) answers every
retry, wherever it arrives.
"""

from __future__ import annotations

import json
import uuid

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response
from sqlalchemy.ext.asyncio import AsyncConnection

from region_node import access, refunds
from region_node.api.auth import caller, principal_header, principal_of
from region_node.api.mutation import AfterCommit, Result, node_of, run_mutation
from region_node.api.routing import existing_id, from_owner, home_of, owner_route
from region_node.errors import NotFound
from region_node.forwarding import FORWARD_HEADERS, FORWARDED_FROM, ForwardedRequest, Header

router = APIRouter(prefix="/v1", tags=["refunds"], dependencies=[Depends(caller)])


def push_if_pending(request: Request) -> AfterCommit:
    """After commit: a cross-region refund that just went `pending` is delivered now, in
    the background (the replicated refund row is the fallback)."""
    def hook(body: dict[str, object]) -> None:
        if body.get("status") == refunds.PENDING:
            request.app.state.refund_worker.push_soon(uuid.UUID(str(body["id"])))
    return hook


async def _payee_home(request: Request, pid: uuid.UUID) -> str | Response | None:
    """The payee's home region of payment `pid`, or the owner's answer when it refuses to
    show the payment (404, 403); None when nobody can tell (answered 404 here)."""
    node = node_of(request)
    async with node.db.engine.connect() as conn:
        home = await refunds.payee_home_of(conn, pid)
    if home is not None:
        return home
    payer_home = home_of(request, pid)
    if payer_home is None or request.headers.get(FORWARDED_FROM):
        # A forwarded request is never forwarded again (routing.forward): decide here.
        return None
    owner = (await node.ownership.owner(payer_home)).serving_region
    if owner == node.region:
        return None
    # Not replicated here yet: the payer home's owner has the payment (a strong read, as
    # the caller, so its access rules apply).
    carried = principal_header(request)
    headers = [Header(k, v) for k, v in request.headers.items()
               if k.lower() in FORWARD_HEADERS and k.lower() not in ("content-type",
                                                                     "idempotency-key")
               and not (carried is not None and k.lower() == "authorization")]
    if carried is not None:
        headers.append(Header(*carried))
    reply = await node.peers.forward(owner, ForwardedRequest(
        method="GET", path=f"/v1/payments/{pid}", query="consistency=strong",
        headers=tuple(headers), body=b"", origin_region=node.region))
    if reply.status != 200:
        return Response(reply.body, status_code=reply.status, media_type="application/json")
    payment = json.loads(reply.body)
    return home_of(request, uuid.UUID(payment["payee"])) or payer_home


async def create_refund(request: Request, payment_id: str, amount: int | None) -> Response:
    """Refund a payment at the region serving the payee's home (see module docstring)."""
    pid = existing_id(payment_id, "payment")
    node = node_of(request)
    found = await _payee_home(request, pid)
    if isinstance(found, Response):
        return found
    home = found or node.region
    if (forwarded := await owner_route(request, home)) is not None:
        return forwarded
    refund_id = node.new_id(home)
    principal = principal_of(request)

    async def step(conn: AsyncConnection) -> Result:
        row = await refunds.create(conn, region=node.region, refund_id=refund_id,
                                   payment_id=pid, amount=amount, principal=principal,
                                   serving_home=home, payer_home=home_of(request, pid))
        return 201, refunds.to_api(row)

    return await run_mutation(request, step, home=home, after_commit=push_if_pending(request))


@router.get("/refunds/{refund_id}")
async def get(refund_id: str, request: Request,
              consistency: str = Query("local", pattern="^(local|strong)$")) -> Response:
    """A refund and its status (`pending`, `succeeded`, `failed`), from this region's copy
    unless `consistency=strong`; the payer's or the payee's principal."""
    rid = existing_id(refund_id, "refund")
    if (forwarded := await owner_route(request, home_of(request, rid), write=False)):
        return forwarded
    try:
        async with node_of(request).db.engine.connect() as conn:
            row = await refunds.get_refund(conn, rid)
            await refunds.require_party(conn, principal_of(request), row)
    except NotFound as missing:
        return await from_owner(request, missing)
    return JSONResponse(refunds.to_api(row))


@router.get("/payments/{payment_id}/refunds")
async def list_for_payment(payment_id: str, request: Request,
                           consistency: str = Query("local", pattern="^(local|strong)$")
                           ) -> Response:
    """A payment's refunds, oldest first, from this region's copy unless
    `consistency=strong` (then from the region serving the payee's home, which writes
    them); the payer's or the payee's principal."""
    pid = existing_id(payment_id, "payment")
    async with node_of(request).db.engine.connect() as conn:
        home = await refunds.payee_home_of(conn, pid)
    if (forwarded := await owner_route(request, home or home_of(request, pid), write=False)):
        return forwarded
    principal = principal_of(request)
    async with node_of(request).db.engine.connect() as conn:
        rows = await refunds.list_for_payment(conn, pid)
        if home is None and not rows:
            # Neither the payment nor a refund of it is here (yet): ask its owner.
            return await from_owner(request, NotFound(f"No such payment: '{pid}'"))
        await access.require_payment(conn, principal, pid)
        if rows:
            # The payment may not be here (a cross-region payee's copy): the refund knows.
            await refunds.require_party(conn, principal, rows[0])
    return JSONResponse({"object": "list", "data": [refunds.to_api(r) for r in rows],
                         "has_more": False})

