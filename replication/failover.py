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
from replication.align import align, cut_off, take_origin
from replication.errors import ReplicationError
from replication.libpq import lsn_int
from replication.wiring import set_enabled, slot_name, subscription_name

log = logging.getLogger("replication.failover")

RESTAMPED: tuple[tuple[str, str], ...] = (
    ("accounts", "home_region"), ("payments", "home_region"), ("idempotency_keys", "scope"),
    ("refunds", "home_region"),
)
"""Replicated tables whose rows of a home region its owner updates (or deletes) after
inserting them, and the column that names the home region. Insert-only tables need no
restamp; nor do orders and stock allotments, which the selling region keeps writing
whoever owns the buyer's home. A cross-region refund is inserted `pending` by the region
serving the payee's home (`refunds.home_region`) and finished by whoever serves it when
the payer's answer comes, perhaps the new owner."""


class HandoverError(ReplicationError):
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
    # Crash / partition takeovers (`crash_takeover`): forced, the old owner's durability
    # mode as found, each survivor's position in its stream when it was cut off, and
    # the position every survivor holds after alignment (the lost tail starts there).
    forced: bool = False
    durability: str | None = None
    positions: dict[str, str | None] = field(default_factory=dict)
    aligned_at: str | None = None

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


async def _owner_as_seen_by(regions: Mapping[str, RegionHandle], home: str,
                            to: str) -> tuple[int, str, bool]:
    """(epoch, serving region, banned) of `home` in `to`'s store, where every takeover
    starts; HandoverError if `to` is not among `regions` or knows no owner."""
    if to not in regions:
        raise HandoverError(f"unknown region {to!r}")
    current = await asyncio.to_thread(_owner_row, regions[to].dsn, home)
    if current is None:
        raise HandoverError(f"{to} knows no owner of home region {home}")
    return current


def _has_ban(dsn: str, home: str, epoch: int) -> bool:
    with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
        return conn.execute("select 1 from ownership_bans where home_region = %s "
                            "and epoch = %s", (home, epoch)).fetchone() is not None


def restamp(dsn: str, home: str, publisher: str, timeout_seconds: float = 10.0) -> int:
    """In the store at `dsn`: rewrite, unchanged, the rows of `home` in RESTAMPED tables
    whose last change did not come from `publisher` (its replication origin here, read
    with ``pg_xact_commit_timestamp_origin(xmin)``; needs ``track_commit_timestamp``), as
    if they had arrived from `publisher`, so that `publisher`'s later updates of them are
    not counted as conflicts. Rows that already carry `publisher`'s origin are left alone
    (after a failback most of them do). The subscription is paused meanwhile (an origin
    serves one session at a time). Returns the number of rows rewritten."""
    rows = 0
    sub = subscription_name(publisher)
    with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
        found = conn.execute(
            """select s.oid, o.roident from pg_subscription s
                 left join pg_replication_origin o on o.roname = 'pg_' || s.oid::text
                where s.subname = %s and s.subdbid =
                      (select oid from pg_database where datname = current_database())""",
            (sub,)).fetchone()
        if found is None:
            raise HandoverError(f"no subscription {sub} in {dsn}")
        subid, roident = int(found[0]), found[1]
        set_enabled(dsn, publisher, False)
        try:
            deadline = time.monotonic() + timeout_seconds
            while conn.execute("select 1 from pg_stat_subscription where subid = %s "
                               "and pid is not null", (subid,)).fetchone():
                if time.monotonic() > deadline:
                    raise HandoverError(f"apply worker of {sub} did not stop in {timeout_seconds}s")
                time.sleep(0.005)
            take_origin(conn, f"pg_{subid}", deadline)
            try:
                with conn.transaction():
                    for table, column in RESTAMPED:
                        cur = conn.execute(
                            sql.SQL("update {t} set {c} = {c} where {c} = %s and "
                                    "(pg_xact_commit_timestamp_origin(xmin)).roident "
                                    "is distinct from %s")
                            .format(t=sql.Identifier(table), c=sql.Identifier(column)),
                            (home, roident))
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


ONE_CONNECTION_PER_CALL = httpx.Limits(max_keepalive_connections=0)
"""The handover's calls are seconds apart (catch-up and restamp run between them), about
the nodes' keep-alive timeout (uvicorn's 5 s, httpx's pool keeps a connection as long): a
call on a pooled connection the node is closing at that moment fails with ReadError, and
a failed release aborts the handover. A handful of calls can afford a connection each."""


