"""The ledger invariants of one region's copy, as findings rather than assertions, for
tools that report (the failover drill) instead of failing a test.

The same checks as `tests/helpers.py`'s `cluster_ledger_checks` (docs/architecture.md,
"Invariants"), meant for a quiet cluster: double entry, balances equal their entries, money
conserved (customers + merchants + in transit == what came in through the funding
accounts, with what the suspense accounts parked: `region_node.suspense`), nothing in
transit (clearing accounts at zero, no refund pending), every cross-region refund ended as
its payer's region answered, one posting per channel operation (pay-ins, payouts), no
negative available balance, zero replication
conflicts and apply errors, one credit posting per succeeded payment. Conservation is
checked against the funding accounts rather than a caller's deposit count, so it also
holds in a lab that other clients used before.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import psycopg

CONFLICT_SUM = ("confl_insert_exists + confl_update_origin_differs + confl_update_exists "
                "+ confl_update_missing + confl_delete_origin_differs + confl_delete_missing "
                "+ confl_multiple_unique_conflicts")


# A channel operation's money moved exactly once: a succeeded pay-in has one credit, any
# other none; a payout one debit, and once terminal one settlement (paid or returned).
_CHANNEL_POSTINGS = """
    select o.id, o.kind, o.status, t.credits, t.debits, t.settles from channel_operations o
      left join lateral (
        select count(distinct e.journal_id) filter (where e.entry_type = 'payin') credits,
               count(distinct e.journal_id) filter (where e.entry_type = 'payout') debits,
               count(distinct e.journal_id) filter (where e.entry_type in
                   ('payout_paid', 'payout_returned')) settles
          from journal_entries e where e.payment_id = o.id) t on true
     where (o.kind = 'payin' and (t.credits <> case when o.status = 'succeeded' then 1
                                              else 0 end or t.debits + t.settles <> 0))
        or (o.kind = 'payout' and (t.debits <> 1 or t.credits <> 0 or t.settles <>
                                   case when o.status in ('queued', 'pending') then 0
                                   else 1 end))"""


def _payouts_waiting(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("select coalesce(sum(amount), 0)::bigint from channel_operations "
                       "where kind = 'payout' and status in ('queued', 'pending')").fetchone()
    return int(row[0]) if row else 0


@dataclass(frozen=True)
class Finding:
    """One invariant in one region: whether it holds, and the evidence if not."""

    region: str
    name: str
    ok: bool
    detail: str = ""

    def to_json(self) -> dict[str, Any]:
        """JSON-able form."""
        return asdict(self)


def conflict_counts(dsn: str) -> dict[str, tuple[int, int]]:
    """Per subscription of the store at `dsn`: (conflicts, apply errors) since the
    counters were last reset."""
    with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
        rows = conn.execute(f"select subname, {CONFLICT_SUM}, apply_error_count "
                            "from pg_stat_subscription_stats").fetchall()
    return {str(name): (int(c), int(e)) for name, c, e in rows}


def ledger_findings(region: str, dsn: str,
                    conflicts_before: dict[str, tuple[int, int]] | None = None
                    ) -> list[Finding]:
    """Check the invariants in `region`'s store. `conflicts_before` (from
    `conflict_counts`) makes the conflict check count only what happened since then."""
    found: list[Finding] = []

    def add(name: str, rows: list[Any] | bool, detail: str = "") -> None:
        ok = rows if isinstance(rows, bool) else not rows
        if not ok and not detail and not isinstance(rows, bool):
            detail = f"{len(rows)} rows, e.g. {rows[:3]}"
        found.append(Finding(region, name, ok, "" if ok else detail))

    with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
        add("journals balance", conn.execute(
            "select journal_id, currency, sum(amount) from journal_entries "
            "group by journal_id, currency having sum(amount) <> 0").fetchall())
        add("balances equal entries", conn.execute(
            "select a.id, a.balance, coalesce(sum(e.amount), 0) from accounts a "
            "left join journal_entries e on e.account_id = a.id group by a.id "
            "having a.balance <> coalesce(sum(e.amount), 0)").fetchall())
        by_kind = {str(k): int(v) for k, v in conn.execute(
            "select kind, coalesce(sum(balance), 0)::bigint from accounts group by kind")}
        users = by_kind.get("customer", 0) + by_kind.get("merchant", 0)
        in_transit = by_kind.get("clearing", 0)
        parked = by_kind.get("suspense", 0)
        deposits = -by_kind.get("funding", 0)
        # Card pay-ins less payouts paid: the channel clearing account goes negative like
        # funding when money comes in by card, and its fees (charged to it, paid from the
        # fees account) cancel out: -(channel + fees) = pay-ins - payouts paid.
        by_card = -by_kind.get("channel", 0) - by_kind.get("fees", 0)
        going_out = by_kind.get("payout", 0)
        add("money conserved", users + in_transit + parked + going_out == deposits + by_card,
            f"customers+merchants {users} + in transit {in_transit} + suspense {parked} "
            f"+ payouts on their way {going_out} != deposits {deposits} + card pay-ins "
            f"net of payouts paid {by_card}")
        # Refunds travel the other way through the same clearing accounts: a pending
        # cross-region refund is money in transit too, and must have ended once settled.
        counted = conn.execute("select count(*) from refunds where status = 'pending'"
                               ).fetchone()
        pending_refunds = int(counted[0]) if counted else 0
        add("nothing in transit", in_transit == 0 and pending_refunds == 0,
            f"{in_transit} in clearing accounts, {pending_refunds} refunds pending")
        waiting = _payouts_waiting(conn)
        add("payout clearing holds the payouts waiting", going_out == waiting,
            f"{going_out} in payout clearing accounts, {waiting} in payouts waiting")
        add("one posting per channel operation", conn.execute(_CHANNEL_POSTINGS).fetchall())
        # Not a failure: orphan credits of a lost tail, open for an operator.
        found.append(Finding(region, "suspense (informational)", True,
                             f"{-parked} paid out without a surviving debit, listed for "
                             "reconciliation" if parked else ""))
        add("no negative available balance", conn.execute(
            "select id, balance, held from accounts where not allow_overdraft "
            "and balance - held < 0").fetchall())
        add("one credit per succeeded payment", conn.execute(
            "select id, status, credited from (select p.id, p.status, "
            "count(distinct e.journal_id) filter (where e.entry_type in "
            "('payment', 'transfer_in')) as credited from payments p "
            "left join journal_entries e on e.payment_id = p.id group by p.id, p.status) t "
            "where credited <> case when status = 'succeeded' then 1 else 0 end").fetchall())
        # A cross-region refund ends as the payer's region answered, once: succeeded with
        # a credit there, or failed (merchant re-credited) with a rejection.
        add("every refund ended as its payer's region answered", conn.execute(
            "select r.id, r.status, rr.outcome from refunds r "
            "left join refund_results rr on rr.refund_id = r.id "
            "where r.payer_home <> r.home_region and r.status <> 'pending' "
            "and rr.outcome is distinct from case r.status when 'succeeded' then 'credited' "
            "else 'rejected' end").fetchall())
    before = conflicts_before or {}
    counts = conflict_counts(dsn)
    # A counter below its earlier value was reset (e.g. a rebuilt region's new
    # subscriptions): everything it shows is new.
    grown = {sub: tuple(now if now < was else now - was
                        for now, was in zip((c, e), before.get(sub, (0, 0)), strict=True))
             for sub, (c, e) in counts.items()}
    add("zero replication conflicts", all(c == 0 for c, _ in grown.values()),
        f"conflicts per subscription: { {s: c for s, (c, _) in grown.items() if c} }")
    found.append(Finding(region, "apply errors (informational)", True,
                         ", ".join(f"{s}: {e}" for s, (_, e) in grown.items() if e)))
    return found
