"""Start and stop region nodes (`python -m region_node`) on top of a region's servers.

A node is configured only through its `PAYCLUSTER_*` environment and is judged ready only
through its public contract (`GET /health/ready` answering 200), never through its
internals. Like the servers, every node is its own session and is stopped by the pid we
started.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from cluster.servers import (
    RegionServers,
    ServerProcess,
    ServerStartError,
    _tail,
    free_port,
    spawn,
)

NODE_COMMAND: tuple[str, ...] = (sys.executable, "-m", "region_node")
"""How a node is launched: the region_node package under our own interpreter."""

READY_TIMEOUT = 60.0
"""Seconds a node gets to migrate its database and answer /health/ready."""

STOP_TIMEOUT = 15.0
"""Seconds between SIGTERM and SIGKILL when stopping a node."""


class NodeStartError(ServerStartError):
    """A region node did not become ready; the message carries the tail of its log."""


def node_env(region: str, servers: RegionServers, api_port: int,
             extra_env: dict[str, str] | None = None) -> dict[str, str]:
    """The PAYCLUSTER_* settings that point a node at its region's servers.

    Built on top of our own environment (PATH, locale, PYTHONPATH...) so the node runs
    with the same interpreter setup; `extra_env` wins over everything.
    """
    env = dict(os.environ)
    env.update({
        "PAYCLUSTER_REGION": region,
        "PAYCLUSTER_DATABASE_URL": servers.postgres.dsn("paycluster"),
        "PAYCLUSTER_REDIS_URL": servers.redis.url,
        "PAYCLUSTER_NATS_URL": servers.nats.url,
        "PAYCLUSTER_API_HOST": "127.0.0.1",
        "PAYCLUSTER_API_PORT": str(api_port),
        # Log lines reach node.log as they happen, not when a buffer fills.
        "PYTHONUNBUFFERED": "1",
    })
    env.update(extra_env or {})
    return env


@dataclass
class NodeProcess(ServerProcess):
    """A running region node: its API address, its pid, and how to stop or restart it.

    `stop()` (SIGTERM, then SIGKILL after a timeout) and `kill()` (SIGKILL, as a crash
    would) come from ServerProcess; `restart()` starts it again on the same port.
    """

    region: str = ""
    env: dict[str, str] = field(default_factory=dict, repr=False)
    command: tuple[str, ...] = NODE_COMMAND

    @property
    def api_url(self) -> str:
        """Base URL of the node's REST API."""
        return f"http://127.0.0.1:{self.port}"

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM (uvicorn drains in-flight requests), SIGKILL after `timeout` seconds."""
        super().stop(timeout)

    def restart(self, timeout: float = READY_TIMEOUT) -> None:
        """Stop the node if it still runs, then start it again with the same port and env.

        The pid changes; callers that recorded it (cluster.json) must record it again.
        """
        if self.is_running():
            self.stop()
        self._launch(timeout)

    def _launch(self, timeout: float) -> None:
        proc = spawn(list(self.command), self.log_path, cwd=self.data_dir, env=self.env)
        # A fresh process of ours: its Popen handle identifies it from now on.
        self.pid, self._popen, self.started_at = proc.pid, proc, None
        try:
            wait_ready(self.api_url, proc, self.log_path, timeout)
        except BaseException:
            # Includes KeyboardInterrupt: a half-started node must not outlive us.
            self.kill()
            raise

    def to_json(self) -> dict[str, object]:
        """What cluster.json records about this node."""
        return {**super().to_json(), "region": self.region, "api_url": self.api_url}


def wait_ready(api_url: str, proc: subprocess.Popen[bytes] | None, log: Path,
               timeout: float = READY_TIMEOUT) -> None:
    """Poll GET /health/ready until it answers 200; raise NodeStartError with the log tail.

    Fails early when `proc` exits: a node that crashed on start will never be ready.
    """
    deadline = time.monotonic() + timeout
    last = "no answer yet"
    with httpx.Client(timeout=2.0) as client:
        while True:
            if proc is not None and proc.poll() is not None:
                raise NodeStartError(
                    f"region node exited with {proc.returncode} before it was ready "
                    f"(log {log}):\n{_tail(log)}")
            try:
                resp = client.get(f"{api_url}/health/ready")
                if resp.status_code == 200:
                    return
                last = f"HTTP {resp.status_code}: {resp.text[:300]}"
            except httpx.HTTPError as exc:
                last = f"{type(exc).__name__}: {exc}"
            if time.monotonic() > deadline:
                raise NodeStartError(
                    f"region node at {api_url} not ready after {timeout:.0f}s ({last}) "
                    f"(log {log}):\n{_tail(log)}")
            time.sleep(0.1)


def start_node(region: str, servers: RegionServers, data_dir: Path, api_port: int | None = None,
               extra_env: dict[str, str] | None = None,
               timeout: float = READY_TIMEOUT) -> NodeProcess:
    """Start the region node of `region` against its servers and wait until it is ready.

    `data_dir` is the cluster's data dir, as for `start_region_servers`: the node's files
    (its log, `node.log`) go under `data_dir/<region>/node/`. The API binds 127.0.0.1 on
    `api_port` (a free port if None). If the node does not answer /health/ready with 200
    within `timeout` seconds it is killed and NodeStartError carries its log tail.
    """
    node_dir = (data_dir / region / "node").resolve()
    node_dir.mkdir(parents=True, exist_ok=True)
    port = api_port or free_port()
    node = NodeProcess("node", port, node_dir, node_dir / "node.log", pid=0, region=region,
                       env=node_env(region, servers, port, extra_env))
    node._launch(timeout)
    return node

