"""Orders: reserve global stock and pay, in one local transaction where possible.

The region serving the payer's home sells from its own allotment: reserve the units,
create the payment, and record the order, all in one transaction. A payment that is
refused (402, 404...) rolls the reservation back with it, so nothing stays reserved.
A cross-region payment is `processing` at first: the order stays `reserved` until the
payment settles, then it is `confirmed` (units sold) or `released` (units back to the
allotment: the compensation), by `settle_open_orders`.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Row
from sqlalchemy.ext.asyncio import AsyncConnection

from region_node import payment_states as st
from region_node import payments, schema, stock
from region_node.errors import Conflict, NotFound
from region_node.outbox import write_event
from region_node.payment_view import to_api as payment_api

O = schema.orders  # noqa: E741 - the orders table
P = schema.payments

# The stock mover's poll for settled payments of reserved orders (every
# `transfer_poll_seconds`, usually finding nothing): prebuilt, nothing compiled per poll.
_SETTLED_RESERVED = sa.text("""
    select o.*, p.status as payment_status from orders o
      join payments p on p.id = o.payment_id
     where o.region = :region and o.status = 'reserved'
       and p.status = any(cast(:settled as text[]))
     limit :limit
       for update of o skip locked
""")


class OutOfStock(Conflict):
    """This region's allotment cannot cover the order (and no other region could give)."""

    code = "out_of_stock"


@dataclass(frozen=True)
class OrderRequest:
    """A validated order: `quantity` units of `sku`, paid by `payment`."""

    order_id: uuid.UUID
    sku: str
    quantity: int
    payment: payments.PaymentRequest


def to_api(order: Row[Any], payment: Row[Any] | None) -> dict[str, Any]:
    """The public JSON shape of an order."""
    return {
        "id": str(order.id), "object": "order", "sku": order.sku, "quantity": order.quantity,
        "status": order.status, "region": order.region,
        "payment": payment_api(payment) if payment is not None else None,
        "created_at": order.created_at.isoformat(), "updated_at": order.updated_at.isoformat(),
    }


async def place(conn: AsyncConnection, *, region: str, request: OrderRequest,
                hold_ttl: timedelta) -> tuple[Row[Any], Row[Any]]:
    """Reserve and pay in one transaction; OutOfStock when the allotment is short."""
    sku_row = await stock.get_sku(conn, request.sku)
    await stock.ensure_allotment(conn, sku_row=sku_row, region=region)
    if not await stock.reserve(conn, sku=request.sku, region=region,
                               quantity=request.quantity):
        raise OutOfStock(f"Not enough '{request.sku}' in stock here for {request.quantity}",
                         param="quantity")
    payment = await payments.create_payment(conn, region=region, request=request.payment,
                                            hold_ttl=hold_ttl)
    status = "reserved"
    if payment.status == st.SUCCEEDED:
        await stock.confirm(conn, sku=request.sku, region=region, quantity=request.quantity)
        status = "confirmed"
    order = (await conn.execute(O.insert().values(
        id=request.order_id, sku=request.sku, quantity=request.quantity, region=region,
        home_region=request.payment.payer_home, payment_id=payment.id, status=status)
        .returning(*O.c))).one()
    await write_event(conn, region=region, event_type=f"order.{status}", aggregate_id=order.id,
                      payload=to_api(order, payment))
    return order, payment


async def get(conn: AsyncConnection, order_id: uuid.UUID) -> tuple[Row[Any], Row[Any] | None]:
    """An order and its payment (this region's copy)."""
    order = (await conn.execute(sa.select(O).where(O.c.id == order_id))).one_or_none()
    if order is None:
        raise NotFound(f"No such order: '{order_id}'")
    payment = (await conn.execute(sa.select(P).where(P.c.id == order.payment_id))
               ).one_or_none()
    return order, payment


async def settle_open_orders(conn: AsyncConnection, *, region: str, limit: int = 100) -> int:
    """Confirm or release this region's reserved orders whose payment has settled."""
    rows = (await conn.execute(_SETTLED_RESERVED, {
        "region": region, "limit": limit,
        "settled": [st.SUCCEEDED, st.FAILED, st.CANCELED]})).all()
    for row in rows:
        if row.payment_status == st.SUCCEEDED:
            await stock.confirm(conn, sku=row.sku, region=region, quantity=row.quantity)
            status = "confirmed"
        else:
            await stock.release(conn, sku=row.sku, region=region, quantity=row.quantity)
            status = "released"
        order = (await conn.execute(O.update().where(O.c.id == row.id)
                                    .values(status=status, updated_at=sa.func.now())
                                    .returning(*O.c))).one()
        await write_event(conn, region=region, event_type=f"order.{status}",
                          aggregate_id=order.id, payload=to_api(order, None))
    return len(rows)
