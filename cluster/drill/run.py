"""Failover drills: rehearse losing a region under load and measure what users would feel.

    paycluster drill planned|crash|partition --region R [--duration S] [--rate N]
                     [--report DIR] [--data-dir DIR] [--wan-scale X]
                     [--durability local|regional] [--to B] [--drain]

A drill runs on the lab in `--data-dir` if one is running there, else on a lab of its own
(3 regions, the WAN emulator, one geo router), stopped at the end even on failure or
Ctrl-C. It

1. opens and funds accounts in every region (through the router);
2. starts the client workload (`cluster.drill.workload`): payments through the geo router
   from clients in every region at `--rate` per second, half of them paid by accounts
   homed in R, each retried with its Idempotency-Key on 503, every attempt recorded; and
   samples every region's convergence monitor (`/v1/replication/status`);
3. injects the fault a quarter of the way in:
   - **planned**: `replication.failover.planned_handover` of home R to its takeover
     region (R's durability buddy, else the next region), then failback the same way;
   - **crash**: SIGKILL of R's node and PostgreSQL, takeover by the takeover region
     (`replication.failover.crash_takeover`), restart of R, its lost tail listed for
     reconciliation, rejoin, failback;
   - **partition**: every WAN link to and from R cut; takeover by the majority; heal;
     failback;
4. stops the workload, waits until the regions converge, and measures RTO per
   disruptive event, RPO, duplicates, errors by code, max replication lag, replication
   conflicts and the ledger invariants in every region (`cluster.drill.measure`,
   `cluster.invariants`);
5. writes the report (`cluster.drill.report`: terminal table, report.json, report.md,
   timeline.png).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import inspect
import logging
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from cluster.demo import read_view
from cluster.drill.faults import (
    crash_region,
    drop_in_flight,
    heal_region,
    isolate_region,
    restart_store,
    slow_links,
)
from cluster.drill.measure import (
    Disruption,
    Loss,
    RefundLoss,
    StoredPayment,
    disruption,
    loss,
    max_lag,
    refund_loss,
    stored_payments,
    stored_refunds,
    timeline,
)
from cluster.drill.workload import Attempt, LagSampler, Workload
from cluster.errors import LabError
from cluster.invariants import Finding, conflict_counts, ledger_findings
from cluster.lab import Cluster, ClusterError, running_pids, start_cluster

log = logging.getLogger("cluster.drill")

_T = TypeVar("_T")

KINDS = ("planned", "crash", "partition")

DRILL_NODE_ENV: dict[str, str] = {"PAYCLUSTER_TRANSFER_POLL_SECONDS": "0.1"}
"""Node settings of a lab the drill starts itself."""

DRILL_ROUTER_ENV: dict[str, str] = {
    # A dead region is noticed within ~1 s, a new owner within half a second.
    "PAYCLUSTER_ROUTER_PROBE_INTERVAL_SECONDS": "0.5",
    "PAYCLUSTER_ROUTER_PROBE_TIMEOUT_SECONDS": "0.4",
    "PAYCLUSTER_ROUTER_FALL": "2",
    "PAYCLUSTER_ROUTER_OWNERSHIP_REFRESH_SECONDS": "0.5",
}
"""Router settings of a lab the drill starts itself."""

CONVERGE_TIMEOUT = 120.0
"""Seconds the regions get to converge after the workload stopped."""

CLEANUP_TIMEOUT = 15.0
"""Seconds the cleanup after a failed or interrupted fault sequence may spend healing
the region's links."""

RTO_BOUND_PLANNED = 10.0
"""The issue's bound on a planned handover's RTO on this machine."""


class DrillError(LabError):
    """The drill could not run (or finish) its fault sequence."""


@dataclass
class DrillConfig:
    """What to drill and how hard."""

    kind: str
    region: str
    duration: float = 15.0
    rate: float = 20.0
    to: str | None = None
    durability: str | None = None
    drain: bool = False
    cut_mode: str = "blackhole"
    seed: int = 0
    hold: float | None = None
    """Seconds between the takeover and the failback (default: a third of the duration)."""
    settle: float = 2.0
    """Seconds of workload after the failback, before it stops."""
    deadline: float = 300.0
    """Seconds the fault sequence (fault, takeover, return, failback) may take."""
    cross_share: float = 0.2
    refund_share: float = 0.1
    """Share of arrivals that also start a partial refund of an acknowledged payment."""
    tail_lag: float = 0.0
    """Crash: seconds of extra one-way delay on the region's outgoing replication for
    the last seconds before the SIGKILL (its WAN links slowed), so that local mode has an
    unreplicated tail to lose; restored at the crash. 0 = the links as they are."""

    def validate(self, regions: list[str]) -> None:
        """ValueError for an unknown kind or region, or an unusable setting."""
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, not {self.kind!r}")
        if self.region not in regions:
            raise ValueError(f"unknown region {self.region!r}; the lab has "
                             f"{', '.join(regions)}")
        if self.to is not None and (self.to not in regions or self.to == self.region):
            raise ValueError(f"--to must be another region of {', '.join(regions)}")
        if len(regions) < 3 and self.kind != "planned":
            raise ValueError("crash and partition drills need 3 regions (a majority)")
        if self.durability not in (None, "local", "regional"):
            raise ValueError("durability must be local or regional")
        if self.duration <= 0 or self.rate <= 0:
            raise ValueError("duration and rate must be positive")


@dataclass
class Event:
    """Something the drill did, at `at` seconds since t0 (`wall`: unix time)."""

    at: float
    name: str
    detail: str = ""
    wall: float = 0.0
    disruptive: bool = False


@dataclass
class Check:
    """One of the issue's pass criteria: name, whether it holds, and the figure."""

    name: str
    ok: bool
    detail: str = ""


