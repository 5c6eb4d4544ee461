"""Rate limits per API key: token buckets in the region's real Redis.

The limiter is tested directly (two limiters on one Redis stand for two nodes of a
region) and through the HTTP API (429 in the error shape with Retry-After, recovery).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import httpx
import pytest
from grpc.aio import Metadata
from redis.asyncio import Redis

from cluster.servers import RegionServers, free_port, start_redis
from region_node.api.errors import error_response
from region_node.config import RegionSettings
from region_node.errors import RateLimited
from region_node.rate_limit import KEY_PREFIX, RateLimiter
from region_node.rpc.errors import from_rpc_error, status_for, trailers_for
from tests.conftest import app_client, auth_headers

pytestmark = pytest.mark.integration

WAIT = 30.0
"""Bound on every wait for a condition; a healthy run needs a small fraction of it."""


def _key() -> str:
    """A bucket no other test (or earlier run on this Redis) has touched."""
    return f"test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def limiter(servers: RegionServers) -> AsyncIterator[RateLimiter]:
    """A limiter with generous defaults on the session's Redis."""
    lim = RateLimiter.from_url(servers.redis.url, 1000, 2000)
    try:
        yield lim
    finally:
        await lim.aclose()


async def _admitted(limiter: RateLimiter, key: str, n: int, rate: float | None,
                    burst: int | None) -> int:
    count = 0
    for _ in range(n):
        try:
            await limiter.take(key, rate, burst)
            count += 1
        except RateLimited:
            pass
    return count


async def test_past_the_limit_refused_with_retry_after_then_recovers(
        limiter: RateLimiter) -> None:
    key = _key()
    for _ in range(3):
        await limiter.take(key, 2.0, 3)  # the burst
    with pytest.raises(RateLimited) as refused:
        await limiter.take(key, 2.0, 3)
    # One token comes back every 0.5 s (1 / rate): never a longer wait than that.
    assert 0 < refused.value.retry_after <= 1 / 2.0
    assert refused.value.http_status == 429
    assert refused.value.to_body()["error"]["type"] == "rate_limit_error"
    await asyncio.sleep(refused.value.retry_after)
    await limiter.take(key, 2.0, 3)  # recovered: one token back
    recovered = time.monotonic()
    try:
        await limiter.take(key, 2.0, 3)
    except RateLimited as again:
        assert 0 < again.retry_after <= 1 / 2.0
    else:  # only if the machine took longer than a refill between the two calls
        assert time.monotonic() - recovered >= 1 / 2.0 * 0.9


async def test_two_nodes_on_one_redis_share_the_bucket(servers: RegionServers) -> None:
    a = RateLimiter.from_url(servers.redis.url, 0.01, 5)
    b = RateLimiter.from_url(servers.redis.url, 0.01, 5)
    key = _key()
    try:
        assert await _admitted(a, key, 3, None, None) == 3
        assert await _admitted(b, key, 3, None, None) == 2
        with pytest.raises(RateLimited):
            await a.take(key)
    finally:
        await a.aclose()
        await b.aclose()


async def test_concurrent_clients_admitted_within_the_bucket_bound(
        servers: RegionServers) -> None:
    """20 clients (on 4 'nodes') hammer one key until the refill has handed out a second's
    worth of tokens beyond the burst (not starved): admitted <= burst + rate * t."""
    rate, burst = 40.0, 10
    nodes = [RateLimiter.from_url(servers.redis.url, rate, burst) for _ in range(4)]
    key = _key()
    admitted = refused = 0
    deadline = time.monotonic() + WAIT

    async def client(lim: RateLimiter) -> None:
        nonlocal admitted, refused
        while admitted < burst + rate and time.monotonic() < deadline:
            try:
                await lim.take(key)
                admitted += 1
            except RateLimited:
                refused += 1

    started = time.monotonic()
    try:
        await asyncio.gather(*(client(nodes[i % 4]) for i in range(20)))
    finally:
        elapsed = time.monotonic() - started
        # A node whose Redis call outlived its 0.25 s bound (a loaded machine) fails open
        # to a bucket of its own for 5 s, longer than this test: by design, it may admit
        # up to one more bucket's worth.
        fell_back = sum(1 for lim in nodes if lim.degraded)
        for lim in nodes:
            await lim.aclose()
    bound = (burst + rate * elapsed) * (1 + fell_back)
    assert refused > 0
    # Never more than the buckets allow (+1: a token landing between our clock readings).
    assert admitted <= bound + 1, (admitted, bound, fell_back)
    # And not starved either: the refill really was handed out (the clients stopped when
    # it was, or failed the bound above).
    assert admitted >= burst + rate, (admitted, refused, elapsed)


async def test_one_key_does_not_limit_another(limiter: RateLimiter) -> None:
    busy, quiet = _key(), _key()
    assert await _admitted(limiter, busy, 5, 0.01, 2) == 2
    assert await _admitted(limiter, quiet, 2, 0.01, 2) == 2


