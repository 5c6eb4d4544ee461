"""Routes: payments, capture, cancel, refunds."""

from __future__ import annotations

import uuid

from fastapi import APIRouter, Body, Request
from fastapi.responses import JSONResponse
from sqlalchemy.ext.asyncio import AsyncConnection

from region_node import payments
from region_node.api.models import Cancel, Capture, CreatePayment, Refund, check_amount
from region_node.api.mutation import Result, node_of, run_mutation
from region_node.errors import InvalidRequest, NotFound
from region_node.ids import parse_id

router = APIRouter(prefix="/v1/payments", tags=["payments"])


def _payment_id(raw: str) -> uuid.UUID:
    parsed = parse_id(raw)
    if parsed is None:
        raise NotFound(f"No such payment: '{raw}'")
    return parsed


def _account_param(raw: str, param: str) -> uuid.UUID:
    parsed = parse_id(raw)
    if parsed is None:
        raise NotFound(f"No such account: '{raw}'", param=param)
    return parsed


@router.post("", status_code=201)
async def create(body: CreatePayment, request: Request) -> JSONResponse:
    """Pay now (automatic capture) or place a hold to capture later (manual)."""
    node = node_of(request)
    check_amount(body.amount, node.settings.max_amount)
    req = payments.PaymentRequest(
        payer=_account_param(body.payer, "payer"), payee=_account_param(body.payee, "payee"),
        amount=body.amount, currency=body.currency, capture_method=body.capture_method,
        description=body.description)
    if req.payer == req.payee:
        raise InvalidRequest("payer and payee must be different accounts", param="payee")

    async def step(conn: AsyncConnection) -> Result:
        row = await payments.create_payment(conn, region=node.region, request=req,
                                            hold_ttl=node.hold_ttl)
        return 201, payments.to_api(row)

    return await run_mutation(request, step)


@router.get("/{payment_id}")
async def get(payment_id: str, request: Request) -> JSONResponse:
    """A payment and its status."""
    pid = _payment_id(payment_id)
    async with node_of(request).db.engine.connect() as conn:
        row = await payments.get_payment(conn, pid)
    return JSONResponse(payments.to_api(row))


@router.post("/{payment_id}/capture")
async def capture(payment_id: str, request: Request,
                  body: Capture | None = Body(None)) -> JSONResponse:
    """Capture a held payment, fully or partly (TCC confirm)."""
    pid = _payment_id(payment_id)
    node = node_of(request)
    amount = body.amount if body else None

    async def step(conn: AsyncConnection) -> Result:
        row = await payments.capture(conn, region=node.region, payment_id=pid, amount=amount)
        return 200, payments.to_api(row)

    return await run_mutation(request, step)


@router.post("/{payment_id}/cancel")
async def cancel(payment_id: str, request: Request,
                 body: Cancel | None = Body(None)) -> JSONResponse:
    """Release a held payment (TCC cancel)."""
    pid = _payment_id(payment_id)
    node = node_of(request)
    reason = body.cancellation_reason if body else "requested_by_customer"

    async def step(conn: AsyncConnection) -> Result:
        row = await payments.cancel(conn, region=node.region, payment_id=pid, reason=reason)
        return 200, payments.to_api(row)

    return await run_mutation(request, step)


@router.post("/{payment_id}/refunds", status_code=201)
async def refund(payment_id: str, request: Request,
                 body: Refund | None = Body(None)) -> JSONResponse:
    """Refund a captured payment, fully or partly."""
    pid = _payment_id(payment_id)
    node = node_of(request)
    amount = body.amount if body else None

    async def step(conn: AsyncConnection) -> Result:
        return 201, await payments.refund(conn, region=node.region, payment_id=pid,
                                          amount=amount)

    return await run_mutation(request, step)