@dataclass
class DrillResult:
    """Everything the report shows."""

    config: DrillConfig
    run_id: str
    started_at: str
    regions: list[str]
    takeover: str
    durability: str
    data_dir: str
    events: list[Event] = field(default_factory=list)
    disruptions: list[Disruption] = field(default_factory=list)
    loss: Loss | None = None
    refunds: RefundLoss | None = None
    findings: list[Finding] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    handovers: list[dict[str, Any]] = field(default_factory=list)
    lost_tail: list[dict[str, Any]] | None = None
    lost_tail_record: dict[str, Any] | None = None
    fence: dict[str, Any] | None = None
    max_lag: dict[str, Any] = field(default_factory=dict)
    converged_after: float | None = None
    diverged: list[str] = field(default_factory=list)
    workload: dict[str, Any] = field(default_factory=dict)
    errors_by_code: dict[str, int] = field(default_factory=dict)
    timeline: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    error: str | None = None
    attempts: list[Attempt] = field(default_factory=list, repr=False)

    @property
    def ok(self) -> bool:
        """True when the drill ran to the end and every check passed."""
        return self.error is None and bool(self.checks) and all(c.ok for c in self.checks)

    @property
    def fault(self) -> Disruption | None:
        """The disruption after the fault itself."""
        return self.disruptions[0] if self.disruptions else None

    def to_json(self) -> dict[str, Any]:
        """JSON-able form (report.json)."""
        return {
            "kind": self.config.kind, "region": self.config.region, "ok": self.ok,
            "config": asdict(self.config), "run_id": self.run_id,
            "started_at": self.started_at, "regions": self.regions,
            "takeover": self.takeover, "durability": self.durability,
            "data_dir": self.data_dir, "seconds": round(self.seconds, 2),
            "error": self.error,
            "rto": None if self.fault is None else {
                "first_success_s": self.fault.rto_first, "stable_s": self.fault.rto_stable},
            "rpo": None if self.loss is None else {
                "count": self.loss.rpo_count, "amount": self.loss.missing_amount},
            "duplicates": None if self.loss is None else self.loss.duplicates,
            "checks": [asdict(c) for c in self.checks],
            "events": [asdict(e) for e in self.events],
            "disruptions": [d.to_json() for d in self.disruptions],
            "loss": None if self.loss is None else self.loss.to_json(),
            "refunds": None if self.refunds is None else self.refunds.to_json(),
            "errors_by_code": self.errors_by_code,
            "invariants": [f.to_json() for f in self.findings],
            "handovers": self.handovers, "lost_tail": self.lost_tail_record,
            "fence": self.fence,
            "max_lag": self.max_lag, "converged_after_s": self.converged_after,
            "diverged": self.diverged, "workload": self.workload,
            "timeline": self.timeline,
        }


# --------------------------------------------------------------------------- the lab


def auth_headers(cluster: Cluster) -> dict[str, str]:
    """The headers every /v1 call of the drill carries (the lab's admin key once the lab
    has one: `Cluster.auth_headers`); the one place they come from."""
    fn = getattr(cluster, "auth_headers", None)
    if not callable(fn):
        return {}
    try:
        return dict(fn())
    except ClusterError:  # a lab from before API keys: nodes that ask for none
        return {}


@contextlib.contextmanager
def drill_lab(data_dir: Path | None, wan_scale: float = 0.25,
              on_status: Callable[[str], None] | None = None,
              shield: Callable[[], contextlib.AbstractContextManager[Any]] | None = None,
              ) -> Iterator[Cluster]:
    """The running lab in `data_dir` if there is one (with a geo router: one is started
    for the drill if it has none, and stopped afterwards), else a lab of the drill's own
    in `data_dir` (or a temp dir), stopped on exit whatever happens. `shield` (e.g. the
    CLI's signal guard) is entered while stopping, so a second Ctrl-C cannot cut the
    stop short."""
    say = on_status or (lambda _msg: None)
    guard = shield or contextlib.nullcontext
    if data_dir is not None and running_pids(data_dir):
        cluster = Cluster.load(data_dir)
        started_router = None
        if not any(r.is_running() for r in cluster.routers):
            say("the lab runs no geo router: starting one for the drill")
            started_router = cluster.start_router()
        try:
            yield cluster
        finally:
            if started_router is not None:
                say("stopping the drill's router")
                with contextlib.suppress(Exception):
                    started_router.stop()
                with cluster._lock:
                    cluster.routers.remove(started_router)
                cluster.write()
        return
    run_dir = data_dir or Path(tempfile.mkdtemp(prefix="paycluster-drill-"))
    say(f"starting a 3-region lab in {run_dir} (WAN scale {wan_scale:g})")
    cluster = start_cluster(run_dir, regions=3, wan_scale=wan_scale, routers=1,
                            extra_env=dict(DRILL_NODE_ENV), router_env=dict(DRILL_ROUTER_ENV))
    try:
        yield cluster
    finally:
        with guard():
            say("stopping the drill's lab")
            cluster.stop()


def takeover_region(cluster: Cluster, home: str, wanted: str | None = None) -> str:
    """Who takes over `home`: `wanted`, else its durability buddy, else the next region."""
    if wanted is not None:
        return wanted
    from replication.durability import durability

    names = cluster.names
    with contextlib.suppress(Exception):
        state = durability(cluster.region(home).dsn, home, names)
        if state.buddy in names and state.buddy != home:
            return str(state.buddy)
    return names[(names.index(home) + 1) % len(names)]


