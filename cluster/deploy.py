"""`paycluster deploy ...`: the steps of a containerised cluster (docker-compose.multiregion.yml)
as commands, so the one-shot jobs and sidecars run the project's own code, never copied SQL.

Everything is driven by one topology file (deploy/compose/topology.json): the regions and
the hosts their PostgreSQL, TLS gateway, gRPC and Redis answer on inside the container
network. The ports that tie them together (WAN links, gateways) are derived here, so the
compose file, the WAN emulator and the wiring cannot disagree (tests/test_deploy_compose.py
checks the compose file against `node_env`).

    subscriber S's PostgreSQL -> pgtls-S:<client port of P> -TLS-> wan:<link S->P postgres>
        -> pgtls-P:5433 (server gateway) -> P's PostgreSQL unix socket (shared volume)
    node of S -> wan:<link S->P grpc> -> node of P (mutual TLS end to end)
    node of S -> wan:<link S->P redis> -> Redis of P (the lock quorum)

Commands (each idempotent, so `docker compose up` can run the jobs again):
`pki` (CA and region certificates), `migrate` (every region's schema), `wire`
(publications and subscriptions), `bootstrap` (lock servers, the admin's and the geo
routers' API keys into the secrets folder), `wan` (the WAN emulator), `pg-tls` (a
region's gateways), `env` (a node's PAYCLUSTER_* settings), `link` (cut / heal / list),
`drill` (a partition drill, cluster/drill/deploy.py).

A topology without gateways (`pg_tls` empty: a managed PostgreSQL such as RDS, see
terraform/modules/replication) has subscriptions reach each publisher's own address and
log in with the password in `replication_password_env`; a region's operator password can
come from its own variable (`password_env`).
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

import typer

from cluster.cli_options import DEFAULT_CUT_MODE, CutMode

WAN_SERVICES: tuple[str, ...] = ("postgres", "grpc", "redis")
DEFAULT_TOPOLOGY = Path("/etc/paycluster/topology.json")


@dataclass(frozen=True)
class RegionSpec:
    """One region of a deployment, as the container network names its parts."""

    name: str
    postgres: str
    database: str
    grpc: str
    redis: str
    nats: str
    # host:port of the region's server gateway; its client gateways (one per publisher P)
    # listen on the same host at port + 1 + i(P). Empty: no gateways, subscriptions reach
    # the publisher's PostgreSQL directly over its own TLS (a managed PostgreSQL).
    pg_tls: str = ""
    # PostgreSQL's unix socket, where the server gateway hands connections over.
    pg_socket: str = ""
    # The operator role of the jobs (RDS: the instance's master user), and the variable
    # that holds its password when regions have different ones (else PGPASSWORD).
    user: str = "postgres"
    password_env: str = ""

    @property
    def dsn(self) -> str:
        """libpq URL of the ledger database; the password comes from the environment
        (`password_env`, or libpq's PGPASSWORD), never from the topology file."""
        login = self.user
        if self.password_env:
            secret = os.environ.get(self.password_env)
            if not secret:
                raise ValueError(f"{self.password_env} is not set (password of {self.name})")
            login += ":" + quote(secret, safe="")
        return f"postgresql://{login}@{self.postgres}/{self.database}"


@dataclass(frozen=True)
class Topology:
    """A deployment's regions and where its shared files live."""

    regions: tuple[RegionSpec, ...]
    pki_dir: Path
    secrets_dir: Path
    wan_host: str
    # Link (S, D, service) listens on wan_base_port + 100*i(S) + 10*i(D) + i(service).
    wan_base_port: int = 20000
    # The emulator's control API: loopback only, in the emulator's own container.
    wan_control_port: int = 7000
    rtt_scale: float = 1.0
    replication_user: str = "paycluster_repl"
    # Where the emulator's links and the gateways listen: in containers every interface of
    # the container (they are reached over the compose network); on one host, loopback.
    listen_host: str = "0.0.0.0"
    # Environment variable holding the replication role's password, where subscriptions
    # log in over TCP (no gateways); read when wiring, never stored in the file.
    replication_password_env: str = ""

    @classmethod
    def load(cls, path: Path) -> Topology:
        """Read a topology file (see deploy/compose/topology.json)."""
        doc = json.loads(path.read_text())
        regions = tuple(RegionSpec(**r) for r in doc["regions"])
        if len({r.name for r in regions}) != len(regions) or not regions:
            raise ValueError(f"{path}: regions must be named uniquely")
        wan = doc["wan"]
        return cls(regions, Path(doc["pki_dir"]), Path(doc["secrets_dir"]), str(wan["host"]),
                   int(wan.get("base_port", 20000)), int(wan.get("control_port", 7000)),
                   float(wan.get("rtt_scale", 1.0)),
                   str(doc.get("replication_user", "paycluster_repl")),
                   str(doc.get("listen_host", "0.0.0.0")),
                   str(doc.get("replication_password_env", "")))

    @property
    def names(self) -> list[str]:
        """Region names in order (the order fixes the derived ports)."""
        return [r.name for r in self.regions]

    def region(self, name: str) -> RegionSpec:
        """The region called `name`; KeyError if unknown."""
        for region in self.regions:
            if region.name == name:
                return region
        raise KeyError(f"no region {name!r} in the topology (have {self.names})")

    def wan_port(self, src: str, dst: str, service: str) -> int:
        """Where `src` reaches `dst`'s `service` through the WAN emulator."""
        return (self.wan_base_port + 100 * self.names.index(src)
                + 10 * self.names.index(dst) + WAN_SERVICES.index(service))

    def gateway(self, subscriber: str, publisher: str) -> tuple[str, int]:
        """Where `subscriber`'s PostgreSQL reaches `publisher`'s: its own client gateway."""
        host, port = _host_port(self.region(subscriber).pg_tls)
        return host, port + 1 + self.names.index(publisher)


def _host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


def wan_links(topo: Topology) -> list[dict[str, Any]]:
    """The WAN emulator's links (cluster.wan's config format) for every ordered pair."""
    from cluster.wan import link_rtt

    links = []
    for src in topo.regions:
        for dst in topo.regions:
            if src is dst:
                continue
            targets = {"postgres": _host_port(dst.pg_tls),
                       "grpc": _host_port(dst.grpc), "redis": _host_port(dst.redis)}
            for service in WAN_SERVICES:
                host, port = targets[service]
                links.append({"src": src.name, "dst": dst.name, "service": service,
                              "target_host": host, "target_port": port,
                              "listen_port": topo.wan_port(src.name, dst.name, service),
                              "rtt_ms": round(link_rtt(src.name, dst.name, topo.rtt_scale)
                                              * 1000.0, 3)})
    return links


def gateway_specs(topo: Topology, name: str) -> tuple[list[Any], list[Any]]:
    """Region `name`'s TLS gateways: its server gateway (to its PostgreSQL's socket) and one
    client gateway per other region (for its subscription to that region)."""
    from cluster.pg_tls import ClientSpec, ServerSpec
    from region_node.rpc.tls import cert_name

    region = topo.region(name)
    if not (region.pg_tls and region.pg_socket):
        raise ValueError(f"region {name} has no TLS gateway in the topology (pg_tls, "
                         "pg_socket)")
    ca, cert, key = (str(topo.pki_dir / "ca.crt"), str(topo.pki_dir / f"{name}.crt"),
                     str(topo.pki_dir / f"{name}.key"))
    server = ServerSpec(name, _host_port(region.pg_tls)[1], region.pg_socket, ca, cert, key,
                        listen_host=topo.listen_host)
    clients = [ClientSpec(name, other, topo.gateway(name, other)[1], topo.wan_host,
                          topo.wan_port(name, other, "postgres"), cert_name(other), ca, cert,
                          key, listen_host=topo.listen_host)
               for other in topo.names if other != name]
    return [server], clients


def region_dbs(topo: Topology) -> dict[str, Any]:
    """Every region as replication.wiring sees it: a subscriber S reaches publisher P at
    S's own client gateway for P, or (without gateways) at P's PostgreSQL itself, logging
    in with the password from `replication_password_env`."""
    from replication.wiring import RegionDb

    password = None
    if topo.replication_password_env:
        password = os.environ.get(topo.replication_password_env)
        if not password:
            raise ValueError(f"{topo.replication_password_env} is not set")
    return {p.name: RegionDb(p.name, p.dsn, replication_user=topo.replication_user,
                             replication_password=password, reach={
                s.name: topo.gateway(s.name, p.name)
                for s in topo.regions if s is not p and s.pg_tls})
            for p in topo.regions}


def node_env(topo: Topology, name: str) -> dict[str, str]:
    """The PAYCLUSTER_* settings that differ per region for a node of region `name` (the
    database password comes from PGPASSWORD, never from a setting)."""
    region = topo.region(name)
    others = [o for o in topo.names if o != name]
    lock_urls = {o: (f"redis://{region.redis}/0" if o == name else
                     f"redis://{topo.wan_host}:{topo.wan_port(name, o, 'redis')}/0")
                 for o in topo.names}
    return {
        "PAYCLUSTER_REGION": name,
        "PAYCLUSTER_DATABASE_URL": f"postgresql+psycopg://postgres@{region.postgres}/"
                                   f"{region.database}",
        "PAYCLUSTER_REDIS_URL": f"redis://{region.redis}/0",
        "PAYCLUSTER_NATS_URL": f"nats://{region.nats}",
        "PAYCLUSTER_GRPC_PORT": str(_host_port(region.grpc)[1]),
        "PAYCLUSTER_PEERS": json.dumps(
            {o: f"{topo.wan_host}:{topo.wan_port(name, o, 'grpc')}" for o in others},
            separators=(",", ":")),
        "PAYCLUSTER_LOCK_REDIS_URLS": json.dumps(lock_urls, separators=(",", ":")),
        "PAYCLUSTER_TLS_CA_FILE": str(topo.pki_dir / "ca.crt"),
        "PAYCLUSTER_TLS_CERT_FILE": str(topo.pki_dir / f"{name}.crt"),
        "PAYCLUSTER_TLS_KEY_FILE": str(topo.pki_dir / f"{name}.key"),
    }


# --------------------------------------------------------------------------- commands

deploy_app = typer.Typer(help="Steps of a containerised deployment "
                              "(docker-compose.multiregion.yml); see cluster/deploy.py.",
                         no_args_is_help=True)

class LinkAction(StrEnum):
    """What `deploy link` does."""

    cut = "cut"
    heal = "heal"
    list = "list"


TopologyOpt = Annotated[Path, typer.Option("--topology", help="the deployment's topology file")]


@deploy_app.command("pki")
def pki(topology: TopologyOpt = DEFAULT_TOPOLOGY) -> None:
    """Create the cluster CA and every region's certificate (kept while still good)."""
    from cluster.pki import ensure_region_cert

    topo = Topology.load(topology)
    topo.pki_dir.mkdir(parents=True, exist_ok=True)
    for name in topo.names:
        files = ensure_region_cert(topo.pki_dir, name)
        typer.echo(json.dumps({"region": name, "cert": str(files.cert_file),
                               "name": files.name}))


@deploy_app.command("migrate")
def migrate(topology: TopologyOpt = DEFAULT_TOPOLOGY) -> None:
    """Migrate every region's database (DDL does not replicate: every region needs it)."""
    from region_node.migrate import upgrade

    for region in Topology.load(topology).regions:
        upgrade(region.dsn)
        typer.echo(json.dumps({"region": region.name, "migrated": True}))


@deploy_app.command("wire")
def wire(topology: TopologyOpt = DEFAULT_TOPOLOGY) -> None:
    """Publish in every region and subscribe every region to every other (through the TLS
    gateways and the WAN); pairs already wired are left as they are."""
    from replication.wiring import wire_cluster

    created = wire_cluster(region_dbs(Topology.load(topology)))
    typer.echo(json.dumps({"created": [f"{sub}<-{pub}" for sub, pub in created]}))


def _write_secret(path: Path, value: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(value + "\n")
    os.replace(tmp, path)


def _read_secret(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except FileNotFoundError:
        return None


@deploy_app.command("bootstrap")
def bootstrap(topology: TopologyOpt = DEFAULT_TOPOLOGY,
              timeout: Annotated[float, typer.Option(help="seconds for the keys to "
                                                          "replicate")] = 120.0) -> None:
    """Make the new Redis servers grant locks at once, and create (or keep) the bootstrap
    admin's and the geo routers' API keys in the first region, awaited in every region;
    they are written to `<secrets_dir>/admin_key` and `router_key` (mode 0600)."""
    from cluster.lab import ROUTER_PRINCIPAL, ensure_principal_key, provision_lock_servers

    topo = Topology.load(topology)
    provision_lock_servers([f"redis://{r.redis}/0" for r in topo.regions])
    first = topo.regions[0]
    others = {r.name: r.dsn for r in topo.regions[1:]}
    for file, principal, role, what in (("admin_key", "bootstrap-admin", "admin",
                                         "bootstrap admin"),
                                        ("router_key", ROUTER_PRINCIPAL, "customer",
                                         "geo router")):
        path = topo.secrets_dir / file
        key = ensure_principal_key(first.name, first.dsn, others, _read_secret(path),
                                   principal, role, what, timeout)
        _write_secret(path, key)
        typer.echo(json.dumps({"principal": principal, "file": str(path)}))


@deploy_app.command("wan")
def wan(topology: TopologyOpt = DEFAULT_TOPOLOGY) -> None:
    """Run the WAN emulator with every link of the topology (until SIGTERM)."""
    from cluster.wan import run_emulator

    topo = Topology.load(topology)
    with tempfile.TemporaryDirectory(prefix="paycluster-wan-") as folder:
        config = Path(folder) / "links.json"
        config.write_text(json.dumps({"scale": topo.rtt_scale, "links": wan_links(topo)}))
        asyncio.run(run_emulator(topo.wan_control_port, config, topo.rtt_scale,
                                 listen_host=topo.listen_host))


@deploy_app.command("pg-tls")
def pg_tls(region: Annotated[str, typer.Option(
               "--region", "-r", help="the region whose gateways to run")],
           topology: TopologyOpt = DEFAULT_TOPOLOGY) -> None:
    """Run a region's TLS gateways for replication (until SIGTERM)."""
    from cluster.pg_tls import run_gateways

    servers_, clients = gateway_specs(Topology.load(topology), region)
    asyncio.run(run_gateways(servers_, clients))


@deploy_app.command("env")
def env(region: Annotated[str, typer.Option("--region", "-r", help="the node's region")],
        topology: TopologyOpt = DEFAULT_TOPOLOGY) -> None:
    """Print the PAYCLUSTER_* settings of a node of `region`, one NAME=value a line."""
    for name, value in node_env(Topology.load(topology), region).items():
        typer.echo(f"{name}={value}")


@deploy_app.command("link")
def link(action: Annotated[LinkAction, typer.Argument(help="cut, heal or list")],
         a: Annotated[str | None, typer.Argument(help="region A")] = None,
         b: Annotated[str | None, typer.Argument(help="region B")] = None,
         mode: Annotated[CutMode, typer.Option(
             help="blackhole: connections hang (a real partition); reset: they fail at "
                  "once")] = DEFAULT_CUT_MODE,
         topology: TopologyOpt = DEFAULT_TOPOLOGY) -> None:
    """Cut, heal or list the WAN links; run it where the emulator runs (its control API
    listens on loopback only): `docker compose exec wan paycluster deploy link cut A B`."""
    from cluster.wan import WanControl

    port = Topology.load(topology).wan_control_port
    with WanControl(f"http://127.0.0.1:{port}") as control:
        if action == "list":
            result: Any = control.links()
        elif action in ("cut", "heal") and a and b:
            result = (control.cut(a, b, mode=mode.value)
                      if action == "cut" else control.heal(a, b))
        else:
            raise typer.BadParameter("use: link list | link cut A B | link heal A B")
    for entry in result:
        typer.echo(json.dumps({k: entry.get(k) for k in (
            "src", "dst", "service", "listen_port", "rtt_ms", "cut")}))


@deploy_app.command("drill")
def drill(region: Annotated[str, typer.Option("--region", "-r", help="the region to cut off")],
          router: Annotated[str, typer.Option(help="the geo router's URL")] =
          "http://router:8080",
          before: Annotated[float, typer.Option(help="seconds of load before the cut")] = 10.0,
          partition: Annotated[float, typer.Option(help="seconds the region stays cut off")]
          = 20.0,
          after: Annotated[float, typer.Option(help="seconds of load after the heal")] = 20.0,
          rate: Annotated[float, typer.Option(help="payments per second in total")] = 10.0,
          topology: TopologyOpt = DEFAULT_TOPOLOGY) -> None:
    """Partition drill on a deployed cluster: cut every WAN link of `region` under load,
    heal, and check fencing, recovery, convergence, RPO and duplicates (cluster/drill/deploy.py).
    Run it where the emulator runs: `docker compose exec wan paycluster deploy drill ...`."""
    from dataclasses import asdict

    from cluster.drill.deploy import run_partition_drill

    report = asyncio.run(run_partition_drill(
        Topology.load(topology), router, region, before=before, partition=partition,
        after=after, rate=rate))
    typer.echo(json.dumps(asdict(report), indent=2, default=str))
    for check, held in report.checks.items():
        typer.echo(f"{'PASS' if held else 'FAIL'}  {check}")
    raise typer.Exit(0 if report.passed else 1)
