"""Ownership leases: the serving region of a home region holds the quorum lock
``ownership:<home>`` (over one Redis per region, `lock_service`) for as long as it writes.

Why: the ownership log (`region_node.ownership`) says who *should* serve a home region,
but a region cut off from the others cannot learn that someone took over. A lease that
must be renewed with a majority of the regions' Redis servers gives every owner a clock:

- **Holding.** The node acquires the lease for every home its store says it serves (an
  unbanned epoch of its own) at start and again whenever it is lost; a home that the
  store says another region serves is never tried. The watchdog renews it every
  ``ownership_lease_renew_seconds``.
- **Epoch = token.** On every (re)acquisition with token T the node inserts (home, T,
  itself) into the log: the epoch of its writes is always the token of the lease it
  holds. Tokens only grow (`lock_service.quorum`), only the lease holder inserts, so no
  key is inserted twice. Writes (`ownership.assert_serving`) need a valid local lease
  whose token equals the store's current epoch, else 503 ``lease_lost``.
- **Self-fencing.** A write may only *start* while more than ``ownership_lease_margin_seconds``
  of validity is left, and its transaction always gets a PostgreSQL
  ``transaction_timeout`` that ends before the lease does (also for a node paused past
  its lease, which no in-process timer could stop): a region that cannot renew
  (partition: only its own Redis answers) has committed its last write before its
  lease ends, and a new owner can only acquire the lock after the old keys expired on a
  majority (Redlock): no two epochs ever write at the same time.
- **The epoch register.** A store can be behind: a region healed from a partition may
  not have received the epoch a takeover inserted elsewhere yet. If the new owner then
  lost its lease too, the stale region could re-acquire and write on top of a store
  that misses the new owner's writes. So every lease holder first writes (epoch,
  region) to a register on a majority of the same Redis servers (a max-register:
  only a higher epoch replaces it), and a holder whose register read (majority) shows
  a newer epoch of another region than its store has gives the lease back and waits
  for replication. Majorities intersect, so the newest taken epoch is always seen.
- **Planned handover.** The guard bans the old epoch, waits for catch-up, restamps,
  then the old owner `release`s (it never re-acquires a banned epoch) and the new owner
  `take`s: it acquires the lease itself and inserts its token as the next epoch.
- **Crash / partition takeover.** The new owner `take`s with ``forced``: it waits for
  the old owner's lease to expire (the lock cannot be granted before) and inserts the
  epoch without a ban, recording the takeover in ``ownership_takeovers``.

Assumptions as in `lock_service.quorum` (Redis keeps acknowledged keys or loses them all
and then sits out its quarantine; clock rates within the drift allowance).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
import redis.asyncio as aioredis

from lock_service.config import LockSettings
from lock_service.errors import LockUnavailable
from lock_service.quorum import Lease, LockService
from lock_service.watchdog import Watchdog
from region_node import ownership as own
from region_node.db import Database
from region_node.errors import Conflict, RegionUnavailable

log = logging.getLogger(__name__)

REGISTER_PREFIX = "paycluster:owner:"

# KEYS: 1 register. ARGV: 1 epoch, 2 region. Keeps the highest epoch ever written.
_SETMAX_LUA = """
local cur = redis.call('GET', KEYS[1])
if cur then
  local e = tonumber(string.match(cur, '^(%d+)'))
  if e and e >= tonumber(ARGV[1]) then return 0 end
end
redis.call('SET', KEYS[1], ARGV[1] .. ' ' .. ARGV[2])
return 1
"""


# Sessions holding (or waiting for) a home's ownership lock shared: its writers.
_TERMINATE_WRITERS = """
select pg_terminate_backend(l.pid) from pg_locks l
 where l.locktype = 'advisory' and l.classid = cast(%(cls)s as oid)
   and l.objid = cast(hashtext(%(home)s) as oid) and l.objsubid = 2 and l.mode = 'ShareLock'
   and l.pid <> pg_backend_pid()
