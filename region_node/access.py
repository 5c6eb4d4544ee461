"""Access rules: which principal may touch which account and payment.

- Every customer or merchant account belongs to the principal that opened it (an admin
  may open one for another principal); system accounts belong to nobody.
- Admins may act on everything.
- A payment's payer account must be the caller's; the payee may be anyone's.
- Reads of an account and its entries: its principal. Reads of a payment (and of an
  order's payment): the payer's or the payee's principal.
- Capture: the payer's principal (it authorized the hold). Cancel: the payer's or the
  payee's principal (releasing a hold never takes anything from the payer). Refund: the
  payee's principal, as with Stripe the merchant refunds; a payer cannot pull money back
  out of the merchant's account by itself.
- Withdrawals and closing: the account's principal. Deposits from outside, SKU creation,
  principal and key management, operator routes: admins only (api/auth.py).

Checks on writes run inside the write's own transaction at the region that owns the data,
before any money moves; a refusal (403) rolls everything back. Ownership of an account
never changes (the column is written once, at insert), so a plain read is enough.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from region_node import schema
from region_node.errors import Forbidden
from region_node.principals import Principal

A = schema.accounts
P = schema.payments

PAYER = "payer"
PAYEE = "payee"


def may(principal: Principal, owners: Iterable[uuid.UUID | None]) -> bool:
    """True if the caller is an admin or one of `owners`."""
    return principal.is_admin or any(o == principal.id for o in owners if o is not None)


def require(principal: Principal, owners: Iterable[uuid.UUID | None], what: str) -> None:
    """Forbidden (403) unless `may`."""
    if not may(principal, owners):
        raise Forbidden(f"This API key may not access this {what}")


def require_admin(principal: Principal) -> None:
    """Forbidden (403) unless the caller is an admin."""
    if not principal.is_admin:
        raise Forbidden("This route needs an admin API key", code="admin_required")


async def account_owner(conn: AsyncConnection, account_id: uuid.UUID
                        ) -> tuple[bool, uuid.UUID | None]:
    """(exists here, principal) of an account."""
    row = (await conn.execute(sa.select(A.c.principal_id).where(A.c.id == account_id))
           ).one_or_none()
    return (row is not None, row.principal_id if row is not None else None)


async def require_account(conn: AsyncConnection, principal: Principal, account_id: uuid.UUID,
                          what: str = "account") -> None:
    """Forbidden unless the caller owns the account (or is an admin). An account that does
    not exist here passes: the business step answers 404 for it."""
    if principal.is_admin:
        return
    exists, owner = await account_owner(conn, account_id)
    if exists:
        require(principal, [owner], what)


async def payment_parties(conn: AsyncConnection, payment_id: uuid.UUID
                          ) -> dict[str, uuid.UUID | None] | None:
    """The principals of a payment's payer and payee accounts (None: no such payment here;
    a party unknown here, e.g. a payee not yet replicated, maps to None)."""
    payer = A.alias("payer_account")
    payee = A.alias("payee_account")
    row = (await conn.execute(
        sa.select(payer.c.principal_id.label("payer"), payee.c.principal_id.label("payee"))
        .select_from(P.outerjoin(payer, payer.c.id == P.c.payer_id)
                     .outerjoin(payee, payee.c.id == P.c.payee_id))
        .where(P.c.id == payment_id))).one_or_none()
    if row is None:
        return None
    return {PAYER: row.payer, PAYEE: row.payee}


async def require_payment(conn: AsyncConnection, principal: Principal, payment_id: uuid.UUID,
                          parties: Iterable[str] = (PAYER, PAYEE)) -> None:
    """Forbidden unless the caller owns one of `parties` of the payment (or is an admin).
    A payment that does not exist here passes: the business step answers 404."""
    if principal.is_admin:
        return
    found = await payment_parties(conn, payment_id)
    if found is not None:
        require(principal, [found[p] for p in parties], "payment")


async def parties_of(conn: AsyncConnection, payer: uuid.UUID, payee: uuid.UUID
                     ) -> list[uuid.UUID | None]:
    """Principals of two accounts (for reads of a payment row already in hand)."""
    rows = (await conn.execute(sa.select(A.c.principal_id)
                               .where(A.c.id.in_([payer, payee])))).all()
    return [r.principal_id for r in rows]
