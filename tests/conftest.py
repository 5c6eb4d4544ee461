"""Shared fixtures: real PostgreSQL 18, Redis and NATS, started once per test session.

Every test gets its own freshly migrated database (cloned from a template), so tests
never see each other's rows while the servers stay up for the whole session.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

import cluster.lab
from cluster.pki import TlsFiles, ensure_cluster_pki
from cluster.servers import (
    PGDATA_TEMPLATE_ENV,
    PORT_SLICE_ENV,
    RegionServers,
    free_port,
    start_region_servers,
)
from region_node.app import create_app
from region_node.config import RegionSettings
from region_node.migrate import upgrade
from region_node.principals import BootstrapAdmin, bootstrap_admin_sync
from region_node.rpc.tls import RpcTls

# The channel (acquirer simulator) and a receiver of its callbacks, for every test module
# (re-exported fixtures, see tests/channel_fixtures.py).
from tests.channel_fixtures import callback_receiver as callback_receiver
from tests.channel_fixtures import channel_admin as channel_admin
from tests.channel_fixtures import channel_client as channel_client
from tests.channel_fixtures import channel_server as channel_server

TEMPLATE_DB = "paycluster_template"
ADMIN: list[BootstrapAdmin] = []
"""The session's bootstrap admin (inserted into the template, so every test database has
it); `admin_key()` and `auth_headers()` read it."""


def admin_key() -> str:
    """The bootstrap admin's API key of this test session."""
    return ADMIN[0].key


def auth_headers(key: str | None = None) -> dict[str, str]:
    """`Authorization: Bearer <key>` (default: the session's admin key)."""
    return {"Authorization": f"Bearer {key or admin_key()}"}
_db_counter = itertools.count()
_OWN_BASETEMP: list[Path] = []


def pytest_configure(config: pytest.Config) -> None:
    """Give each session a base temp dir of its own outside /tmp/pytest-of-<user>.

    PostgreSQL runs as an unprivileged user and must walk down to its data dir. Every
    pytest session that starts re-tightens /tmp/pytest-of-<user> to mode 0700, which
    would cut a running session's PostgreSQL off from its files (PANIC) when two suites
    run at once. A dir of our own is never touched by another session; we remove it at
    the end.
    """
    workerinput = getattr(config, "workerinput", None)
    if workerinput is not None:  # a pytest-xdist worker: ports of its own (cluster.servers)
        index = int(str(workerinput["workerid"]).removeprefix("gw"))
        os.environ[PORT_SLICE_ENV] = f"{index}/{workerinput['workercount']}"
    if config.option.basetemp is None and workerinput is None:
        base = Path(tempfile.mkdtemp(prefix="paycluster-pytest-"))
        config.option.basetemp = str(base)
        _OWN_BASETEMP.append(base)
    if workerinput is None and PGDATA_TEMPLATE_ENV not in os.environ:
        # One initdb for the whole session (the workers and the labs their commands start
        # inherit the variable): each new data dir is a copy (cluster.servers).
        template = Path(tempfile.mkdtemp(prefix="paycluster-pgdata-template-"))
        os.environ[PGDATA_TEMPLATE_ENV] = str(template)
        _OWN_BASETEMP.append(template)


def pytest_unconfigure(config: pytest.Config) -> None:
    """Remove the base temp dir this session created (servers are stopped by now)."""
    for base in _OWN_BASETEMP:
        shutil.rmtree(base, ignore_errors=True)


LAB_FIXTURES = frozenset({"lab", "cluster"})
"""Module fixtures that start a lab (every module names its lab one of these)."""
_RUNNING: list[pytest.Item] = []


SLOWEST_MODULES = (
    "test_drills.py", "test_leases.py", "test_channel_payments.py", "test_webhooks.py",
    "test_lab.py", "test_flash_sale.py", "test_multiregion.py", "test_demo.py",
    "test_channel.py", "test_lock_service.py", "test_deploy_steps.py", "test_durability.py",
    "test_refunds.py", "test_failover.py", "test_validation.py", "test_reconciliation.py",
    "test_replication.py", "test_deploy_alerts.py", "test_geo_router.py",
)
"""The modules that take longest (most of their time is starting labs and waiting on
them), slowest first: they run first, so that under `make test` (pytest-xdist, whole
modules per worker) the two workers do not end with one of them still running a long
module alone. Keep in step with the README's testing section."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark `lab` every test that uses a module's lab fixture, so `-m "not lab"` is the
    fast job and `-m lab` the rest; a test that starts a lab by itself carries the mark
    explicitly (checked at run time, see `_start_cluster_marked_lab`). Then put the
    slowest modules first (a stable sort: a module's tests keep their order)."""
    for item in items:
        if LAB_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.lab)
    rank = {name: i for i, name in enumerate(SLOWEST_MODULES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    _RUNNING[:] = [item]


def pytest_runtest_teardown(item: pytest.Item) -> None:
    _RUNNING.clear()


_start_cluster = cluster.lab.start_cluster


def _start_cluster_marked_lab(*args: Any, **kwargs: Any) -> cluster.lab.Cluster:
    """`cluster.lab.start_cluster`, refused in a test that is not marked `lab` (so the
    mark stays complete as tests are added)."""
    if _RUNNING and _RUNNING[0].get_closest_marker("lab") is None:
        raise pytest.UsageError(f"{_RUNNING[0].nodeid} starts a lab: mark it pytest.mark.lab")
    return _start_cluster(*args, **kwargs)


cluster.lab.start_cluster = _start_cluster_marked_lab  # type: ignore[assignment]


@pytest.fixture(scope="session")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegionServers]:
    """One region's real servers for the whole session, stopped even if tests fail."""
    region = start_region_servers("us-east", tmp_path_factory.mktemp("servers"))
    try:
        upgrade(region.postgres.dsn(TEMPLATE_DB))
        ADMIN[:] = [bootstrap_admin_sync(region.postgres.dsn(TEMPLATE_DB), "us-east")]
        yield region
    finally:
        region.stop()


@contextlib.contextmanager
def fresh_database(servers: RegionServers) -> Iterator[str]:
    """A new database cloned from the migrated template; dropped on exit."""
    name = f"t{next(_db_counter)}_{Path(servers.postgres.data_dir).parent.name}".replace("-", "_")
    admin = servers.postgres.dsn()
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'create database "{name}" template {TEMPLATE_DB}')
    try:
        yield servers.postgres.dsn(name)
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'drop database if exists "{name}" with (force)')


