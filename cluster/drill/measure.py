"""What a failover drill measured, computed from the client's attempts, the monitor's lag
samples and the stores' final, converged state.

- **RTO** for the drilled region's users (payers homed in it), per disruptive event (the
  fault; a failback): `first` = from the event until the first acknowledged write that was
  sent after writes had started failing (if none failed: until the first write sent after
  the event was acknowledged, i.e. how long writes were held); `stable` = from the event
  until the point after which, in every following second, more than 95 % of their
  attempts were answered.
- **RPO**: acknowledged payments missing from the final state (count and amount).
- **Duplicates**: a key charged more than once in the stores, or a client that saw two
  different payment ids for one key.
- **Refunds** (`refund_loss`): every acknowledged refund is in the final state once and has
  ended (``succeeded`` or ``failed``, none ``pending``), or, lost with a crashed region's
  tail in ``local`` mode, is listed for reconciliation; no payment holds more refunds than
  were asked for it, or more refunded than its amount; the payer's region's
  ``amount_refunded`` is the sum of its succeeded refunds.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import psycopg

from cluster.drill.workload import (
    DESCRIPTION_PREFIX,
    Attempt,
    Intent,
    LagSample,
    RefundIntent,
)
from cluster.stats import percentile

STABLE_RATIO = 0.95
"""Share of answered attempts per second after which writes count as recovered."""


@dataclass
class Disruption:
    """What the users of one home region felt after one event (seconds since the event)."""

    event: str
    at: float
    rto_first: float | None = None
    rto_stable: float | None = None
    attempts: int = 0
    failed: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    max_latency: float = 0.0
    longest_ack_gap: float = 0.0

    def to_json(self) -> dict[str, Any]:
        """JSON-able form."""
        return asdict(self)


def _stable_from(attempts: Sequence[Attempt], start: float, end: float) -> float | None:
    """Earliest time T >= start such that every 1-s bucket from T to `end` with attempts
    (by start time) has more than STABLE_RATIO of them answered; None if never."""
    fails = sorted(a.ended for a in attempts if not a.answered and start <= a.ended < end)
    for candidate in [start, *fails]:
        ok = True
        buckets: dict[int, list[bool]] = {}
        for a in attempts:
            if candidate <= a.started < end:
                buckets.setdefault(int((a.started - candidate) // 1.0), []).append(a.answered)
        for answers in buckets.values():
            if sum(answers) / len(answers) <= STABLE_RATIO:
                ok = False
                break
        if ok:
            return candidate
    return None


def disruption(attempts: Iterable[Attempt], home: str, event: str, at: float,
               until: float) -> Disruption:
    """The disruption for payers homed in `home` from `at` (the event) until `until`
    (the next event, or the end of the workload)."""
    mine = sorted((a for a in attempts if a.home == home and a.ended >= at
                   and a.started < until), key=lambda a: a.started)
    out = Disruption(event, at, attempts=len(mine))
    failed = [a for a in mine if not a.answered]
    out.failed = len(failed)
    out.errors = dict(Counter(a.code or f"http_{a.status}" for a in failed))
    out.max_latency = max((a.latency for a in mine if a.started >= at), default=0.0)
    sent_after = [a for a in mine if a.started >= at]
    if failed:
        first_fail = min(a.started for a in failed)
        oks = [a.ended for a in sent_after if a.answered and a.started >= first_fail]
    else:
        oks = [a.ended for a in sent_after if a.answered][:1]
    out.rto_first = round(min(oks) - at, 4) if oks else None
    stable = _stable_from(mine, at, until)
    if stable is not None and out.rto_first is not None:
        # Not recovered before the first success, whatever the attempts sent later say.
        stable = max(stable, at + out.rto_first)
    out.rto_stable = None if stable is None else round(stable - at, 4)
    acks = sorted([at, *[a.ended for a in mine if a.outcome == "ok" and a.ended >= at]])
    out.longest_ack_gap = round(max((b - a for a, b in itertools.pairwise(acks)),
                                    default=0.0), 4)
    return out


# --------------------------------------------------------------------------- timeline


@dataclass
class Second:
    """One time bucket of the drill (`t` = its start, `width` long): attempts, answered
    share, latency, worst lag."""

    t: float
    width: float
    attempts: int
    success_rate: float | None
    focus_attempts: int
    focus_success_rate: float | None
    p50_ms: float | None
    p99_ms: float | None
    max_lag_s: float | None
    max_lag_others_s: float | None = None


def timeline(attempts: Sequence[Attempt], samples: Sequence[LagSample], home: str,
             end: float, width: float = 0.5) -> list[Second]:
    """Per `width` seconds (by attempt start): the success rate of all attempts and of
    `home`'s users, latency p50/p99 of answered attempts, and the worst lag any monitor
    reported."""
    seconds: list[Second] = []
    for i in range(math.ceil(end / width) + 1):
        t = i * width
        here = [a for a in attempts if t <= a.started < t + width]
        focus = [a for a in here if a.home == home]
        lat = [a.latency * 1000 for a in here if a.answered]
        lags = [lag for s in samples if t <= s.at < t + width for lag in s.pairs.values()
                if lag is not None]
        others = [lag for s in samples if t <= s.at < t + width
                  for pair, lag in s.pairs.items()
                  if lag is not None and home not in pair.split("->")]
        seconds.append(Second(
            round(t, 3), width, len(here), _rate(here), len(focus), _rate(focus),
            round(percentile(lat, 50), 2) if lat else None,
            round(percentile(lat, 99), 2) if lat else None,
            round(max(lags), 3) if lags else None,
            round(max(others), 3) if others else None))
    return seconds


def _rate(attempts: Sequence[Attempt]) -> float | None:
    return round(sum(a.answered for a in attempts) / len(attempts), 4) if attempts else None


def max_lag(samples: Sequence[LagSample], exclude: str | None = None,
            start: float = 0.0, end: float = math.inf) -> tuple[float | None, str | None]:
    """The worst lag any monitor reported in [start, end) (and its pair), optionally
    leaving out the pairs that involve `exclude` (a region that is down or cut off: its
    lag grows by definition)."""
    worst: tuple[float | None, str | None] = (None, None)
    for s in samples:
        if not start <= s.at < end:
            continue
        for pair, lag in s.pairs.items():
            if lag is None or (exclude is not None and exclude in pair.split("->")):
                continue
            if worst[0] is None or lag > worst[0]:
                worst = (lag, pair)
    return worst


# --------------------------------------------------------------------------- the stores


@dataclass(frozen=True)
class StoredPayment:
    """A drill payment as a store has it."""

    id: str
    key: str
    amount: int
    status: str
    epoch: int | None
    home: str


def stored_payments(dsn: str, run_id: str) -> list[StoredPayment]:
    """Every payment of drill `run_id` in the store at `dsn` (found by its description)."""
    prefix = f"{DESCRIPTION_PREFIX}:{run_id}:"
    with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
        rows = conn.execute(
            "select id::text, description, amount, status, epoch, home_region from payments "
            "where description like %s", (prefix + "%",)).fetchall()
    return [StoredPayment(str(i), str(d)[len(prefix):], int(a), str(s),
                          None if e is None else int(e), str(h)) for i, d, a, s, e, h in rows]


@dataclass
class Loss:
    """RPO and duplicates, from the client's acknowledgements and one converged store."""

    acknowledged: int = 0
    acknowledged_amount: int = 0
    missing: list[dict[str, Any]] = field(default_factory=list)
    missing_amount: int = 0
    duplicate_keys: list[str] = field(default_factory=list)
    client_saw_two_ids: list[str] = field(default_factory=list)
    unacknowledged_stored: int = 0
    stored: int = 0

    @property
    def rpo_count(self) -> int:
        """Acknowledged payments missing afterwards."""
        return len(self.missing)

    @property
    def duplicates(self) -> int:
        """Keys charged more than once, or answered with two different ids."""
        return len(self.duplicate_keys) + len(self.client_saw_two_ids)

    def to_json(self) -> dict[str, Any]:
        """JSON-able form."""
        return {**asdict(self), "rpo_count": self.rpo_count, "duplicates": self.duplicates}


