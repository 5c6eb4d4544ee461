"""Heartbeats and the convergence monitor: replication lag per ordered region pair, the SLO.

Both run inside each node (`region_node.app` starts them), on the node's own database; the
subscriptions they read are named and reported as `region_node.replication_status` says.

Every region writes its own row of the replicated table `heartbeats` each second
(`HeartbeatWriter`): `seq` counts up, `sent_at` is the writer's `clock_timestamp()`. Each
region's `ConvergenceMonitor` reads, in its own database, the copies of its peers' rows:
``lag(peer -> me) = clock_timestamp() - heartbeat[peer].sent_at``. That is the age of the
newest change of the peer this region is known to have, so it includes up to one
heartbeat interval on top of the replication delay (it is an upper bound, which is what
an SLO wants), and it also grows when the peer stops writing: then nobody can tell that
the pair converges either. Across machines it relies on synchronized clocks (NTP skew
adds to or subtracts from the figure; here every region shares one clock).

A pair is in **breach** of the SLO when any of these holds (causes are joined by "; "):

- ``lag 31.2s > 30s`` (or no heartbeat of the peer at all for longer than the SLO);
- the apply worker of the subscription ``sub_<peer>`` has not been seen running cleanly
  (worker present, `apply_error_count` not increasing, subscription enabled) for longer
  than `apply_grace_seconds` (default: the smaller of 10 s and the SLO), with what is
  known of the cause: disabled, the error counts, the conflict counters. PostgreSQL keeps
  the error text only in its server log; the subscriber's log has the key and the
  transaction's finish LSN;
- any PostgreSQL 18 conflict counter of that subscription is non-zero
  (``conflicts: confl_insert_exists=1``). Conflicts must stay zero by design, and a
  non-zero counter means rows may differ between regions even when the worker runs on
  (e.g. `update_origin_differs`), so this breach holds until an operator repairs the
  cause and acknowledges it by resetting the counters
  (`replication.wiring.reset_conflict_counters`, done by
  `replication.repair.resolve_duplicate_key`), not merely until the monitor restarts.

A breach is logged once when it starts (logger ``replication.monitor``, level ERROR,
`event=replication_slo_breach`) and once when it clears (`replication_slo_recovered`).
Each check runs every `interval` seconds, so a lag breach is seen at most one interval
(plus one query) after the lag crosses the SLO.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from prometheus_client import CollectorRegistry, Gauge
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from region_node.replication_status import (
    CONFLICT_COLUMNS,
    STATUS_SQL,
    status_row,
    subscription_name,
)

# The logger keeps the name it had when the monitor lived in `replication/`: log queries
# and alerts select its breach events by it.
log = logging.getLogger("replication.monitor")

_UPSERT_HEARTBEAT = text("""
insert into heartbeats (region, seq, sent_at) values (:region, 1, clock_timestamp())
on conflict (region) do update set seq = heartbeats.seq + 1, sent_at = clock_timestamp()
returning seq
""")

_READ_HEARTBEATS = text("""
select region, seq, extract(epoch from clock_timestamp() - sent_at)::float8 as age,
       extract(epoch from clock_timestamp())::float8 as now
  from heartbeats
""")

_STATUS = text(STATUS_SQL)


class HeartbeatWriter:
    """Upserts this region's heartbeat row every `interval` seconds."""

    def __init__(self, engine: AsyncEngine, region: str, interval: float = 1.0) -> None:
        self.engine = engine
        self.region = region
        self.interval = interval
        self.seq = 0
        self._failing = False

    async def beat(self) -> int:
        """Write one heartbeat now; returns its sequence number."""
        async with self.engine.begin() as conn:
            self.seq = int((await conn.execute(_UPSERT_HEARTBEAT, {"region": self.region}))
                           .scalar_one())
        return self.seq

    async def run(self, stop: asyncio.Event) -> None:
        """Beat until `stop` is set; database errors are logged (once) and retried."""
        next_at = time.monotonic()
        while not stop.is_set():
            try:
                await self.beat()
                if self._failing:
                    log.info("heartbeat of %s written again", self.region,
                             extra={"event": "heartbeat_recovered"})
                self._failing = False
            except Exception as exc:
                if not self._failing:
                    log.warning("heartbeat of %s failed: %r", self.region, exc,
                                extra={"event": "heartbeat_failed"})
                self._failing = True
            next_at = max(next_at + self.interval, time.monotonic())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=next_at - time.monotonic())


@dataclass
class _PairState:
    """What the monitor knows about one ordered pair peer -> this region."""

    peer: str
    lag: float | None = None
    heartbeat_seq: int | None = None
    missing_since: float | None = None
    subscription: str | None = None
    enabled: bool | None = None
    apply_running: bool = False
    apply_error_count: int = 0
    conflicts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CONFLICT_COLUMNS, 0))
    last_healthy: float | None = None
    breach_since: float | None = None
    cause: str | None = None


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat()