def owner_of(dsn: str, home: str) -> tuple[int, str] | None:
    """(epoch, serving region) of `home` in the store at `dsn`: the ownership log's
    newest row."""
    import psycopg

    with psycopg.connect(dsn, autocommit=True, connect_timeout=3) as conn:
        row = conn.execute("select epoch, serving_region from ownership_epochs "
                           "where home_region = %s order by epoch desc limit 1",
                           (home,)).fetchone()
    return None if row is None else (int(row[0]), str(row[1]))


def _handles(cluster: Cluster) -> dict[str, Any]:
    return cluster.region_handles()


def _lock_urls(cluster: Cluster, via: str) -> list[str]:
    return [url for _, url in sorted(cluster.lock_urls_of(via).items())]


def _with_headers(fn: Callable[..., Any], headers: Mapping[str, str],
                  kwargs: dict[str, Any]) -> dict[str, Any]:
    """`kwargs` plus `headers=` if `fn` takes it (the guard's functions gain it with the
    lab's API keys)."""
    if headers and "headers" in inspect.signature(fn).parameters:
        return {**kwargs, "headers": dict(headers)}
    return kwargs


# --------------------------------------------------------------------------- the run


async def _blocking(fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
    """`fn(*args, **kwargs)` in a daemon thread of its own: a fault step that hangs (a
    store waiting forever) cannot keep the drill from reporting and stopping, as a
    thread of asyncio's default executor would (asyncio.run waits for those)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[_T] = loop.create_future()

    def settle(ok: bool, value: Any) -> None:
        if not future.done():
            future.set_result(value) if ok else future.set_exception(value)

    def run() -> None:
        try:
            value: Any = fn(*args, **kwargs)
            ok = True
        except BaseException as exc:
            value, ok = exc, False
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits
            loop.call_soon_threadsafe(settle, ok, value)

    threading.Thread(target=run, name=f"drill-{getattr(fn, '__name__', 'step')}",
                     daemon=True).start()
    return await future


class _DaemonExecutor(concurrent.futures.ThreadPoolExecutor):
    """The drill's event loop's default executor (`asyncio.to_thread`, also inside the
    failover guard): every call runs in a daemon thread of its own, and shutting it down
    never waits. With asyncio's own executor a step stuck on a store (before #12: a
    catalog change waiting for a synchronous standby that was cut off) kept `asyncio.run`
    from returning - its shutdown joins the executor's threads, without a timeout on
    Python 3.11 - so neither the deadline nor Ctrl-C could end the drill and stop its
    lab. Every step is bounded by its own timeouts as well; this is the backstop."""

    def submit(self, fn: Callable[..., _T], /, *args: Any,
               **kwargs: Any) -> concurrent.futures.Future[_T]:
        future: concurrent.futures.Future[_T] = concurrent.futures.Future()

        def run() -> None:
            if not future.set_running_or_notify_cancel():
                return
            try:
                value = fn(*args, **kwargs)
            except BaseException as exc:
                future.set_exception(exc)
            else:
                future.set_result(value)

        threading.Thread(target=run, name=f"drill-io-{getattr(fn, '__name__', 'step')}",
                         daemon=True).start()
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        return None


class _Run:
    """State of one drill run: clock, events, the workload, the lab."""

    def __init__(self, cluster: Cluster, config: DrillConfig,
                 say: Callable[[str], None]) -> None:
        self.cluster = cluster
        self.config = config
        self.say = say
        self.t0 = time.monotonic()
        self.wall0 = time.time()
        self.headers = auth_headers(cluster)
        self.events: list[Event] = []
        self.handovers: list[dict[str, Any]] = []
        self.takeover = takeover_region(cluster, config.region, config.to)
        self.regional = False
        self.buddy = self.takeover
        self.isolated = False
        self.crashed = False
        self.takeover_started: float | None = None
        self.lost_tail: dict[str, Any] | None = None
        self.sync_waiters = 0
        self.fence: dict[str, Any] | None = None

    def now(self) -> float:
        return time.monotonic() - self.t0

    def event(self, name: str, detail: str = "", disruptive: bool = False) -> Event:
        ev = Event(round(self.now(), 4), name, detail, time.time(), disruptive)
        self.events.append(ev)
        self.say(f"  t={ev.at:6.2f}s  {name}" + (f": {detail}" if detail else ""))
        return ev

    async def sleep_until(self, at: float) -> None:
        delay = at - self.now()
        if delay > 0:
            await asyncio.sleep(delay)

    # ------------------------------------------------------------ building blocks

    async def handover(self, to: str, label: str) -> Any:
        """A planned handover of the drilled region's home to `to` (optionally drained
        at the routers meanwhile); recorded as an event and in `handovers`."""
        from replication.failover import HandoverError, Step, planned_handover

        home = self.config.region
        source = self.current_owner()
        drained = self.drain(source) if self.config.drain and source != to else None

        def step(s: Step) -> None:
            self.event(f"{label}: {s.name}", f"{s.detail} ({s.seconds * 1000:.0f} ms)")

        self.event(label, f"planned handover of {home} from {source} to {to}",
                   disruptive=True)
        kwargs = _with_headers(planned_handover, self.headers, {"on_step": step})
        try:
            report = await planned_handover(_handles(self.cluster),
                                            _lock_urls(self.cluster, to), home, to, **kwargs)
        except HandoverError as exc:
            if exc.report is not None:
                self.handovers.append({"label": label, **exc.report.to_json()})
            raise DrillError(f"{label} failed: {exc}") from exc
        finally:
            if drained is not None:
                self.undrain(drained)
        self.handovers.append({"label": label, **report.to_json()})
        self.event(f"{label} done", f"{to} serves {home} under epoch {report.new_epoch}; "
                   f"writes paused {1000 * (report.unavailable_seconds or 0):.0f} ms")
        return report

    def current_owner(self) -> str:
        """Who serves the drilled home now, per the first store that answers."""
        for name in [self.takeover, self.config.region, *self.cluster.names]:
            with contextlib.suppress(Exception):
                owner = owner_of(self.cluster.region(name).dsn, self.config.region)
                if owner is not None:
                    return owner[1]
        return self.config.region

    def drain(self, region: str) -> str:
        for router in self.cluster.routers:
            with router.admin() as admin:
                admin.drain(region)
        self.event("drain", f"{region} drained at the router(s)")
        return region

    def undrain(self, region: str) -> None:
        for router in self.cluster.routers:
            with contextlib.suppress(Exception), router.admin() as admin:
                admin.undrain(region)
        self.event("undrain", f"{region} undrained at the router(s)")

    # ------------------------------------------------------------ fault sequences

    async def planned(self, fault_at: float, hold: float) -> None:
        await self.sleep_until(fault_at)
        await self.handover(self.takeover, "fault")
        await asyncio.sleep(hold)
        await self.handover(self.config.region, "failback")

    async def crash(self, fault_at: float, hold: float) -> None:
        home = self.config.region
        lag = self.config.tail_lag
        if lag > 0:
            await self.sleep_until(max(0.5, fault_at - 2 * lag - 1.0))
            await _blocking(slow_links, self.cluster, home, lag)
            self.event("slow links", f"{home}'s replication to the others delayed by "
                       f"{lag:g} s (so that the crash leaves a tail)")
        await self.sleep_until(fault_at)
        self.event("fault", f"SIGKILL of {home}'s node and PostgreSQL", disruptive=True)
        self.crashed = True
        try:
            if lag > 0:  # what is still on the (slow) wire dies with the region
                await _blocking(drop_in_flight, self.cluster, home)
            killed = await _blocking(crash_region, self.cluster, home)
        finally:
            if lag > 0:
                await _blocking(drop_in_flight, self.cluster, home, heal=True)
                await _blocking(slow_links, self.cluster, home, 0.0)
        self.event("crashed", ", ".join(f"{k} pid {v}" for k, v in killed.items())
                   + ("; its stream in flight dropped, links back to normal"
                      if lag > 0 else ""))
        await self.force_takeover("crash")
        await asyncio.sleep(hold)
        await _blocking(restart_store, self.cluster, home)
        self.event("restart", f"{home}'s PostgreSQL up again (crash recovery); its node "
                   "stays down until the rejoin")
        await self.come_back()

    async def partition(self, fault_at: float, hold: float) -> None:
        home = self.config.region
        await self.sleep_until(fault_at)
        self.event("fault", f"WAN cut isolating {home} ({self.config.cut_mode}): "
                   "replication, gRPC and lock quorum links, both ways", disruptive=True)
        self.isolated = True
        await _blocking(isolate_region, self.cluster, home, self.config.cut_mode)
        report = await self.force_takeover("partition")
        await asyncio.sleep(hold)
        await _blocking(heal_region, self.cluster, home)
        self.isolated = False
        self.event("heal", f"every WAN link of {home} healed")
        if self.regional:
            # Commits of the isolated region still waiting for its cut-off buddy: ended
            # (never acknowledged), so that the fence sees them and the tail lists them.
            from replication.reconcile import end_sync_waiters

            self.sync_waiters = await _blocking(end_sync_waiters,
                                                self.cluster.region(home).dsn)
            self.event("sync waiters ended", f"{self.sync_waiters} commits of {home} "
                       "waiting for its cut-off buddy ended (never acknowledged; listed "
                       "in the tail if no survivor has them)")
        # Before the rejoin rebuilds its store: what did the isolated region write, when?
        self.fence = await _blocking(
            fence_check, self.cluster.region(home).dsn,
            self.cluster.region(self.takeover).dsn, home, report.new_epoch,
            self.takeover_started)
        self.event("fence", str(self.fence["summary"]))
        await self.come_back()

    async def recover(self) -> None:
        """After a failed crash drill: start the crashed region's store and node again
        (whoever owns its home now; a rebuild is the operator's call, the report shows
        whether its store diverged)."""
        home = self.config.region
        region = self.cluster.region(home)
        try:
            if not region.servers.postgres.is_running():
                await _blocking(restart_store, self.cluster, home)
            if region.node is None or not region.node.is_running():
                await _blocking(self.cluster.restart_node, home)
            self.crashed = False
            self.event("recovered", f"{home}'s store and node started again (cleanup)")
        except Exception as exc:
            log.exception("recovering %s failed", home)
            self.event("recovery failed", f"{type(exc).__name__}: {exc}")

    async def force_takeover(self, reason: str) -> Any:
        """`replication.failover.crash_takeover` of the drilled home by the takeover
        region (by the survivor furthest ahead in the lost region's stream if that is
        another one), accepting the loss of an unreplicated tail in local mode."""
        try:
            from replication.failover import HandoverError, Step, crash_takeover
        except ImportError as exc:
            raise DrillError(f"{reason} drill needs replication.failover.crash_takeover: "
                             f"{exc}") from None
        from replication.align import lsn_int

        home = self.config.region

        def step(s: Step) -> None:
            self.event(f"takeover: {s.name}", f"{s.detail} ({s.seconds * 1000:.0f} ms)")

        for _ in range(2):
            self.takeover_started = time.time()
            self.event("takeover", f"forced takeover of {home} by {self.takeover}")
            # The drill accepts the loss of a local-mode tail (it measures it); it does
            # not rely on the guard's own reading of the mode (the buddy's subscription
            # setting), which it reports as found.
            kwargs = _with_headers(crash_takeover, self.headers, {
                "dead": home, "accept_data_loss": True,
                "reason": f"{reason} drill", "on_step": step})
            try:
                report = await crash_takeover(_handles(self.cluster), home, self.takeover,
                                              **kwargs)
            except HandoverError as exc:
                positions = (exc.report.positions if exc.report is not None else {}) or {}
                ahead = max(positions, key=lambda n: lsn_int(positions[n]), default=None)
                if "take over at" not in str(exc) or ahead in (None, self.takeover):
                    if exc.report is not None:
                        self.handovers.append({"label": "takeover", **exc.report.to_json()})
                    raise DrillError(f"takeover failed: {exc}") from exc
                self.event("takeover redirected", f"{ahead} is furthest ahead in {home}'s "
                           f"stream: it takes over instead of {self.takeover}")
                self.takeover = str(ahead)
                continue
            self.handovers.append({"label": "takeover", **report.to_json()})
            self.event("takeover done", f"{self.takeover} serves {home} under epoch "
                       f"{report.new_epoch} (forced, {report.durability} mode)")
            return report
        raise DrillError("takeover failed twice")

    async def come_back(self) -> None:
        """List the returning region's lost tail for reconciliation, rebuild it into the
        cluster (`replication.reconcile`), then fail back the planned way."""
        try:
            from cluster.rejoin import rejoin_region
            from replication.reconcile import lost_tail, wait_parked
        except ImportError as exc:
            raise DrillError(f"the rejoin needs replication.reconcile: {exc}") from None
        home = self.config.region
        handles = _handles(self.cluster)
        survivors = {n: h for n, h in handles.items() if n != home}
        tail = await _blocking(lost_tail, handles[home], survivors, home, record=True)
        self.lost_tail = tail.to_json()
        self.lost_tail["sync_waiters_ended"] = tail.sync_waiters_ended + self.sync_waiters
        self.event("lost tail listed", f"{tail.count} payments "
                   f"{tail.amount_by_currency or ''}, {len(tail.journals)} other journals and "
                   f"{len(tail.orphan_credits)} orphan credits "
                   f"{tail.orphan_amount_by_currency or ''} written to reconciliation_items "
                   f"({tail.recorded} new items)")
        if tail.orphan_credits:
            await _blocking(wait_parked, survivors, tail)
            self.event("suspense", f"{len(tail.orphan_credits)} orphan credits parked in "
                       "the paying regions' suspense accounts")
        if tail.orphan_refund_credits:
            # wait_parked waits for payments' orphan credits only; a refund's is parked by
            # its payer region's refund scan, before the invariants are read.
            await _blocking(_wait_refund_credits_parked, survivors,
                            tail.orphan_refund_credits)
            self.event("suspense", f"{len(tail.orphan_refund_credits)} orphan refund "
                       "credits parked in the paying regions' suspense accounts")
        # A regional region is rebuilt in local mode and made regional again (its buddy
        # no longer streamed from it): cluster.rejoin.rejoin_region.
        await _blocking(rejoin_region, self.cluster, home)
        self.crashed = False
        self.event("rejoined", f"{home} rebuilt from a donor snapshot, its node up"
                   + (f", regional again (buddy {self.buddy})" if self.regional else ""))
        await self.handover(home, "failback")


def _wait_refund_credits_parked(stores: Mapping[str, Any], credits: list[dict[str, Any]],
                                timeout: float = 30.0) -> None:
    """Wait until each orphan refund credit of a lost tail has its suspense posting (one
    per item, journal `suspense.refund_park_journal`) in the region that paid it."""
    import psycopg

    from region_node.suspense import refund_park_journal

    deadline = time.monotonic() + timeout
    waiting = list(credits)
    while waiting:
        still = []
        for credit in waiting:
            journal = refund_park_journal(uuid.UUID(str(credit["journal_id"])))
            with psycopg.connect(stores[credit["credit_region"]].dsn, autocommit=True,
                                 connect_timeout=5) as conn:
                if conn.execute("select 1 from journal_entries where journal_id = %s "
                                "limit 1", (journal,)).fetchone() is None:
                    still.append(credit)
        waiting = still
        if waiting and time.monotonic() > deadline:
            raise DrillError(f"orphan refund credits not parked within {timeout:g} s: "
                             f"{[c['refund_id'] for c in waiting]}")
        if waiting:
            time.sleep(0.1)


def fence_check(old_dsn: str, new_dsn: str, home: str, new_epoch: int,
                takeover_started: float | None, old_owner: str | None = None
                ) -> dict[str, Any]:
    """Did the isolated old owner stop writing before the new owner started?

    Reads the old owner's own store (before it is rebuilt: it holds the writes it made
    while cut off) and the new owner's: the commit time of every journal entry the old
    owner wrote for payments of `home` under an epoch older than `new_epoch`, of every
    entry the new owner wrote under `new_epoch` or later, and of the new epoch itself
    (``track_commit_timestamp``; one clock on this machine). Per account, the old
    epoch's last write must precede the new epoch's first; overall, the old owner's last
    write must precede the new epoch's commit."""
    import psycopg

    old_owner = old_owner or home
    per_account = ("select e.account_id::text, min(pg_xact_commit_timestamp(e.xmin)), "
                   "max(pg_xact_commit_timestamp(e.xmin)) from journal_entries e "
                   "join payments p on p.id = e.payment_id where p.home_region = %s "
                   "and e.region = %s and p.epoch {op} %s group by e.account_id")
    with psycopg.connect(old_dsn, autocommit=True, connect_timeout=5) as conn:
        old = {a: (lo, hi) for a, lo, hi in conn.execute(
            per_account.format(op="<"), (home, old_owner, new_epoch)).fetchall()}
    with psycopg.connect(new_dsn, autocommit=True, connect_timeout=5) as conn:
        row = conn.execute("select serving_region, pg_xact_commit_timestamp(xmin) "
                           "from ownership_epochs where home_region = %s and epoch = %s",
                           (home, new_epoch)).fetchone()
        if row is None:
            raise DrillError(f"the new epoch {new_epoch} of {home} is not in the new owner's "
                             "store")
        new_owner, taken_at = str(row[0]), row[1]
        new = {a: (lo, hi) for a, lo, hi in conn.execute(
            per_account.format(op=">="), (home, new_owner, new_epoch)).fetchall()}
    last_old = max((hi for _, hi in old.values() if hi is not None), default=None)
    first_new = min((lo for lo, _ in new.values() if lo is not None), default=None)
    overlaps = sorted(a for a in old.keys() & new.keys()
                      if old[a][1] is not None and new[a][0] is not None
                      and old[a][1] >= new[a][0])
    stopped = last_old is None or (taken_at is not None and last_old < taken_at)
    margin = (None if last_old is None or taken_at is None
              else round((taken_at - last_old).total_seconds(), 4))
    before_start = (None if last_old is None or takeover_started is None
                    else round(takeover_started - last_old.timestamp(), 4))
    return {
        "old_owner_last_write": None if last_old is None else last_old.isoformat(),
        "new_epoch_committed": None if taken_at is None else taken_at.isoformat(),
        "new_owner_first_write": None if first_new is None else first_new.isoformat(),
        "takeover_started": takeover_started,
        "stopped_before_takeover": stopped,
        "margin_s": margin, "last_write_before_takeover_call_s": before_start,
        "accounts_written_by_both": len(old.keys() & new.keys()),
        "overlapping_accounts": overlaps,
        "summary": (f"old owner's last write {margin} s before the new epoch's commit"
                    + ("" if before_start is None else
                       f" ({abs(before_start):g} s {'before' if before_start >= 0 else 'after'}"
                       " the takeover procedure began: it waits for the old lease)")
                    + "; "
                    f"{len(overlaps)} of {len(old.keys() & new.keys())} accounts written "
                    "under both epochs overlap"),
    }


