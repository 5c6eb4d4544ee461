"""Per-key rate limits: a token bucket per API key in the region's Redis.

Every node of a region talks to the same Redis (settings.redis_url), so the bucket of a
key is shared by all of them. One Lua script refills and takes a token atomically, and it
reads the clock with Redis `TIME`, so nodes whose clocks disagree still share one clock.
Buckets carry a TTL (the time to refill completely): an idle key costs nothing.

When Redis cannot be reached the limiter does NOT fail closed. The limiter protects the
region from a runaway or abusive client; it does not guard money (the ledger, the
idempotency keys and the access rules do). Failing closed would turn an outage of a cache
into an outage of payments: every request of every merchant refused. Instead each node
falls back, for a bounded time before it probes Redis again, to an in-process bucket with
the same rate and burst: still a bound (at most nodes x limit across the region), with no
network call. The outage is logged once when it starts and once when it ends.

A busy key does not cost a Redis round trip per request. When Redis reports a bucket far
from empty (at least LEASE_HEADROOM x the lease left), a node takes a few tokens at once
(up to LEASE_MAX, and no more than LEASE_SECONDS of the key's rate) and spends them
locally for at most LEASE_SECONDS; what it has not spent by then is dropped, never
returned. Every admitted request still spends a token taken from the shared bucket, so
the bound holds across the region; a near-empty bucket (the only case where sharing
matters) is taken from one token at a time, exactly as before.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from region_node.errors import RateLimited

log = logging.getLogger(__name__)

KEY_PREFIX = "ratelimit:"
"""Redis key of a bucket: KEY_PREFIX + key id."""

# KEYS[1]: the bucket. ARGV: rate (tokens per second), burst (capacity), tokens wanted
# (optional, default 1). Takes as many of them as there are whole tokens (at least 1, or
# none). Returns {tokens taken (0: refused), microseconds until one token is back, whole
# tokens left}.
# Time in integer microseconds from the Redis server's TIME: every node of the region
# reads the same clock. A bucket not seen before starts full. The TTL is the time to
# refill completely: after that a missing bucket and a full one are the same thing.
TAKE_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(state[1])
local ts = tonumber(state[2])
if tokens == nil or ts == nil then
  tokens = burst
  ts = now
end
if now > ts then
  tokens = math.min(burst, tokens + (now - ts) * rate / 1000000)
  ts = now
end
if tokens > burst then tokens = burst end
local wanted = tonumber(ARGV[3] or '1')
local admitted = 0
local wait_us = 0
if tokens >= 1 then
  admitted = math.min(wanted, math.floor(tokens))
  tokens = tokens - admitted
else
  wait_us = math.ceil((1 - tokens) * 1000000 / rate)
end
redis.call('HSET', KEYS[1], 'tokens', string.format('%.17g', tokens),
           'ts', string.format('%.0f', ts))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst * 1000 / rate) + 1000)
return {admitted, wait_us, math.floor(tokens)}
"""

# A new connection must cost no round trip before the command itself (RESP2, no CLIENT
# SETINFO): the limiter sits in front of every request.
_CONNECT_KW: dict[str, Any] = {"protocol": 2} | (
    {"driver_info": None}
    if "driver_info" in inspect.signature(aioredis.Connection.__init__).parameters else {})


LEASE_MAX = 16
"""Most tokens a node takes from a key's bucket in one round trip."""
LEASE_HEADROOM = 8
"""A lease of n tokens is taken only while at least n x this many are left."""
LEASE_SECONDS = 0.25
"""How long a node may spend the tokens of a lease; the rest are dropped."""


@dataclass
class _Lease:
    """Tokens this node took from a key's shared bucket and has not spent yet."""

    tokens: int
    until: float  # monotonic


@dataclass
class _LocalBucket:
    """In-process token bucket used only while Redis is unreachable."""

    tokens: float
    ts: float


