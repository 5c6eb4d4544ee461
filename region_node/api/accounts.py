"""Routes: accounts, deposits, withdrawals, journal entries."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response
from sqlalchemy.ext.asyncio import AsyncConnection

from region_node import access, ledger, principals
from region_node.api.auth import caller, principal_of
from region_node.api.models import Movement, OpenAccount, check_amount
from region_node.api.mutation import Result, node_of, run_mutation
from region_node.api.routing import existing_id, from_owner, home_of, known_home, owner_route
from region_node.errors import Forbidden, InvalidRequest, NotFound
from region_node.ids import parse_id

router = APIRouter(prefix="/v1/accounts", tags=["accounts"], dependencies=[Depends(caller)])


def account_id_of(raw: str) -> uuid.UUID:
    """Path id -> UUID; anything else is simply not an account we have."""
    return existing_id(raw, "account")


@router.post("", status_code=201)
async def open_account(body: OpenAccount, request: Request) -> Response:
    """Open an account homed in `home_region` (default: the region that took the request);
    the region serving that home opens it."""
    node = node_of(request)
    home = known_home(request, body.home_region or node.region)
    principal = principal_of(request)
    owner_id = principal.id
    if body.principal_id is not None:
        named = parse_id(body.principal_id)
        if named is None:
            raise InvalidRequest("principal_id must be a principal id", param="principal_id")
        if named != principal.id:
            access.require_admin(principal)  # only an admin opens accounts for others
        owner_id = named
    if body.allow_overdraft and not principal.is_admin:
        # An account that may overdraw is an entry point for money: only an admin makes
        # one (like a deposit), or a customer could pay out money never deposited.
        raise Forbidden("Only an admin may open an account that can overdraw",
                        code="overdraft_requires_admin", param="allow_overdraft")
    if (forwarded := await owner_route(request, home)) is not None:
        return forwarded

    async def step(conn: AsyncConnection) -> Result:
        if owner_id != principal.id:
            await principals.get_principal(conn, owner_id)  # 404 for an unknown principal
        account = await ledger.open_account(conn, account_id=node.new_id(home),
                                            currency=body.currency, kind=body.kind,
                                            home_region=home,
                                            allow_overdraft=body.allow_overdraft,
                                            principal_id=owner_id)
        return 201, account.to_api()

    return await run_mutation(request, step, home=home)


@router.get("/{account_id}")
async def get_account(account_id: str, request: Request,
                      consistency: str = Query("local", pattern="^(local|strong)$")) -> Response:
    """Balance, available and held amounts; served from this region's copy unless
    `consistency=strong` asks the owner."""
    acc_id = account_id_of(account_id)
    if (forwarded := await owner_route(request, home_of(request, acc_id), write=False)):
        return forwarded
    try:
        async with node_of(request).db.engine.connect() as conn:
            account = await ledger.get_account(conn, acc_id)
    except NotFound as missing:
        return await from_owner(request, missing)
    access.require(principal_of(request), [account.principal_id], "account")
    return JSONResponse(account.to_api())


@router.post("/{account_id}/deposits", status_code=201)
async def deposit(account_id: str, body: Movement, request: Request) -> Response:
    """Fund an account from outside the ledger (admins only: money enters the cluster)."""
    access.require_admin(principal_of(request))
    return await _movement(request, account_id, body, ledger.deposit)


@router.post("/{account_id}/withdrawals", status_code=201)
async def withdraw(account_id: str, body: Movement, request: Request) -> Response:
    """Pay money out of the ledger; never below the available balance (the account's
    principal, or an admin)."""
    return await _movement(request, account_id, body, ledger.withdraw)


async def _movement(request: Request, account_id: str, body: Movement,
                    move: Callable[..., Awaitable[dict[str, object]]]) -> Response:
    acc_id = account_id_of(account_id)
    node = node_of(request)
    check_amount(body.amount, node.settings.max_amount)
    home = home_of(request, acc_id)
    if (forwarded := await owner_route(request, home)) is not None:
        return forwarded

    principal = principal_of(request)

    async def step(conn: AsyncConnection) -> Result:
        await access.require_account(conn, principal, acc_id)
        return 201, await move(conn, region=node.region, account_id=acc_id, amount=body.amount)

    return await run_mutation(request, step, home=home)


@router.post("/{account_id}/close")
async def close(account_id: str, request: Request) -> Response:
    """Close an empty account; payments to it are refused from then on."""
    acc_id = account_id_of(account_id)
    home = home_of(request, acc_id)
    if (forwarded := await owner_route(request, home)) is not None:
        return forwarded

    principal = principal_of(request)

    async def step(conn: AsyncConnection) -> Result:
        await access.require_account(conn, principal, acc_id)
        return 200, (await ledger.close_account(conn, acc_id)).to_api()

    return await run_mutation(request, step, home=home)


@router.get("/{account_id}/entries")
async def entries(account_id: str, request: Request,
                  limit: int = Query(20, ge=1, le=100),
                  starting_after: str | None = None,
                  consistency: str = Query("local", pattern="^(local|strong)$")) -> Response:
    """Journal entries, newest first; pass `next_cursor` as `starting_after` for more."""
    acc_id = account_id_of(account_id)
    cursor = None
    if starting_after is not None:
        cursor = parse_id(starting_after)
        if cursor is None:
            raise InvalidRequest("starting_after must be an entry id", param="starting_after")
    if (forwarded := await owner_route(request, home_of(request, acc_id), write=False)):
        return forwarded
    try:
        async with node_of(request).db.engine.connect() as conn:
            await access.require_account(conn, principal_of(request), acc_id)
            page = await ledger.list_entries(conn, acc_id, limit=limit, starting_after=cursor)
    except NotFound as missing:
        return await from_owner(request, missing)
    return JSONResponse(page)
