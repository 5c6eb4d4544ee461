"""Keys, access rules and the audit trail across regions, on a real two-region lab: a key
made in one region works for a write forwarded to a region that has not received the key
yet, and for local reads once it has replicated; audit rows replicate; an admin key is
needed everywhere."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest

from cluster.lab import ROUTER_PRINCIPAL, Cluster, start_cluster
from replication.wiring import set_enabled
from tests.helpers import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.multiregion]


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """us-east and eu-west, WAN round trip scaled down; stopped even if a test fails."""
    cluster = start_cluster(Path(tmp_path_factory.mktemp("authlab")), regions=2, wan_scale=0.2)
    try:
        yield cluster
    finally:
        cluster.stop()


def _has_row(dsn: str, table: str, row_id: str) -> bool:
    with psycopg.connect(dsn, autocommit=True) as conn:
        # `table` is one of this module's fixed names, never input.
        return conn.execute(f"select 1 from {table} where id = %s",
                            (row_id,)).fetchone() is not None


def test_key_made_in_one_region_works_in_the_other(lab: Cluster) -> None:
    us, eu = lab.region("us-east"), lab.region("eu-west")
    admin = lab.auth_headers()
    # us-east stops receiving eu-west's changes: a key made in eu-west now is unknown there.
    set_enabled(us.dsn, "eu-west", False)
    try:
        with httpx.Client(base_url=eu.api_url, timeout=30) as http:
            made = http.post("/v1/admin/principals", headers=admin,
                             json={"name": "eu merchant", "role": "merchant"})
            assert made.status_code == 201, made.text
            principal, key = made.json()["id"], made.json()["api_key"]["key"]
            mine = {"Authorization": f"Bearer {key}"}
            # Entered in eu-west, owned by us-east: forwarded with the principal eu-west
            # authenticated; us-east does not have the key (nor the principal) yet.
            opened = http.post("/v1/accounts", headers={**mine, "Idempotency-Key":
                                                        f"auth-{uuid.uuid4()}"},
                               json={"currency": "USD", "home_region": "us-east"})
            assert opened.status_code == 201, opened.text
            assert opened.headers["paycluster-served-by"] == "us-east"
            account = opened.json()["id"]
            assert opened.json()["principal_id"] == principal
        assert not _has_row(us.dsn, "principals", principal), "the subscription was paused"
        with httpx.Client(base_url=us.api_url, timeout=30) as http:
            # Used directly in us-east before it replicated: unknown there (401), no echo.
            early = http.get(f"/v1/accounts/{account}", headers=mine)
            assert early.status_code == 401 and key not in early.text
    finally:
        set_enabled(us.dsn, "eu-west", True)
    wait_for(lambda: _has_row(us.dsn, "principals", principal), 30,
             "the principal to replicate to us-east")
    # Replicated (principals and keys are in one transaction): a local read in us-east.
    with httpx.Client(base_url=us.api_url, timeout=30) as http:
        wait_for(lambda: http.get(f"/v1/accounts/{account}", headers=mine).status_code == 200,
                 30, "the key to work in us-east")
        # The admin deposits (admin only); the merchant may not read another's account.
        funded = http.post(f"/v1/accounts/{account}/deposits", json={"amount": 500},
                           headers=admin)
        assert funded.status_code == 201, funded.text
        other = http.post("/v1/accounts", headers=admin, json={"currency": "USD"})
        assert other.status_code == 201
        assert http.get(f"/v1/accounts/{other.json()['id']}", headers=mine).status_code == 403
        assert http.post(f"/v1/accounts/{account}/deposits", json={"amount": 1},
                         headers=mine).status_code == 403
    # The account (written by us-east) is readable with the key in eu-west, too.
    with httpx.Client(base_url=eu.api_url, timeout=30) as http:
        wait_for(lambda: http.get(f"/v1/accounts/{account}", headers=mine).json().get(
                     "balance") == 500, 30, "the deposit to replicate to eu-west")
        # The audit rows of both regions replicate: eu-west lists us-east's rows.
        def audited() -> bool:
            rows = http.get("/v1/admin/audit", params={"principal_id": principal, "limit": 100},
                            headers=admin).json()["data"]
            seen = {(r["region"], r["action"], r["status"]) for r in rows}
            return {("us-east", "accounts.open_account", 201),
                    ("us-east", "accounts.get_account", 403),
                    ("us-east", "accounts.deposit", 403)} <= seen
        wait_for(audited, 30, "us-east's audit rows to replicate to eu-west")
    for region in (us, eu):
        with psycopg.connect(region.dsn, autocommit=True) as conn:
            row = conn.execute(
                "select coalesce(sum(confl_insert_exists + confl_update_origin_differs"
                " + confl_update_exists + confl_update_missing + confl_delete_missing), 0)"
                " from pg_stat_subscription_stats").fetchone()
        assert row is not None and row[0] == 0, f"replication conflicts in {region.name}"


def test_revocation_reaches_the_other_region(lab: Cluster) -> None:
    us, eu = lab.region("us-east"), lab.region("eu-west")
    admin = lab.auth_headers()
    with httpx.Client(base_url=us.api_url, timeout=30) as http:
        made = http.post("/v1/admin/principals", headers=admin,
                         json={"name": "short-lived", "role": "customer"})
        assert made.status_code == 201
        key_id, key = made.json()["api_key"]["id"], made.json()["api_key"]["key"]
    mine = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=eu.api_url, timeout=30) as http:
        wait_for(lambda: http.get("/v1/cluster/ownership", headers=mine).status_code == 200,
                 30, "the key to work in eu-west")
        # Revoked through eu-west: forwarded to the key's home (us-east), which writes it.
        revoked = http.delete(f"/v1/admin/keys/{key_id}", headers=admin)
        assert revoked.status_code == 200 and revoked.json()["revoked"], revoked.text
        # eu-west dropped it from its cache; once the revocation replicates back it is 401.
        wait_for(lambda: http.get("/v1/cluster/ownership", headers=mine).status_code == 401,
                 10, "the revocation to bite in eu-west")
    with httpx.Client(base_url=us.api_url, timeout=30) as http:
        assert http.get("/v1/cluster/ownership", headers=mine).status_code == 401


@pytest.mark.lab
def test_a_restarted_lab_keeps_its_admin_key(tmp_path: Path) -> None:
    """cluster.json is 0600 with the admin key; a lab started again on its data dir (same
    stores) keeps that key instead of minting another admin."""
    import os
    import stat

    keys = []
    for _ in range(2):
        cluster = start_cluster(tmp_path / "lab", regions=1, wan_scale=0)
        try:
            assert stat.S_IMODE(os.stat(cluster.cluster_file).st_mode) == 0o600
            keys.append(cluster.admin_key)
            admins = httpx.get(f"{cluster.regions[0].api_url}/v1/admin/principals",
                               headers=cluster.auth_headers(), timeout=10)
            assert admins.status_code == 200, admins.text
            # One admin and the routers' own non-admin principal; a restart mints neither
            # again.
            assert sorted((p["name"], p["role"]) for p in admins.json()["data"]) == [
                ("bootstrap-admin", "admin"), (ROUTER_PRINCIPAL, "customer")]
        finally:
            cluster.stop()
    assert keys[0] == keys[1] and keys[0].startswith("pck_")
