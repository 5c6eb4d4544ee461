"""The failover guard: planned handover of a home region's ownership with RPO 0.

Ownership is an append-only log (`ownership_epochs`, `ownership_bans`; see
`region_node.ownership`). A planned handover of home H from its owner A to region B:

1. **precheck**: B's convergence monitor must not report the pair A->B stale (a takeover
   would need that data), and A must be H's owner;
2. **lock**: take the quorum lock ``ownership:<H>``; its fencing token T is the new epoch
   (tokens only grow, so no two regions ever insert the same (H, epoch));
3. **ban**: A inserts the ban on its current epoch E (``POST /v1/admin/ownership/ban``),
   after the writers in flight; from then on A refuses writes for H (503, clients retry);
4. **catch-up**: wait, bounded, until the ban row is visible in every other region's
   store. Logical replication applies an origin's transactions in commit order, and all
   of A's writes under E committed before the ban, so a region that has the ban has
   every write for H. On timeout: abort (A takes epoch T itself, which lifts the ban);
5. **restamp**: rows of H that B will update next (accounts, payments, idempotency
   keys) were last written by A. PostgreSQL counts an update of a row whose
   last change came from another origin as ``update_origin_differs`` (a conflict the
   monitor treats as an SLO breach), so in every region except B these rows are
   rewritten unchanged in a session bound to that region's replication origin of its
   subscription to B (the subscription is paused for the few milliseconds this takes;
   ``origin = none`` never forwards such a write). B's later updates then arrive from the
   origin the rows already carry, as they would for rows B had always owned;
6. **take**: B inserts (H, T, B) (``POST /v1/admin/ownership/take``; B refuses unless it
   sees E banned, i.e. is caught up); the new epoch has no ban, so writes resume at B.

Failback is the same procedure in the other direction. The write-unavailability window
is measured from the ban's commit to the new epoch's commit (plus up to one ownership
refresh of the other regions' caches, during which they forward to the old owner, which
answers 503).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx
import psycopg
from psycopg import sql

from lock_service.config import LockSettings
from lock_service.quorum import LockService
from replication.wiring import set_enabled, subscription_name

log = logging.getLogger("replication.failover")

RESTAMPED: tuple[tuple[str, str], ...] = (
    ("accounts", "home_region"), ("payments", "home_region"), ("idempotency_keys", "scope"),
)
"""Replicated tables whose rows of a home region its owner updates (or deletes) after
inserting them, and the column that names the home region. Insert-only tables need no
restamp; nor do orders and stock allotments, which the selling region keeps writing
whoever owns the buyer's home."""


class HandoverError(RuntimeError):
    """A handover could not start or finish; `report` says how far it got."""

    def __init__(self, message: str, report: HandoverReport | None = None) -> None:
        super().__init__(message)
        self.report = report


@dataclass(frozen=True)
class RegionHandle:
    """How the guard reaches a region: its REST API and (operator access) its store."""

    name: str
    api_url: str
    dsn: str


@dataclass
class Step:
    """One step of a handover: what, how long it took, and details."""

    name: str
    seconds: float
    detail: str = ""


@dataclass
class HandoverReport:
    """What a handover did: owners and epochs before and after, the steps with timings,
    and the write-unavailability window (ban commit to new epoch commit)."""

    home: str
    from_region: str
    to_region: str
    old_epoch: int = 0
    new_epoch: int = 0
    steps: list[Step] = field(default_factory=list)
    unavailable_seconds: float | None = None
    seconds: float = 0.0
    aborted: bool = False
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        """JSON-able form."""
        return asdict(self)


def _owner_row(dsn: str, home: str) -> tuple[int, str, bool] | None:
    with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
        row = conn.execute(
            """select e.epoch, e.serving_region,
                      exists (select 1 from ownership_bans b
                               where b.home_region = e.home_region and b.epoch = e.epoch)
                 from ownership_epochs e where e.home_region = %s
                order by e.epoch desc limit 1""", (home,)).fetchone()
    return None if row is None else (int(row[0]), str(row[1]), bool(row[2]))


def _has_ban(dsn: str, home: str, epoch: int) -> bool:
    with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
        return conn.execute("select 1 from ownership_bans where home_region = %s "
                            "and epoch = %s", (home, epoch)).fetchone() is not None


