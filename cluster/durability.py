"""The lab's durability modes: which regions commit synchronously to which buddy, set when
the lab starts, recorded in cluster.json, and watched while it runs.

The mechanism is `replication.durability` (``synchronous_standby_names`` + reload); this
module decides the plan for a whole lab and applies it at the right moment of a start:

- **Buddy choice**: a region's default buddy is the *nearest* other region by the lab's
  round-trip table (`cluster.lab.link_rtt` at scale 1; ties go to the region started
  first). In the default lab: us-east -> eu-west (75 ms), eu-west -> us-east (75 ms),
  ap-southeast -> eu-west (170 ms). The nearest region is the one whose round trip every
  commit pays, and the one clients are nearest to after a takeover. A ring would make
  ap-southeast pay 215 ms to us-east for nothing. ``--buddy R=B`` overrides per region.
- **Start order**: every store is put back into ``local`` mode before anything commits
  (a re-used data dir keeps ``synchronous_standby_names`` in postgresql.auto.conf, and a
  commit would wait for a buddy whose subscription has not been re-pointed at the new
  WAN ports yet: migrations and wiring could deadlock), then the plan is applied right
  after replication is wired and before the nodes start, and the start waits until
  every buddy's walsender is ``sync``, so the first payment already has RPO 0 and does
  not stall.
- **Restart**: the plan is recorded per region in cluster.json (``durability``); a start
  on a data dir without an explicit mode re-applies what was recorded there.

Operational choice while a buddy is unreachable: commits in ``regional`` mode WAIT (this
is PostgreSQL synchronous replication; nothing downgrades them automatically, since a
silent fallback to ``local`` would break the RPO 0 promise exactly when a region may be
about to be lost). Payments of that region stall until the buddy is back or an operator
runs ``paycluster durability set R local``; `StandbyWatch` turns a missing synchronous
standby into that hint (`paycluster up`'s monitor and `paycluster status`).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg

from cluster.servers import is_ours
from cluster.wan import link_rtt
from replication.durability import MODES, Durability, durability, set_durability

SYNC_TIMEOUT = 30.0
"""Seconds a start waits for every buddy's walsender to become a ``sync`` standby."""

STANDBY_MISSING_HINT_SECONDS = 10.0
"""How long a regional region's synchronous standby may be missing before the hint."""


def default_buddy(region: str, names: Sequence[str]) -> str:
    """The nearest other region of `names` by the lab's round-trip table (ties: the one
    listed first); ValueError if there is no other region."""
    others = [n for n in names if n != region]
    if not others:
        raise ValueError("regional mode needs at least two regions")
    return min(others, key=lambda other: (link_rtt(region, other), names.index(other)))