async def test_per_principal_limits_override_the_defaults(limiter: RateLimiter) -> None:
    assert limiter.limits(None, None) == (1000.0, 2000)
    assert limiter.limits(5.0, 7) == (5.0, 7)
    key = _key()
    assert await _admitted(limiter, key, 10, 0.01, 7) == 7
    # The same (empty) bucket under the defaults refills at 1000/s: 20 ms give 10 tokens.
    await asyncio.sleep(0.02)
    assert await _admitted(limiter, key, 10, None, None) == 10


async def test_idle_buckets_expire(servers: RegionServers, limiter: RateLimiter) -> None:
    key = _key()
    await limiter.take(key, 10.0, 5)
    redis = Redis.from_url(servers.redis.url)
    try:
        ttl_ms = await redis.pttl(KEY_PREFIX + key)
    finally:
        await redis.aclose()
    # Time to refill completely (0.5 s) plus a second of margin.
    assert 0 < ttl_ms <= 1500


async def test_redis_unreachable_fails_open_to_a_local_bucket(
        caplog: pytest.LogCaptureFixture) -> None:
    """No Redis listening: requests are not refused for that, yet a key is still bounded
    by a per-node bucket, and the outage is logged once, not per request."""
    lim = RateLimiter.from_url(f"redis://127.0.0.1:{free_port()}/0", 0.01, 3,
                               fallback_seconds=60)
    key = _key()
    caplog.set_level(logging.WARNING, logger="region_node.rate_limit")
    try:
        assert await _admitted(lim, key, 5, None, None) == 3
        assert lim.degraded
        assert await _admitted(lim, _key(), 2, None, None) == 2
    finally:
        await lim.aclose()
    outage_lines = [r for r in caplog.records if "unreachable" in r.getMessage()]
    assert len(outage_lines) == 1


def test_retry_after_survives_the_hop_between_regions() -> None:
    """A 429 raised by the region a request was forwarded to comes back as the same
    RateLimited, Retry-After included (gRPC status, trailers, then the HTTP mapping)."""
    err = RateLimited("Too many requests; retry after 3 s", retry_after=2.25)
    rpc_error = grpc.aio.AioRpcError(status_for(err), Metadata(), Metadata(*trailers_for(err)),
                                     err.message)
    back = from_rpc_error(rpc_error)
    assert isinstance(back, RateLimited)
    assert back.retry_after == pytest.approx(2.25)
    resp = error_response(back)
    assert resp.status_code == 429 and resp.headers["retry-after"] == "3"
    assert json.loads(bytes(resp.body))["error"]["code"] == "rate_limited"


# ---------------------------------------------------------------- through the HTTP API

async def _limited_key(client: httpx.AsyncClient, rate: float, burst: int) -> str:
    """A merchant created through the admin API with its own limit; its new API key."""
    resp = await client.post("/v1/admin/principals", json={
        "name": f"limited-{uuid.uuid4().hex[:6]}", "role": "merchant",
        "rate_per_second": rate, "rate_burst": burst})
    assert resp.status_code == 201, resp.text
    assert resp.json()["rate_per_second"] == rate and resp.json()["rate_burst"] == burst
    key: str = resp.json()["api_key"]["key"]
    return key


async def test_http_429_in_the_error_shape_with_retry_after_then_recovery(
        client: httpx.AsyncClient) -> None:
    key = await _limited_key(client, 1.0, 3)
    auth = {"Authorization": f"Bearer {key}"}
    opened = await client.post("/v1/accounts", json={"currency": "USD"}, headers=auth)
    assert opened.status_code == 201, opened.text
    account = opened.json()["id"]
    for _ in range(2):
        assert (await client.get(f"/v1/accounts/{account}", headers=auth)).status_code == 200
    refused = await client.get(f"/v1/accounts/{account}", headers=auth)
    assert refused.status_code == 429, refused.text
    assert refused.json()["error"]["type"] == "rate_limit_error"
    assert refused.json()["error"]["code"] == "rate_limited"
    retry_after = int(refused.headers["Retry-After"])
    assert retry_after == 1  # one token per second: back within a second
    # Another key (the admin's) is not affected while this one is throttled.
    assert (await client.get(f"/v1/accounts/{account}")).status_code == 200
    await asyncio.sleep(retry_after)
    assert (await client.get(f"/v1/accounts/{account}", headers=auth)).status_code == 200


async def test_http_two_nodes_of_a_region_share_a_keys_bucket(
        client: httpx.AsyncClient, settings: RegionSettings) -> None:
    """Two node apps on the region's one database and one Redis: a key's burst is spent
    across both, not once per node."""
    key = await _limited_key(client, 0.01, 4)
    async with app_client(settings, key) as a, app_client(settings, key) as b:
        codes = [(await node.post("/v1/accounts", json={"currency": "USD"})).status_code
                 for node in (a, b, a, b, a, b)]
    assert codes == [201, 201, 201, 201, 429, 429]