async def _post(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> dict[str, Any]:
    resp = await client.post(url, json=body)
    if resp.status_code != 200:
        raise HandoverError(f"POST {url} answered {resp.status_code}: {resp.text}")
    out: dict[str, Any] = resp.json()
    return out


async def planned_handover(regions: Mapping[str, RegionHandle], lock_urls: Sequence[str],
                           home: str, to: str, *, catch_up_timeout: float = 10.0,
                           lock_wait_seconds: float = 10.0, lock_ttl_seconds: float = 10.0,
                           on_step: Callable[[Step], None] | None = None,
                           headers: Mapping[str, str] | None = None) -> HandoverReport:
    """Hand the ownership of `home` over to region `to` (see the module docstring).

    `regions` must list every region of the cluster (every store is restamped).
    `lock_urls` are the quorum lock's Redis servers as reached from here (only used
    when the nodes run without ownership leases; with leases the old owner releases its
    lease and `to`'s node acquires it, waiting up to `lock_wait_seconds`). `headers` go with
    every API call (e.g. the admin key: `Cluster.auth_headers()`). Raises HandoverError
    (with the report) if it cannot start or had to abort; after an abort the old owner
    serves `home` again under a new epoch.
    """
    started = time.monotonic()
    current = await _owner_as_seen_by(regions, home, to)
    report = HandoverReport(home, current[1], to, old_epoch=current[0])
    clock = _Clock(report, on_step)
    source = current[1]
    if source == to and not current[2]:
        report.new_epoch = current[0]
        clock.done("noop", f"{to} already serves {home} (epoch {current[0]})")
        return report
    if source not in regions:
        raise HandoverError(f"owner {source} of {home} is not among the regions given", report)

    async with httpx.AsyncClient(timeout=max(15.0, lock_wait_seconds + 5.0),
                                 headers=dict(headers or {}), limits=ONE_CONNECTION_PER_CALL
                                 ) as client:
        # 1. The pair source -> to must not be stale (as `to`'s monitor sees it).
        resp = await client.get(f"{regions[to].api_url}/v1/replication/status")
        resp.raise_for_status()
        pair = resp.json().get("pairs", {}).get(f"{source}->{to}")
        if source != to and (pair is None or pair.get("breach")):
            raise HandoverError(f"pair {source}->{to} is stale: "
                                f"{(pair or {}).get('breach') or 'not monitored'}", report)
        clock.done("precheck", f"{source}->{to} lag "
                   f"{(pair or {}).get('lag_seconds')}s, no breach")
        if await _leases_enabled(client, regions[to]):
            await _handover_leased(client, regions, home, source, to, report, clock,
                                   catch_up_timeout, lock_wait_seconds)
            report.seconds = round(time.monotonic() - started, 4)
            if report.aborted:
                raise HandoverError(report.error or "handover aborted", report)
            return report

        locks = LockService(list(lock_urls), LockSettings(redis_urls=list(lock_urls),
                                                         ttl_seconds=lock_ttl_seconds))
        try:
            async with locks.hold(f"ownership:{home}", ttl=lock_ttl_seconds,
                                  wait=lock_wait_seconds) as lease:
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
    epoch, ban_at = await _ban(client, regions, home, source, report, clock)
    restamped: list[str] = []
    try:
        await _catch_up_and_restamp(regions, home, source, to, epoch, ban_at,
                                    catch_up_timeout, clock, restamped)
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


async def _ban(client: httpx.AsyncClient, regions: Mapping[str, RegionHandle], home: str,
               source: str, report: HandoverReport, clock: _Clock) -> tuple[int, float]:
    """Step 2 of both handover paths: ban writes at the owner, after its writers in
    flight; returns the banned epoch and when the ban was answered."""
    banned = await _post(client, f"{regions[source].api_url}/v1/admin/ownership/ban",
                         {"home_region": home})
    ban_at = time.monotonic()
    epoch = int(banned["epoch"])
    report.old_epoch = epoch
    clock.done("ban", f"{source} banned writes for {home} under epoch {epoch}")
    return epoch, ban_at


async def _catch_up_and_restamp(regions: Mapping[str, RegionHandle], home: str, source: str,
                                to: str, epoch: int, ban_at: float, catch_up_timeout: float,
                                clock: _Clock, restamped: list[str]) -> None:
    """Steps 3 and 4 of both handover paths: wait until every other store has the ban
    (and so every write under the epoch), then restamp H's rows everywhere but the new
    owner. `restamped` collects the regions touched, for an abort to undo."""
    await _catch_up(regions, home, source, epoch, ban_at + catch_up_timeout,
                    catch_up_timeout)
    others = [r for r in regions if r != source]
    clock.done("catch-up", f"{', '.join(others)} applied {source}'s changes up to the ban")
    counts = {}
    for name in regions:
        if name == to:
            continue
        restamped.append(name)
        counts[name] = await asyncio.to_thread(restamp, regions[name].dsn, home, to)
    clock.done("restamp", ", ".join(f"{n}: {c} rows" for n, c in counts.items()))


async def _catch_up(regions: Mapping[str, RegionHandle], home: str, source: str, epoch: int,
                    deadline: float, bound_seconds: float) -> None:
    """Wait until every region but `source` has `source`'s ban of `epoch`."""
    waiting = {r for r in regions if r != source}
    while waiting:
        for name in sorted(waiting):
            if await asyncio.to_thread(_has_ban, regions[name].dsn, home, epoch):
                waiting.discard(name)
        if not waiting:
            break
        if time.monotonic() > deadline:
            raise HandoverError(f"catch-up timed out after {bound_seconds}s: "
                                f"{sorted(waiting)} have not applied {source}'s ban")
        await asyncio.sleep(0.01)


async def _leases_enabled(client: httpx.AsyncClient, region: RegionHandle) -> bool:
    """Whether `region`'s node holds ownership leases (multi-region lock quorum)."""
    resp = await client.get(f"{region.api_url}/v1/admin/ownership/leases")
    return resp.status_code == 200 and bool(resp.json().get("enabled"))


async def _handover_leased(client: httpx.AsyncClient, regions: Mapping[str, RegionHandle],
                           home: str, source: str, to: str, report: HandoverReport,
                           clock: _Clock, catch_up_timeout: float,
                           lock_wait_seconds: float) -> None:
    """The handover with ownership leases: ban, catch-up, restamp, the old owner
    releases its lease, the new owner acquires it and takes its token as the epoch."""
    epoch, ban_at = await _ban(client, regions, home, source, report, clock)
    restamped: list[str] = []
    try:
        await _catch_up_and_restamp(regions, home, source, to, epoch, ban_at,
                                    catch_up_timeout, clock, restamped)
        released = await _post(client, f"{regions[source].api_url}/v1/admin/ownership/release",
                               {"home_region": home})
        clock.done("release", f"{source} gave back its lease (fence={released['token']})"
                   if released.get("token") is not None else
                   f"{source} held no lease of {home} any more (its epoch {epoch} is banned)")
    except Exception as exc:
        await _abort(client, regions, home, source, None, report, clock, ban_at, restamped,
                     exc, lock_wait_seconds)
        return
    try:
        took = await _post(client, f"{regions[to].api_url}/v1/admin/ownership/take",
                           {"home_region": home, "wait": lock_wait_seconds})
    except HandoverError as exc:
        # `to` refused (not caught up, or no lease): it inserted nothing.
        await _abort(client, regions, home, source, None, report, clock, ban_at, restamped,
                     exc, lock_wait_seconds)
        return
    except httpx.HTTPError as exc:
        owner = await asyncio.to_thread(_owner_row, regions[to].dsn, home)
        if owner is None or owner[1] != to or owner[0] <= epoch:
            report.aborted, report.error = True, (
                f"take at {to} got no answer ({exc!r}); {home} stays banned under epoch "
                f"{epoch}: run the handover again")
            clock.done("unknown", report.error)
            return
        took = {"epoch": owner[0]}
    report.new_epoch = int(took["epoch"])
    report.unavailable_seconds = round(time.monotonic() - ban_at, 4)
    clock.done("take", f"{to} acquired the lease and serves {home} under epoch "
                       f"{report.new_epoch}")


async def _abort(client: httpx.AsyncClient, regions: Mapping[str, RegionHandle], home: str,
                 source: str, token: int | None, report: HandoverReport, clock: _Clock,
                 ban_at: float, restamped: list[str], exc: Exception,
                 lock_wait_seconds: float = 10.0) -> None:
    """Hand back: rows restamped for the new owner go back to the old owner's origin,
    then the old owner takes the (unused) token as its next epoch, which has no ban
    (with leases, `token` None: the old owner acquires its lease again and takes the
    new token)."""
    report.aborted, report.error = True, f"{type(exc).__name__}: {exc}"
    clock.done("abort", report.error)
    for name in restamped:
        if name != source:
            await asyncio.to_thread(restamp, regions[name].dsn, home, source)
    body: dict[str, Any] = ({"home_region": home, "epoch": token} if token is not None
                            else {"home_region": home, "wait": lock_wait_seconds})
    took = await _post(client, f"{regions[source].api_url}/v1/admin/ownership/take", body)
    report.new_epoch = int(took["epoch"])
    report.unavailable_seconds = round(time.monotonic() - ban_at, 4)
    clock.done("handed back", f"{source} serves {home} again under epoch "
                              f"{report.new_epoch}")


# --------------------------------------------------------------------------- crash takeover


def _durability_of(regions: Mapping[str, RegionHandle], dead: str, to: str) -> str:
    """``regional`` if `dead` runs with `to` as its synchronous buddy, else ``local``.

    Read from `dead`'s store when it answers (a partition: the operator may still reach
    it), else from `to`'s subscription to `dead`: regional mode sets its
    ``synchronous_commit`` (default ``off``), local mode sets it back to ``off``
    (`replication.durability.set_durability`)."""
    handle = regions.get(dead)
    if handle is not None:
        try:
            with _isolated_session(handle.dsn) as conn:
                row = conn.execute("show synchronous_standby_names").fetchone()
            return "regional" if row and slot_name(dead, to) in str(row[0]) else "local"
        except psycopg.Error:
            pass
    with psycopg.connect(regions[to].dsn, autocommit=True, connect_timeout=5) as conn:
        row = conn.execute("select subsynccommit from pg_subscription where subname = %s",
                           (subscription_name(dead),)).fetchone()
    # The subscription default is off; regional mode sets it (local: see
    # `replication.durability`), local mode sets it back to off.
    return "regional" if row and str(row[0]) != "off" else "local"


ISOLATED_STATEMENT_TIMEOUT_SECONDS = 5.0
"""Seconds any statement of the guard may take in the old owner's store during a
forced takeover (and its lock waits: `ISOLATED_LOCK_TIMEOUT_SECONDS`): that store may be cut off
with commits waiting for a synchronous standby that will never answer."""

ISOLATED_LOCK_TIMEOUT_SECONDS = 2.0


def _isolated_session(
        dsn: str, statement_timeout_seconds: float = ISOLATED_STATEMENT_TIMEOUT_SECONDS,
        lock_timeout_seconds: float = ISOLATED_LOCK_TIMEOUT_SECONDS) -> psycopg.Connection[Any]:
    """An autocommit session on a store that may be cut off from the cluster (the old
    owner in a forced takeover): it never waits for a synchronous standby (its commits
    are ``synchronous_commit = local``: the standby may be the region that is cut off,
    and these are the guard's catalog changes, not payments), and every statement and
    lock wait is bounded, so a lock held by a transaction stuck in ``SyncRep`` cannot
    hold the takeover up."""
    options = (f"-c synchronous_commit=local "
               f"-c statement_timeout={max(1, int(statement_timeout_seconds * 1000))} "
               f"-c lock_timeout={max(1, int(lock_timeout_seconds * 1000))}")
    return psycopg.connect(dsn, autocommit=True, connect_timeout=2, options=options)


def _quarantine_inbound(handle: RegionHandle, survivors: Sequence[str]) -> list[str]:
    """Best effort, if the old owner's store answers (a partition): pause its
    subscriptions to the survivors, so that after the heal it does not apply the new
    owner's updates on top of rows it changed in its tail (`replication.reconcile`
    decides how it comes back). Bounded (`_isolated_session`): a store whose commits
    wait for a cut-off synchronous standby, or whose catalog is locked by such a
    commit, is left as it is (a rebuild brings it back). Returns the subscriptions
    paused."""
    paused = []
    try:
        with _isolated_session(handle.dsn) as conn:
            for name in survivors:
                try:
                    conn.execute(sql.SQL("alter subscription {} disable").format(
                        sql.Identifier(subscription_name(name))))
                except psycopg.errors.UndefinedObject:
                    continue
                paused.append(name)
    except (psycopg.Error, OSError) as exc:
        log.warning("could not pause %s's subscriptions (%s paused): %s", handle.name,
                    paused or "none", exc)
    return paused


async def crash_takeover(regions: Mapping[str, RegionHandle], home: str, to: str, *,
                         dead: str | None = None, headers: Mapping[str, str] | None = None,
                         lease_wait: float = 15.0, accept_data_loss: bool = False,
                         reason: str = "crash",
                         on_step: Callable[[Step], None] | None = None) -> HandoverReport:
    """Forced takeover of `home` by region `to` when its owner is dead or cut off (crash
    or partition); no ban is possible. Returns the report (HandoverError if refused).

    `regions`: every surviving region, plus the old owner's handle if known (its store
    is read if it answers, never required). `dead`: the old owner (default: the owner
    in `to`'s store). Steps:

    1. **durability**: in ``regional`` mode with `to` as the old owner's buddy every
       acknowledged commit is already at `to` (RPO 0); otherwise (``local``) the
       unreplicated tail is lost for now, and the takeover is refused unless
       `accept_data_loss`;
    2. **cut off**: every survivor disables its subscription to the old owner and
       records its position (`replication.align.cut_off`): the old owner's tail is
       never applied silently when it comes back; if the old owner's store answers,
       its own subscriptions to the survivors are paused too;
    3. **align**: every survivor (`to` included) gets the old owner's rows that the
       survivor furthest ahead in its stream has and it lacks (`replication.align.align`),
       so all hold the same prefix;
    4. **restamp** the home's rows everywhere but `to` (as in a planned handover);
    5. **take**: `to`'s node acquires the lease ``ownership:<home>`` (waiting up to
       `lease_wait` s: the old owner's lease must expire first, so the old owner has
       stopped writing) and inserts its token as the new epoch, forced, recorded in
       ``ownership_takeovers`` with the positions.

    `headers` go with every API call (e.g. the admin key). `reason` is recorded.

    The old owner comes back with `replication.reconcile` (`lost_tail`, then
    `reconnect_region` or `rejoin_region`). If its store could not be reached here, its
    subscriptions were not paused: after a heal it applies the new owner's updates over
    rows it changed itself (conflicts counted there), and only a rebuild
    (`rejoin_region`) brings it back.
    """
    started = time.monotonic()
    current = await _owner_as_seen_by(regions, home, to)
    old = dead or current[1]
    report = HandoverReport(home, old, to, old_epoch=current[0], forced=True)
    clock = _Clock(report, on_step)
    if current[1] == to and dead is None:
        report.new_epoch = current[0]
        clock.done("noop", f"{to} already serves {home} (epoch {current[0]})")
        return report
    if old == to:
        raise HandoverError(f"{to} cannot take over from itself", report)
    survivors = [r for r in regions if r != old]
    report.durability = await asyncio.to_thread(_durability_of, regions, old, to)
    if report.durability != "regional" and not accept_data_loss:
        raise HandoverError(
            f"{old} ran in {report.durability} mode (not regional with {to} as its buddy): "
            f"its acknowledged but unreplicated payments would be lost for now; pass "
            f"accept_data_loss to take over anyway (the tail is listed on its return)",
            report)
    clock.done("durability", f"{old} in {report.durability} mode")

    # 2. Cut the old owner off every survivor; where did each one stop?
    positions = await asyncio.gather(*(asyncio.to_thread(cut_off, regions[s].dsn, old)
                                       for s in survivors))
    report.positions = dict(zip(survivors, positions, strict=True))
    paused: list[str] = []
    if old in regions:
        paused = await asyncio.to_thread(_quarantine_inbound, regions[old], survivors)
    clock.done("cut off", ", ".join(f"{s} at {p}" for s, p in report.positions.items())
               + (f"; {old} paused its subscriptions to {', '.join(paused)}" if paused else ""))

    # 3. Every survivor at the position of the one furthest ahead (`to` included).
    ahead = max(survivors, key=lambda s: (lsn_int(report.positions[s]), s == to))
    report.aligned_at = report.positions[ahead]
    aligned = {}
    for name in survivors:
        if name != ahead:
            changed = await asyncio.to_thread(align, regions[ahead].dsn, regions[name].dsn,
                                              old)
            aligned[name] = sum(changed.values())
    clock.done("align", f"to {ahead}'s position {report.aligned_at}: "
               + (", ".join(f"{n}: {c} rows" for n, c in aligned.items()) or "nothing"))

    # 4. Restamp, 5. take.
    counts = {}
    for name in survivors:
        if name != to:
            counts[name] = await asyncio.to_thread(restamp, regions[name].dsn, home, to)
    clock.done("restamp", ", ".join(f"{n}: {c} rows" for n, c in counts.items()))
    async with httpx.AsyncClient(timeout=lease_wait + 15.0, headers=dict(headers or {}),
                                 limits=ONE_CONNECTION_PER_CALL) as client:
        took = await _post(client, f"{regions[to].api_url}/v1/admin/ownership/take", {
            "home_region": home, "forced": True, "wait": lease_wait,
            "takeover": {"from_region": old, "from_epoch": current[0],
                         "positions": {"aligned_at": report.aligned_at,
                                       "cut_off": report.positions},
                         "detail": reason}})
    report.new_epoch = int(took["epoch"])
    report.unavailable_seconds = None
    report.seconds = round(time.monotonic() - started, 4)
    clock.done("take", f"{to} acquired the lease and serves {home} under epoch "
                       f"{report.new_epoch} (forced)")
    return report