def loss(intents: Sequence[Intent], stored: Sequence[StoredPayment]) -> Loss:
    """Compare what clients saw acknowledged with what the store has."""
    out = Loss(stored=len(stored))
    by_id = {p.id: p for p in stored}
    keys = Counter(p.key for p in stored)
    out.duplicate_keys = sorted(k for k, n in keys.items() if n > 1)
    acked_keys = set()
    for intent in intents:
        if intent.payment_id is None:
            continue
        acked_keys.add(intent.key)
        out.acknowledged += 1
        out.acknowledged_amount += intent.amount
        if len(set(intent.ids_seen)) > 1:
            out.client_saw_two_ids.append(intent.key)
        for pid in set(intent.ids_seen):
            if pid not in by_id:
                out.missing.append({"id": pid, "key": intent.key, "amount": intent.amount,
                                    "home": intent.home, "acked_at": intent.acked_at})
                out.missing_amount += intent.amount
    out.unacknowledged_stored = sum(1 for p in stored if p.key not in acked_keys)
    return out


# --------------------------------------------------------------------------- refunds


@dataclass(frozen=True)
class StoredRefund:
    """A refund of a drill payment as a store has it."""

    id: str
    payment_id: str
    amount: int
    status: str


@dataclass
class StoredRefunds:
    """The refunds of some payments in one store, and what the payments say was refunded
    (`refunded`: payment id -> (amount captured, amount refunded))."""

    refunds: list[StoredRefund] = field(default_factory=list)
    refunded: dict[str, tuple[int, int]] = field(default_factory=dict)