@pytest.fixture
def db_url(servers: RegionServers) -> Iterator[str]:
    """A fresh, migrated database for one test (libpq URL); dropped afterwards."""
    with fresh_database(servers) as url:
        yield url


def region_settings(servers: RegionServers, db_url: str, **overrides: object) -> RegionSettings:
    """Settings of a node in region us-east on the session's servers and a test database."""
    values: dict[str, object] = {
        "region": "us-east", "database_url": db_url, "redis_url": servers.redis.url,
        "nats_url": servers.nats.url, "events_stream": f"EV_{db_url.rsplit('/', 1)[-1]}",
        "events_subject_prefix": f"ev.{db_url.rsplit('/', 1)[-1]}",
    }
    values.update(overrides)
    return RegionSettings(**values)  # type: ignore[arg-type]


@pytest.fixture
def settings(servers: RegionServers, db_url: str) -> RegionSettings:
    """Node settings for this test's database (override fields with model_copy)."""
    return region_settings(servers, db_url)


@contextlib.asynccontextmanager
async def app_client(settings: RegionSettings, key: str | None = None
                     ) -> AsyncIterator[httpx.AsyncClient]:
    """An in-process node (lifespan and workers running) and an HTTP client for it that
    sends `key` (default: the session's admin key) on every request."""
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://node",
                                     headers=auth_headers(key)) as client:
            yield client


@pytest.fixture
async def client(settings: RegionSettings) -> AsyncIterator[httpx.AsyncClient]:
    """HTTP client of an in-process node on this test's database."""
    async with app_client(settings) as c:
        yield c


def pki_files(servers: RegionServers, region: str) -> TlsFiles:
    """The session's cluster CA and `region`'s certificate, next to the session's servers
    (created on first use, reused afterwards)."""
    return ensure_cluster_pki(Path(servers.postgres.data_dir).parent.parent, [region])[region]


def tls_overrides(servers: RegionServers, region: str) -> dict[str, object]:
    """RegionSettings fields that give `region`'s in-process node mutual TLS on gRPC."""
    files = pki_files(servers, region)
    return {"tls_ca_file": str(files.ca_file), "tls_cert_file": str(files.cert_file),
            "tls_key_file": str(files.key_file)}


def rpc_tls(servers: RegionServers, region: str) -> RpcTls:
    """What a gRPC client acting as `region` presents (for tests that dial nodes directly)."""
    files = pki_files(servers, region)
    return RpcTls.from_files(files.ca_file, files.cert_file, files.key_file)


@contextlib.asynccontextmanager
async def two_regions(servers: RegionServers, **overrides: object) -> AsyncIterator[
        tuple[httpx.AsyncClient, httpx.AsyncClient, str, str, dict[str, int]]]:
    """Nodes us-east and eu-west in this process, each with its own database and a real
    gRPC server (mutual TLS, certificates of the session's cluster CA), peers of each
    other (no replication between them)."""
    ports = {"us-east": free_port(), "eu-west": free_port()}
    with fresh_database(servers) as db_a, fresh_database(servers) as db_b:
        sa = region_settings(servers, db_a, region="us-east", grpc_port=ports["us-east"],
                             peers={"eu-west": f"127.0.0.1:{ports['eu-west']}"},
                             transfer_poll_seconds=0.05,
                             **{**tls_overrides(servers, "us-east"), **overrides})
        sb = region_settings(servers, db_b, region="eu-west", grpc_port=ports["eu-west"],
                             peers={"us-east": f"127.0.0.1:{ports['us-east']}"},
                             transfer_poll_seconds=0.05,
                             **{**tls_overrides(servers, "eu-west"), **overrides})
        async with app_client(sa) as a, app_client(sb) as b:
            yield a, b, db_a, db_b, ports