"""


# What a write's transaction_timeout keeps from the lease's remaining time: the round trip
# that sets it and the server's timer granularity.
WRITE_SAFETY_SECONDS = 0.2

# The fence loop sleeps until a lease reaches its margin, between these bounds: at most
# 0.25 s so that a lease installed meanwhile is looked at long before its margin (a new
# lease has the whole ttl), at least 10 ms. It used to wake every 50 ms, idle or not.
FENCE_CHECK_MAX_SECONDS = 0.25
FENCE_CHECK_MIN_SECONDS = 0.01

# A write session ended this long after a fence began is counted as ended by it: the
# terminations reach their sessions within milliseconds, a shutdown is rarely that close.
FENCE_ATTRIBUTION_SECONDS = 5.0


def lock_name(home: str) -> str:
    """The quorum lock whose holder serves `home`."""
    return f"ownership:{home}"


@dataclass
class HeldLease:
    """A lease this node holds for one home region."""

    home: str
    lease: Lease
    watchdog: Watchdog

    @property
    def token(self) -> int:
        """The fencing token, which is also the ownership epoch of our writes."""
        return self.lease.fence


class EpochRegister:
    """A max-register of (epoch, region) per home on a majority of the lock's servers."""

    def __init__(self, urls: Sequence[str], op_timeout_seconds: float) -> None:
        self.op_timeout_seconds = op_timeout_seconds
        self.clients = [aioredis.Redis.from_url(u, decode_responses=True,
                                                socket_timeout=op_timeout_seconds,
                                                socket_connect_timeout=op_timeout_seconds,
                                                protocol=2)
                        for u in urls]
        self.quorum = len(self.clients) // 2 + 1

    async def _each(self, fn: Any) -> list[Any]:
        async def one(client: aioredis.Redis) -> Any:
            try:
                async with asyncio.timeout(self.op_timeout_seconds):
                    return await fn(client)
            except Exception as exc:  # unreachable server: counts as no answer
                return exc
        return list(await asyncio.gather(*(one(c) for c in self.clients)))

    async def read(self, home: str) -> tuple[int, str] | None:
        """The highest (epoch, region) a majority knows of; None if none was written.
        RegionUnavailable if fewer than a majority answered."""
        replies = await self._each(lambda c: c.get(REGISTER_PREFIX + home))
        answered = [r for r in replies if not isinstance(r, Exception)]
        if len(answered) < self.quorum:
            raise RegionUnavailable("the epoch register has no majority", code="lease_lost")
        best: tuple[int, str] | None = None
        for value in answered:
            if value:
                epoch, _, region = str(value).partition(" ")
                if best is None or int(epoch) > best[0]:
                    best = (int(epoch), region)
        return best

    async def write(self, home: str, epoch: int, region: str) -> None:
        """Record (epoch, region) on a majority (never lowers a register)."""
        replies = await self._each(lambda c: c.eval(_SETMAX_LUA, 1, REGISTER_PREFIX + home,
                                                    str(epoch), region))
        if sum(1 for r in replies if not isinstance(r, Exception)) < self.quorum:
            raise RegionUnavailable("the epoch register has no majority", code="lease_lost")

    async def aclose(self) -> None:
        """Close the connections."""
        for client in self.clients:
            with contextlib.suppress(Exception):
                await client.aclose()


