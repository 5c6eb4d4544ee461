"""Routes: card pay-ins and bank payouts through the channel, the channel's callbacks, and
the operator's view (breaker, statement reconciliation).

A pay-in's card goes to the channel within the request and is never stored or logged
whole: the operation row keeps its last four digits and brand. A callback is verified
with the channel's signature before anything reads it; one that reaches a region not
serving the operation's home region is forwarded there (api/routing.py), so the owner
alone writes the operation.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, date, datetime
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from pydantic import Field, StrictInt
from sqlalchemy.ext.asyncio import AsyncConnection

from channel.client import ChannelRejected, ChannelUnavailable, parse_statement
from channel.signing import SIGNATURE_HEADER, SignatureError, verify
from region_node import access, channel_ops, ledger, statement_recon
from region_node.api.auth import caller, principal_of
from region_node.api.models import Amount, Body, check_amount
from region_node.api.mutation import Result, node_of, run_mutation
from region_node.api.routing import existing_id, from_owner, home_of, owner_route
from region_node.breaker import BreakerOpen
from region_node.channel_link import CALLBACK_PATH, ChannelLink, ChannelNotConfigured
from region_node.errors import InvalidRequest, NotFound, RegionUnavailable, Unauthenticated
from region_node.ids import parse_id
from region_node.node import Node
from region_node.ownership import assert_serving
from region_node.redact import luhn_valid

log = logging.getLogger(__name__)

T = TypeVar("T")

router = APIRouter(tags=["channel"], dependencies=[Depends(caller)])
callbacks = APIRouter(tags=["channel"])
"""No API key: the channel proves itself with its signature."""


class ChannelDown(RegionUnavailable):
    """The channel cannot take the request now (breaker open, or none configured): 503
    with Retry-After."""

    code = "channel_unavailable"

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class CardIn(Body):
    """A card as the payer gives it; it exists only for this request."""

    number: Annotated[str, Field(min_length=12, max_length=23)]
    exp_month: Annotated[StrictInt, Field(ge=1, le=12)]
    exp_year: Annotated[StrictInt, Field(ge=2000, le=2100)]
    cvc: Annotated[str | None, Field(pattern=r"^\d{3,4}$")] = None


class PayIn(Body):
    """POST /v1/accounts/{id}/payins."""

    amount: Amount
    card: CardIn


class BankAccountIn(Body):
    """Where a payout goes."""

    account_number: Annotated[str, Field(pattern=r"^[0-9A-Z]{6,34}$")]
    holder_name: Annotated[str, Field(min_length=1, max_length=140)]


class PayOut(Body):
    """POST /v1/accounts/{id}/payouts."""

    amount: Amount
    bank_account: BankAccountIn


class StatementIn(Body):
    """POST /v1/admin/channel/statement: a statement CSV, or none to fetch the day's."""

    day: date | None = None
    csv: Annotated[str | None, Field(max_length=50 * 1024 * 1024)] = None


def link_of(request: Request) -> ChannelLink:
    """This node's link to the channel."""
    link: ChannelLink = request.app.state.channel
    return link


def _card_digits(raw: str) -> str:
    """The card number's digits; 400 ``incorrect_number`` (never echoing it) if it is not
    a plausible card number."""
    digits = re.sub(r"[ -]", "", raw)
    if not digits.isdigit() or not 12 <= len(digits) <= 19 or not luhn_valid(digits):
        raise InvalidRequest("The card number is not a valid card number",
                             code="incorrect_number", param="card.number")
    return digits


async def in_fence(node: Node, home: str, fn: Callable[[AsyncConnection], Awaitable[T]]) -> T:
    """Run `fn` in one transaction behind the ownership fence of `home`."""
    async def step(conn: AsyncConnection) -> T:
        await assert_serving(conn, node.region, home)
        return await fn(conn)
    return await node.db.transaction(step)


def _available(link: ChannelLink) -> None:
    if not link.configured:
        raise ChannelDown("No channel is configured in this region", retry_after=60)
    if not link.breaker.allows():
        raise ChannelDown("The card channel is unavailable right now (circuit breaker "
                          "open); retry later", retry_after=link.breaker.retry_after())


async def _current(node: Node, op_id: uuid.UUID) -> dict[str, Any]:
    async with node.db.engine.connect() as conn:
        return channel_ops.to_api(await channel_ops.get_operation(conn, op_id))


