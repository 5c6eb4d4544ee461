"""The Prometheus alerting rules (deploy/prometheus/): promtool's syntax check and unit
tests, every metric they read is one the code exports, and a real Prometheus server
scraping a running lab fires the SLO alert when a WAN link is cut.

promtool and prometheus come from Debian's `prometheus` package; `make venv`
(scripts/install-tools.sh) extracts them into .venv/bin when they are not on PATH.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from cluster.lab import Cluster, start_cluster
from cluster.servers import free_port, spawn, stop_pid

ROOT = Path(__file__).resolve().parent.parent
PROM = ROOT / "deploy" / "prometheus"
RULES = PROM / "rules" / "paycluster.rules.yml"
RULE_TESTS = PROM / "tests" / "paycluster.rules.test.yml"

# The channel breaker (channel/) does not exist yet; its rule is written against the
# metric it is to export (see the comment in the rules file).
NOT_YET_EXPORTED = {"paycluster_channel_breaker_state"}


def _tool(name: str) -> str:
    found = shutil.which(name) or str(Path(sys.executable).parent / name)
    if not Path(found).exists():
        pytest.skip(f"{name} not installed (make venv installs it from Debian's "
                    "prometheus package)")
    return found


def test_promtool_checks_the_rules() -> None:
    out = subprocess.run([_tool("promtool"), "check", "rules", str(RULES)],
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


def test_promtool_unit_tests_pass() -> None:
    out = subprocess.run([_tool("promtool"), "test", "rules", str(RULE_TESTS)],
                         capture_output=True, text=True, timeout=120, check=False,
                         cwd=RULE_TESTS.parent)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


def _rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def test_every_alert_the_operators_asked_for_exists_and_is_unit_tested() -> None:
    alerts = {r["alert"]: r for r in _rules() if "alert" in r}
    wanted = {"PayclusterReplicationLagOverSLO", "PayclusterReplicationConflict",
              "PayclusterLeaseLost", "PayclusterHigh5xxRate",
              "PayclusterReconciliationItemsOpen", "PayclusterChannelBreakerOpen"}
    assert wanted <= set(alerts)
    tested = {case["alertname"] for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]
              for case in test.get("alert_rule_test", [])}
    assert set(alerts) <= tested, f"alerts without a promtool test: {set(alerts) - tested}"
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in ("critical", "warning"), name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name


def test_every_metric_the_rules_read_is_exported_by_the_code() -> None:
    recorded = {r["record"] for r in _rules() if "record" in r}
    used: set[str] = set()
    for rule in _rules():
        used |= set(re.findall(r"\b(paycluster_[a-z_]+)", rule["expr"]))
    source = "\n".join(p.read_text() for pkg in ("region_node", "replication", "geo_router")
                       for p in (ROOT / pkg).rglob("*.py"))
    missing = {m for m in used - recorded - NOT_YET_EXPORTED
               if f'"{m.removesuffix("_bucket")}"' not in source}
    assert not missing, f"rules read metrics nothing exports: {missing}"


# --------------------------------------------------------------------------- live


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.loads(resp.read())


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Two regions, no WAN delay, a 5 s convergence SLO so that a cut breaches quickly
    (and a loaded machine's lag spikes do not)."""
    cluster = start_cluster(tmp_path_factory.mktemp("alertlab"), regions=2, wan_scale=0,
                            extra_env={"PAYCLUSTER_REPLICATION_SLO_SECONDS": "5"})
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.mark.integration
@pytest.mark.multiregion
@pytest.mark.chaos
@pytest.mark.slow
def test_prometheus_fires_the_slo_alert_when_a_wan_link_is_cut(
        lab: Cluster, tmp_path: Path) -> None:
    prometheus = _tool("prometheus")
    port = free_port()
    targets = [r.api_url.removeprefix("http://") for r in lab.regions]
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [{"job_name": "paycluster-node",
                            "static_configs": [{"targets": targets}]}]}))
    proc = spawn([prometheus, f"--config.file={config}",
                  f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                  f"--web.listen-address=127.0.0.1:{port}"], tmp_path / "prometheus.log",
                 cwd=tmp_path)
    base = f"http://127.0.0.1:{port}"
    wan = lab.wan_control()
    try:
        deadline = time.monotonic() + 60
        while True:  # every node scraped once, with its lag series
            try:
                up = _get(f"{base}/api/v1/query?query=paycluster_replication_lag_seconds")
                if len(up["data"]["result"]) == 2:
                    break
            except OSError:
                pass
            assert proc.poll() is None, (tmp_path / "prometheus.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "prometheus never scraped both nodes"
            time.sleep(0.5)
        while True:  # quiet before the fault (the lab may still be converging)
            firing = [a for a in _get(f"{base}/api/v1/alerts")["data"]["alerts"]
                      if a["labels"]["alertname"].startswith("PayclusterReplication")]
            if not firing:
                break
            assert time.monotonic() < deadline, f"replication alerts without a fault: {firing}"
            time.sleep(0.5)
        # Each region holds the lease of its own home (what PayclusterLeaseLost reads).
        while True:
            held = _get(f"{base}/api/v1/query?query=paycluster_ownership_lease_held")
            leases = {(r["metric"]["region"], r["metric"]["home_region"]): r["value"][1]
                      for r in held["data"]["result"]}
            if leases == {("us-east", "us-east"): "1", ("eu-west", "eu-west"): "1"}:
                break
            assert time.monotonic() < deadline, f"lease gauges: {leases}"
            time.sleep(0.5)

        cut_at = time.monotonic()
        wan.cut("us-east", "eu-west", mode="blackhole")
        while True:
            alerts = [a for a in _get(f"{base}/api/v1/alerts")["data"]["alerts"]
                      if a["labels"]["alertname"] == "PayclusterReplicationSLOBreach"
                      and a["state"] == "firing"]
            if alerts:
                break
            assert time.monotonic() - cut_at < 60, "no SLO alert 60 s after the cut"
            time.sleep(0.5)
        pairs = {(a["labels"]["from"], a["labels"]["to"]) for a in alerts}
        # Both directions of the cut pair, nothing else (there is nothing else here).
        assert pairs <= {("us-east", "eu-west"), ("eu-west", "us-east")} and pairs
        assert alerts[0]["labels"]["severity"] == "critical"
        print(f"SLO alert firing {time.monotonic() - cut_at:.1f} s after the cut: {pairs}")
    finally:
        try:
            wan.heal("us-east", "eu-west")
        finally:
            wan.close()
            stop_pid(proc.pid)
            proc.wait(10)
