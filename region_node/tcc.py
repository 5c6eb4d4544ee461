"""TCC (try / confirm / cancel) sub-transaction barrier.

One row per (global transaction id, branch, phase) in `tcc_barrier`, inserted in the same
transaction as the phase's effect. The insert either takes the slot or finds it taken,
and PostgreSQL's ON CONFLICT waits for a concurrent inserter to finish first, so the
decision is race-free:

- duplicate phase: the slot is taken, the effect is skipped (idempotent);
- cancel before try (null compensation): a cancel first takes the *try* slot with reason
  'cancel'; if it got that slot the try never ran, so there is nothing to release;
- try after cancel (hanging): the try finds its slot taken by a cancel and is refused;
- confirm after cancel, cancel after confirm: refused (409). Callers serialize the two on
  the payment's row lock, so the check reads a committed barrier.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from enum import StrEnum

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from region_node import schema
from region_node.errors import Conflict

B = schema.tcc_barrier

Effect = Callable[[], Awaitable[None]]


class Outcome(StrEnum):
    """What a phase did."""

    APPLIED = "applied"
    DUPLICATE = "duplicate"
    NULL_COMPENSATION = "null_compensation"


class HangingTry(Conflict):
    """A try that arrives after its transaction was canceled; it must never take effect."""

    code = "tcc_try_after_cancel"


async def _take(conn: AsyncConnection, gid: uuid.UUID, branch: str, op: str, reason: str) -> bool:
    stmt = (pg_insert(B).values(gid=gid, branch_id=branch, op=op, reason=reason)
            .on_conflict_do_nothing().returning(B.c.op))
    return (await conn.execute(stmt)).first() is not None


async def try_phase(conn: AsyncConnection, gid: uuid.UUID, branch: str, effect: Effect) -> Outcome:
    """Run the try effect once; refuse it (HangingTry) if the cancel got there first."""
    if await _take(conn, gid, branch, "try", "try"):
        await effect()
        return Outcome.APPLIED
    reason = (await conn.execute(sa.select(B.c.reason).where(
        B.c.gid == gid, B.c.branch_id == branch, B.c.op == "try"))).scalar_one()
    if reason == "cancel":
        raise HangingTry(f"Transaction {gid} was canceled before its try arrived")
    return Outcome.DUPLICATE


async def confirm_phase(conn: AsyncConnection, gid: uuid.UUID, branch: str,
                        effect: Effect) -> Outcome:
    """Run the confirm effect once; a repeated confirm is a no-op, one after cancel a 409."""
    canceled = (await conn.execute(sa.select(B.c.op).where(
        B.c.gid == gid, B.c.branch_id == branch, B.c.op == "cancel"))).first()
    if canceled is not None:
        raise Conflict(f"Transaction {gid} was canceled", code="tcc_confirm_after_cancel")
    if await _take(conn, gid, branch, "confirm", "confirm"):
        await effect()
        return Outcome.APPLIED
    return Outcome.DUPLICATE


async def cancel_phase(conn: AsyncConnection, gid: uuid.UUID, branch: str, effect: Effect,
                       reason: str = "cancel") -> Outcome:
    """Run the cancel effect once; if the try never ran, record a null compensation; a
    cancel after the confirm is refused (409), whatever the caller's status check said."""
    confirmed = (await conn.execute(sa.select(B.c.op).where(
        B.c.gid == gid, B.c.branch_id == branch, B.c.op == "confirm"))).first()
    if confirmed is not None:
        raise Conflict(f"Transaction {gid} was confirmed", code="tcc_cancel_after_confirm")
    try_never_ran = await _take(conn, gid, branch, "try", "cancel")
    if not await _take(conn, gid, branch, "cancel", reason):
        return Outcome.DUPLICATE
    if try_never_ran:
        return Outcome.NULL_COMPENSATION
    await effect()
    return Outcome.APPLIED
