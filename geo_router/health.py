"""Health probing of every region's `GET /health/ready`, with hysteresis.

Every `interval` seconds each region is probed (all regions at once, each bounded by
`timeout`). A probe succeeds when the node answers 200: `{"status": "ready"}` makes the
region healthy, `{"status": "degraded", ...}` (e.g. stale replication) degraded. Anything
else - 503 `unavailable`, another status, a timeout, a refused connection - is a failure.

Hysteresis, so that one lost probe does not flap a region and one lucky probe does not
bring a sick one back:
- a routable (healthy/degraded) region goes `down` after `fall` consecutive failures;
- a `down` region comes back after `rise` consecutive successes;
- while routable, healthy vs degraded follows the latest successful answer;
- the very first probe of a region sets its state directly (a router that has just
  started has no history to be cautious about).

The probe schedule is fixed-rate (round k starts at start + k * interval), so a region
that dies is marked down at most `fall * interval` plus one interval (the wait for the
next round) after its last good answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import httpx

from geo_router.catalog import RegionEntry
from geo_router.policy import ROUTABLE, State

log = logging.getLogger(__name__)

HISTORY = 20
"""Probe results kept per region for the admin API."""

EVENTS = 200
"""State changes kept for the admin API."""


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """One probe: `ok` and the readiness status it saw (`ready`, `degraded`,
    `unavailable`) or `error` with the cause in `detail`."""

    ok: bool
    status: str
    detail: str = ""
    seconds: float = 0.0
    at: float = field(default_factory=time.time)

    def to_json(self) -> dict[str, Any]:
        """As the admin API shows it."""
        return {"ok": self.ok, "status": self.status, "detail": self.detail,
                "ms": round(self.seconds * 1000, 2), "at": self.at}


@dataclass(frozen=True, slots=True)
class Transition:
    """A region changed state."""

    region: str
    old: State | None
    new: State
    reason: str
    at: float = field(default_factory=time.time)

    def to_json(self) -> dict[str, Any]:
        """As the admin API shows it."""
        return {"region": self.region, "from": self.old.value if self.old else None,
                "to": self.new.value, "reason": self.reason, "at": self.at}


@dataclass
class RegionHealth:
    """The hysteresis of one region: its probe state and the current runs of results."""

    name: str
    state: State | None = None
    ok_streak: int = 0
    fail_streak: int = 0
    changed_at: float | None = None
    history: deque[ProbeResult] = field(default_factory=lambda: deque(maxlen=HISTORY))

    def observe(self, result: ProbeResult, fall: int, rise: int) -> Transition | None:
        """Count one probe result; the state change it causes, if any."""
        self.history.append(result)
        old = self.state
        if result.ok:
            self.ok_streak += 1
            self.fail_streak = 0
            up = State.DEGRADED if result.status == "degraded" else State.HEALTHY
            if old is None or old in ROUTABLE or self.ok_streak >= rise:
                new = up
            else:
                new = old
            why = (f"{self.ok_streak} consecutive successful probe(s) (rise {rise})"
                   if old == State.DOWN else f"ready answered {result.status}")
        else:
            self.fail_streak += 1
            self.ok_streak = 0
            if old is None or old == State.DOWN or self.fail_streak >= fall:
                new = State.DOWN
            else:
                new = old
            why = (f"{self.fail_streak} consecutive failed probe(s) (fall {fall}): "
                   f"{result.detail or result.status}")
        if new == old:
            return None
        self.state = new
        self.changed_at = result.at
        return Transition(self.name, old, new, why if old is not None else
                          f"first probe: {result.detail or result.status}", result.at)

    def to_json(self) -> dict[str, Any]:
        """As the admin API shows it."""
        return {"probe_state": self.state.value if self.state else None,
                "ok_streak": self.ok_streak, "fail_streak": self.fail_streak,
                "changed_at": self.changed_at,
                "last_probe": self.history[-1].to_json() if self.history else None,
                "history": [r.to_json() for r in self.history]}


async def probe(client: httpx.AsyncClient, endpoint: str, path: str,
                limit: float) -> ProbeResult:
    """One readiness probe of the region at `endpoint`, bounded by `limit` seconds."""
    started = time.perf_counter()
    try:
        async with asyncio.timeout(limit):
            resp = await client.get(endpoint + path, timeout=limit)
        took = time.perf_counter() - started
    except TimeoutError:
        return ProbeResult(False, "error", f"timeout after {limit:g}s",
                           time.perf_counter() - started)
    except httpx.HTTPError as exc:
        return ProbeResult(False, "error", f"{type(exc).__name__}: {exc}"[:200],
                           time.perf_counter() - started)
    status = ""
    with contextlib.suppress(ValueError, AttributeError):
        status = str(resp.json().get("status") or "")
    if resp.status_code == 200 and status in ("ready", "degraded"):
        return ProbeResult(True, status, "", took)
    return ProbeResult(False, status or "error", f"HTTP {resp.status_code}"
                       + (f" {status}" if status else ""), took)


class Prober:
    """Probes a set of regions on a fixed-rate schedule and keeps their hysteresis.

    `on_probe(region, result)` and `on_transition(transition)` are called for every probe
    and every state change (metrics, logs).
    """

    def __init__(self, client: httpx.AsyncClient, *, interval: float, timeout: float,
                 fall: int, rise: int, path: str = "/health/ready",
                 on_probe: Callable[[str, ProbeResult], None] | None = None,
                 on_transition: Callable[[Transition], None] | None = None) -> None:
        self.client = client
        self.interval = interval
        self.timeout = timeout
        self.fall = fall
        self.rise = rise
        self.path = path
        self.on_probe = on_probe
        self.on_transition = on_transition
        self.regions: dict[str, RegionHealth] = {}
        self.endpoints: dict[str, str] = {}
        self.events: deque[Transition] = deque(maxlen=EVENTS)
        self.rounds = 0
        self._task: asyncio.Task[None] | None = None

    def set_regions(self, entries: Iterable[RegionEntry]) -> None:
        """Probe exactly these regions from now on (a catalog reload); a region whose
        endpoint changed starts over, like a new one."""
        wanted = {e.name: e.endpoint for e in entries}
        for name in list(self.regions):
            if wanted.get(name) != self.endpoints.get(name):
                del self.regions[name]
                self.endpoints.pop(name, None)
        for name, endpoint in wanted.items():
            if name not in self.regions:
                self.regions[name] = RegionHealth(name)
                self.endpoints[name] = endpoint

    def state(self, name: str) -> State:
        """The probe state of a region (a region not probed yet counts as down)."""
        health = self.regions.get(name)
        return health.state if health is not None and health.state is not None else State.DOWN

    async def round(self) -> None:
        """Probe every region once, concurrently, and apply the results."""
        names = list(self.endpoints.items())
        results = await asyncio.gather(*(probe(self.client, endpoint, self.path, self.timeout)
                                         for _, endpoint in names))
        for (name, _), result in zip(names, results, strict=True):
            health = self.regions.get(name)
            if health is None:  # removed by a reload while we probed
                continue
            if self.on_probe is not None:
                self.on_probe(name, result)
            transition = health.observe(result, self.fall, self.rise)
            if transition is not None:
                self.events.append(transition)
                if self.on_transition is not None:
                    self.on_transition(transition)
        self.rounds += 1

    def start(self) -> None:
        """Run the probe loop in the background."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="geo-router-prober")

    async def stop(self) -> None:
        """Stop the probe loop."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            next_at += self.interval
            try:
                await self.round()
            except Exception:  # a bug must not stop the probing of every region
                log.exception("probe round failed")
            # Fixed rate; if a round overran (it cannot, timeout < interval), skip ahead.
            now = loop.time()
            if next_at < now:
                next_at = now
            await asyncio.sleep(next_at - now)