class RateLimiter:
    """Token bucket per API key, shared by all nodes of a region through its Redis."""

    def __init__(self, redis: aioredis.Redis, default_rate: float, default_burst: int, *,
                 fallback_seconds: float = 5.0, owns_client: bool = False) -> None:
        if default_rate <= 0 or default_burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self.redis = redis
        self.default_rate = float(default_rate)
        self.default_burst = int(default_burst)
        self.fallback_seconds = fallback_seconds
        self._owns_client = owns_client
        # redis-py's Script runs EVALSHA and, on NOSCRIPT (a restarted or flushed Redis),
        # loads the script and runs it again: the script body crosses the wire only then.
        self._script = redis.register_script(TAKE_SCRIPT)
        self._down_until = 0.0  # monotonic; while in the future, use the local buckets
        self._local: dict[str, _LocalBucket] = {}
        self._leases: dict[str, _Lease] = {}
        # Whole tokens the key's bucket had left at its last answer, and keys with a
        # call to Redis in flight (only one of them asks for a lease at a time).
        self._left: dict[str, int] = {}
        self._asking: set[str] = set()

    @classmethod
    def from_url(cls, url: str, default_rate: float, default_burst: int, *,
                 op_timeout: float = 0.25, fallback_seconds: float = 5.0) -> RateLimiter:
        """A limiter with a client of its own, every call bounded by `op_timeout` seconds.

        No retries on timeouts (a hung Redis must cost one bound, not several); one
        immediate retry on a connection error, so a restarted Redis is picked up at once.
        """
        client = aioredis.Redis.from_url(
            url, socket_timeout=op_timeout, socket_connect_timeout=op_timeout,
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
            health_check_interval=0, **_CONNECT_KW)
        return cls(client, default_rate, default_burst, fallback_seconds=fallback_seconds,
                   owns_client=True)

    def limits(self, rate: float | None, burst: int | None) -> tuple[float, int]:
        """The effective (rate, burst): a principal's own values, else the defaults."""
        eff_rate = float(rate) if rate is not None and rate > 0 else self.default_rate
        eff_burst = int(burst) if burst is not None and burst >= 1 else self.default_burst
        return eff_rate, eff_burst

    async def take(self, key_id: str, rate: float | None = None,
                   burst: int | None = None) -> None:
        """Take one token from the key's bucket; raise RateLimited (with the seconds until
        one token is back) when it is empty."""
        eff_rate, eff_burst = self.limits(rate, burst)
        now = time.monotonic()
        if now >= self._down_until:
            lease = self._leases.get(key_id)
            if lease is not None:
                if lease.until > now and lease.tokens > 0:
                    lease.tokens -= 1  # taken from the shared bucket already
                    return
                del self._leases[key_id]
            wanted = 1
            asker = key_id not in self._asking
            if asker:
                # Ask for a lease only while the bucket is far from empty; its size is
                # what this key spends in LEASE_SECONDS at its full rate, at most.
                self._asking.add(key_id)
                wanted = max(1, min(LEASE_MAX, self._left.get(key_id, 0) // LEASE_HEADROOM,
                                    int(eff_rate * LEASE_SECONDS)))
            try:
                taken, wait_us, left = await self._script(
                    keys=[KEY_PREFIX + key_id],
                    args=[repr(eff_rate), str(eff_burst), str(wanted)])
            except (RedisError, OSError, RuntimeError) as exc:
                # RuntimeError: under uvloop a write to a transport the peer just closed.
                self._went_down(exc)
            else:
                if self._down_until:
                    self._down_until = 0.0
                    self._local.clear()
                    log.warning("rate limiter: Redis reachable again; shared buckets resumed")
                if int(left) >= 2 * LEASE_HEADROOM:
                    if len(self._left) >= 10_000:  # a bound for many keys
                        self._left.clear()
                    self._left[key_id] = int(left)
                else:
                    self._left.pop(key_id, None)
                if not int(taken):
                    self._refuse(int(wait_us) / 1e6)
                if int(taken) > 1:
                    self._lease(key_id, int(taken) - 1)
                return
            finally:
                if asker:
                    self._asking.discard(key_id)
        self._take_local(key_id, eff_rate, eff_burst)

    def _lease(self, key_id: str, tokens: int) -> None:
        """Keep `tokens` taken from the key's shared bucket for this node's next requests."""
        lease = self._leases.get(key_id)
        until = time.monotonic() + LEASE_SECONDS
        if lease is None or lease.until <= time.monotonic():
            self._leases[key_id] = _Lease(tokens, until)
        else:
            lease.tokens += tokens
            lease.until = until
        if len(self._leases) > 10_000:  # a bound for many keys: drop the expired ones
            now = time.monotonic()
            self._leases = {k: v for k, v in self._leases.items() if v.until > now}

    def _went_down(self, exc: BaseException) -> None:
        first = not self._down_until
        self._down_until = time.monotonic() + self.fallback_seconds
        if first:
            # Logged once per outage, not per request: a log line per payment would bury
            # everything else (and cost more than the check it replaces).
            log.warning("rate limiter: Redis unreachable (%s); each node limits on its own "
                        "until it is back (requests are not refused for this)",
                        type(exc).__name__)

    def _take_local(self, key_id: str, rate: float, burst: int) -> None:
        now = time.monotonic()
        bucket = self._local.get(key_id)
        if bucket is None:
            bucket = self._local[key_id] = _LocalBucket(float(burst), now)
        bucket.tokens = min(float(burst), bucket.tokens + (now - bucket.ts) * rate)
        bucket.ts = now
        if bucket.tokens >= 1:
            bucket.tokens -= 1
            return
        self._refuse((1 - bucket.tokens) / rate)

    @staticmethod
    def _refuse(wait: float) -> None:
        raise RateLimited(f"Too many requests; retry after {max(1, math.ceil(wait))} s",
                          retry_after=wait)

    @property
    def degraded(self) -> bool:
        """True while Redis is considered unreachable and the local buckets are in use."""
        return time.monotonic() < self._down_until

    async def aclose(self) -> None:
        """Close the Redis client if the limiter created it."""
        if self._owns_client:
            await self.redis.aclose()


async def _bench(url: str, n: int = 2000) -> None:  # pragma: no cover - manual use
    """Median cost of one `take` against a real Redis (python -m region_node.rate_limit URL)."""
    limiter = RateLimiter.from_url(url, 1e9, 10**9)
    samples = []
    try:
        for i in range(n):
            started = time.perf_counter()
            await limiter.take(f"bench-{i % 10}")
            samples.append(time.perf_counter() - started)
    finally:
        await limiter.aclose()
    samples.sort()
    print(f"take x{n}: median {samples[n // 2] * 1e6:.0f} us, "
          f"p99 {samples[int(n * 0.99)] * 1e6:.0f} us")


if __name__ == "__main__":  # pragma: no cover
    import sys

    asyncio.run(_bench(sys.argv[1]))
