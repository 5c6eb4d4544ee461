"""Quorum locks over one Redis per region (Redlock-style), with fencing tokens.

The protocol
============
N Redis servers, one per region, each reached through its own URL (in the lab: the WAN-link
URL). Quorum q = N // 2 + 1. Keys per lock `name` on every server: `<prefix>:held:<name>`
(the owner id of the current attempt, with a PX ttl) and `<prefix>:fence:<name>` (the
fencing counter, no ttl). Per server: `<prefix>:boot` (no ttl) and `<prefix>:quarantine`.

acquire: every attempt draws a fresh random owner id and runs ACQUIRE on all servers at once.
  ACQUIRE (one Lua script, atomic on its server): refuse if the server is quarantined; refuse
  if `held` exists (unless it is this attempt's own owner id: a retried call whose reply was
  lost); else fence += 1 and `held` = owner PX ttl, and return the new fence.
  The token T is the largest fence returned by the granting servers. If fewer than q of them
  returned exactly T, RAISE(T) (fence := max(fence, T)) is sent to every server, and we wait
  until q *granting* servers are known to hold fence >= T: the confirmed set S. The attempt
  succeeds iff S is complete before the validity ends,
      valid_until = start + ttl - (ttl * drift_factor + drift_fixed)
  measured from before the first request went out. Otherwise the attempt is released on
  every server and the next one follows after an exponentially growing, fully jittered
  backoff, until the attempt count or the time bound runs out (`LockUnavailable`).
  Servers are never all waited for: a round ends as soon as a quorum answered (or can no
  longer answer), so a slow or cut link costs nothing while a majority is reachable.
  Every call to every server is bounded by `op_timeout` and by the lease's validity.
release: RELEASE (delete `held` iff it holds our owner id) on every server, also those that
  did not grant. A server whose grant reply is still in flight is released after that reply,
  so a late grant cannot outlive the release.
renew: RENEW (pexpire `held` iff it holds our owner id) on every server; success iff q servers
  still held our key; then valid_until = renew start + ttl - drift. The watchdog
  (`lock_service.watchdog`) renews every ttl * renew_fraction and, when no renewal reached a
  majority by valid_until, marks the lease lost and cancels the guarded work.
quarantine: a server whose `boot` key is missing has lost its data (restart without
  persistence, FLUSHALL) or is new. The first script that sees this sets `boot` and a
  `quarantine` key with PX quarantine_seconds; while it exists the server grants nothing and
  touches no counter. quarantine_seconds >= every ttl in use, so every lease the server
  granted before it lost its data has ended before it grants again (Redlock's "delayed
  restart"). `provision_new_servers()` skips this for servers that have never granted anything.

Fencing tokens: why they only go up
===================================
Claim: if A and B are successful acquisitions of the same lock and A's lease ended (expired or
was released) before B succeeded, then T_A < T_B. (Success = the moment S is complete.)

S_A and G_B (the servers that granted B) are both majorities of N, so they share a server.
(1) applies if one of the shared servers kept its data from A's confirmation to B's grant,
(2) if all of them lost it.

(1) A shared server j kept its data. On j, A's grant set `held`, and A's confirmation put
fence_j >= T_A before A succeeded (j is in S_A). B's grant on j needs `held` absent, so it
ran after A's key on j was gone: removed by A's release (after A succeeded), or expired, no
earlier than A's start + ttl * (1 - rho) > A's valid_until >= the moment A succeeded,
because the drift allowance covers the clock-rate error rho. (B's grant on j cannot have
come first: A's grant would then have had to wait for B's key on j to go, i.e. until after B
succeeded, and A's lease would not have ended before B's success.) Counters never decrease,
so B's grant on j returned >= T_A + 1, and T_B, the maximum over B's grants, is > T_A.
Failed and partial attempts only increment or raise counters; their values are never
handed out, so they cannot break this.

(2) All shared servers lost their data; take one, j, which lost it at t_loss, after A's
confirmation and before B's grant. j was quarantined from the first request it saw after
the loss, for Q = quarantine_seconds, and touched no counter meanwhile. Its first counter
for the lock after that was created from its own clock: fence_j := TIME in microseconds
(every counter is created this way, on grant or raise), so B's grant returned
> clock_j(t_c) >= t_c - eps with t_c >= t_loss + Q. Every counter value that exists at time
t is <= t + eps (in microseconds since the epoch): it was created from a server clock
(<= t + eps) and then only incremented by 1 per grant, which cannot outrun a clock that
advances 10^6 per second (assumption 3), or raised to a value that already existed. So
T_A <= t_loss + eps < t_c - Q + eps, and T_B > T_A as long as Q > 2 * eps.

Exact assumptions:
  1. A Redis server either keeps every key it acknowledged or loses all keys of this prefix
     together (restart without persistence, FLUSHALL). So: keys without a ttl are never
     evicted (maxmemory-policy noeviction or volatile-*), and no failover to an asynchronous
     replica that may have missed the latest writes (that is a partial loss with `boot`
     still present).
  2. Only for (2): every server's wall clock is within eps of true time, with
     2 * eps < quarantine_seconds (NTP gives milliseconds; the default Q is 15 s). Every
     process uses the same key_prefix and quarantine_seconds and no ttl > quarantine_seconds.
  3. No lock's counter is incremented more than once per microsecond (each grant is a Lua
     script run on a server; tens of microseconds each).
  4. Tokens stay below 2**53 (Lua numbers are doubles): microseconds since 1970 plus grants,
     good until about the year 2255.
  5. Only for mutual exclusion, not for the tokens: clock rates differ by less than
     drift_factor. Processes may pause for any time (GC, SIGSTOP, swap): the lock alone
     cannot stop a paused holder from writing late, the store's token check does
     (`lock_service.fencing`).
Tokens look like microsecond timestamps; treat them as opaque, increasing integers.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import random
import secrets
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from lock_service.config import LockSettings
from lock_service.errors import LockLost, LockUnavailable

if TYPE_CHECKING:
    from lock_service.watchdog import HeldLock, Watchdog

log = logging.getLogger(__name__)

QUARANTINED, DENIED, GRANTED = -1, 0, 1

# Shared by the scripts that touch counters. KEYS: 1 held, 2 fence, 3 boot, 4 quarantine;
# ARGV[1] is the quarantine length in ms.
_PRELUDE = """
if redis.replicate_commands then redis.replicate_commands() end
local function ready()
  if redis.call('EXISTS', KEYS[3]) == 0 then
    -- This server lost its data (or is new): sit out one quarantine before granting.
    redis.call('SET', KEYS[3], '1')
    redis.call('SET', KEYS[4], '1', 'PX', ARGV[1])
    return false
  end
  return redis.call('EXISTS', KEYS[4]) == 0