async def test_script_reloaded_after_redis_forgot_it(servers: RegionServers,
                                                     limiter: RateLimiter) -> None:
    """EVALSHA with fallback: a restarted (or flushed) Redis has no script cache; the next
    call loads the script again instead of failing (or failing open)."""
    key = _key()
    await limiter.take(key, 0.01, 2)
    redis = Redis.from_url(servers.redis.url)
    try:
        await redis.script_flush()
    finally:
        await redis.aclose()
    await limiter.take(key, 0.01, 2)
    assert not limiter.degraded
    with pytest.raises(RateLimited):
        await limiter.take(key, 0.01, 2)


async def test_shared_buckets_resume_when_redis_is_back(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()
    lim = RateLimiter.from_url(f"redis://127.0.0.1:{port}/0", 1000, 10,
                               fallback_seconds=0.2)
    caplog.set_level(logging.WARNING, logger="region_node.rate_limit")
    redis = None
    try:
        await lim.take(_key())
        assert lim.degraded
        redis = await asyncio.to_thread(start_redis, tmp_path / "redis", port)
        deadline = time.monotonic() + WAIT
        while True:  # tried again every 0.2 s (a call past its 0.25 s bound fails open anew)
            await asyncio.sleep(0.25)
            await lim.take(_key())
            if not lim.degraded:
                break
            assert time.monotonic() < deadline, "the limiter never went back to Redis"
    finally:
        await lim.aclose()
        if redis is not None:
            redis.stop()
    assert any("reachable again" in r.getMessage() for r in caplog.records)


async def test_http_concurrent_clients_on_one_key_stay_within_the_bound(
        client: httpx.AsyncClient) -> None:
    """10 clients hammer one key through the API until a second's worth of refill beyond
    the burst was admitted (not starved): admitted <= burst + rate * t."""
    rate, burst = 10.0, 5
    key = await _limited_key(client, rate, burst)
    auth = {"Authorization": f"Bearer {key}"}
    account = (await client.post("/v1/accounts", json={"currency": "USD"},
                                 headers=auth)).json()["id"]
    codes: list[int] = []
    started = time.monotonic()
    deadline = started + WAIT

    async def hammer() -> None:
        while 1 + codes.count(200) < burst + rate and time.monotonic() < deadline:
            codes.append((await client.get(f"/v1/accounts/{account}", headers=auth))
                         .status_code)

    await asyncio.gather(*(hammer() for _ in range(10)))
    elapsed = time.monotonic() - started
    admitted = 1 + codes.count(200)  # + the account opening
    # A Redis call past its 0.25 s bound (a loaded machine) fails the node open to a bucket
    # of its own for 5 s: by design, up to one more bucket's worth.
    limiter: RateLimiter = client._transport.app.state.rate_limiter  # type: ignore[attr-defined]
    fell_back = int(limiter.degraded)
    assert set(codes) <= {200, 429}
    assert codes.count(429) > 0
    assert admitted <= (burst + rate * elapsed) * (1 + fell_back) + 1, (admitted, elapsed)
    assert admitted >= burst + rate, (admitted, elapsed)


async def test_http_redis_down_fails_open_to_a_bucket_per_node(
        client: httpx.AsyncClient, settings: RegionSettings,
        caplog: pytest.LogCaptureFixture) -> None:
    """A node whose Redis is unreachable keeps serving (payments must not stop for a
    cache), yet a key is still bounded there by the node's own bucket (same limits), and
    the outage is logged once."""
    key = await _limited_key(client, 0.01, 3)
    caplog.set_level(logging.WARNING, logger="region_node.rate_limit")
    no_redis = settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{free_port()}/0"})
    async with app_client(no_redis, key) as node:
        opened = await node.post("/v1/accounts", json={"currency": "USD"})
        assert opened.status_code == 201, opened.text
        account = opened.json()["id"]
        codes = [(await node.get(f"/v1/accounts/{account}")).status_code for _ in range(4)]
        assert codes == [200, 200, 429, 429]  # the burst of 3, the opening included
        refused = await node.get(f"/v1/accounts/{account}")
        assert refused.json()["error"]["code"] == "rate_limited"
        assert int(refused.headers["Retry-After"]) >= 1
        # Another key is not affected; the limiter says it runs on its local buckets.
        assert (await node.get(f"/v1/accounts/{account}", headers=auth_headers())
                ).status_code == 200
        limiter: RateLimiter = node._transport.app.state.rate_limiter  # type: ignore[attr-defined]
        assert limiter.degraded
    outage_lines = [r for r in caplog.records if "unreachable" in r.getMessage()]
    assert len(outage_lines) == 1, [r.getMessage() for r in outage_lines]