@router.post("/v1/accounts/{account_id}/payins", status_code=201)
async def create_payin(account_id: str, body: PayIn, request: Request) -> Response:
    """Top up an account from a card: `pending` until the channel confirms, then
    `succeeded` (credited once) or `failed`. 503 ``channel_unavailable`` with Retry-After
    at once while the channel's breaker is open."""
    acc_id = existing_id(account_id, "account")
    node, link = node_of(request), link_of(request)
    check_amount(body.amount, node.settings.max_amount)
    digits = _card_digits(body.card.number)
    home = home_of(request, acc_id)
    if (forwarded := await owner_route(request, home)) is not None:
        return forwarded
    _available(link)
    home = home or node.region
    principal = principal_of(request)
    op_id = node.new_id(home)

    async def step(conn: AsyncConnection) -> Result:
        await access.require_account(conn, principal, acc_id)
        row = await channel_ops.create_payin(
            conn, op_id=op_id, account_id=acc_id, amount=body.amount, card_last4=digits[-4:],
            card_brand=channel_ops.card_brand(digits),
            stuck_after=link.settings.stuck_after_seconds)
        return 201, channel_ops.to_api(row)

    resp = await run_mutation(request, step, home=home)
    if resp.headers.get("idempotent-replayed"):
        return resp
    doc = json.loads(bytes(resp.body))
    try:
        answer = await link.payin(op_id, body.amount, doc["currency"], digits,
                                  body.card.exp_month, body.card.exp_year,
                                  body.card.cvc or "000")
    except (BreakerOpen, ChannelNotConfigured) as exc:
        # Never sent: the card is gone with this request, so the pay-in fails now.
        await in_fence(node, home, lambda c: channel_ops.give_up(
            c, region=node.region, op_id=op_id, reason="channel_unavailable", by="send"))
        raise ChannelDown("The card channel is unavailable right now; retry later",
                          retry_after=getattr(exc, "retry_after", 5.0)) from None
    except ChannelRejected as exc:
        reason = exc.code or "channel_rejected"
        await in_fence(node, home, lambda c: channel_ops.give_up(
            c, region=node.region, op_id=op_id, reason=reason, by="send"))
        return JSONResponse(await _current(node, op_id), 201)
    except ChannelUnavailable:
        # Unknown outcome: the callback or the compensation job settles it.
        return JSONResponse(await _current(node, op_id), 201)
    await in_fence(node, home, lambda c: channel_ops.apply_answer(
        c, region=node.region, op_id=op_id, source="send",
        answer=channel_ops.ChannelAnswer(answer.status, answer.version, answer.failure_code,
                                         answer.fee)))
    return JSONResponse(await _current(node, op_id), 201)


@router.post("/v1/accounts/{account_id}/payouts", status_code=201)
async def create_payout(account_id: str, body: PayOut, request: Request) -> Response:
    """Pay out to a bank account: the money moves to the payout clearing account at once;
    then `paid`, or `returned` / `failed` (money back). While the breaker is open the
    payout is `queued` and sent when the channel is back."""
    acc_id = existing_id(account_id, "account")
    node, link = node_of(request), link_of(request)
    check_amount(body.amount, node.settings.max_amount)
    home = home_of(request, acc_id)
    if (forwarded := await owner_route(request, home)) is not None:
        return forwarded
    if not link.configured:
        raise ChannelDown("No channel is configured in this region", retry_after=60)
    home = home or node.region
    principal = principal_of(request)
    op_id = node.new_id(home)
    queued = not link.breaker.allows()

    async def step(conn: AsyncConnection) -> Result:
        await access.require_account(conn, principal, acc_id)
        row = await channel_ops.create_payout(
            conn, region=node.region, op_id=op_id, account_id=acc_id, amount=body.amount,
            bank_account=body.bank_account.account_number,
            holder_name=body.bank_account.holder_name, queued=queued,
            stuck_after=0.0 if queued else link.settings.stuck_after_seconds)
        return 201, channel_ops.to_api(row)

    resp = await run_mutation(request, step, home=home)
    if resp.headers.get("idempotent-replayed") or queued:
        return resp
    await send_payout(node, link, op_id, home)
    return JSONResponse(await _current(node, op_id), 201)


async def send_payout(node: Node, link: ChannelLink, op_id: uuid.UUID, home: str) -> str:
    """Offer a payout (pending or queued) to the channel and apply its answer; returns
    what happened: sent, rejected, unknown (no answer: the compensation job asks), or
    queued (the breaker did not let the call through)."""
    async with node.db.engine.connect() as conn:
        op = await channel_ops.get_operation(conn, op_id)
    try:
        answer = await link.payout(op_id, op.amount, op.currency, op.bank_account or "",
                                   op.holder_name or "")
    except (BreakerOpen, ChannelNotConfigured):
        return "queued"
    except ChannelRejected as exc:
        reason = exc.code or "channel_rejected"
        await in_fence(node, home, lambda c: channel_ops.give_up(
            c, region=node.region, op_id=op_id, reason=reason, by="send"))
        return "rejected"
    except ChannelUnavailable:
        await in_fence(node, home, lambda c: channel_ops.mark_sent(
            c, op_id, link.settings.stuck_after_seconds))
        return "unknown"

    async def record(conn: AsyncConnection) -> None:
        await channel_ops.mark_sent(conn, op_id, link.settings.stuck_after_seconds)
        await channel_ops.apply_answer(
            conn, region=node.region, op_id=op_id, source="send",
            answer=channel_ops.ChannelAnswer(answer.status, answer.version,
                                             answer.failure_code, answer.fee))
    await in_fence(node, home, record)
    return "sent"