end
local function fence()
  local f = redis.call('GET', KEYS[2])
  if f then return tonumber(f) end
  -- A counter is only ever created from this server's clock (microseconds): see the
  -- module docstring, case (2).
  local t = redis.call('TIME')
  local init = tonumber(t[1]) * 1000000 + tonumber(t[2])
  redis.call('SET', KEYS[2], string.format('%.0f', init))
  return init
end
"""

# ARGV: 1 quarantine ms, 2 owner, 3 ttl ms. Returns {status, fence as a decimal string}.
# Owner ids are new for every attempt, so finding our own id means this call is a retry of
# one that already granted (the reply was lost): grant again, with the current counter.
ACQUIRE_LUA = _PRELUDE + """
if not ready() then return {-1, '0'} end
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[2] then return {1, string.format('%.0f', fence())} end
if holder then
  return {0, redis.call('GET', KEYS[2]) or '0'}
end
fence()
local n = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
return {1, string.format('%.0f', n)}
"""

# ARGV: 1 quarantine ms, 2 token. Returns 1 when fence >= token afterwards, -1 if quarantined.
RAISE_LUA = _PRELUDE + """
if not ready() then return -1 end
if fence() < tonumber(ARGV[2]) then redis.call('SET', KEYS[2], ARGV[2]) end
return 1
"""

# KEYS: 1 held. ARGV: 1 owner, 2 ttl ms.
RENEW_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

# KEYS: 1 held. ARGV: 1 owner.
RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

# KEYS: 1 boot.
PROVISION_LUA = """
if redis.call('SET', KEYS[1], '1', 'NX') then return 1 end
return 0
"""

# KEYS: 1 held, 2 fence, 3 boot, 4 quarantine.
INSPECT_LUA = """
return {redis.call('GET', KEYS[1]) or '', redis.call('PTTL', KEYS[1]),
        redis.call('GET', KEYS[2]) or '', redis.call('EXISTS', KEYS[3]),
        redis.call('PTTL', KEYS[4])}
