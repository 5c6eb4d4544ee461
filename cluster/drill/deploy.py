"""`paycluster deploy drill`: a partition drill on a deployed cluster (the containers of
docker-compose.multiregion.yml), where `paycluster drill` needs the local lab.

Run where the WAN emulator runs (its control API is loopback only):

    docker compose -f docker-compose.multiregion.yml exec wan \\
        paycluster deploy drill --region eu-west --router http://router:8080

Clients in every region pay through the geo router (cluster.drill.workload, retrying with
the same Idempotency-Key); every WAN link of the region is cut (blackhole) for a while,
then healed. What it shows: the cut-off region stops writing for its users once it cannot
renew its ownership lease with a majority (503 lease_lost: no split brain), the other
regions' users keep paying while they are a majority, writes come back after the heal,
the regions converge with zero conflicts, and no acknowledged payment is lost or charged
twice. No takeover is made: that is an operator's decision (`paycluster failover crash`
on the lab; on a deployment, the failover guard's functions).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import httpx

from cluster.deploy import Topology
from cluster.drill.measure import disruption, loss, stored_payments
from cluster.drill.workload import CLIENT_REGION, Workload
from cluster.wan import WanControl


@dataclass
class PartitionReport:
    """What the drill measured (seconds since the workload's start)."""

    region: str
    cut_at: float = 0.0
    healed_at: float = 0.0
    during: dict[str, Any] = field(default_factory=dict)
    after_heal: dict[str, Any] = field(default_factory=dict)
    others_during: dict[str, Any] = field(default_factory=dict)
    converged_after: float | None = None
    conflicts: int = 0
    loss: dict[str, Any] = field(default_factory=dict)
    checks: dict[str, bool] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        """Every check held."""
        return all(self.checks.values())


CAUGHT_UP_SECONDS = 3.0
"""A pair is converged again when its lag is back under this (heartbeats are 1 s apart);
the 30 s SLO is not the test: a short partition never breaches it."""


async def _replication_state(client: httpx.AsyncClient, region: str) -> dict[str, Any] | None:
    """Region `region`'s own /v1/replication/status (through the router), or None if
    another region answered (the router sends a client elsewhere while one is down)."""
    resp = await client.get("/v1/replication/status", headers={CLIENT_REGION: region})
    if resp.status_code != 200 or resp.headers.get("paycluster-served-by") != region:
        return None
    doc: dict[str, Any] = resp.json()
    return doc


def converged(doc: dict[str, Any] | None) -> tuple[bool, int]:
    """(every pair into this region caught up, conflicts counted) of a status document."""
    if doc is None:
        return False, 0
    pairs = list((doc.get("pairs") or {}).values())
    conflicts = sum(int(v) for p in pairs for v in (p.get("conflicts") or {}).values())
    caught_up = bool(doc.get("ok")) and all(
        p.get("lag_seconds") is not None and p["lag_seconds"] < CAUGHT_UP_SECONDS
        for p in pairs)
    return caught_up, conflicts


async def run_partition_drill(topo: Topology, router_url: str, region: str, *,
                              before: float, partition: float, after: float, rate: float,
                              converge_within: float = 60.0) -> PartitionReport:
    """Run the drill (see the module docstring) and return its report."""
    key = (topo.secrets_dir / "admin_key").read_text().strip()
    headers = {"Authorization": f"Bearer {key}"}
    others = [r for r in topo.names if r != region]
    report = PartitionReport(region)
    t0 = time.monotonic()
    run_id = uuid.uuid4().hex[:8]
    async with Workload(router_url, topo.names, focus=region, rate=rate, t0=t0,
                        run_id=run_id, headers=headers) as work:
        await work.open_accounts(payers_per_region=2, payees_per_region=1)
        stop = asyncio.Event()
        load = asyncio.create_task(work.run(stop))
        with WanControl(f"http://127.0.0.1:{topo.wan_control_port}") as wan:
            await asyncio.sleep(before)
            report.cut_at = work.now()
            for other in others:
                await asyncio.to_thread(wan.cut, region, other, "blackhole")
            try:
                await asyncio.sleep(partition)
            finally:
                report.healed_at = work.now()
                for other in others:
                    await asyncio.to_thread(wan.heal, region, other)
        await asyncio.sleep(after)
        stop.set()
        await load
        end = work.now()
        report.during = disruption(work.attempts, region, "partition", report.cut_at,
                                   report.healed_at).to_json()
        report.after_heal = disruption(work.attempts, region, "heal", report.healed_at,
                                       end).to_json()
        report.others_during = {o: disruption(work.attempts, o, "partition", report.cut_at,
                                              report.healed_at).to_json() for o in others}
        deadline = time.monotonic() + converge_within
        async with httpx.AsyncClient(base_url=router_url, headers=headers,
                                     timeout=10) as client:
            while True:
                states = [converged(await _replication_state(client, r))
                          for r in topo.names]
                report.conflicts = sum(c for _, c in states)
                if all(ok for ok, _ in states):
                    report.converged_after = round(work.now() - report.healed_at, 2)
                    break
                if time.monotonic() > deadline:
                    break
                await asyncio.sleep(1.0)
        # Every transfer settled before the books are compared.
        await asyncio.sleep(2.0)
        stored = await asyncio.to_thread(stored_payments, topo.regions[0].dsn, run_id)
        report.loss = loss(work.intents, stored).to_json()
    report.checks = {
        "region's writes stopped while cut off": report.during["failed"] > 0,
        "region's users paid again after the heal": report.after_heal["rto_first"] is not None,
        "converged after the heal": report.converged_after is not None,
        "zero replication conflicts": report.conflicts == 0,
        "no acknowledged payment lost": report.loss["rpo_count"] == 0,
        "no payment charged twice": report.loss["duplicates"] == 0,
    }
    if len(others) >= 2:
        # A majority is left: its users must not notice the partition.
        report.checks["the majority's users kept paying"] = all(
            d["rto_first"] is not None and d["failed"] <= max(1, d["attempts"] // 20)
            for d in report.others_during.values())
    return report
