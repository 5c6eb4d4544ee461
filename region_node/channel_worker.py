"""Background work with the channel, behind the ownership fence of each home region this
region serves:

- compensation: an operation still `pending` past `stuck_after_seconds` is queried with
  the channel's status API, then again after each step of `retry_schedule_seconds`. A
  final answer settles it (channel_ops.apply_answer: once, forward only). When the last
  query leaves it unsettled it fails with `channel_timeout` and is reversed (a payout's
  money goes back); a success the channel reports later moves no money and becomes a
  reconciliation item. A payout the channel never received (404) is sent again under the
  same reference (idempotent there); a pay-in cannot be (the card is gone).
- queued payouts (made while the breaker was open) are sent once it lets calls through.
- the daily statement job reconciles yesterday's statement (statement_recon).

Several nodes of a region may run this at once: operations are claimed with SKIP LOCKED
and a lease on their next check, and every settlement re-checks under the row lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from channel.client import ChannelRejected, ChannelUnavailable
from region_node import channel_ops as ops
from region_node import statement_recon
from region_node.api.channel import in_fence, send_payout
from region_node.breaker import BreakerOpen
from region_node.channel_link import ChannelLink, ChannelNotConfigured
from region_node.errors import RegionUnavailable
from region_node.node import Node
from region_node.periodic import run_every

log = logging.getLogger(__name__)


def _due_now(op_id: Any, attempts: int = 0) -> Any:
    async def due(conn: Any) -> None:
        await ops.reschedule(conn, op_id, attempts=attempts, after=0.0)
    return due


class ChannelWorker:
    """The compensation job, the sender of queued payouts and the daily statement job."""

    def __init__(self, node: Node, link: ChannelLink) -> None:
        self.node = node
        self.link = link
        self.settings = link.settings

    def _lease(self) -> float:
        # Long enough for one status query and its settlement; a node that dies while
        # holding an operation gives it back after this.
        return max(3 * self.settings.timeout_seconds, 5.0)

    async def _claim(self, home: str, status: str) -> list[Any]:
        async def claim(conn: Any) -> list[Any]:
            return await ops.waiting(conn, home_region=home, status=status,
                                     limit=self.settings.batch, lease_seconds=self._lease())
        try:
            return await in_fence(self.node, home, claim)
        except RegionUnavailable:
            return []  # no longer ours: its owner does it

    async def send_queued(self) -> int:
        """Send queued payouts while the breaker lets calls through; returns how many
        went out."""
        if not self.link.configured or not self.link.breaker.allows():
            return 0
        sent = 0
        for home in statement_recon.served_homes(self.node):
            for op in await self._claim(home, ops.QUEUED):
                what = await send_payout(self.node, self.link, op.id, home)
                if what == "queued":
                    # The breaker opened again: due at once, sent when it closes.
                    await in_fence(self.node, home, _due_now(op.id))
                    return sent
                sent += 1
        if sent:
            log.info("sent %d queued payouts", sent)
        return sent

    async def compensate(self) -> dict[str, int]:
        """One pass over the operations waiting past their next check; returns counts of
        what happened (settled, waiting, given_up, resent)."""
        done: dict[str, int] = {"settled": 0, "waiting": 0, "given_up": 0, "resent": 0}
        if not self.link.configured:
            return done
        for home in statement_recon.served_homes(self.node):
            for op in await self._claim(home, ops.PENDING):
                try:
                    done[await self._check(home, op)] += 1
                except Exception:
                    # One operation's trouble must not hold the others back until their
                    # claims run out; it is due again at once.
                    log.exception("channel check of %s failed", op.id)
                    with contextlib.suppress(Exception):
                        await in_fence(self.node, home, _due_now(op.id, op.sync_attempts))
        if any(done.values()):
            log.info("channel compensation pass: %s", done)
        return done

    async def _check(self, home: str, op: Any) -> str:
        node, region = self.node, self.node.region
        answer: ops.ChannelAnswer | None = None
        unknown_there = False
        try:
            found = await self.link.status(str(op.id))
            answer = ops.ChannelAnswer(found.status, found.version, found.failure_code,
                                       found.fee)
        except ChannelRejected as exc:
            unknown_there = exc.status == 404
        except (ChannelUnavailable, BreakerOpen, ChannelNotConfigured):
            pass  # no answer this time: counts as a failed retry
        if answer is not None:
            applied = await in_fence(node, home, lambda c: ops.apply_answer(
                c, region=region, op_id=op.id, answer=answer, source="sync"))
            if applied.row.status in ops.TERMINAL:
                return "settled"
        resent = False
        if unknown_there and op.kind == ops.PAYOUT:
            # Never reached the channel (our call was lost on the way): send it again
            # under the same reference; the channel does it once whatever happened.
            resent = await send_payout(node, self.link, op.id, home) == "sent"
        attempts = op.sync_attempts + 1
        schedule = self.settings.retry_schedule_seconds
        if attempts > len(schedule):
            given = await in_fence(node, home, lambda c: ops.give_up(
                c, region=region, op_id=op.id))
            if given is not None:
                log.warning("channel %s %s given up after %d queries: %s", op.kind, op.id,
                            attempts, ops.TIMEOUT_CODE)
                return "given_up"
            return "settled"
        await in_fence(node, home, lambda c: ops.reschedule(
            c, op.id, attempts=attempts, after=schedule[attempts - 1]))
        return "resent" if resent else "waiting"

    async def statement_pass(self) -> dict[str, Any] | None:
        """Fetch and reconcile the statement of the configured day; None if the channel
        could not give it (tried again next time)."""
        if not self.link.configured:
            return None
        day = statement_recon.default_day(self.settings.statement_lag_days)
        try:
            rows = await self.link.call(lambda c: c.statement(day))
        except (ChannelUnavailable, ChannelRejected, BreakerOpen) as exc:
            log.warning("statement of %s not fetched: %s", day, exc)
            return None
        report = await statement_recon.reconcile(self.node, rows, day=day)
        log.info("statement %s reconciled: %s", day, report["summary"])
        return report

    async def run_compensation(self, stop: asyncio.Event) -> None:
        """The compensation job, every `compensation_seconds`."""
        await run_every(stop, lambda: self.settings.compensation_seconds, self.compensate,
                        "channel compensation pass")

    async def run_queue(self, stop: asyncio.Event) -> None:
        """The sender of queued payouts, every `queue_poll_seconds`."""
        await run_every(stop, lambda: self.settings.queue_poll_seconds, self.send_queued,
                        "queued payouts pass")

    async def run_statements(self, stop: asyncio.Event) -> None:
        """The daily statement job; waits one period before its first run (a node
        restart must not reconcile again at once)."""
        try:
            await asyncio.wait_for(stop.wait(), self.settings.statement_seconds)
            return
        except TimeoutError:
            pass
        await run_every(stop, lambda: self.settings.statement_seconds, self.statement_pass,
                        "statement reconciliation")
