"""Routes: payments, capture, cancel, refunds."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Body, Depends, Query, Request
from fastapi.responses import JSONResponse, Response
from sqlalchemy.ext.asyncio import AsyncConnection

from region_node import access, hot_path, payments
from region_node import payment_states as st
from region_node.api import refunds as refund_routes
from region_node.api.audit_trail import action_of, mark_audited
from region_node.api.auth import caller, principal_of
from region_node.api.models import Cancel, Capture, CreatePayment, Refund, check_amount
from region_node.api.mutation import AfterCommit, Result, node_of, run_mutation
from region_node.api.routing import existing_id, from_owner, home_of, owner_route
from region_node.errors import InvalidRequest, NotFound
from region_node.idempotency import Claim, caller_key, request_hash, validate_key
from region_node.logs import request_id

router = APIRouter(prefix="/v1/payments", tags=["payments"], dependencies=[Depends(caller)])


def _payment_id(raw: str) -> uuid.UUID:
    return existing_id(raw, "payment")


def push_if_processing(request: Request,
                       payment_of: Callable[[dict[str, Any]], dict[str, Any]] = lambda b: b,
                       ) -> AfterCommit:
    """After commit: a cross-region payment that just went `processing` is delivered now,
    in the background (the replicated message row is the fallback). `payment_of` finds
    the payment in the response body."""
    def hook(body: dict[str, Any]) -> None:
        payment = payment_of(body)
        if payment.get("status") == st.PROCESSING:
            request.app.state.transfer_worker.push_soon(uuid.UUID(payment["id"]))
    return hook


def new_payment(request: Request, *, payer: str, payee: str, amount: int, currency: str,
                capture_method: str = "automatic",
                description: str | None = None) -> payments.PaymentRequest:
    """Check the parties and the amount of a new payment and give it an id stamped with
    the payer's home region (the region serving that home executes it)."""
    node = node_of(request)
    check_amount(amount, node.settings.max_amount)
    payer_id = existing_id(payer, "account", "payer")
    payee_id = existing_id(payee, "account", "payee")
    if payer_id == payee_id:
        raise InvalidRequest("payer and payee must be different accounts", param="payee")
    payer_home = home_of(request, payer_id) or node.region
    return payments.PaymentRequest(
        payment_id=node.new_id(payer_home), payer=payer_id, payee=payee_id,
        payer_home=payer_home, payee_home=home_of(request, payee_id) or payer_home,
        amount=amount, currency=currency, capture_method=capture_method,
        description=description)


@router.post("", status_code=201)
async def create(body: CreatePayment, request: Request) -> Response:
    """Pay now (automatic capture) or place a hold to capture later (manual). The region
    serving the payer's home executes it; a payee in another home region is paid by a
    saga (status `processing` until the payee's region has credited it)."""
    node = node_of(request)
    req = new_payment(request, payer=body.payer, payee=body.payee, amount=body.amount,
                      currency=body.currency, capture_method=body.capture_method,
                      description=body.description)
    if (forwarded := await owner_route(request, req.payer_home)) is not None:
        return forwarded
    if (node.hot_path is not None and req.capture_method == "automatic"
            and not req.cross_region):
        answer = await _pay_in_one_call(request, req, node.hot_path)
        if isinstance(answer, Response):
            return answer
        claimed = answer
    else:
        claimed = None
    principal = principal_of(request)

    async def step(conn: AsyncConnection) -> Result:
        # The payer must be the caller's (a 403 rolls back before any money moves).
        await access.require_account(conn, principal, req.payer, "payer account")
        row = await payments.create_payment(conn, region=node.region, request=req,
                                            hold_ttl=node.hold_ttl)
        return 201, payments.to_api(row)

    return await run_mutation(request, step, home=req.payer_home,
                              after_commit=push_if_processing(request), claim=claimed)


