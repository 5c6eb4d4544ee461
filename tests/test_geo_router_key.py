"""The lab's geo router reads ownership with a key of its own, not the admin's, and keeps
it when the lab is restarted on its data dir (one real region: PostgreSQL 18, Redis,
NATS, a region node and a router - nothing mocked)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from cluster.lab import Cluster, read_cluster, start_cluster
from geo_router.client import RouterAdmin
from tests.helpers import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.lab, pytest.mark.timeout(180)]

ROUTER_ENV = {"PAYCLUSTER_ROUTER_PROBE_INTERVAL_SECONDS": "0.4",
              "PAYCLUSTER_ROUTER_PROBE_TIMEOUT_SECONDS": "0.3",
              "PAYCLUSTER_ROUTER_OWNERSHIP_REFRESH_SECONDS": "0.5"}


def ownership_read(cluster: Cluster) -> dict[str, Any] | None:
    """The router's ownership map once it read it from the region (None before)."""
    with RouterAdmin(cluster.routers[0].admin_url) as admin:
        view: dict[str, Any] = admin.regions()["ownership"]
    return view if view["answered"] == ["us-east"] else None


def keys_of(cluster: Cluster) -> tuple[str, str]:
    """(admin key, router key) as cluster.json records them; the router key works for
    ownership and is not an admin's."""
    doc = read_cluster(cluster.data_dir)
    admin_key, router_key = doc["admin_key"], doc["router_key"]
    assert (admin_key, router_key) == (cluster.admin_key, cluster.router_key)
    assert router_key.startswith("pck_") and router_key != admin_key
    api = cluster.region("us-east").api_url
    bearer = {"Authorization": f"Bearer {router_key}"}
    assert httpx.get(f"{api}/v1/cluster/ownership", headers=bearer, timeout=5
                     ).status_code == 200
    denied = httpx.get(f"{api}/v1/admin/principals", headers=bearer, timeout=5)
    assert denied.status_code == 403 and denied.json()["error"]["code"] == "admin_required"
    return admin_key, router_key


def test_the_router_key_is_its_own_and_survives_a_restart(tmp_path: Path) -> None:
    data_dir = tmp_path / "lab"
    cluster = start_cluster(data_dir, regions=1, wan_scale=0.0, routers=1,
                            router_env=ROUTER_ENV)
    try:
        first = keys_of(cluster)
        view = wait_for(lambda: ownership_read(cluster), 10, "the router's ownership read")
        assert view["serving"] == {"us-east": "us-east"} and view["sources"] == {
            "us-east": "us-east"}
    finally:
        cluster.stop()
    again = start_cluster(data_dir, regions=1, wan_scale=0.0, routers=1,
                          router_env=ROUTER_ENV)
    try:
        # The same stores honour the same keys: both kept, and the router reads with its.
        assert keys_of(again) == first
        wait_for(lambda: ownership_read(again), 10, "the restarted router's ownership read")
    finally:
        again.stop()