async def run_drill_async(cluster: Cluster, config: DrillConfig,
                          say: Callable[[str], None] | None = None) -> DrillResult:
    """Run one drill on `cluster` (see the module docstring); never raises for a failed
    fault sequence: the result carries the error, and what was measured so far."""
    say = say or (lambda _msg: None)
    config.validate(cluster.names)
    asyncio.get_running_loop().set_default_executor(_DaemonExecutor())
    run = _Run(cluster, config, say)
    home = config.region
    result = DrillResult(config, uuid.uuid4().hex[:10],
                         datetime.now(UTC).isoformat(timespec="seconds"), cluster.names,
                         run.takeover, "local", str(cluster.data_dir))
    if config.durability is not None:
        from replication.durability import set_durability

        buddy = run.takeover if config.durability == "regional" else None
        await asyncio.to_thread(
            set_durability, cluster.region(home).dsn, home, config.durability, buddy,
            cluster.region(run.takeover).dsn)
    result.durability = _durability_of(cluster, home)
    run.regional = result.durability.startswith("regional")
    say(f"drill {config.kind} of {home} (takeover {run.takeover}, durability "
        f"{result.durability}), {config.rate:g} payments/s for {config.duration:g}s+")
    before = {r.name: await asyncio.to_thread(conflict_counts, r.dsn) for r in cluster.regions}
    apis = {r.name: r.api_url for r in cluster.regions}
    sampler = LagSampler(apis, run.t0, run.headers)
    hold = config.hold if config.hold is not None else max(3.0, config.duration / 3)
    fault_at = max(2.0, config.duration / 4)
    async with Workload(cluster.router_url, cluster.names, focus=home, rate=config.rate,
                        t0=run.t0, run_id=result.run_id, headers=run.headers,
                        seed=config.seed, cross_share=config.cross_share,
                        refund_share=config.refund_share) as work:
        accounts = await work.open_accounts()
        # The clock starts with the workload: everything is measured from here.
        run.t0 = work.t0 = sampler.t0 = time.monotonic()
        run.event("workload", f"{config.rate:g} payments/s through {cluster.router_url}")
        sampler.start()
        stop = asyncio.Event()
        load = asyncio.create_task(work.run(stop))
        interrupted = False
        try:
            try:
                await asyncio.wait_for(getattr(run, config.kind)(fault_at, hold),
                                       config.deadline)
            except TimeoutError:
                result.error = (f"the {config.kind} sequence did not finish within "
                                f"{config.deadline:g} s")
                run.event("drill error", result.error)
            except asyncio.CancelledError:  # Ctrl-C or SIGTERM: clean up briefly, go
                interrupted = True
                run.event("interrupted", "the drill was stopped")
                raise
            except Exception as exc:
                log.exception("drill %s failed", config.kind)
                result.error = f"{type(exc).__name__}: {exc}"
                run.event("drill error", result.error)
            finally:
                if run.isolated:  # never leave a region cut off, whatever happened
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(_blocking(heal_region, cluster, home),
                                               CLEANUP_TIMEOUT)
                        run.isolated = False
                        run.event("heal", f"every WAN link of {home} healed (cleanup)")
                if run.crashed and not interrupted:  # failed half-way: bring it back up
                    await run.recover()
            await run.sleep_until(max(config.duration, run.now() + config.settle))
        except asyncio.CancelledError:
            interrupted = True
            raise
        finally:
            stop.set()
            if interrupted:  # do not wait for the clients' retries (up to give_up_after)
                work.abandon()
                load.cancel()
            try:
                await load
            except asyncio.CancelledError:
                if not interrupted:  # interrupted while waiting for the clients' answers
                    work.abandon()
                    raise
            run.event("workload stopped", f"{len(work.intents)} payments, "
                      f"{len(work.attempts)} attempts, {len(work.refunds)} refunds")
        await sampler.stop()
    result.events, result.handovers = run.events, run.handovers
    result.takeover, result.lost_tail, result.fence = run.takeover, None, run.fence
    if run.lost_tail is not None:
        result.lost_tail = list(run.lost_tail.get("payments") or [])
        result.lost_tail_record = run.lost_tail
    end = run.now()

    # Converged final state, then the figures.
    # After a failed drill the regions may never converge: do not wait as long.
    result.converged_after, result.diverged = await _converge(
        cluster, CONVERGE_TIMEOUT if result.error is None else 20.0)
    stored: dict[str, list[StoredPayment]] = {}
    for region in cluster.regions:
        try:
            stored[region.name] = await asyncio.to_thread(stored_payments, region.dsn,
                                                          result.run_id)
        except Exception as exc:  # a region still down after a failed drill
            result.diverged.append(f"{region.name}'s store cannot be read: {exc}")
    final_region = home if home in stored else run.takeover
    final = stored.get(final_region, [])
    result.loss = loss(work.intents, final)
    if final_region in stored:
        # The refunds in the same store; a refund lost with a tail is listed there.
        refunds_stored = await asyncio.to_thread(
            stored_refunds, cluster.region(final_region).dsn,
            [r.payment_id for r in work.refunds])
        tail_refunds = [str(r["id"]) for r in (run.lost_tail or {}).get("refunds") or []]
        result.refunds = refund_loss(work.refunds, refunds_stored, tail_refunds)
    for name, rows in stored.items():
        if {p.id for p in rows} != {p.id for p in final}:
            result.diverged.append(f"{name} has {len(rows)} drill payments, {home} "
                                   f"{len(final)}")
    for region in cluster.regions:
        if region.name not in stored:
            continue
        result.findings += await asyncio.to_thread(ledger_findings, region.name, region.dsn,
                                                   before[region.name])
    disruptive = [e for e in result.events if e.disruptive]
    for i, ev in enumerate(disruptive):
        until = disruptive[i + 1].at if i + 1 < len(disruptive) else end
        result.disruptions.append(disruption(work.attempts, home, ev.name, ev.at, until))
    result.errors_by_code = dict(sorted(_count(
        a.code or f"http_{a.status}" for a in work.attempts if not a.answered).items()))
    overall, pair = max_lag(sampler.samples)
    others, other_pair = max_lag(sampler.samples, exclude=home)
    result.max_lag = {"seconds": overall, "pair": pair, "excluding_region_seconds": others,
                      "excluding_region_pair": other_pair,
                      "breaches": sorted({b for s in sampler.samples for b in s.breaches}),
                      "unreachable_samples": sum(1 for s in sampler.samples if s.error)}
    result.timeline = [asdict(s) for s in timeline(work.attempts, sampler.samples, home, end)]
    result.workload = _workload_figures(work, accounts.deposited, end)
    result.seconds = end
    result.checks = _checks(result, final)
    result.attempts = work.attempts
    return result


