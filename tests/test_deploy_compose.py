"""docker-compose.multiregion.yml, the Dockerfile, and the Prometheus / Grafana files they
mount, checked without a container engine: the Compose specification's published JSON
schema (vendored by the check-jsonschema package), and the structure an operator relies
on - every service healthy before its dependants start, settings that exist, ports that do
not collide, nodes configured exactly as `paycluster deploy env` derives them.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from cluster.deploy import Topology, node_env
from cluster.servers import PG_SETTINGS
from geo_router.config import RouterSettings
from region_node.config import RegionSettings

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.multiregion.yml"
TOPOLOGY = ROOT / "deploy" / "compose" / "topology.json"
DOCKERFILE = ROOT / "Dockerfile"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "paycluster.json"
REGIONS = ("us-east", "eu-west", "ap-southeast")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return doc


def _services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    services: dict[str, dict[str, Any]] = compose["services"]
    return services


def _is_job(service: dict[str, Any]) -> bool:
    return (service.get("labels") or {}).get("com.paycluster.role") == "job"


def test_compose_file_is_valid_against_the_compose_specification(
        compose: dict[str, Any]) -> None:
    schema_file = resources.files("check_jsonschema.builtin_schemas.vendor") / \
        "compose-spec.json"
    schema = json.loads(schema_file.read_text())
    validator_cls = jsonschema.validators.validator_for(schema)
    validator_cls.check_schema(schema)
    errors = sorted(validator_cls(schema).iter_errors(compose), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors[:10])


def test_the_schema_catches_a_broken_file(compose: dict[str, Any]) -> None:
    """The validator is not vacuous: a misspelt key and a bad condition are refused."""
    schema = json.loads((resources.files("check_jsonschema.builtin_schemas.vendor")
                         / "compose-spec.json").read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    broken = json.loads(json.dumps(compose))
    broken["services"]["wan"]["healthcheck"]["intervall"] = "2s"
    broken["services"]["router"]["depends_on"]["bootstrap"]["condition"] = "service_done"
    assert len(list(validator.iter_errors(broken))) >= 2


def test_three_regions_with_their_stores_and_two_nodes_each(compose: dict[str, Any]) -> None:
    services = _services(compose)
    for region in REGIONS:
        assert services[f"pg-{region}"]["image"].startswith("postgres:18")
        assert services[f"redis-{region}"]["image"].startswith("redis:")
        assert "-js" in services[f"nats-{region}"]["command"]
        assert services[f"node-{region}"]["deploy"]["replicas"] >= 2
        assert services[f"pgtls-{region}"]["command"][-2:] == ["--region", region]
    assert services["router"]["command"][-1].endswith("python -m geo_router")
    assert services["wan"]["command"] == ["paycluster", "deploy", "wan"]
    for job in ("pki", "migrate", "wire", "bootstrap"):
        assert services[job]["command"] == ["paycluster", "deploy", job]
    assert set(services["prometheus"]["profiles"]) == set(services["grafana"]["profiles"]) \
        == {"observability"}


def test_every_service_is_healthchecked_and_every_dependency_waits(
        compose: dict[str, Any]) -> None:
    services = _services(compose)
    for name, service in services.items():
        if _is_job(service):
            # A one-shot job exits: it is waited for by its exit code, not by health.
            assert service["restart"] == "no", name
            continue
        check = service.get("healthcheck")
        assert check and check.get("test") and not check.get("disable"), name
    for name, service in services.items():
        for dep, spec in (service.get("depends_on") or {}).items():
            assert dep in services, f"{name} depends on unknown {dep}"
            wanted = ("service_completed_successfully" if _is_job(services[dep])
                      else "service_healthy")
            assert isinstance(spec, dict) and spec.get("condition") == wanted, (name, dep)


def test_start_order_puts_the_jobs_before_the_nodes(compose: dict[str, Any]) -> None:
    services = _services(compose)

    def before(name: str) -> set[str]:
        seen: set[str] = set()
        todo = list(services[name].get("depends_on") or {})
        while todo:
            dep = todo.pop()
            if dep not in seen:
                seen.add(dep)
                todo.extend(services[dep].get("depends_on") or {})
        return seen

    for region in REGIONS:
        assert {"pki", "migrate", "wire", "bootstrap", "wan", f"pg-{region}",
                f"pgtls-{region}"} <= before(f"node-{region}")
    assert {f"node-{r}" for r in REGIONS} <= before("router")
    assert {f"pgtls-{r}" for r in REGIONS} | {"migrate"} <= before("wire")


def test_no_published_port_collides_and_all_bind_loopback(compose: dict[str, Any]) -> None:
    published: dict[tuple[str, str], str] = {}
    for name, service in _services(compose).items():
        for port in service.get("ports") or []:
            host_ip, host_port, _container = str(port).split(":")
            assert host_ip == "127.0.0.1", f"{name} publishes {port} beyond loopback"
            key = (host_ip, host_port)
            assert key not in published, f"{name} and {published[key]} both publish {port}"
            published[key] = name
    assert ("127.0.0.1", "8080") in published  # the router: the cluster's front door


def _settings_env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def _dockerfile_env() -> dict[str, str]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    env: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("ENV "):
            env.update(re.findall(r"(\w+)=(\S+)", line))
    return env


def test_every_paycluster_variable_is_a_setting() -> None:
    node_fields = {f"PAYCLUSTER_{name.upper()}" for name in RegionSettings.model_fields}
    router_fields = {f"PAYCLUSTER_ROUTER_{name.upper()}" for name in RouterSettings.model_fields}
    compose = yaml.safe_load(COMPOSE.read_text())
    used: dict[str, str] = {}
    for name, service in compose["services"].items():
        for var in _settings_env(service):
            used[var] = name
        command = " ".join(map(str, service.get("command") or []))
        for var in re.findall(r"\b(PAYCLUSTER_[A-Z_]+)", command):
            used[var] = name
    for var in _dockerfile_env():
        used[var] = "Dockerfile"
    unknown = {var: where for var, where in used.items() if var.startswith("PAYCLUSTER_")
               and var not in (router_fields if var.startswith("PAYCLUSTER_ROUTER_")
                               else node_fields)}
    assert not unknown, f"settings no class reads: {unknown}"
    assert len([v for v in used if v.startswith("PAYCLUSTER_")]) > 15


def test_nodes_are_configured_as_the_deploy_commands_derive(
        compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    topo = Topology.load(TOPOLOGY)
    services = _services(compose)
    for region in REGIONS:
        env = _settings_env(services[f"node-{region}"])
        for var, value in node_env(topo, region).items():
            assert env.get(var) == value, (region, var)
        # The settings class reads what the compose file gives a node, as a node would.
        with monkeypatch.context() as patch:
            for var, value in env.items():
                patch.setenv(var, value)
            settings = RegionSettings()
        assert settings.region == region and set(settings.peers) == set(REGIONS) - {region}
        assert settings.api_host == "0.0.0.0" and settings.grpc_port == 9000
    router = _settings_env(services["router"])
    catalog = json.loads(router["PAYCLUSTER_ROUTER_CATALOG"])
    assert [c["name"] for c in catalog] == list(REGIONS)
    assert all(c["endpoint"] == f"http://node-{c['name']}:8000" for c in catalog)


def test_postgres_runs_with_the_labs_replication_settings(compose: dict[str, Any]) -> None:
    for region in REGIONS:
        command = _services(compose)[f"pg-{region}"]["command"]
        given = dict(arg.split("=", 1) for arg in command if "=" in arg)
        for key in ("wal_level", "max_wal_senders", "max_replication_slots",
                    "max_logical_replication_workers", "max_worker_processes",
                    "track_commit_timestamp", "wal_retrieve_retry_interval"):
            assert given.get(key) == PG_SETTINGS[key], (region, key)


def test_mounted_files_exist(compose: dict[str, Any]) -> None:
    for name, service in _services(compose).items():
        for volume in service.get("volumes") or []:
            source = str(volume).split(":", 1)[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"{name} mounts missing {source}"


def test_dockerfile_is_multistage_nonroot_and_healthchecked() -> None:
    text = DOCKERFILE.read_text()
    stages = re.findall(r"^FROM\s+\S+(?:\s+AS\s+(\w+))?", text, flags=re.M | re.I)
    assert len(stages) >= 2 and "build" in stages
    users = re.findall(r"^USER\s+(\S+)", text, flags=re.M)
    assert users and users[-1].split(":")[0] not in ("0", "root")
    assert "COPY --from=build" in text
    assert re.search(r"^HEALTHCHECK .*\n?.*CMD", text, flags=re.M)
    assert _dockerfile_env()["HEALTHCHECK_URL"].endswith("/health/ready")
    assert re.search(r'^CMD \["python", "-m", "region_node"\]', text, flags=re.M)


def _promtool() -> str:
    found = shutil.which("promtool") or str(Path(sys.executable).parent / "promtool")
    if not Path(found).exists():
        pytest.skip("promtool not installed (make venv installs it)")
    return found


def test_promtool_accepts_the_compose_prometheus_config() -> None:
    out = subprocess.run([_promtool(), "check", "config", "--syntax-only",
                          str(ROOT / "deploy" / "prometheus" / "prometheus.yml")],
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stdout + out.stderr


def _panels() -> list[dict[str, Any]]:
    return list(json.loads(DASHBOARD.read_text())["panels"])


def test_dashboard_shows_what_operators_watch() -> None:
    titles = " | ".join(p["title"].lower() for p in _panels())
    for wanted in ("regions", "payments", "p99", "lag matrix", "conflicts", "epochs"):
        assert wanted in titles, wanted
    datasource = yaml.safe_load((ROOT / "deploy/grafana/provisioning/datasources/"
                                 "prometheus.yml").read_text())["datasources"][0]
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["templating"]["list"][0]["current"]["value"] == datasource["uid"]
    provider = yaml.safe_load((ROOT / "deploy/grafana/provisioning/dashboards/"
                               "paycluster.yml").read_text())["providers"][0]
    grafana = yaml.safe_load(COMPOSE.read_text())["services"]["grafana"]
    assert f"./deploy/grafana/dashboards:{provider['options']['path']}:ro" in grafana["volumes"]


def test_every_dashboard_query_is_valid_promql(tmp_path: Path) -> None:
    """promtool parses each panel's query (as a recording rule) and the rules file's
    recorded series are the ones the dashboard reads."""
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:panel_{i}_{j}", "expr": target["expr"]}
        for i, panel in enumerate(_panels()) for j, target in enumerate(panel["targets"])]}]}
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump(rules))
    out = subprocess.run([_promtool(), "check", "rules", str(path)], capture_output=True,
                         text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    recorded = {r["record"] for g in yaml.safe_load(
        (ROOT / "deploy/prometheus/rules/paycluster.rules.yml").read_text())["groups"]
        for r in g["rules"] if "record" in r}
    used = {m for p in _panels() for t in p["targets"]
            for m in re.findall(r"\b(paycluster:[a-z0-9_:]+)", t["expr"])}
    assert used and used <= recorded


def test_image_copies_every_package_the_project_installs() -> None:
    """A package left out of the image breaks `paycluster` (the CLI imports them all)."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = {p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]
                ["include"]}
    copied = set(re.findall(r"^COPY (\w+) \./\1$", DOCKERFILE.read_text(), flags=re.M))
    assert packages == copied, packages ^ copied
