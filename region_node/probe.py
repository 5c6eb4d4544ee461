"""One look for all the workers: which of them have work that came from outside.

Work this node creates wakes its worker at once (`region_node.wakeups`). Work that
arrives from elsewhere (rows replicated in from other regions, another node of the
region, rows written by hand) is found by this probe: ONE prebuilt statement every
`transfer_poll_seconds` (or `outbox_poll_seconds`, if shorter), one round trip, no
transaction of its own beyond the statement, that asks each worker's poll predicate with
EXISTS (the same predicates and partial indexes the workers' own polls use, so each is
an index probe) and wakes only the workers whose answer is yes. An idle node then costs
one short statement per interval instead of a transaction per worker per interval; the
workers still poll on their own every `wakeups.FALLBACK_SECONDS`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import sqlalchemy as sa

from region_node import suspense, wakeups
from region_node.node import Node
from region_node.saga_worker import served_homes

log = logging.getLogger(__name__)

# Statuses are spelled out (partial indexes' predicates, as in the workers' own polls).
_PROBE = sa.text("""
    select
      exists (select 1 from outbox where region = :region and published_at is null)
        as outbox,
      exists (select 1 from webhook_pending_events where region = :region) as webhooks,
      exists (select 1 from transfers t
                left join transfer_results tr on tr.transfer_id = t.id
               where t.to_home = any(cast(:homes as text[])) and tr.transfer_id is null)
      or exists (select 1 from payments p
                   join transfers t on t.payment_id = p.id
                   join transfer_results tr on tr.transfer_id = t.id
                  where p.status = 'processing' and p.home_region = any(cast(:homes as text[])))
      or exists (select 1 from reconciliation_items r
                   join accounts a on a.id = (r.detail->>'clearing_account')::uuid
                  where r.item_kind = :orphan_kind and a.home_region = :region
                    and a.kind = 'clearing'
                    and not exists (select 1 from journal_entries e
                                     where e.payment_id = (r.detail->>'payment_id')::uuid
                                       and e.entry_type = :orphan_entry))
        as transfers,
      exists (select 1 from refunds r
                left join refund_results rr on rr.refund_id = r.id
               where r.status = 'pending' and r.payer_home = any(cast(:homes as text[]))
                 and r.payer_home <> r.home_region and rr.refund_id is null)
      or exists (select 1 from refund_results rr join refunds r on r.id = rr.refund_id
                  where r.status = 'pending' and r.home_region = any(cast(:homes as text[])))
      or exists (select 1 from reconciliation_items r
                   join accounts a on a.id = (r.detail->>'clearing_account')::uuid
                  where r.item_kind = :refund_orphan_kind and a.home_region = :region
                    and a.kind = 'clearing')
        as refunds,
      exists (select 1 from stock_grants g
                left join stock_grant_receipts r on r.grant_id = g.id
               where g.to_region = :region and r.grant_id is null)
      or exists (select 1 from orders o join payments p on p.id = o.payment_id
                  where o.region = :region and o.status = 'reserved'
                    and p.status in ('succeeded', 'failed', 'canceled'))
        as stock
""")

NAMES = (wakeups.OUTBOX, wakeups.WEBHOOKS, wakeups.TRANSFERS, wakeups.REFUNDS, wakeups.STOCK)


class Probe:
    """The probe of one node; `run` is one of the node's workers."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.wakeups = node.db.wakeups
        self.engine = node.db.reads  # the statement alone: no BEGIN / ROLLBACK around it

    def interval(self) -> float:
        """Seconds between probes: the shortest of the polls it stands in for."""
        s = self.node.settings
        return min(s.transfer_poll_seconds, s.outbox_poll_seconds)

    async def run_once(self) -> list[str]:
        """Probe once and wake the workers that have work; returns their names."""
        params = {"region": self.node.region, "homes": served_homes(self.node),
                  "orphan_kind": suspense.ITEM_KIND, "orphan_entry": suspense.ENTRY_TYPE,
                  "refund_orphan_kind": suspense.REFUND_ITEM_KIND}
        async with self.engine.connect() as conn:
            row = (await conn.execute(_PROBE, params)).one()
        due = [name for name, has_work in zip(NAMES, row, strict=True) if has_work]
        if due:
            self.wakeups.signal(*due)
        return due

    async def run(self, stop: asyncio.Event) -> None:
        """Probe until stopped; the workers rely on it (`Wakeups.probing`) meanwhile.
        A failed probe wakes every worker (they look for themselves) and is logged."""
        self.wakeups.probing = True
        try:
            while not stop.is_set():
                try:
                    await self.run_once()
                except Exception:
                    log.exception("worker probe failed; waking every worker")
                    self.wakeups.signal(*NAMES)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.interval())
        finally:
            self.wakeups.probing = False
