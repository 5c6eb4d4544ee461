"""The routing decision: a pure function of the catalog, the regions' states, the operator's
weights, the client's location and (optionally) the owner of the data the request names.

Every router computes it the same way from the same inputs - it has no randomness of its
own: where a weight splits traffic, the split is a hash of the client's key - so routers in
every region, probing the same regions, send the same client to the same place.

Rules, in order:

1. Only `healthy` and `degraded` regions are routable; `down` (failed `fall` probes in a
   row) and `draining` (the operator's) never get new requests. No routable region at
   all: `NoRoute` (the proxy answers 503).
2. Rank: healthy before degraded (degraded = ready answers `degraded`, e.g. a replication
   pair over its SLO: usable, but a healthy region is preferred), then by distance to the
   client - great-circle kilometres, or the configured latency table's milliseconds when it
   has a row for the client's region that covers every region.
3. Ties: regions of the same tier within `tie` (km or ms) of the best of their group are
   ordered by a weighted draw (Efraimidis-Spirakis keys from the client's hash), so the
   weights split clients between equally near regions.
4. Owner preference: when the request names data whose owning region is known, healthy
   and has a non-zero weight, that region goes first - it saves the forwarding hop the
   nearest region would make. Only an optimisation: a wrong guess costs a hop, never
   correctness, because any region forwards to the owner.
5. Weights as gradual shifts: walking the ranked list, each region keeps `weight` percent
   of the clients that reach it and passes the rest on; the last one keeps everything.
   With every weight at 100 this is plain nearest-first; lowering a region from 100 to 0
   moves its clients, a hashed slice at a time, to the next region. Weight 0 means "only
   if nothing else is routable"; draining means "never".

The decision also lists the other routable regions in rank order: where a safe request is
retried when the chosen region cannot be reached.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from geo_router.catalog import DEFAULT_WEIGHT
from geo_router.geo import GeoPoint, great_circle_km
from geo_router.locate import ClientLocation


class State(StrEnum):
    """A region's state as the router sees it."""

    HEALTHY = "healthy"
    DEGRADED = "degraded"
    DOWN = "down"
    DRAINING = "draining"


ROUTABLE = frozenset({State.HEALTHY, State.DEGRADED})

REASONS = ("owner", "nearest", "weighted", "failover")
"""Why a region was chosen: the data's owner; the nearest region; a weight passed the
client on from a nearer one; a nearer region was down, draining or degraded."""


@dataclass(frozen=True, slots=True)
class Candidate:
    """A region with everything the policy needs to know about it."""

    name: str
    location: GeoPoint
    state: State
    weight: int = DEFAULT_WEIGHT


@dataclass(frozen=True, slots=True)
class Decision:
    """Where to send a client: `order` starts with the chosen region and continues with
    the other routable regions to fail over to, best first."""

    region: str
    reason: str
    order: tuple[str, ...]
    metric: str
    distance: Mapping[str, float]
    skipped: Mapping[str, str] = field(default_factory=dict)


class NoRoute(Exception):
    """No region is routable (all down or draining)."""

    def __init__(self, states: Mapping[str, State]) -> None:
        self.states = dict(states)
        listed = ", ".join(f"{name} {state}" for name, state in self.states.items())
        super().__init__(f"No region can take the request ({listed or 'no regions'})")


def roll(key: str, salt: str = "") -> float:
    """A uniform number in [0, 1) from `key` - the same on every router and every run."""
    digest = hashlib.blake2b(f"{salt}\x00{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def distances(candidates: Sequence[Candidate], client: ClientLocation,
              latency_ms: Mapping[str, Mapping[str, float]] | None = None,
              ) -> tuple[dict[str, float], str]:
    """Distance from the client to every candidate and its unit ("ms" or "km").

    Milliseconds from the latency table when it has a row for the client's region covering
    every candidate (a partial row would mix units); great-circle km otherwise.
    """
    row = (latency_ms or {}).get(client.region or "") if client.region else None
    if row and all(c.name in row for c in candidates):
        return {c.name: float(row[c.name]) for c in candidates}, "ms"
    return {c.name: great_circle_km(client.point, c.location) for c in candidates}, "km"


def _weighted_key(candidate: Candidate, client_key: str) -> float:
    # Efraimidis-Spirakis: sorting by u ** (1 / w) descending draws an order in which each
    # element comes first with probability w / sum(w). Weight 0 sorts last.
    if candidate.weight <= 0:
        return -1.0
    u = roll(client_key, salt=candidate.name)
    return math.exp(math.log(max(u, 1e-300)) / candidate.weight)


def rank(candidates: Sequence[Candidate], dist: Mapping[str, float], tie: float,
         client_key: str) -> list[Candidate]:
    """Routable candidates in preference order: tier, distance, weighted ties (rules 2-3)."""
    routable = sorted((c for c in candidates if c.state in ROUTABLE),
                      key=lambda c: (c.state != State.HEALTHY, dist[c.name], c.name))
    groups: list[list[Candidate]] = []
    for cand in routable:
        head = groups[-1][0] if groups else None
        if (head is not None and head.state == cand.state
                and dist[cand.name] - dist[head.name] <= tie):
            groups[-1].append(cand)
        else:
            groups.append([cand])
    ordered: list[Candidate] = []
    for group in groups:
        if len(group) > 1:
            group = sorted(group, key=lambda c: _weighted_key(c, client_key), reverse=True)
        ordered.extend(group)
    return ordered


def choose(candidates: Sequence[Candidate], client: ClientLocation, *, client_key: str,
           latency_ms: Mapping[str, Mapping[str, float]] | None = None,
           owner: str | None = None, tie_km: float = 50.0, tie_ms: float = 5.0) -> Decision:
    """Where to send this client (see the module docstring); NoRoute if nowhere."""
    dist, metric = distances(candidates, client, latency_ms)
    ranked = rank(candidates, dist, tie_ms if metric == "ms" else tie_km, client_key)
    if not ranked:
        raise NoRoute({c.name: c.state for c in candidates})
    reason = ""
    preferred = next((c for c in ranked if c.name == owner and c.state == State.HEALTHY
                      and c.weight > 0), None) if owner else None
    if preferred is not None:
        chosen, reason = preferred, "owner"
    else:
        chosen = ranked[-1]
        u = roll(client_key)
        for cand in ranked[:-1]:
            keep = min(max(cand.weight, 0), 100) / 100.0
            if u < keep:
                chosen = cand
                break
            # The part of the roll not kept, stretched back to [0, 1) for the next region.
            u = (u - keep) / (1.0 - keep)
    skipped: dict[str, str] = {}
    for cand in candidates:
        if cand.name != chosen.name and dist[cand.name] < dist[chosen.name]:
            skipped[cand.name] = (cand.state.value if cand.state != State.HEALTHY
                                  else "weight")
    if not reason:
        if any(why != "weight" for why in skipped.values()):
            reason = "failover"
        elif skipped:
            reason = "weighted"
        else:
            reason = "nearest"
    order = (chosen.name, *(c.name for c in ranked if c.name != chosen.name))
    return Decision(chosen.name, reason, order, metric, dist, skipped)
