"""Routes: accounts, deposits, withdrawals, journal entries."""

from __future__ import annotations

import uuid

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from sqlalchemy.ext.asyncio import AsyncConnection

from region_node import ledger
from region_node.api.models import Movement, OpenAccount, check_amount
from region_node.api.mutation import Result, node_of, run_mutation
from region_node.errors import InvalidRequest, NotFound
from region_node.ids import parse_id

router = APIRouter(prefix="/v1/accounts", tags=["accounts"])


def account_id_of(raw: str) -> uuid.UUID:
    """Path id -> UUID; anything else is simply not an account we have."""
    parsed = parse_id(raw)
    if parsed is None:
        raise NotFound(f"No such account: '{raw}'")
    return parsed


@router.post("", status_code=201)
async def open_account(body: OpenAccount, request: Request) -> JSONResponse:
    """Open an account in this region (its home region)."""
    node = node_of(request)
    home = body.home_region or node.region
    if home != node.region:
        raise InvalidRequest(f"This region is '{node.region}'; accounts homed in '{home}' "
                             "are opened there", code="unknown_region", param="home_region")

    async def step(conn: AsyncConnection) -> Result:
        account = await ledger.open_account(conn, currency=body.currency, kind=body.kind,
                                            home_region=home,
                                            allow_overdraft=body.allow_overdraft)
        return 201, account.to_api()

    return await run_mutation(request, step)


@router.get("/{account_id}")
async def get_account(account_id: str, request: Request) -> JSONResponse:
    """Balance, available and held amounts of an account."""
    acc_id = account_id_of(account_id)
    async with node_of(request).db.engine.connect() as conn:
        account = await ledger.get_account(conn, acc_id)
    return JSONResponse(account.to_api())


@router.post("/{account_id}/deposits", status_code=201)
async def deposit(account_id: str, body: Movement, request: Request) -> JSONResponse:
    """Fund an account from outside the ledger."""
    acc_id = account_id_of(account_id)
    node = node_of(request)
    check_amount(body.amount, node.settings.max_amount)

    async def step(conn: AsyncConnection) -> Result:
        return 201, await ledger.deposit(conn, region=node.region, account_id=acc_id,
                                         amount=body.amount)

    return await run_mutation(request, step)


@router.post("/{account_id}/withdrawals", status_code=201)
async def withdraw(account_id: str, body: Movement, request: Request) -> JSONResponse:
    """Pay money out of the ledger; never below the available balance."""
    acc_id = account_id_of(account_id)
    node = node_of(request)
    check_amount(body.amount, node.settings.max_amount)

    async def step(conn: AsyncConnection) -> Result:
        return 201, await ledger.withdraw(conn, region=node.region, account_id=acc_id,
                                          amount=body.amount)

    return await run_mutation(request, step)


@router.get("/{account_id}/entries")
async def entries(account_id: str, request: Request,
                  limit: int = Query(20, ge=1, le=100),
                  starting_after: str | None = None) -> JSONResponse:
    """Journal entries, newest first; pass `next_cursor` as `starting_after` for more."""
    acc_id = account_id_of(account_id)
    cursor = None
    if starting_after is not None:
        cursor = parse_id(starting_after)
        if cursor is None:
            raise InvalidRequest("starting_after must be an entry id", param="starting_after")
    async with node_of(request).db.engine.connect() as conn:
        page = await ledger.list_entries(conn, acc_id, limit=limit, starting_after=cursor)
    return JSONResponse(page)

