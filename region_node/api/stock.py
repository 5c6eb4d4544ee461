"""Routes: global stock (SKUs) and orders."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response
from sqlalchemy.ext.asyncio import AsyncConnection

from region_node import access, orders, stock
from region_node.api.auth import caller, principal_of, require_admin
from region_node.api.models import CreateOrder, CreateSku
from region_node.api.mutation import Result, node_of, run_mutation
from region_node.api.payments import new_payment, push_if_processing
from region_node.api.routing import existing_id, home_of, owner_route

router = APIRouter(tags=["stock"], dependencies=[Depends(caller)])


def _cluster_regions(request: Request) -> list[str]:
    node = node_of(request)
    return sorted({node.region, *node.settings.peers})


@router.post("/v1/skus", status_code=201, dependencies=[Depends(require_admin)])
async def create_sku(body: CreateSku, request: Request) -> Response:
    """Create a SKU whose stock is split into per-region allotments (escrow), or kept
    whole at one region with every reservation under the global lock (strict)."""
    regions = _cluster_regions(request)
    home = stock.home_for(body.sku, regions)
    if (forwarded := await owner_route(request, home)) is not None:
        return forwarded

    async def step(conn: AsyncConnection) -> Result:
        await stock.create_sku(conn, sku=body.sku, stock=body.stock, mode=body.mode,
                               home_region=home, regions=regions)
        return 201, await stock.view(conn, body.sku)

    return await run_mutation(request, step, home=home)


@router.get("/v1/skus/{sku}")
async def get_sku(sku: str, request: Request,
                  consistency: str = Query("local", pattern="^(local|strong)$")) -> Response:
    """Stock, sold, reserved and per-region allotments (this region's copy)."""
    home = stock.home_for(sku, _cluster_regions(request))
    if (forwarded := await owner_route(request, home, write=False)) is not None:
        return forwarded
    async with node_of(request).db.engine.connect() as conn:
        return JSONResponse(await stock.view(conn, sku))


@router.post("/v1/orders", status_code=201)
async def create_order(body: CreateOrder, request: Request) -> Response:
    """Reserve `quantity` units of a SKU and pay for them. Sold by the region serving
    the payer's home, from its own allotment; more stock is taken from other regions
    under the SKU's quorum lock when the allotment runs low."""
    node = node_of(request)
    payment = new_payment(request, payer=body.payer, payee=body.payee, amount=body.amount,
                          currency=body.currency)
    payer_home = payment.payer_home
    if (forwarded := await owner_route(request, payer_home)) is not None:
        return forwarded
    order = orders.OrderRequest(order_id=node.new_id(payer_home), sku=body.sku,
                                quantity=body.quantity, payment=payment)
    async with node.db.engine.connect() as conn:
        mode = (await stock.get_sku(conn, body.sku)).mode
    principal = principal_of(request)

    async def step(conn: AsyncConnection) -> Result:
        # The payer must be the caller's (a 403 rolls back before stock or money moves).
        await access.require_account(conn, principal, payment.payer, "payer account")
        placed, payment_row = await orders.place(conn, region=node.region, request=order,
                                                 hold_ttl=node.hold_ttl)
        return 201, orders.to_api(placed, payment_row)

    pushed = push_if_processing(request, lambda order_body: order_body.get("payment") or {})

    async def attempt() -> Response:
        return await run_mutation(request, step, home=payer_home, after_commit=pushed,
                                  unrecorded=(orders.OutOfStock,))

    mover = request.app.state.stock_mover
    if mode == "strict":
        async with mover.exclusive(body.sku) as token:
            try:
                return await attempt()
            except orders.OutOfStock:
                if not await mover.replenish(body.sku, body.quantity, exact=True, token=token):
                    raise
                return await attempt()
    try:
        return await attempt()
    except orders.OutOfStock:
        if not await mover.replenish(body.sku, body.quantity):
            raise
        return await attempt()


@router.get("/v1/orders/{order_id}")
async def get_order(order_id: str, request: Request) -> Response:
    """An order, its status (reserved, confirmed, released) and its payment."""
    parsed = existing_id(order_id, "order")
    if (forwarded := await owner_route(request, home_of(request, parsed), write=False)):
        return forwarded
    async with node_of(request).db.engine.connect() as conn:
        order, payment = await orders.get(conn, parsed)
        if payment is not None:
            access.require(principal_of(request),
                           await access.parties_of(conn, payment.payer_id, payment.payee_id),
                           "order")
        else:
            access.require(principal_of(request), [], "order")
    return JSONResponse(orders.to_api(order, payment))