async def _get(request: Request, op_id_raw: str, kind: str) -> Response:
    op_id = existing_id(op_id_raw, kind)
    if (forwarded := await owner_route(request, home_of(request, op_id), write=False)):
        return forwarded
    try:
        async with node_of(request).db.engine.connect() as conn:
            row = await channel_ops.get_operation(conn, op_id)
            if row.kind != kind:
                raise NotFound(f"No such {kind}: '{op_id}'")
            account = await ledger.get_account(conn, row.account_id)
    except NotFound as missing:
        return await from_owner(request, missing)
    access.require(principal_of(request), [account.principal_id], kind)
    return JSONResponse(channel_ops.to_api(row))


@router.get("/v1/payins/{op_id}")
async def get_payin(op_id: str, request: Request) -> Response:
    """A pay-in and its status (this region's copy unless `consistency=strong`)."""
    return await _get(request, op_id, channel_ops.PAYIN)


@router.get("/v1/payouts/{op_id}")
async def get_payout(op_id: str, request: Request) -> Response:
    """A payout and its status (this region's copy unless `consistency=strong`)."""
    return await _get(request, op_id, channel_ops.PAYOUT)


@callbacks.post(CALLBACK_PATH)
async def channel_callback(request: Request) -> Response:
    """A callback from the channel: verified, put in the inbox by its event id (a
    duplicate does nothing), applied only if its version is newer (never backwards), at
    the region serving the operation's home region (forwarded there if not here)."""
    node, link = node_of(request), link_of(request)
    # The signature is the callback's credential, as an API key is for the rest of /v1:
    # without a valid one (or a secret to check it against) nothing is read: 401.
    if not link.settings.callback_secret:
        raise Unauthenticated("This region takes no channel callbacks (no channel is "
                              "configured)", code="channel_not_configured")
    raw = await request.body()
    try:
        verify(raw, request.headers.get(SIGNATURE_HEADER, ""), link.settings.callback_secret,
               tolerance=link.settings.callback_tolerance_seconds)
        event = json.loads(raw)
        event_id, data = str(event["id"]), event["data"]
        reference = str(data["reference"])
        answer = channel_ops.ChannelAnswer.from_json(data)
    except SignatureError as exc:
        raise Unauthenticated(f"Invalid callback signature: {exc}",
                              code="invalid_signature") from None
    except (ValueError, KeyError, TypeError):
        raise InvalidRequest("Malformed callback body", code="invalid_callback") from None
    op_id = parse_id(reference)
    home = home_of(request, op_id)
    if op_id is None or home is None:
        log.warning("channel callback %s for a reference that is not ours", event_id)
        return JSONResponse({"received": True, "outcome": "unknown_reference"})
    if (forwarded := await owner_route(request, home)) is not None:
        return forwarded

    async def step(conn: AsyncConnection) -> str:
        await assert_serving(conn, node.region, home)
        fresh = await channel_ops.record_callback(
            conn, event_id=event_id, op_id=op_id, reference=reference,
            event_type=str(event.get("type", "")), version=answer.version, region=node.region)
        if not fresh:
            return "duplicate"
        try:
            applied = await channel_ops.apply_answer(conn, region=node.region, op_id=op_id,
                                                     answer=answer, source="callback")
            outcome = applied.outcome
        except NotFound:
            outcome = "unknown_reference"
        await channel_ops.set_callback_outcome(conn, event_id, outcome)
        return outcome

    outcome = await node.db.transaction(step)
    return JSONResponse({"received": True, "outcome": outcome})


@router.get("/v1/admin/channel")
async def channel_status(request: Request) -> JSONResponse:
    """The breaker and this region's operations by kind and status (admins)."""
    node, link = node_of(request), link_of(request)
    async with node.db.engine.connect() as conn:
        counts = await statement_recon.operation_counts(conn)
        items = await statement_recon.open_items(conn)
    return JSONResponse({"region": node.region, "configured": link.configured,
                         "breaker": link.state(), "retry_after": link.breaker.retry_after(),
                         "breaker_opened": link.breaker.opened_count,
                         "operations": counts, "open_items": items})


@router.post("/v1/admin/channel/statement")
async def reconcile_statement(body: StatementIn, request: Request) -> JSONResponse:
    """Match a statement (the CSV given, else the channel's statement of `day`, default
    yesterday) against the operations of the home regions this region serves: fix what
    is safe once, list the rest as reconciliation items, post the fees. The report."""
    node, link = node_of(request), link_of(request)
    day = body.day or statement_recon.default_day(link.settings.statement_lag_days)
    if body.csv is not None:
        try:
            rows = parse_statement(body.csv)
        except (KeyError, ValueError):
            raise InvalidRequest("Not a channel statement CSV", code="invalid_statement",
                                 param="csv") from None
    else:
        try:
            rows = await link.call(lambda c: c.statement(day))
        except (BreakerOpen, ChannelNotConfigured, ChannelUnavailable) as exc:
            raise ChannelDown(f"Cannot fetch the statement of {day}: {exc}",
                              retry_after=30) from None
    report = await statement_recon.reconcile(node, rows, day=day)
    report["generated_at"] = datetime.now(UTC).isoformat()
    return JSONResponse(report)