def _count(items: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in items:
        out[item] = out.get(item, 0) + 1
    return out


def _durability_of(cluster: Cluster, home: str) -> str:
    from replication.durability import durability

    try:
        state = durability(cluster.region(home).dsn, home, cluster.names)
    except Exception:
        return "unknown"
    return state.mode if state.mode == "local" else f"regional (buddy {state.buddy})"


def _workload_figures(work: Workload, deposited: int, end: float) -> dict[str, Any]:
    results = _count(i.result for i in work.intents)
    return {"payments": len(work.intents), "attempts": len(work.attempts),
            "retries": len(work.attempts) - len(work.intents), "results": results,
            "rate_per_s": round(len(work.intents) / end, 2) if end else None,
            "acknowledged": sum(1 for i in work.intents if i.payment_id),
            "focus_payments": sum(1 for i in work.intents if i.home == work.focus),
            "refunds": len(work.refunds),
            "refunds_acknowledged": sum(1 for r in work.refunds if r.refund_id),
            "deposited": deposited}


async def _converge(cluster: Cluster, within: float = CONVERGE_TIMEOUT
                    ) -> tuple[float | None, list[str]]:
    """Wait until every region's copy of the ledger is identical and nothing is
    `processing`; (seconds it took, []) or (None, what still differs)."""
    started = time.monotonic()
    last: list[str] = []
    while time.monotonic() - started < within:
        try:
            views = {r.name: await asyncio.to_thread(read_view, r.dsn)
                     for r in cluster.regions}
        except Exception as exc:
            last = [f"cannot read a store: {exc}"]
        else:
            prints = {v.fingerprint for v in views.values()}
            busy = {n: v.processing for n, v in views.items() if v.processing}
            if len(prints) == 1 and not busy:
                return round(time.monotonic() - started, 2), []
            last = [f"{len(prints)} different views"] + [f"{n}: {c} processing"
                                                          for n, c in busy.items()]
        await asyncio.sleep(0.5)
    return None, last


def _checks(result: DrillResult, final: list[StoredPayment]) -> list[Check]:
    """The issue's pass criteria for this kind of drill."""
    checks: list[Check] = []
    lossy = result.loss
    assert lossy is not None
    checks.append(Check("drill ran to the end", result.error is None, result.error or ""))
    checks.append(Check("regions converged", result.converged_after is not None
                        and not result.diverged,
                        "; ".join(result.diverged) or f"in {result.converged_after}s"))
    kind = result.config.kind
    regional = result.durability.startswith("regional")
    if kind == "planned" or regional:
        checks.append(Check("RPO 0", lossy.rpo_count == 0,
                            f"{lossy.rpo_count} acknowledged payments missing "
                            f"({lossy.missing_amount} minor units)"))
    checks.append(Check("no duplicates", lossy.duplicates == 0,
                        f"{len(lossy.duplicate_keys)} keys charged twice, "
                        f"{len(lossy.client_saw_two_ids)} keys answered with two ids"))
    # Refunds in flight through the fault (nothing pending is also an invariant above):
    # each acknowledged one stored once and ended; in local mode one lost with the
    # crashed region's tail is listed for reconciliation instead.
    refunds = result.refunds
    refund_problems = (["not measured (no store to read)"] if refunds is None else
                       refunds.problems(tail_allowed=kind in ("crash", "partition")
                                        and not regional))
    checks.append(Check("every refund ended exactly once", not refund_problems,
                        "; ".join(refund_problems) if refund_problems or refunds is None else
                        f"{refunds.acknowledged} of {refunds.intents} refunds acknowledged "
                        f"({refunds.cross_region} of them all cross-region; answers "
                        f"{refunds.results}), stored {refunds.statuses}"
                        + (f", {len(refunds.listed_in_tail)} listed in the lost tail"
                           if refunds.listed_in_tail else "")))
    broken = [f for f in result.findings if not f.ok]
    checks.append(Check("invariants hold in every region", not broken,
                        "; ".join(f"{f.region}: {f.name}: {f.detail}" for f in broken)
                        or f"{len(result.findings)} checks"))
    fault = result.fault
    if kind in ("crash", "partition"):
        rto = None if fault is None else fault.rto_first
        checks.append(Check("writes for the region's users recovered", rto is not None,
                            f"first success {rto} s, stable "
                            f"{None if fault is None else fault.rto_stable} s after the fault"))
        checks.append(_tail_check(result, lossy, regional))
        back = [h for h in result.handovers if h.get("label") == "failback"]
        checks.append(Check("failback clean", bool(back) and not back[-1].get("aborted"),
                            "" if not back else f"{back[-1].get('from_region')} -> "
                            f"{back[-1].get('to_region')}, epoch {back[-1].get('new_epoch')}"))
    if kind == "partition":
        fence = result.fence or {}
        checks.append(Check("isolated region stopped writing before the takeover",
                            bool(fence.get("stopped_before_takeover")),
                            str(fence.get("summary", "not measured"))))
        checks.append(Check("no two epochs wrote one account at once",
                            bool(fence) and not fence.get("overlapping_accounts"),
                            f"{len(fence.get('overlapping_accounts') or [])} overlapping of "
                            f"{fence.get('accounts_written_by_both')} accounts written under "
                            "both epochs"))
    if kind == "planned":
        rto = None if fault is None else fault.rto_stable
        checks.append(Check(f"RTO < {RTO_BOUND_PLANNED:g} s", rto is not None
                            and rto < RTO_BOUND_PLANNED, f"stable after {rto} s"))
        back = [h for h in result.handovers if h.get("label") == "failback"]
        clean = bool(back) and not back[-1].get("aborted") and \
            back[-1].get("to_region") == result.config.region
        checks.append(Check("failback clean", clean,
                            "" if not back else f"{back[-1].get('from_region')} -> "
                            f"{back[-1].get('to_region')}, epoch {back[-1].get('new_epoch')}"))
    return checks


def _tail_check(result: DrillResult, lossy: Loss, regional: bool) -> Check:
    """Local mode: the lost tail listed for reconciliation is exactly what clients saw
    acknowledged and is missing (count, amount, ids); regional: nothing to list."""
    tail = result.lost_tail or []
    record = result.lost_tail_record or {}
    if result.lost_tail is None:
        return Check("lost tail listed for reconciliation", False, "no tail was listed")
    acked = {m["id"] for m in lossy.missing}
    tail_ids = {str(p["id"]) for p in tail}
    acked_in_tail = [p for p in tail if str(p["id"]) in acked]
    amount = sum(int(p["amount"]) for p in acked_in_tail)
    exact = acked <= tail_ids and len(acked_in_tail) == lossy.rpo_count \
        and amount == lossy.missing_amount
    recorded = int(record.get("recorded") or 0) >= len(tail) or not tail
    detail = (f"tail {len(tail)} payments ({sum(int(p['amount']) for p in tail)} minor "
              f"units), of which {len(acked_in_tail)} acknowledged ({amount}); clients miss "
              f"{lossy.rpo_count} acknowledged ({lossy.missing_amount}); "
              f"{record.get('recorded')} items recorded")
    orphans = record.get("orphan_credits") or []
    if orphans:
        detail += (f"; {len(orphans)} orphan credits "
                   f"({sum(int(c['amount']) for c in orphans)}) parked in suspense")
    if regional:
        # RPO 0: no acknowledged payment in the tail. What the tail may hold are commits
        # that were waiting for the cut-off buddy when the region was cut off (a
        # partition): never acknowledged, ended at the rejoin, listed, never applied.
        waited = record.get("sync_waiters_ended")
        return Check("lost tail holds no acknowledged payment (regional)",
                     not acked_in_tail and exact,
                     detail + ("" if not waited else
                               f"; {waited} commits waiting for the buddy were ended"))
    return Check("lost tail reported exactly and listed", exact and recorded, detail)


def run_drill(cluster: Cluster, config: DrillConfig,
              say: Callable[[str], None] | None = None) -> DrillResult:
    """Synchronous `run_drill_async`."""
    return asyncio.run(run_drill_async(cluster, config, say))