class OwnershipLeases:
    """The leases of one region node (see the module docstring); also the write guard
    that `ownership.assert_serving` consults (registered per region)."""

    def __init__(self, db: Database, region: str, lock_urls: Sequence[str], *,
                 ttl_seconds: float = 3.0, renew_seconds: float = 1.0,
                 margin_seconds: float = 1.0, op_timeout_seconds: float = 0.5,
                 ownership: own.OwnershipMap | None = None) -> None:
        if (not 0 < margin_seconds < ttl_seconds
                or not 0 < renew_seconds < ttl_seconds - margin_seconds):
            raise ValueError("need 0 < margin_seconds < ttl_seconds and "
                             "0 < renew_seconds < ttl_seconds - margin_seconds")
        self.db = db
        self.region = region
        self.ownership = ownership
        self.ttl_seconds = ttl_seconds
        self.renew_seconds = renew_seconds
        self.margin_seconds = margin_seconds
        self.op_timeout_seconds = op_timeout_seconds
        self._fenced: set[int] = set()  # tokens whose writers were terminated
        self._fenced_at: float | None = None  # monotonic start of the last fence
        self.locks = LockService(list(lock_urls), LockSettings(
            redis_urls=list(lock_urls), ttl_seconds=ttl_seconds,
            renew_fraction=renew_seconds / ttl_seconds, op_timeout_seconds=op_timeout_seconds,
            quarantine_seconds=max(15.0, ttl_seconds)))
        self.register = EpochRegister(lock_urls, op_timeout_seconds)
        self.held: dict[str, HeldLease] = {}
        self.released: set[str] = set()  # handed over: never re-acquired by `run`
        self._busy: dict[str, asyncio.Lock] = {}
        self.events: list[tuple[float, str, str]] = []  # (monotonic, home, what), last 100

    # ------------------------------------------------------------------ write guard

    def budget_ms(self, home: str) -> int | None:
        """How long a write transaction of `home` starting now may take: the milliseconds
        until the lease ends, minus a safety, as the transaction's ``transaction_timeout``
        (None when no usable lease is held: `check` refuses the write).

        Always, even while renewals are on schedule: the renewals and `_fence_loop` run in
        this process, so a node that is paused (SIGSTOP, a VM stall) stops both, and when
        it resumes after its lease ended nothing here would stop it from committing. The
        database's own timer does not pause with us: it ends the session first."""
        held = self.held.get(home)
        if held is None:
            return None
        left = held.lease.remaining()
        if left <= self.margin_seconds:
            return None
        return max(1, int((left - WRITE_SAFETY_SECONDS) * 1000))

    def check(self, home: str, epoch: int) -> None:
        """Raise 503 ``lease_lost`` unless a lease for `home` with token `epoch` is held
        with more than the margin left."""
        held = self.held.get(home)
        if held is None or held.lease.remaining() <= self.margin_seconds:
            raise RegionUnavailable(f"Region {self.region} holds no valid ownership lease for "
                                    f"{home}; retry shortly", code="lease_lost")
        if held.token != epoch:
            raise RegionUnavailable(f"Lease of {home} is held here under epoch={held.token}, not "
                                    f"epoch={epoch}; retry shortly", code="lease_lost")

    def token(self, home: str) -> int | None:
        """The token of the lease held for `home` (the epoch its writes carry), or None."""
        held = self.held.get(home)
        return None if held is None else held.token

    def fenced_recently(self) -> bool:
        """Whether `_fence_loop` ended this region's writers within the last
        FENCE_ATTRIBUTION_SECONDS: a write session the server ended then was ended for a
        lease running out (`write_guard.ended_session_error`)."""
        return (self._fenced_at is not None
                and time.monotonic() - self._fenced_at < FENCE_ATTRIBUTION_SECONDS)

    # ------------------------------------------------------------------ acquire / release

    def _note(self, home: str, what: str) -> None:
        self.events = [*self.events[-99:], (time.monotonic(), home, what)]
        log.info("ownership lease %s: %s", home, what, extra={"event": "ownership_lease"})

    def _lock_for(self, home: str) -> asyncio.Lock:
        return self._busy.setdefault(home, asyncio.Lock())

    async def take(self, home: str, *, wait_seconds: float, forced: bool = False,
                   takeover: dict[str, Any] | None = None) -> int:
        """Acquire the lease of `home` (waiting up to `wait_seconds`: an old owner's lease
        must expire first) and make this region its owner under the lease's token;
        returns the epoch. Without `forced` the store's current epoch must be ours or
        banned (a planned handover, `ownership.take`); with it (crash or partition
        takeover) it is taken anyway and recorded in ``ownership_takeovers`` with
        `takeover` (from_region, from_epoch, positions). A lease we already hold is given
        back and acquired again, so the new epoch is above every earlier one."""
        async with self._lock_for(home):
            if not forced:
                # Refuse before touching the lock: a region that is not caught up must
                # not hold the lease (the old owner could not get it back).
                await own.check_takeable(self.db, self.region, home)
            old = self.held.pop(home, None)
            if old is not None:
                await self._drop(old, "re-acquired for a take")
            self.released.discard(home)
            try:
                lease = await self.locks.acquire(lock_name(home), wait=wait_seconds)
            except LockUnavailable as exc:
                raise RegionUnavailable(f"ownership lease of {home} not granted: {exc}",
                                        code="lease_unavailable") from None
            try:
                await self.register.write(home, lease.fence, self.region)
                await own.take(self.db, self.region, home, lease.fence, forced=forced,
                               takeover=takeover)
            except BaseException:
                await self.locks.release(lease)
                raise
            self._install(home, lease)
            self._note(home, f"taken under epoch={lease.fence}" + (" (forced)" if forced
                                                                   else ""))
            return lease.fence

    async def release(self, home: str) -> int | None:
        """Give the lease of `home` back (planned handover: after the ban and the
        restamp) and never re-acquire it by itself; returns the token it had."""
        async with self._lock_for(home):
            self.released.add(home)
            held = self.held.pop(home, None)
            if held is None:
                return None
            await self._drop(held, "released for a handover")
            return held.token

    async def _drop(self, held: HeldLease, why: str) -> None:
        await held.watchdog.stop()
        with contextlib.suppress(Exception):
            await self.locks.release(held.lease)
        self._note(held.home, why)

    def _install(self, home: str, lease: Lease) -> None:
        def lost(lost_lease: Lease) -> None:
            current = self.held.get(home)
            if current is not None and current.lease is lost_lease:
                del self.held[home]
            self._note(home, f"lost (fence={lost_lease.fence}): {lost_lease.lost_reason}")

        self.held[home] = HeldLease(home, lease, self.locks.watch(lease, on_lost=lost))

    async def _try_keep(self, home: str) -> None:
        """One attempt to (re)acquire the lease of a home the store says we serve."""
        async with self._lock_for(home):
            if home in self.held or home in self.released:
                return
            lease = await self.locks.try_acquire(lock_name(home))
            if lease is None:
                return
            try:
                newest = await self.register.read(home)
                current = await own.current(self.db, home)
                if (newest is not None and newest[1] != self.region
                        and (current is None or newest[0] > current[0])):
                    # Someone took a newer epoch that our store has not received yet.
                    self._note(home, f"not re-acquired: {newest[1]} took epoch={newest[0]}, "
                                     "our store is behind")
                    await self.locks.release(lease)
                    return
                await self.register.write(home, lease.fence, self.region)
                await own.take(self.db, self.region, home, lease.fence)
            except (Conflict, RegionUnavailable) as exc:
                self._note(home, f"not re-acquired: {exc}")
                await self.locks.release(lease)
                return
            except BaseException:
                await self.locks.release(lease)
                raise
            self._install(home, lease)
            self._note(home, f"acquired under epoch={lease.fence}")

    async def homes_to_serve(self) -> list[str]:
        """Homes whose current epoch in our store is ours and not banned. With the node's
        ownership map (`ownership`), this read refreshes the map too: the lease upkeep
        reads more often than the map's own refresh, which then has nothing left to do."""
        if self.ownership is not None:
            await self.ownership.refresh()
            return [o.home_region for o in self.ownership.snapshot()
                    if o.serving_region == self.region and not o.banned]
        async with self.db.reads.connect() as conn:
            rows = (await conn.execute(own.CURRENT_ALL)).all()
        return [r.home_region for r in rows if r.serving_region == self.region and not r.banned]

    async def keep_all(self) -> None:
        """Try once to hold the lease of every home we serve, and drop the lease of a
        home we no longer serve or whose epoch is banned (a planned handover: the old
        owner gives its lease up as soon as it has banned its writes; the guard's
        release then finds none, and an abort acquires a new one)."""
        homes = await self.homes_to_serve()
        for home in list(self.held):
            if home not in homes:
                async with self._lock_for(home):
                    held = self.held.pop(home, None)
                    if held is not None:
                        await self._drop(held, "banned or no longer ours in the store")
        for home in homes:
            if home not in self.held and home not in self.released:
                await self._try_keep(home)

    async def start(self, wait_seconds: float) -> None:
        """At node start: acquire the leases of the homes we serve, waiting up to
        `wait_seconds` (an earlier incarnation's lease must expire first); the rest is
        retried by `run`."""
        deadline = time.monotonic() + wait_seconds
        while True:
            with contextlib.suppress(Exception):
                await self.keep_all()
            missing = [h for h in await self.homes_to_serve() if h not in self.held]
            if not missing or time.monotonic() >= deadline:
                return
            await asyncio.sleep(0.1)

    async def run(self, stop: asyncio.Event) -> None:
        """Background: keep holding the leases of the homes we serve, and fence off the
        writers of a lease that is running out (`_fence_loop`)."""
        interval = max(0.05, self.ttl_seconds / 12)
        fence = asyncio.create_task(self._fence_loop(stop), name="ownership-lease-fence")
        try:
            while not stop.is_set():
                try:
                    await self.keep_all()
                except Exception as exc:
                    log.warning("ownership lease upkeep failed: %s", exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), interval)
        finally:
            fence.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await fence

    async def _fence_loop(self, stop: asyncio.Event) -> None:
        """Once a lease has no more than the margin left (its renewals failed: new writes
        are refused from then on), end the write transactions of its home still in
        flight (they hold the home's ownership lock shared: `ownership.assert_serving`)
        before the lease ends, so none commits after it. Writes that started while the
        renewal was already overdue are bounded by their own transaction_timeout too."""
        while not stop.is_set():
            for held in list(self.held.values()):
                if (held.lease.remaining() <= self.margin_seconds
                        and held.token not in self._fenced):
                    self._fenced.add(held.token)
                    # Before the terminations: a writer they end already finds it set.
                    self._fenced_at = time.monotonic()
                    try:
                        ended = await self._terminate_writers(held.home)
                        self._note(held.home, f"lease running out (fence={held.token}): "
                                              f"ended {ended} write transaction(s)")
                    except Exception as exc:
                        log.warning("fencing writers of %s failed: %s", held.home, exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self._until_next_fence())

    def _until_next_fence(self) -> float:
        """Seconds until the first held lease not fenced yet is down to the margin (a
        lease's time left only grows with a renewal, so waking then is never late), at
        most FENCE_CHECK_MAX_SECONDS (a lease installed meanwhile) and at least
        FENCE_CHECK_MIN_SECONDS."""
        due = [held.lease.remaining() - self.margin_seconds for held in self.held.values()
               if held.token not in self._fenced]
        return min(max(min(due, default=FENCE_CHECK_MAX_SECONDS), FENCE_CHECK_MIN_SECONDS),
                   FENCE_CHECK_MAX_SECONDS)

    async def _terminate_writers(self, home: str) -> int:
        # A connection of its own, not one of the pool: the writers to end may be exactly
        # what fills the pool (commits waiting for a cut-off synchronous standby).
        dsn = self.db.engine.url.set(drivername="postgresql").render_as_string(
            hide_password=False)
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True,
                                                         connect_timeout=2) as conn:
            cur = await conn.execute(_TERMINATE_WRITERS,
                                     {"cls": own.LOCK_CLASS, "home": home})
            rows = await cur.fetchall()
        return sum(1 for r in rows if r[0])

    def snapshot(self) -> list[dict[str, Any]]:
        """The leases held, for status output."""
        return [{"home_region": h.home, "token": h.token,
                 "remaining_seconds": round(h.lease.remaining(), 3)}
                for h in self.held.values()]

    async def aclose(self) -> None:
        """Give every lease back (a clean stop) and close connections."""
        for home in list(self.held):
            held = self.held.pop(home)
            await self._drop(held, "node stopping")
        await self.locks.aclose()
        await self.register.aclose()


__all__ = ["EpochRegister", "HeldLease", "OwnershipLeases", "lock_name"]