def stored_refunds(dsn: str, payment_ids: Iterable[str]) -> StoredRefunds:
    """The refunds of `payment_ids` in the store at `dsn`, and those payments' amounts."""
    ids = sorted(set(payment_ids))
    with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
        refunds = conn.execute(
            "select id::text, payment_id::text, amount, status from refunds "
            "where payment_id = any(%s::uuid[])", (ids,)).fetchall()
        payments = conn.execute(
            "select id::text, amount_captured, amount_refunded from payments "
            "where id = any(%s::uuid[])", (ids,)).fetchall()
    return StoredRefunds([StoredRefund(str(i), str(p), int(a), str(s))
                          for i, p, a, s in refunds],
                         {str(i): (int(c), int(r)) for i, c, r in payments})


@dataclass
class RefundLoss:
    """Did every refund end exactly once? From the clients' answers and one store."""

    intents: int = 0
    cross_region: int = 0
    acknowledged: int = 0
    results: dict[str, int] = field(default_factory=dict)
    statuses: dict[str, int] = field(default_factory=dict)
    missing: list[dict[str, Any]] = field(default_factory=list)
    listed_in_tail: list[str] = field(default_factory=list)
    not_ended: list[str] = field(default_factory=list)
    client_saw_two_ids: list[str] = field(default_factory=list)
    more_refunds_than_asked: list[str] = field(default_factory=list)
    over_refunded: list[str] = field(default_factory=list)
    refunded_differs: list[str] = field(default_factory=list)

    @property
    def unlisted_missing(self) -> list[dict[str, Any]]:
        """Acknowledged refunds missing and not listed in a lost tail."""
        listed = set(self.listed_in_tail)
        return [m for m in self.missing if m["id"] not in listed]

    def problems(self, tail_allowed: bool) -> list[str]:
        """What breaks "every refund ended exactly once"; `tail_allowed`: a refund lost
        in a listed tail is accounted for (local mode), else any missing one counts."""
        lost = self.unlisted_missing if tail_allowed else self.missing
        out = [f"{len(lost)} acknowledged refunds missing"] if lost else []
        for name, items in (("still pending", self.not_ended),
                            ("answered with two ids", self.client_saw_two_ids),
                            ("payments with more refunds than asked", self.more_refunds_than_asked),
                            ("payments refunded beyond their amount", self.over_refunded),
                            ("payments whose amount_refunded differs from their refunds",
                             self.refunded_differs)):
            if items:
                out.append(f"{len(items)} {name}")
        return out

    def to_json(self) -> dict[str, Any]:
        """JSON-able form."""
        return asdict(self)


def refund_loss(intents: Sequence[RefundIntent], stored: StoredRefunds,
                tail_refund_ids: Iterable[str] = ()) -> RefundLoss:
    """Compare the refunds clients saw acknowledged with what the store has;
    `tail_refund_ids`: the refunds a lost tail listed for reconciliation."""
    out = RefundLoss(intents=len(intents),
                     cross_region=sum(1 for i in intents if i.cross_region),
                     results=dict(Counter(i.result for i in intents)),
                     statuses=dict(Counter(r.status for r in stored.refunds)))
    by_id = {r.id: r for r in stored.refunds}
    tail = {str(t) for t in tail_refund_ids}
    asked: Counter[str] = Counter(i.payment_id for i in intents)
    for intent in intents:
        if intent.refund_id is None:
            continue
        out.acknowledged += 1
        if len(set(intent.ids_seen)) > 1:
            out.client_saw_two_ids.append(intent.key)
        for rid in set(intent.ids_seen):
            if rid not in by_id:
                out.missing.append({"id": rid, "key": intent.key, "amount": intent.amount,
                                    "payment_id": intent.payment_id})
                if rid in tail:
                    out.listed_in_tail.append(rid)
    out.not_ended = sorted(r.id for r in stored.refunds if r.status == "pending")
    per_payment: dict[str, list[StoredRefund]] = {}
    for r in stored.refunds:
        per_payment.setdefault(r.payment_id, []).append(r)
    # A payment with a refund lost in the tail may still count it in amount_refunded (the
    # payer's region credited it from the push: an orphan refund credit, listed too).
    in_tail = {m["payment_id"] for m in out.missing if m["id"] in tail}
    for pid in sorted(set(asked) | set(per_payment)):
        refunds = per_payment.get(pid, [])
        if len(refunds) > asked[pid]:
            out.more_refunds_than_asked.append(pid)
        captured, refunded = stored.refunded.get(pid, (0, 0))
        if sum(r.amount for r in refunds if r.status != "failed") > captured:
            out.over_refunded.append(pid)
        if refunded != sum(r.amount for r in refunds if r.status == "succeeded") \
                and pid not in in_tail:
            out.refunded_differs.append(pid)
    return out