def restamp(dsn: str, home: str, publisher: str, timeout: float = 10.0) -> int:
    """In the store at `dsn`: rewrite, unchanged, the rows of `home` in RESTAMPED tables as
    if they had arrived from `publisher` (the replication origin of the subscription to
    it), so that `publisher`'s later updates of them are not counted as conflicts. The
    subscription is paused meanwhile (an origin serves one session at a time). Returns
    the number of rows rewritten."""
    rows = 0
    sub = subscription_name(publisher)
    with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
        found = conn.execute(
            """select oid from pg_subscription where subname = %s and subdbid =
               (select oid from pg_database where datname = current_database())""",
            (sub,)).fetchone()
        if found is None:
            raise HandoverError(f"no subscription {sub} in {dsn}")
        subid = int(found[0])
        set_enabled(dsn, publisher, False)
        try:
            deadline = time.monotonic() + timeout
            while conn.execute("select 1 from pg_stat_subscription where subid = %s "
                               "and pid is not null", (subid,)).fetchone():
                if time.monotonic() > deadline:
                    raise HandoverError(f"apply worker of {sub} did not stop in {timeout}s")
                time.sleep(0.005)
            conn.execute("select pg_replication_origin_session_setup(%s)", (f"pg_{subid}",))
            try:
                with conn.transaction():
                    for table, column in RESTAMPED:
                        cur = conn.execute(sql.SQL("update {t} set {c} = {c} where {c} = %s")
                                           .format(t=sql.Identifier(table),
                                                   c=sql.Identifier(column)), (home,))
                        rows += max(cur.rowcount, 0)
            finally:
                conn.execute("select pg_replication_origin_session_reset()")
        finally:
            set_enabled(dsn, publisher, True)
    return rows


class _Clock:
    def __init__(self, report: HandoverReport,
                 on_step: Callable[[Step], None] | None) -> None:
        self.report = report
        self.on_step = on_step
        self.at = time.monotonic()

    def done(self, name: str, detail: str = "") -> Step:
        now = time.monotonic()
        step = Step(name, round(now - self.at, 4), detail)
        self.at = now
        self.report.steps.append(step)
        log.info("handover %s %s->%s: %s in %.3fs %s", self.report.home,
                 self.report.from_region, self.report.to_region, name, step.seconds, detail,
                 extra={"event": "handover_step"})
        if self.on_step is not None:
            self.on_step(step)
        return step