"""


class _Unreachable:
    """A call that failed or timed out; carries why, for logs and error messages."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def __repr__(self) -> str:
        return f"unreachable({self.reason})"


def _redact(url: str) -> str:
    """The URL without a password, for logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


# A new connection must cost no round trip before the command itself: RESP2 (redis-py 8
# otherwise sends HELLO 3 and CLIENT MAINT_NOTIFICATIONS first) and no CLIENT SETINFO.
# Each of those is a full WAN round trip (75-215 ms in the lab) on the first call.
_CONNECT_KW: dict[str, Any] = {"protocol": 2} | (
    {"driver_info": None}
    if "driver_info" in inspect.signature(aioredis.Connection.__init__).parameters else {})


class _Server:
    """One Redis of the quorum: a client for our scripts, every call bounded in time."""

    def __init__(self, index: int, url: str, op_timeout: float) -> None:
        self.index = index
        self.label = _redact(url)
        self.op_timeout = op_timeout
        # One immediate retry on a connection error only: after a Redis restart every pooled
        # connection is dead, and the retry goes out on a new one. Never on a timeout: that
        # would multiply the time bound on a slow or cut link; the protocol retries whole
        # attempts instead. Every script is safe to run twice (see the scripts).
        self.client = aioredis.Redis.from_url(
            url, decode_responses=True, socket_timeout=op_timeout,
            socket_connect_timeout=op_timeout,
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
            health_check_interval=0, **_CONNECT_KW)

    async def call(self, script: str, keys: Sequence[str], args: Sequence[str],
                   within: float | None = None) -> Any:
        """Run a script within min(`within`, op timeout) seconds; returns its reply or an
        `_Unreachable`, never raises (but can be cancelled)."""
        bound = self.op_timeout if within is None else max(0.0, min(within, self.op_timeout))
        try:
            async with asyncio.timeout(bound):
                # EVAL, not EVALSHA: the scripts are small, and a server that restarted
                # empty would answer NOSCRIPT and cost two more WAN round trips.
                return await self.client.eval(script, len(keys), *keys, *args)
        except TimeoutError:
            return _Unreachable(f"timeout after {bound:.3f}s")
        except (RedisError, OSError, RuntimeError) as exc:
            # RuntimeError: under uvloop a write on a transport the peer just closed raises
            # it instead of a connection error (seen with a killed Redis).
            return _Unreachable(f"{type(exc).__name__}: {exc}")


@dataclass(eq=False)
class Lease:
    """A held lock: its fencing token and how long it is valid (monotonic clock).

    `fence` is the token to send with every guarded write. `valid_until` moves forward on
    each successful renewal; `lost` turns true when the watchdog could not renew in time.
    `granted_by` lists the servers whose grants made the quorum (indices into the configured
    URLs); a slower server may have granted too, after the lease was handed out.
    """

    name: str
    owner: str
    fence: int
    ttl: float
    acquired_at: float
    valid_until: float
    granted_by: tuple[int, ...]
    attempts: int = 1
    renewed_at: float = 0.0
    lost: bool = False
    released: bool = False
    lost_reason: str = ""
    _lost_event: asyncio.Event = field(default_factory=asyncio.Event, repr=False)
    # Grant replies still in flight when the quorum answered: releases wait for them.
    _inflight: dict[int, asyncio.Task[Any]] = field(default_factory=dict, repr=False)

    def remaining(self) -> float:
        """Seconds of validity left (0 once lost or released)."""
        if self.lost or self.released:
            return 0.0
        return max(0.0, self.valid_until - time.monotonic())

    @property
    def valid(self) -> bool:
        """True while the lease is held and inside its validity."""
        return self.remaining() > 0.0

    def check(self) -> None:
        """Raise `LockLost` unless the lease is still valid (call before a side effect)."""
        if not self.valid:
            reason = self.lost_reason or ("released" if self.released else "lease expired")
            raise LockLost(self.name, self.fence, reason)

    async def wait_lost(self) -> None:
        """Return once the lease has been marked lost."""
        await self._lost_event.wait()

    def mark_lost(self, reason: str) -> None:
        """Mark the lease lost (the watchdog does this; idempotent)."""
        if not self.lost:
            self.lost = True
            self.lost_reason = reason
            self._lost_event.set()


@dataclass
class ServerView:
    """What one server knows about a lock (for tests, operators and status pages)."""

    server: str
    reachable: bool
    holder: str | None = None
    pttl_ms: int | None = None
    fence: int | None = None
    booted: bool = False
    quarantine_ms: int | None = None


class _Gates:
    """Per-lock-name asyncio locks of one process, dropped when nobody uses them."""

    def __init__(self) -> None:
        self._gates: dict[str, tuple[asyncio.Lock, int]] = {}

    def enter(self, name: str) -> asyncio.Lock:
        """The gate of `name`, counted as used until `leave`."""
        gate, users = self._gates.get(name) or (asyncio.Lock(), 0)
        self._gates[name] = (gate, users + 1)
        return gate

    def leave(self, name: str) -> None:
        """One user fewer; the gate goes when the last one leaves."""
        gate, users = self._gates[name]
        if users <= 1:
            del self._gates[name]
        else:
            self._gates[name] = (gate, users - 1)

    def __len__(self) -> int:
        return len(self._gates)


class LockService:
    """Quorum locks with fencing tokens over one Redis per region.

    One instance per process (it owns a connection pool per server); share it between tasks.
    Use `hold()` for guarded work (acquire + watchdog + release), or `acquire` / `renew` /
    `release` to manage a `Lease` yourself.
    """

    def __init__(self, redis_urls: Sequence[str], settings: LockSettings | None = None) -> None:
        """`redis_urls`: one per region, as this process reaches it (lab: WAN-link URLs)."""
        if not redis_urls:
            raise ValueError("the lock service needs at least one Redis URL")
        if len(set(redis_urls)) != len(redis_urls):
            # The same server counted twice would fake a majority.
            raise ValueError("the same Redis URL is listed twice")
        self.settings = settings or LockSettings()
        self._servers = [_Server(i, url, self.settings.op_timeout_seconds)
                         for i, url in enumerate(redis_urls)]
        self._background: set[asyncio.Task[Any]] = set()
        self._gates = _Gates()  # hold() queues this process's tasks per lock name
        p = self.settings.key_prefix
        self._boot_key = f"{p}:boot"
        self._quarantine_key = f"{p}:quarantine"

    @classmethod
    def from_settings(cls, settings: LockSettings) -> LockService:
        """A service for `settings.redis_urls`."""
        return cls(settings.redis_urls, settings)

    @property
    def quorum(self) -> int:
        """How many servers make a majority."""
        return len(self._servers) // 2 + 1

    @property
    def servers(self) -> list[str]:
        """The servers' URLs (passwords redacted), in configuration order."""
        return [s.label for s in self._servers]

    # ------------------------------------------------------------------ public API

    async def acquire(self, name: str, *, ttl: float | None = None,
                      wait: float | None = None, max_attempts: int | None = None) -> Lease:
        """Acquire lock `name`; retries with jittered backoff for up to `wait` seconds and
        `max_attempts` attempts (defaults from the settings; `wait=0`: one attempt).

        Returns a `Lease` whose `fence` is greater than every earlier holder's. Raises
        `LockUnavailable` when no attempt reached a majority in time. Does not renew: use
        `hold()` or `watch()` for that.
        """
        s = self.settings
        ttl = s.ttl_seconds if ttl is None else ttl
        self._check_ttl(ttl)
        wait = s.acquire_wait_seconds if wait is None else wait
        attempts_left = s.max_attempts if max_attempts is None else max_attempts
        deadline = time.monotonic() + wait
        attempt = 0
        reason = "no attempt made"
        while True:
            attempt += 1
            started = time.monotonic()
            lease, reason = await self._attempt(name, ttl)
            if lease is not None:
                lease.attempts = attempt
                return lease
            attempts_left -= 1
            now = time.monotonic()
            if attempts_left <= 0 or now >= deadline:
                raise LockUnavailable(name, attempt, reason)
            await asyncio.sleep(min(self._backoff(attempt, now - started), deadline - now))

    async def try_acquire(self, name: str, *, ttl: float | None = None) -> Lease | None:
        """One attempt: the lease, or None if no majority granted it right now."""
        ttl = self.settings.ttl_seconds if ttl is None else ttl
        self._check_ttl(ttl)
        lease, _ = await self._attempt(name, ttl)
        return lease

    async def renew(self, lease: Lease) -> bool:
        """Extend the lease by its ttl on every server still holding it; True on a majority.

        On success `lease.valid_until` moves to (start of this call) + ttl - drift. A lease
        that is lost, released or already past its validity is never renewed: its key may
        have expired and been granted to someone else.
        """
        if not lease.valid:
            return False
        start = time.monotonic()
        ttl_ms = str(max(1, int(lease.ttl * 1000)))
        key = self._held_key(lease.name)
        bound = lease.valid_until - start
        tasks = {srv.index: self._spawn(srv.call(RENEW_LUA, [key], [lease.owner, ttl_ms], bound))
                 for srv in self._servers}
        _, good = await self._until(tasks, need=self.quorum, good=lambda r: r == 1,
                                    deadline=start + bound)
        if len(good) < self.quorum or not lease.valid or time.monotonic() >= lease.valid_until:
            return False
        lease.valid_until = max(lease.valid_until, start + lease.ttl - self._drift(lease.ttl))
        lease.renewed_at = start
        return True

    async def release(self, lease: Lease) -> int:
        """Release on every server (those that did not grant too); only our own key is deleted.

        Returns on how many servers a key of ours was deleted among those that answered
        before a majority had answered (the rest finish in the background). A lease whose
        owner id is not the holder's (a non-holder) deletes nothing.
        """
        lease.released = True
        tasks = self._release_tasks(lease.name, lease.owner, lease._inflight)
        results, _ = await self._until(tasks, need=self.quorum,
                                       good=lambda r: not isinstance(r, _Unreachable),
                                       deadline=time.monotonic() + self.settings.op_timeout_seconds)
        return sum(1 for r in results.values() if r == 1)

    def hold(self, name: str, *, ttl: float | None = None,
             wait: float | None = None) -> HeldLock:
        """Async context manager: acquire, renew while the body runs, release on exit.

        Tasks of this process that hold the same name queue locally first (one of them at a
        time competes across the regions); `wait` bounds the local queue and the attempts.

        If the lease is lost (no renewal reached a majority before it ended) the body is
        cancelled and `LockLost` is raised from the `async with`.
        """
        from lock_service.watchdog import HeldLock

        return HeldLock(self, name, ttl=ttl, wait=wait)

    def watch(self, lease: Lease,
              on_lost: Callable[[Lease], None] | None = None) -> Watchdog:
        """Start renewing `lease` in the background; `on_lost` runs if it cannot be kept."""
        from lock_service.watchdog import Watchdog

        dog = Watchdog(self, lease, on_lost=on_lost)
        dog.start()
        return dog

    async def provision_new_servers(self) -> int:
        """Mark never-used servers ready without their quarantine; returns how many it marked.

        Only for servers that have never granted a lock (a new cluster's first start). A
        server that restarted empty must serve its quarantine: skipping it can break mutual
        exclusion for up to one ttl (tokens stay monotonic under assumption 2).
        """
        tasks = {srv.index: self._spawn(srv.call(PROVISION_LUA, [self._boot_key], []))
                 for srv in self._servers}
        await asyncio.gather(*tasks.values())
        return sum(1 for t in tasks.values() if t.result() == 1)

    async def inspect(self, name: str) -> list[ServerView]:
        """Every server's view of lock `name` (holder id, ttl left, counter, quarantine)."""
        keys = self._keys(name)

        async def one(srv: _Server) -> ServerView:
            r = await srv.call(INSPECT_LUA, keys, [])
            if isinstance(r, _Unreachable):
                return ServerView(srv.label, reachable=False)
            holder, pttl, fence, boot, qpttl = r
            return ServerView(srv.label, True, holder or None, int(pttl) if holder else None,
                              int(fence) if fence else None, bool(boot),
                              int(qpttl) if int(qpttl) > 0 else None)

        return list(await asyncio.gather(*(one(s) for s in self._servers)))

    async def aclose(self) -> None:
        """Let background calls finish (bounded by the op timeout), then close connections."""
        if self._background:
            _, pending = await asyncio.wait(list(self._background),
                                            timeout=self.settings.op_timeout_seconds)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        for srv in self._servers:
            await srv.client.aclose()

    async def __aenter__(self) -> LockService:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # ------------------------------------------------------------------ internals

    def _check_ttl(self, ttl: float) -> None:
        if not 0 < ttl <= self.settings.quarantine_seconds:
            raise ValueError(f"ttl must be in (0, quarantine_seconds="
                             f"{self.settings.quarantine_seconds}], got {ttl}")

    def _backoff(self, attempt: int, took: float) -> float:
        """Seconds to wait before attempt `attempt + 1`; `took`: how long the failed one took.

        Fully jittered and exponential, in units of the attempt's own duration: contenders
        in different regions each win their nearby server first, so attempts that overlap
        in time split the vote, and only a spread of several attempt lengths separates them.
        """
        s = self.settings
        unit = max(s.retry_base_seconds, took)
        cap = min(max(s.retry_max_seconds, 4 * unit), unit * 2 ** min(attempt, 16))
        return random.uniform(0, cap)

    def _drift(self, ttl: float) -> float:
        return ttl * self.settings.drift_factor + self.settings.drift_fixed_seconds

    def _held_key(self, name: str) -> str:
        return f"{self.settings.key_prefix}:held:{name}"

    def _keys(self, name: str) -> list[str]:
        p = self.settings.key_prefix
        return [f"{p}:held:{name}", f"{p}:fence:{name}", self._boot_key, self._quarantine_key]

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """A task we keep a reference to until it ends (every call is time-bounded)."""
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def _until(self, tasks: dict[int, asyncio.Task[Any]], *, need: int,
                     good: Callable[[Any], bool], deadline: float,
                     candidates: set[int] | None = None) -> tuple[dict[int, Any], set[int]]:
        """Wait until `need` of the candidate servers' replies are good, that can no longer
        happen, or the deadline passes. Unfinished calls go on in the background."""
        candidates = set(tasks) if candidates is None else candidates
        pending = {task: i for i, task in tasks.items()}
        results: dict[int, Any] = {}
        good_ids: set[int] = set()
        while len(good_ids) < need:
            possible = len(good_ids) + sum(1 for i in pending.values() if i in candidates)
            remaining = deadline - time.monotonic()
            if possible < need or remaining <= 0:
                break
            done, _ = await asyncio.wait(pending, timeout=remaining,
                                         return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                i = pending.pop(task)
                results[i] = task.result()
                if i in candidates and good(results[i]):
                    good_ids.add(i)
        return results, good_ids

    def _release_tasks(self, name: str, owner: str,
                       inflight: dict[int, asyncio.Task[Any]]) -> dict[int, asyncio.Task[Any]]:
        key = self._held_key(name)

        async def one(srv: _Server) -> Any:
            earlier = inflight.get(srv.index)
            if earlier is not None and not earlier.done():
                # Release after the grant's reply, so the grant cannot land after the release.
                await asyncio.wait([earlier])
            return await srv.call(RELEASE_LUA, [key], [owner])

        return {srv.index: self._spawn(one(srv)) for srv in self._servers}

    async def _attempt(self, name: str, ttl: float) -> tuple[Lease | None, str]:
        """One acquisition attempt; (lease, "") or (None, why it failed)."""
        owner = secrets.token_hex(16)
        keys = self._keys(name)
        q_ms = str(max(1, int(self.settings.quarantine_seconds * 1000)))
        ttl_ms = str(max(1, int(ttl * 1000)))
        start = time.monotonic()
        valid_until = start + ttl - self._drift(ttl)
        round_deadline = min(start + self.settings.op_timeout_seconds, valid_until)
        grants = {srv.index: self._spawn(srv.call(ACQUIRE_LUA, keys, [q_ms, owner, ttl_ms],
                                                  round_deadline - start))
                  for srv in self._servers}
        succeeded = False
        try:
            results, granted = await self._until(
                grants, need=self.quorum, deadline=round_deadline,
                good=lambda r: not isinstance(r, _Unreachable) and int(r[0]) == GRANTED)
            if len(granted) < self.quorum:
                return None, self._why(results, len(granted))
            values = {i: int(results[i][1]) for i in granted}
            token = max(values.values())
            confirmed = {i for i, v in values.items() if v == token}
            if len(confirmed) < self.quorum:
                # The granting servers disagree (a partial attempt or a missed raise left
                # them apart): bring a majority of them up to the token before using it.
                raises = {srv.index: self._spawn(srv.call(RAISE_LUA, keys, [q_ms, str(token)],
                                                          valid_until - time.monotonic()))
                          for srv in self._servers}
                _, raised = await self._until(
                    raises, need=self.quorum - len(confirmed), good=lambda r: r == 1,
                    deadline=valid_until, candidates=granted - confirmed)
                confirmed |= raised
                if len(confirmed) < self.quorum:
                    return None, (f"fence={token} confirmed on {len(confirmed)}/"
                                  f"{len(self._servers)} servers before the validity ended")
            now = time.monotonic()
            if now >= valid_until:
                return None, f"quorum took {now - start:.3f}s, longer than the validity"
            lease = Lease(name=name, owner=owner, fence=token, ttl=ttl, acquired_at=start,
                          valid_until=valid_until, granted_by=tuple(sorted(granted)),
                          renewed_at=start,
                          _inflight={i: t for i, t in grants.items() if not t.done()})
            succeeded = True
            return lease, ""
        finally:
            if not succeeded:
                # Also on cancellation: leave no key of a failed attempt behind.
                self._release_tasks(name, owner, grants)

    def _why(self, results: dict[int, Any], granted: int) -> str:
        held = sum(1 for r in results.values()
                   if not isinstance(r, _Unreachable) and int(r[0]) == DENIED)
        quarantined = sum(1 for r in results.values()
                          if not isinstance(r, _Unreachable) and int(r[0]) == QUARANTINED)
        unreachable = len(self._servers) - len(results) + sum(
            1 for r in results.values() if isinstance(r, _Unreachable))
        return (f"{granted}/{len(self._servers)} granted (need {self.quorum}): held elsewhere "
                f"on {held}, quarantined {quarantined}, unreachable/slow {unreachable}")