def plan_durability(names: Sequence[str], mode: str | None,
                    buddies: Mapping[str, str] | None = None,
                    recorded: Mapping[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """Per region ``{"mode", "buddy"}`` for a start of the regions `names`.

    `mode` applies to every region; None re-uses `recorded` (a previous cluster.json's
    ``durability``) for the regions it lists, ``local`` for the rest. `buddies` (region
    -> buddy) overrides the default buddy of regions in ``regional`` mode. ValueError for
    an unknown mode or region, a region as its own buddy, or a regional single region.
    """
    if mode is not None and mode not in MODES:
        raise ValueError(f"durability must be one of {', '.join(MODES)}, not {mode!r}")
    buddies = dict(buddies or {})
    for region, buddy in buddies.items():
        if region not in names or buddy not in names:
            raise ValueError(f"--buddy {region}={buddy}: both must be regions of the lab "
                             f"({', '.join(names)})")
        if region == buddy:
            raise ValueError(f"--buddy {region}={buddy}: a region cannot be its own buddy")
    plan: dict[str, dict[str, Any]] = {}
    for name in names:
        before = (recorded or {}).get(name)
        region_mode: str = mode if mode is not None else (
            str(before.get("mode")) if isinstance(before, dict) and before.get("mode") in MODES
            else "local")
        if region_mode == "local":
            plan[name] = {"mode": "local", "buddy": None}
            continue
        kept = before.get("buddy") if mode is None and isinstance(before, dict) else None
        chosen = buddies.get(name) or (str(kept) if kept in names and kept != name else None)
        plan[name] = {"mode": "regional", "buddy": chosen or default_buddy(name, names)}
    return plan


def release_standbys(dsns: Mapping[str, str]) -> None:
    """Put every store (region -> DSN of any of its databases: the setting is the
    server's) in ``local`` mode, so that nothing a start commits waits for a buddy that is
    not connected yet."""
    for region, dsn in dsns.items():
        set_durability(dsn, region, "local")


def apply_plan(plan: Mapping[str, Mapping[str, Any]], dsns: Mapping[str, str],
               timeout: float = SYNC_TIMEOUT) -> list[Durability]:
    """Apply `plan` (see `plan_durability`) to the stores `dsns` (region -> DSN) of a lab
    whose replication is wired; return once every regional region's buddy is a ``sync``
    standby (TimeoutError after `timeout`)."""
    for region, entry in plan.items():
        buddy = entry.get("buddy")
        set_durability(dsns[region], region, str(entry["mode"]), buddy,
                       dsns[buddy] if buddy else None)
    return wait_sync(plan, dsns, timeout)


def wait_sync(plan: Mapping[str, Mapping[str, Any]], dsns: Mapping[str, str],
              timeout: float = SYNC_TIMEOUT) -> list[Durability]:
    """Each region's durability once every regional one has its buddy ``sync``."""
    names = list(dsns)
    deadline = time.monotonic() + timeout
    while True:
        states = [durability(dsns[r], r, names) for r in plan]
        waiting = [s for s in states if s.mode == "regional" and s.sync_state != "sync"]
        if not waiting:
            return states
        if time.monotonic() > deadline:
            raise TimeoutError("synchronous standby not in sync after "
                               f"{timeout:.0f}s: " + ", ".join(
                                   f"{s.region} -> {s.buddy} ({s.sync_state or 'absent'})"
                                   for s in waiting))
        time.sleep(0.1)


def standby_problem(state: Durability) -> str | None:
    """What is wrong with a region's durability right now (None if nothing): a regional
    region whose buddy's walsender is not a ``sync`` standby makes every commit wait."""
    if state.mode != "regional" or state.sync_state == "sync":
        return None
    return (f"{state.region}: regional, but buddy {state.buddy}'s standby is "
            f"{state.sync_state or 'not connected'}: commits wait")


def hint(region: str) -> str:
    """The operator's way out of commits waiting for an unreachable buddy."""
    return (f"to stop waiting (RPO > 0 until the buddy is back): "
            f"paycluster durability set {region} local")


@dataclass
class StandbyWatch:
    """Turns repeated looks at the regions' durability into a hint, once per episode,
    when a regional region's synchronous standby has been missing `after` seconds."""

    after: float = STANDBY_MISSING_HINT_SECONDS
    _since: dict[str, float] = field(default_factory=dict)
    _told: set[str] = field(default_factory=set)

    def observe(self, state: Durability | None, region: str,
                now: float | None = None) -> str | None:
        """Record one look at `region` (`state` None: its store did not answer, which is
        not the buddy's problem); return the hint when it is due, else None."""
        now = time.monotonic() if now is None else now
        if state is None or standby_problem(state) is None:
            self._since.pop(region, None)
            self._told.discard(region)
            return None
        since = self._since.setdefault(region, now)
        if now - since < self.after or region in self._told:
            return None
        self._told.add(region)
        return f"{standby_problem(state)} for {now - since:.0f}s; {hint(region)}"


def look(dsn: str, region: str, names: Sequence[str]) -> Durability | None:
    """`replication.durability.durability`, or None if the store does not answer."""
    try:
        return durability(dsn, region, list(names))
    except psycopg.Error:
        return None


def durability_status(doc: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Per region of a cluster.json: the recorded mode and buddy, what its store says now
    (mode, buddy, the buddy walsender's sync_state; None where the store is not running or
    does not answer) and the problem, if any (see `standby_problem`)."""
    regions = dict(doc.get("regions") or {})
    recorded = dict(doc.get("durability") or {})
    out: dict[str, dict[str, Any]] = {}
    for name, entry in regions.items():
        pg = entry.get("postgres")
        live = (look(str(entry["postgres_dsn"]), name, list(regions))
                if isinstance(pg, dict) and is_ours(pg) else None)
        rec = recorded.get(name) or {}
        out[name] = {"recorded_mode": rec.get("mode", "local"), "recorded_buddy": rec.get("buddy"),
                     "mode": live.mode if live else None, "buddy": live.buddy if live else None,
                     "sync_state": live.sync_state if live else None,
                     "problem": standby_problem(live) if live else None}
    return out