class ConvergenceMonitor:
    """Per ordered pair (peer -> this region): lag, apply worker, conflicts, SLO breaches."""

    def __init__(self, engine: AsyncEngine, region: str, peers: Sequence[str],
                 slo_seconds: float = 30.0, interval: float = 1.0, *,
                 registry: CollectorRegistry | None = None,
                 apply_grace_seconds: float | None = None) -> None:
        self.engine = engine
        self.region = region
        self.slo_seconds = slo_seconds
        self.interval = interval
        self.apply_grace_seconds = (min(10.0, slo_seconds) if apply_grace_seconds is None
                                    else apply_grace_seconds)
        self._pairs: dict[str, _PairState] = {}
        self._gauges: dict[str, Gauge] = {}
        self.set_peers(peers)
        self.checked_at: float | None = None
        self.error: str | None = None
        if registry is not None:
            self._gauges = {
                "lag": Gauge("paycluster_replication_lag_seconds",
                             "Age of the newest heartbeat of `from` seen in `to`",
                             ["from", "to"], registry=registry),
                "conflicts": Gauge("paycluster_replication_conflicts",
                                   "PostgreSQL conflict counters of `to`'s subscription to `from`",
                                   ["from", "to", "kind"], registry=registry),
                "breach": Gauge("paycluster_replication_slo_breach",
                                "1 while the pair from -> to breaches the convergence SLO",
                                ["from", "to"], registry=registry),
                "apply": Gauge("paycluster_replication_apply_running",
                               "1 while `to`'s apply worker for `from` is running",
                               ["from", "to"], registry=registry),
            }

    # ------------------------------------------------------------------ peers and names

    def set_peers(self, peers: Sequence[str]) -> None:
        """Change the monitored peers (a region joined or left); keeps known pairs' state."""
        wanted = [p for p in dict.fromkeys(peers) if p != self.region]
        for gone in set(self._pairs) - set(wanted):
            self._forget(gone)
        self._pairs = {p: self._pairs.get(p) or _PairState(p) for p in wanted}

    def _forget(self, peer: str) -> None:
        """Drop a departed peer's metric series, so no stale breach stays exported."""
        for name, gauge in self._gauges.items():
            kinds = [k.removeprefix("confl_") for k in CONFLICT_COLUMNS]
            for labels in ([(peer, self.region, k) for k in kinds] if name == "conflicts"
                           else [(peer, self.region)]):
                with contextlib.suppress(KeyError):
                    gauge.remove(*labels)

    def pair_name(self, peer: str) -> str:
        """`"<peer>-><this region>"`."""
        return f"{peer}->{self.region}"

    # ------------------------------------------------------------------ checking

    async def check_once(self) -> None:
        """Read heartbeats and subscription state once and update lag, breaches, metrics."""
        try:
            async with self.engine.connect() as conn:
                beats = (await conn.execute(_READ_HEARTBEATS)).mappings().all()
                subs = [status_row(dict(r))
                        for r in (await conn.execute(_STATUS)).mappings().all()]
        except Exception as exc:
            if self.error is None:
                log.warning("replication monitor of %s cannot read its database: %r",
                            self.region, exc, extra={"event": "replication_monitor_error"})
            self.error = repr(exc)
            return
        self.error = None
        now = time.time()
        self.checked_at = now
        by_region = {b["region"]: b for b in beats}
        by_publisher: dict[str, dict[str, Any]] = {}
        for sub in subs:
            by_publisher[sub["publisher"] or sub["name"]] = sub
        for peer, st in self._pairs.items():
            beat = by_region.get(peer)
            if beat is None:
                st.lag, st.heartbeat_seq = None, None
                st.missing_since = st.missing_since or now
            else:
                st.lag, st.heartbeat_seq = float(beat["age"]), int(beat["seq"])
                st.missing_since = None
            found = by_publisher.get(peer)
            if found is None:
                found = by_publisher.get(subscription_name(peer))
            self._update_apply(st, found, now)
            self._update_breach(st, self._causes(st, now), now)
            self._export(st)

    def _update_apply(self, st: _PairState, sub: dict[str, Any] | None, now: float) -> None:
        if st.last_healthy is None:
            st.last_healthy = now  # benefit of the doubt at start: judged after the grace
        if sub is None:
            st.subscription, st.enabled, st.apply_running = None, None, False
            return
        errors_grew = sub["apply_error_count"] > st.apply_error_count
        st.subscription = sub["name"]
        st.enabled = bool(sub["enabled"])
        st.apply_running = bool(sub["apply_running"])
        st.apply_error_count = sub["apply_error_count"]
        st.conflicts = dict(sub["conflicts"])
        if st.enabled and st.apply_running and not errors_grew:
            st.last_healthy = now

    def _causes(self, st: _PairState, now: float) -> list[str]:
        causes: list[str] = []
        if st.lag is not None and st.lag > self.slo_seconds:
            causes.append(f"lag {st.lag:.2f}s > {self.slo_seconds:g}s")
        if st.missing_since is not None and now - st.missing_since > self.slo_seconds:
            causes.append(f"no heartbeat from {st.peer} for {now - st.missing_since:.0f}s")
        down_for = now - (st.last_healthy or now)
        if down_for > self.apply_grace_seconds:
            name = st.subscription or subscription_name(st.peer)
            if st.subscription is None:
                why = f"no subscription {name}"
            else:
                details = ["subscription disabled"] if st.enabled is False else []
                if any(st.conflicts.values()):
                    details.append("stopped by a conflict (below; key in the server log)")
                if st.apply_error_count:
                    details.append(f"apply_error_count={st.apply_error_count}")
                why = ", ".join(details) or "worker exited"
            state = "running with errors" if st.apply_running else "not running"
            causes.append(f"apply worker for {name} {state} for {down_for:.0f}s: {why}")
        conflicts = [f"{k}={v}" for k, v in st.conflicts.items() if v]
        if conflicts:
            causes.append("conflicts: " + ", ".join(conflicts))
        return causes

    def _update_breach(self, st: _PairState, causes: list[str], now: float) -> None:
        pair = self.pair_name(st.peer)
        if causes:
            st.cause = "; ".join(causes)
            if st.breach_since is None:
                st.breach_since = now
                log.error("replication SLO breach %s: %s", pair, st.cause,
                          extra={"event": "replication_slo_breach", "pair": pair,
                                 "cause": st.cause, "region": self.region})
        elif st.breach_since is not None:
            lasted = now - st.breach_since
            log.warning("replication SLO breach %s cleared after %.1fs (was: %s)", pair, lasted,
                        st.cause, extra={"event": "replication_slo_recovered", "pair": pair,
                                         "region": self.region})
            st.breach_since, st.cause = None, None

    def _export(self, st: _PairState) -> None:
        if not self._gauges:
            return
        labels = {"from": st.peer, "to": self.region}
        self._gauges["lag"].labels(**labels).set(math.nan if st.lag is None else st.lag)
        self._gauges["breach"].labels(**labels).set(1 if st.breach_since is not None else 0)
        self._gauges["apply"].labels(**labels).set(1 if st.apply_running else 0)
        for kind, value in st.conflicts.items():
            self._gauges["conflicts"].labels(**labels, kind=kind.removeprefix("confl_")).set(value)

    async def run(self, stop: asyncio.Event) -> None:
        """Check every `interval` seconds until `stop` is set."""
        next_at = time.monotonic()
        while not stop.is_set():
            try:
                await self.check_once()
            except Exception:  # a bug here must not kill the monitor silently
                log.exception("replication monitor of %s failed a check", self.region)
            next_at = max(next_at + self.interval, time.monotonic())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=next_at - time.monotonic())

    # ------------------------------------------------------------------ reading the state

    def stale_pairs(self) -> list[str]:
        """Pairs currently in breach, like `"eu-west->us-east"` (for readiness and failover)."""
        return [self.pair_name(p) for p, st in self._pairs.items() if st.breach_since is not None]

    def lag(self, peer: str) -> float | None:
        """Last measured lag of `peer -> this region` in seconds (None: no heartbeat yet)."""
        return self._pairs[peer].lag

    def snapshot(self) -> dict[str, Any]:
        """JSON-able state: region, slo_seconds, ok, checked_at, error and, per pair,
        lag_seconds, heartbeat_seq, subscription, enabled, apply_running, apply_error_count,
        conflicts and breach (None or {since, cause})."""
        pairs: dict[str, Any] = {}
        for peer, st in self._pairs.items():
            pairs[self.pair_name(peer)] = {
                "from": peer, "to": self.region,
                "lag_seconds": None if st.lag is None else round(st.lag, 3),
                "heartbeat_seq": st.heartbeat_seq, "subscription": st.subscription,
                "enabled": st.enabled, "apply_running": st.apply_running,
                "apply_error_count": st.apply_error_count, "conflicts": dict(st.conflicts),
                "breach": None if st.breach_since is None else {
                    "since": _iso(st.breach_since), "cause": st.cause},
            }
        ok = (self.checked_at is not None and self.error is None
              and all(st.breach_since is None for st in self._pairs.values()))
        return {"region": self.region, "slo_seconds": self.slo_seconds, "ok": ok,
                "checked_at": _iso(self.checked_at), "error": self.error, "pairs": pairs}
