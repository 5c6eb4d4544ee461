"""Failover drills on a real three-region lab with a geo router (cluster/drill.py): each
drill runs its client workload through the router, injects its fault, and the test asserts
the issue's numbers from the drill's own report.

- planned: RPO 0, no duplicates, invariants hold, RTO under 10 s, failback clean.

The drills share one lab (module fixture): each ends with the drilled region serving its
own accounts again and the regions converged, which the next drill starts from.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cluster.drill import (
    DRILL_NODE_ENV,
    DRILL_ROUTER_ENV,
    DrillConfig,
    DrillResult,
    owner_of,
    run_drill_async,
)
from cluster.drill_measure import disruption
from cluster.drill_report import write_report
from cluster.drill_workload import Attempt
from cluster.lab import Cluster, start_cluster

REGION = "eu-west"
WAN_SCALE = 0.25
DURATION = 10.0
RATE = 15.0


def chaos(test):  # type: ignore[no-untyped-def]
    """The marks of a drill test: real servers, several regions, faults, slow."""
    for mark in (pytest.mark.integration, pytest.mark.multiregion, pytest.mark.chaos,
                 pytest.mark.slow):
        test = mark(test)
    return test


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Three regions, the WAN emulator and one geo router, stopped even if a test fails."""
    cluster = start_cluster(tmp_path_factory.mktemp("drill-lab"), regions=3,
                            wan_scale=WAN_SCALE, routers=1, extra_env=dict(DRILL_NODE_ENV),
                            router_env=dict(DRILL_ROUTER_ENV))
    try:
        yield cluster
    finally:
        cluster.stop()


def _show(result: DrillResult, report_dir: Path) -> None:
    paths = write_report(result, report_dir)
    assert json.loads(paths["json"].read_text())["kind"] == result.config.kind
    assert paths["png"].stat().st_size > 10_000
    fault = result.fault
    print(f"\n{result.config.kind} drill of {result.config.region}: "
          f"RTO first {fault and fault.rto_first} s, stable {fault and fault.rto_stable} s; "
          f"RPO {result.loss and result.loss.rpo_count}; errors {result.errors_by_code}; "
          f"max lag {result.max_lag.get('seconds')} s; {result.workload}")
    for check in result.checks:
        print(f"  {'ok ' if check.ok else 'NO '} {check.name}: {check.detail}")


def test_rto_is_measured_from_the_fault_to_recovery() -> None:
    """The RTO figures on hand-made attempts: failures from t=1.2 to 3.0, then success."""
    attempts = [Attempt("k", 1, "us-east", REGION, t, 0.05,
                        "ok" if t < 1.2 or t >= 3.0 else "error", 201 if t < 1.2 or t >= 3.0
                        else 503, None if t < 1.2 or t >= 3.0 else "ownership_handover")
                for t in [i / 10 for i in range(60)]]
    attempts.append(Attempt("k", 1, "us-east", "us-east", 2.0, 0.05, "ok", 201))
    got = disruption(attempts, REGION, "fault", 1.0, 6.0)
    assert got.rto_first == pytest.approx(2.05, abs=1e-6)  # sent at 3.0, answered at 3.05
    assert got.rto_stable == pytest.approx(2.05, abs=1e-6)
    assert got.failed == 18 and got.errors == {"ownership_handover": 18}
    assert got.longest_ack_gap == pytest.approx(1.9, abs=1e-6)  # acks at 1.15 and 3.05


@chaos
async def test_planned_drill(lab: Cluster, tmp_path: Path) -> None:
    """Planned handover of eu-west and failback under load: RPO 0, no duplicates,
    invariants, RTO < 10 s, failback clean."""
    started = time.monotonic()
    result = await run_drill_async(lab, DrillConfig("planned", REGION, duration=DURATION,
                                                    rate=RATE), print)
    _show(result, tmp_path / "report")
    assert result.error is None
    assert result.loss is not None and result.fault is not None
    assert result.loss.acknowledged > 0.8 * DURATION * RATE
    assert result.loss.rpo_count == 0 and result.loss.missing_amount == 0
    assert result.loss.duplicates == 0
    assert [f for f in result.findings if not f.ok] == []
    assert result.fault.rto_stable is not None and result.fault.rto_stable < 10.0
    assert result.converged_after is not None and result.diverged == []
    labels = [(h["label"], h["to_region"], h["aborted"]) for h in result.handovers]
    assert labels == [("fault", result.takeover, False), ("failback", REGION, False)]
    assert owner_of(lab.region(REGION).dsn, REGION) == (result.handovers[-1]["new_epoch"],
                                                       REGION)
    assert result.ok, [c for c in result.checks if not c.ok]
    print(f"planned drill took {time.monotonic() - started:.1f}s")