async def _pay_in_one_call(request: Request, req: payments.PaymentRequest,
                           path: hot_path.HotPath) -> Response | Claim | None:
    """An automatic same-region payment in one SQL call (region_node/hot_path.py): the
    answer; None when the call was rolled back and the general path must run it; or the
    key's committed claim when an account was locked elsewhere too long (the general
    path runs the effect under it, as after its own claim transaction).

    Everything run_mutation does around create_payment happens in the call; what stays
    here is what it does outside the transaction: scoping and hashing the key, and
    recording a domain error as the key's answer."""
    node = node_of(request)
    principal = principal_of(request)
    raw_key = request.headers.get("idempotency-key")
    key = req_hash = None
    if raw_key is not None:
        key = caller_key(principal.id, validate_key(raw_key))
        req_hash = request_hash(request.method, request.url.path, await request.body())
    who = hot_path.Caller(
        principal_id=principal.id, key_id=principal.key_id, admin=principal.is_admin,
        key=key, request_hash=req_hash,
        request_id=request_id.get(), action=action_of(request.scope),
        audit_id=node.new_id(node.region))
    try:
        outcome = await path.pay(hot_path.Payment(
            payment_id=req.payment_id, payer=req.payer, payee=req.payee, home=req.payer_home,
            amount=req.amount, currency=req.currency, description=req.description), who)
    except hot_path.Fallback:
        return None
    if outcome.kind == "busy":
        return Claim(req.payer_home, key, outcome.token) if (
            key is not None and outcome.token is not None) else None
    if outcome.kind == "replay":
        return JSONResponse(outcome.body, outcome.status,
                            headers={"Idempotent-Replayed": "true"})
    if outcome.kind == "ok":
        mark_audited(request)  # the audit row committed with the payment
        return JSONResponse(outcome.body, outcome.status)
    error = outcome.error
    assert error is not None
    if outcome.token is not None and key is not None:
        # A decision (402, 404...) is the key's answer too: replayed on a retry.
        await node.idempotency.finish_alone(Claim(req.payer_home, key, outcome.token),
                                            error.http_status, error.to_body())
    raise error


@router.get("/{payment_id}")
async def get(payment_id: str, request: Request,
              consistency: str = Query("local", pattern="^(local|strong)$")) -> Response:
    """A payment and its status, from this region's copy unless `consistency=strong`."""
    pid = _payment_id(payment_id)
    if (forwarded := await owner_route(request, home_of(request, pid), write=False)):
        return forwarded
    try:
        async with node_of(request).db.engine.connect() as conn:
            row = await payments.get_payment(conn, pid)
            await access.require_payment(conn, principal_of(request), pid)
    except NotFound as missing:
        return await from_owner(request, missing)
    return JSONResponse(payments.to_api(row))


@router.post("/{payment_id}/capture")
async def capture(payment_id: str, request: Request,
                  body: Capture | None = Body(None)) -> Response:
    """Capture a held payment, fully or partly (TCC confirm); the payer's principal."""
    amount = body.amount if body else None

    async def act(conn: AsyncConnection, region: str, pid: uuid.UUID) -> Result:
        row = await payments.capture(conn, region=region, payment_id=pid, amount=amount)
        return 200, payments.to_api(row)

    return await _on_payment(request, payment_id, act, (access.PAYER,),
                             push_if_processing(request))


@router.post("/{payment_id}/cancel")
async def cancel(payment_id: str, request: Request,
                 body: Cancel | None = Body(None)) -> Response:
    """Release a held payment (TCC cancel); the payer's or the payee's principal."""
    reason = body.cancellation_reason if body else "requested_by_customer"

    async def act(conn: AsyncConnection, region: str, pid: uuid.UUID) -> Result:
        row = await payments.cancel(conn, region=region, payment_id=pid, reason=reason)
        return 200, payments.to_api(row)

    return await _on_payment(request, payment_id, act, (access.PAYER, access.PAYEE))


@router.post("/{payment_id}/refunds", status_code=201)
async def refund(payment_id: str, request: Request,
                 body: Refund | None = Body(None)) -> Response:
    """Refund a captured payment, fully or partly; the payee's principal (the merchant
    refunds, as with Stripe). Executed by the region serving the payee's home: at once
    within one home region, as a saga (`pending`) across regions (api/refunds.py)."""
    return await refund_routes.create_refund(request, payment_id, body.amount if body else None)


async def _on_payment(request: Request, payment_id: str,
                      act: Callable[[AsyncConnection, str, uuid.UUID], Awaitable[Result]],
                      parties: tuple[str, ...], after_commit: AfterCommit | None = None
                      ) -> Response:
    """Run a step on an existing payment at the region that serves its home, if the caller
    owns one of its `parties` (or is an admin)."""
    pid = _payment_id(payment_id)
    region = node_of(request).region
    home = home_of(request, pid)
    if (forwarded := await owner_route(request, home)) is not None:
        return forwarded

    principal = principal_of(request)

    async def step(conn: AsyncConnection) -> Result:
        await access.require_payment(conn, principal, pid, parties)
        return await act(conn, region, pid)

    return await run_mutation(request, step, home=home, after_commit=after_commit)