async def _post(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> dict[str, Any]:
    resp = await client.post(url, json=body)
    if resp.status_code != 200:
        raise HandoverError(f"POST {url} answered {resp.status_code}: {resp.text}")
    out: dict[str, Any] = resp.json()
    return out


async def planned_handover(regions: Mapping[str, RegionHandle], lock_urls: Sequence[str],
                           home: str, to: str, *, catch_up_timeout: float = 10.0,
                           lock_wait: float = 10.0, lock_ttl: float = 10.0,
                           on_step: Callable[[Step], None] | None = None) -> HandoverReport:
    """Hand the ownership of `home` over to region `to` (see the module docstring).

    `regions` must list every region of the cluster (every store is restamped).
    `lock_urls` are the quorum lock's Redis servers as reached from here. Raises
    HandoverError (with the report) if it cannot start or had to abort; after an abort
    the old owner serves `home` again under a new epoch.
    """
    if to not in regions:
        raise HandoverError(f"unknown region {to!r}")
    started = time.monotonic()
    current = await asyncio.to_thread(_owner_row, regions[to].dsn, home)
    if current is None:
        raise HandoverError(f"{to} knows no owner of home region {home}")
    report = HandoverReport(home, current[1], to, old_epoch=current[0])
    clock = _Clock(report, on_step)
    source = current[1]
    if source == to and not current[2]:
        report.new_epoch = current[0]
        clock.done("noop", f"{to} already serves {home} (epoch {current[0]})")
        return report
    if source not in regions:
        raise HandoverError(f"owner {source} of {home} is not among the regions given", report)

    async with httpx.AsyncClient(timeout=15.0) as client:
        # 1. The pair source -> to must not be stale (as `to`'s monitor sees it).
        resp = await client.get(f"{regions[to].api_url}/v1/replication/status")
        resp.raise_for_status()
        pair = resp.json().get("pairs", {}).get(f"{source}->{to}")
        if source != to and (pair is None or pair.get("breach")):
            raise HandoverError(f"pair {source}->{to} is stale: "
                                f"{(pair or {}).get('breach') or 'not monitored'}", report)
        clock.done("precheck", f"{source}->{to} lag "
                   f"{(pair or {}).get('lag_seconds')}s, no breach")

        locks = LockService(list(lock_urls), LockSettings(redis_urls=list(lock_urls),
                                                         ttl_seconds=lock_ttl))
        try:
            async with locks.hold(f"ownership:{home}", ttl=lock_ttl, wait=lock_wait) as lease:
                token = lease.fence
                clock.done("lock", f"ownership:{home} fencing token {token}")
                await _handover_locked(client, regions, home, source, to, token, report,
                                       clock, catch_up_timeout, lease.check)
        finally:
            await locks.aclose()
    report.seconds = round(time.monotonic() - started, 4)
    if report.aborted:
        raise HandoverError(report.error or "handover aborted", report)
    return report


async def _handover_locked(client: httpx.AsyncClient, regions: Mapping[str, RegionHandle],
                           home: str, source: str, to: str, token: int,
                           report: HandoverReport, clock: _Clock, catch_up_timeout: float,
                           check_lease: Callable[[], None]) -> None:
    # 2. Ban at the owner, after its writers in flight.
    banned = await _post(client, f"{regions[source].api_url}/v1/admin/ownership/ban",
                         {"home_region": home})
    ban_at = time.monotonic()
    epoch = int(banned["epoch"])
    report.old_epoch = epoch
    clock.done("ban", f"{source} banned writes for {home} under epoch {epoch}")
    others = [r for r in regions if r != source]
    restamped: list[str] = []
    try:
        # 3. Catch-up: the ban (and so every write under the epoch) in every other store.
        deadline = ban_at + catch_up_timeout
        waiting = set(others)
        while waiting:
            for name in sorted(waiting):
                if await asyncio.to_thread(_has_ban, regions[name].dsn, home, epoch):
                    waiting.discard(name)
            if not waiting:
                break
            if time.monotonic() > deadline:
                raise HandoverError(f"catch-up timed out after {catch_up_timeout}s: "
                                    f"{sorted(waiting)} have not applied {source}'s ban")
            await asyncio.sleep(0.01)
        clock.done("catch-up", f"{', '.join(others)} applied {source}'s changes up to the ban")
        # 4. Restamp H's rows everywhere but the new owner.
        counts = {}
        for name in regions:
            if name == to:
                continue
            restamped.append(name)
            counts[name] = await asyncio.to_thread(restamp, regions[name].dsn, home, to)
        clock.done("restamp", ", ".join(f"{n}: {c} rows" for n, c in counts.items()))
        check_lease()
    except Exception as exc:
        await _abort(client, regions, home, source, token, report, clock, ban_at, restamped,
                     exc)
        return
    # 5. The new owner takes the next epoch.
    try:
        await _post(client, f"{regions[to].api_url}/v1/admin/ownership/take",
                    {"home_region": home, "epoch": token})
    except HandoverError as exc:
        # `to` answered and refused: it inserted nothing, the token is unused.
        await _abort(client, regions, home, source, token, report, clock, ban_at, restamped,
                     exc)
        return
    except httpx.HTTPError as exc:
        # No answer: `to` may still commit (H, token). Handing back under the same token
        # could insert that key twice, so the ban stays; look at `to`'s store once.
        owner = await asyncio.to_thread(_owner_row, regions[to].dsn, home)
        if owner is None or owner[:2] != (token, to):
            report.aborted, report.error = True, (
                f"take at {to} got no answer ({exc!r}); {home} stays banned under epoch "
                f"{epoch}: run the handover again")
            clock.done("unknown", report.error)
            return
    report.new_epoch = token
    report.unavailable_seconds = round(time.monotonic() - ban_at, 4)
    clock.done("take", f"{to} serves {home} under epoch {token}")


async def _abort(client: httpx.AsyncClient, regions: Mapping[str, RegionHandle], home: str,
                 source: str, token: int, report: HandoverReport, clock: _Clock,
                 ban_at: float, restamped: list[str], exc: Exception) -> None:
    """Hand back: rows restamped for the new owner go back to the old owner's origin,
    then the old owner takes the (unused) token as its next epoch, which has no ban."""
    report.aborted, report.error = True, f"{type(exc).__name__}: {exc}"
    clock.done("abort", report.error)
    for name in restamped:
        if name != source:
            await asyncio.to_thread(restamp, regions[name].dsn, home, source)
    await _post(client, f"{regions[source].api_url}/v1/admin/ownership/take",
                {"home_region": home, "epoch": token})
    report.new_epoch = token
    report.unavailable_seconds = round(time.monotonic() - ban_at, 4)
    clock.done("handed back", f"{source} serves {home} again under epoch {token}")
