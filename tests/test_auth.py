"""API keys, principals, access rules and the audit trail, against a real node (in
process) on real PostgreSQL and Redis."""

from __future__ import annotations

import asyncio
import contextlib
import re
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import psycopg
import pytest

from region_node.app import create_app
from region_node.config import RegionSettings
from tests.conftest import ADMIN, auth_headers
from tests.helpers import check_ledger, open_account

KEY_RE = re.compile(r"^pck_[a-z0-9]{12}_[A-Za-z0-9]{40}$")


@contextlib.asynccontextmanager
async def node(settings: RegionSettings) -> AsyncIterator[httpx.AsyncClient]:
    """An in-process node and a client that sends NO key unless a request names one."""
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://node") as client:
            yield client


def as_key(key: str) -> dict[str, str]:
    """Headers for a request made with `key`."""
    return {"Authorization": f"Bearer {key}"}


async def new_principal(client: httpx.AsyncClient, name: str, role: str = "customer",
                        **extra: Any) -> tuple[str, str, str]:
    """(principal id, key id, key) of a new principal, made with the admin key."""
    resp = await client.post("/v1/admin/principals", json={"name": name, "role": role, **extra},
                             headers=auth_headers())
    assert resp.status_code == 201, resp.text
    body = resp.json()
    assert KEY_RE.match(body["api_key"]["key"]), "pck_<12 [a-z0-9]>_<40 [A-Za-z0-9]>"
    return body["id"], body["api_key"]["id"], body["api_key"]["key"]


async def account_of(client: httpx.AsyncClient, key: str, deposit: int = 0,
                     kind: str = "customer") -> str:
    """An account opened with `key` (funded by the admin)."""
    resp = await client.post("/v1/accounts", json={"currency": "USD", "kind": kind},
                             headers=as_key(key))
    assert resp.status_code == 201, resp.text
    account_id: str = resp.json()["id"]
    if deposit:
        dep = await client.post(f"/v1/accounts/{account_id}/deposits", json={"amount": deposit},
                                headers=auth_headers())
        assert dep.status_code == 201, dep.text
    return account_id


def balances(db_url: str) -> dict[str, int]:
    with psycopg.connect(db_url) as conn:
        return {str(r[0]): int(r[1]) for r in conn.execute("select id, balance from accounts")}


def payment_count(db_url: str) -> int:
    with psycopg.connect(db_url) as conn:
        row = conn.execute("select count(*) from payments").fetchone()
    return int(row[0]) if row else 0


async def test_no_key_malformed_and_unknown_keys_are_401(settings: RegionSettings) -> None:
    async with node(settings) as client:
        assert (await client.get("/health/live")).status_code == 200, "health stays open"
        assert (await client.get("/metrics")).status_code == 200, "metrics stay open"
        missing = await client.post("/v1/payments", json={"payer": "x"})
        assert missing.status_code == 401
        assert missing.json()["error"]["code"] == "missing_api_key"
        assert missing.json()["error"]["type"] == "authentication_error"
        assert missing.headers["www-authenticate"].startswith("Bearer")
        forged = "pck_abcdefghijkl_" + "A" * 40
        for header in ("Bearer", "Basic dXNlcjpwYXNz", "Bearer not-a-key",
                       "Bearer pck_short_x", f"Bearer {forged}", "Bearer " + forged[:-1] + "!",
                       f"Bearer {ADMIN[0].key[:-1]}x"):
            resp = await client.get(f"/v1/accounts/{uuid.uuid4()}",
                                    headers={"Authorization": header})
            assert resp.status_code == 401, (header, resp.text)
            sent = header.partition(" ")[2]
            assert not sent or sent not in resp.text, "the key is never echoed back"
        for method, path in (("GET", "/v1/admin/audit"), ("POST", "/v1/skus"),
                             ("GET", "/v1/replication/status"),
                             ("GET", "/v1/cluster/ownership"), ("POST", "/v1/accounts")):
            assert (await client.request(method, path)).status_code == 401, path


async def test_keys_are_stored_hashed(settings: RegionSettings, db_url: str) -> None:
    async with node(settings) as client:
        pid, _, key = await new_principal(client, "hashed merchant", "merchant")
        extra = await client.post(f"/v1/admin/principals/{pid}/keys", headers=auth_headers())
        assert extra.status_code == 201, extra.text
        second = extra.json()["key"]
        listed = await client.get(f"/v1/admin/principals/{pid}/keys", headers=auth_headers())
        assert listed.status_code == 200
        assert len(listed.json()["data"]) == 2
        assert key not in listed.text and second not in listed.text, "listing shows no secret"
        # The key works; the stored row holds neither the key nor its secret part.
        assert (await client.get("/v1/cluster/ownership", headers=as_key(key))).status_code == 200
    with psycopg.connect(db_url) as conn:
        rows = conn.execute("select * from api_keys").fetchall()
        dump = "\n".join(" ".join(str(v) for v in row) for row in rows)
        audit = conn.execute("select * from audit_log").fetchall()
        dump += "\n".join(" ".join(str(v) for v in row) for row in audit)
        idem = conn.execute("select * from idempotency_keys").fetchall()
        dump += "\n".join(" ".join(str(v) for v in row) for row in idem)
    assert len(rows) == 3  # the admin's and two of the merchant's
    for full in (key, second, ADMIN[0].key):
        secret = full.rsplit("_", 1)[1]
        assert full not in dump and secret not in dump
    assert key.split("_")[1] in dump, "the prefix is stored in clear (it names the key)"


async def test_revoked_key_is_refused(settings: RegionSettings) -> None:
    # Two nodes of one region on one store: the revoking one refuses the key at once,
    # the other one within its auth cache bound (1 s here).
    other = settings.model_copy(update={"auth_cache_seconds": 1.0})
    async with node(settings) as a, node(other) as b:
        _, key_id, key = await new_principal(a, "soon revoked", "merchant")
        assert (await a.get("/v1/cluster/ownership", headers=as_key(key))).status_code == 200
        assert (await b.get("/v1/cluster/ownership", headers=as_key(key))).status_code == 200
        revoked = await a.delete(f"/v1/admin/keys/{key_id}", headers=auth_headers())
        assert revoked.status_code == 200, revoked.text
        assert revoked.json()["revoked"] is True
        again = await a.post(f"/v1/admin/keys/{key_id}/revoke", headers=auth_headers())
        assert again.status_code == 200 and again.json()["revoked_at"] == \
            revoked.json()["revoked_at"], "revoking twice changes nothing"
        refused = await a.get("/v1/cluster/ownership", headers=as_key(key))
        assert refused.status_code == 401
        assert refused.json()["error"]["code"] == "api_key_revoked"
        assert key not in refused.text
        deadline = asyncio.get_running_loop().time() + 1.0 + 2.0
        while (await b.get("/v1/cluster/ownership", headers=as_key(key))).status_code == 200:
            assert asyncio.get_running_loop().time() < deadline, "revocation did not bite"
            await asyncio.sleep(0.1)


async def test_access_rules_and_no_money_moves_on_403(settings: RegionSettings,
                                                      db_url: str) -> None:
    async with node(settings) as client:
        _, _, alice = await new_principal(client, "alice")
        bob_id, _, bob = await new_principal(client, "bob's shop", "merchant")
        _, _, carol = await new_principal(client, "carol")
        alice_acc = await account_of(client, alice, deposit=10_000)
        bob_acc = await account_of(client, bob, kind="merchant")
        carol_acc = await account_of(client, carol, deposit=500)
        before = balances(db_url)

        # Bob may not pay from Alice's account: 403, nothing moved, nothing recorded.
        theft = await client.post("/v1/payments", headers=as_key(bob), json={
            "payer": alice_acc, "payee": bob_acc, "amount": 5_000, "currency": "USD"})
        assert theft.status_code == 403, theft.text
        assert theft.json()["error"]["type"] == "permission_error"
        held = await client.post("/v1/payments", headers=as_key(bob), json={
            "payer": alice_acc, "payee": bob_acc, "amount": 5_000, "currency": "USD",
            "capture_method": "manual"})
        assert held.status_code == 403
        withdraw = await client.post(f"/v1/accounts/{alice_acc}/withdrawals",
                                     json={"amount": 100}, headers=as_key(bob))
        assert withdraw.status_code == 403
        assert balances(db_url) == before
        assert payment_count(db_url) == 0

        # Alice pays Bob (the payee may be anyone's); reads are limited to the parties.
        paid = await client.post("/v1/payments", headers=as_key(alice), json={
            "payer": alice_acc, "payee": bob_acc, "amount": 1_000, "currency": "USD"})
        assert paid.status_code == 201, paid.text
        pay_id = paid.json()["id"]
        to_carol = await client.post("/v1/payments", headers=as_key(alice), json={
            "payer": alice_acc, "payee": carol_acc, "amount": 10, "currency": "USD"})
        assert to_carol.status_code == 201, "a payee may be anyone's account"
        assert (await client.get(f"/v1/payments/{pay_id}", headers=as_key(alice))
                ).status_code == 200
        assert (await client.get(f"/v1/payments/{pay_id}", headers=as_key(bob))
                ).status_code == 200
        assert (await client.get(f"/v1/payments/{pay_id}", headers=as_key(carol))
                ).status_code == 403
        assert (await client.get(f"/v1/accounts/{alice_acc}", headers=as_key(bob))
                ).status_code == 403
        assert (await client.get(f"/v1/accounts/{alice_acc}/entries", headers=as_key(bob))
                ).status_code == 403
        mine = await client.get(f"/v1/accounts/{alice_acc}", headers=as_key(alice))
        assert mine.status_code == 200 and mine.json()["balance"] == 8_990
        assert (await client.get(f"/v1/accounts/{bob_acc}", headers=auth_headers())
                ).json()["principal_id"] == bob_id
        assert (await client.get(f"/v1/accounts/{alice_acc}/entries", headers=as_key(alice))
                ).status_code == 200

        # The merchant refunds (not the payer, not a stranger); capture is the payer's.
        assert (await client.post(f"/v1/payments/{pay_id}/refunds", json={"amount": 100},
                                  headers=as_key(alice))).status_code == 403
        assert (await client.post(f"/v1/payments/{pay_id}/refunds", json={"amount": 100},
                                  headers=as_key(carol))).status_code == 403
        refund = await client.post(f"/v1/payments/{pay_id}/refunds", json={"amount": 100},
                                   headers=as_key(bob))
        assert refund.status_code == 201, refund.text
        hold = await client.post("/v1/payments", headers=as_key(alice), json={
            "payer": alice_acc, "payee": bob_acc, "amount": 300, "currency": "USD",
            "capture_method": "manual"})
        assert hold.status_code == 201
        hold_id = hold.json()["id"]
        assert (await client.post(f"/v1/payments/{hold_id}/capture", headers=as_key(bob))
                ).status_code == 403
        assert (await client.post(f"/v1/payments/{hold_id}/cancel", headers=as_key(carol))
                ).status_code == 403
        captured = await client.post(f"/v1/payments/{hold_id}/capture", headers=as_key(alice))
        assert captured.status_code == 200, captured.text

        # An Idempotency-Key reused by another principal never replays Alice's answer.
        body = {"payer": alice_acc, "payee": bob_acc, "amount": 5, "currency": "USD"}
        first = await client.post("/v1/payments", json=body,
                                  headers={**as_key(alice), "Idempotency-Key": "shared-1"})
        assert first.status_code == 201
        other = await client.post("/v1/payments", json=body,
                                  headers={**as_key(bob), "Idempotency-Key": "shared-1"})
        # Keys are scoped per caller (README, security model): Bob's "shared-1" is his own
        # key, so his request runs as a new one and is refused on its merits (Alice's
        # payer is not his), never answered with Alice's stored response.
        assert other.status_code == 403, other.text
        assert other.json()["error"]["type"] == "permission_error"
        assert first.json()["id"] not in other.text
        assert "Idempotent-Replayed" not in other.headers

        # Only an admin opens accounts for another principal.
        for_bob = await client.post("/v1/accounts", headers=as_key(alice), json={
            "currency": "USD", "principal_id": bob_id})
        assert for_bob.status_code == 403
        by_admin = await client.post("/v1/accounts", headers=auth_headers(), json={
            "currency": "USD", "principal_id": bob_id})
        assert by_admin.status_code == 201 and by_admin.json()["principal_id"] == bob_id
    final = balances(db_url)
    assert final[alice_acc] == 10_000 - 1_000 - 10 + 100 - 300 - 5
    assert final[bob_acc] == 1_000 - 100 + 300 + 5
    check_ledger(db_url).assert_sound()


async def test_admin_only_routes_refuse_merchant_keys(settings: RegionSettings,
                                                      db_url: str) -> None:
    async with node(settings) as client:
        pid, key_id, merchant = await new_principal(client, "merchant", "merchant")
        acc = await account_of(client, merchant)
        before = balances(db_url)
        refused = [
            ("POST", "/v1/skus", {"sku": "hat", "stock": 5}),
            ("POST", "/v1/admin/principals", {"name": "me too", "role": "admin"}),
            ("GET", "/v1/admin/principals", None),
            ("POST", f"/v1/admin/principals/{pid}/keys", None),
            ("GET", f"/v1/admin/principals/{pid}/keys", None),
            ("DELETE", f"/v1/admin/keys/{key_id}", None),
            ("GET", "/v1/admin/audit", None),
            ("POST", f"/v1/accounts/{acc}/deposits", {"amount": 1_000}),
            ("GET", "/v1/replication/status", None),
            ("POST", "/v1/admin/ownership/ban", {"home_region": "us-east"}),
        ]
        for method, path, body in refused:
            resp = await client.request(method, path, json=body, headers=as_key(merchant))
            assert resp.status_code == 403, (method, path, resp.text)
        assert balances(db_url) == before, "a refused deposit moved no money"
        assert (await client.get("/v1/cluster/ownership", headers=as_key(merchant))
                ).status_code == 200
        sku = await client.post("/v1/skus", json={"sku": "hat", "stock": 5},
                                headers=auth_headers())
        assert sku.status_code == 201, sku.text
        assert (await client.get("/v1/skus/hat", headers=as_key(merchant))).status_code == 200
        # Key-showing routes refuse an Idempotency-Key: a stored response would keep the key.
        no_idem = await client.post("/v1/admin/principals", json={"name": "x", "role": "customer"},
                                    headers={**auth_headers(), "Idempotency-Key": "k1"})
        assert no_idem.status_code == 400


async def test_audit_trail(settings: RegionSettings, db_url: str) -> None:
    async with node(settings) as client:
        pid, key_id, key = await new_principal(client, "audited", "customer")
        acc = await account_of(client, key, deposit=1_000)
        _, _, other = await new_principal(client, "payee", "merchant")
        payee = await account_of(client, other, kind="merchant")
        paid = await client.post("/v1/payments", headers={**as_key(key), "x-request-id": "rq-1"},
                                 json={"payer": acc, "payee": payee, "amount": 10,
                                       "currency": "USD"})
        assert paid.status_code == 201
        assert (await client.post("/v1/payments", json={})).status_code == 401
        assert (await client.get(f"/v1/accounts/{acc}", headers=as_key(other))
                ).status_code == 403
        broke = await client.post("/v1/payments", headers=as_key(key), json={
            "payer": acc, "payee": payee, "amount": 999_999, "currency": "USD"})
        assert broke.status_code == 402
        assert (await client.get("/v1/admin/audit", headers=as_key(key))).status_code == 403

        # The middleware writes refusals after the response: give it a moment.
        rows: list[dict[str, Any]] = []
        for _ in range(50):
            resp = await client.get("/v1/admin/audit", params={"limit": 100},
                                    headers=auth_headers())
            assert resp.status_code == 200
            rows = resp.json()["data"]
            if sum(r["status"] in (401, 403) for r in rows) >= 3:
                break
            await asyncio.sleep(0.05)
        by_action = {(r["action"], r["status"]) for r in rows}
        payment = next(r for r in rows if r["action"] == "payments.create" and r["status"] == 201)
        assert payment == {**payment, "key_id": key_id, "principal_id": pid,
                           "resource": paid.json()["id"], "request_id": "rq-1",
                           "region": "us-east"}
        assert ("admin.create_principal", 201) in by_action
        assert ("accounts.deposit", 201) in by_action
        assert ("payments.create", 401) in by_action
        assert ("accounts.get_account", 403) in by_action
        assert ("payments.create", 402) in by_action
        assert ("admin.audit_trail", 403) in by_action
        page = await client.get("/v1/admin/audit", params={"limit": 2}, headers=auth_headers())
        more = await client.get("/v1/admin/audit", params={
            "limit": 2, "cursor": page.json()["next_cursor"]}, headers=auth_headers())
        assert not {r["id"] for r in page.json()["data"]} & {r["id"] for r in more.json()["data"]}
        mine = await client.get("/v1/admin/audit", params={"principal_id": pid},
                                headers=auth_headers())
        assert mine.json()["data"] and all(r["principal_id"] == pid
                                           for r in mine.json()["data"])
    with psycopg.connect(db_url) as conn:
        # Atomic with the effect: every payment has its audit row.
        missing = conn.execute(
            "select count(*) from payments p where not exists (select 1 from audit_log a "
            "where a.resource = p.id::text and a.action = 'payments.create')").fetchone()
    assert missing == (0,)


@pytest.mark.parametrize("clients", [8])
async def test_many_keys_at_once_keep_the_ledger_sound(settings: RegionSettings, db_url: str,
                                                       clients: int) -> None:
    async with node(settings) as client:
        people = [await new_principal(client, f"p{i}") for i in range(clients)]
        accounts = [await account_of(client, key, deposit=1_000) for _, _, key in people]
        ok = 0
        refused = 0

        async def run(i: int) -> None:
            nonlocal ok, refused
            key = people[i][2]
            for n in range(15):
                target = (i + 1 + n % (clients - 1)) % clients
                if n % 5 == 4:  # try to spend someone else's money
                    resp = await client.post("/v1/payments", headers=as_key(key), json={
                        "payer": accounts[target], "payee": accounts[i], "amount": 50,
                        "currency": "USD"})
                    assert resp.status_code == 403, resp.text
                    refused += 1
                    continue
                resp = await client.post("/v1/payments", headers=as_key(key), json={
                    "payer": accounts[i], "payee": accounts[target], "amount": 7,
                    "currency": "USD"})
                assert resp.status_code in (201, 402), resp.text
                ok += resp.status_code == 201

        await asyncio.gather(*(run(i) for i in range(clients)))
        # A key per principal works concurrently; money only moved by the payers' own keys.
        check_ledger(db_url).assert_sound()
        assert payment_count(db_url) == ok and refused == clients * 3
        total = sum(balances(db_url)[a] for a in accounts)
        assert total == clients * 1_000, "customer money is conserved"


async def test_open_account_helper_still_works_with_the_admin_key(
        client: httpx.AsyncClient) -> None:
    """The default test client sends the admin key (tests/conftest.py)."""
    acc = await open_account(client, deposit=10)
    resp = await client.get(f"/v1/accounts/{acc}")
    assert resp.status_code == 200 and resp.json()["principal_id"] == str(ADMIN[0].principal_id)


async def test_every_v1_route_needs_a_key(settings: RegionSettings) -> None:
    """No /v1 route, present or added later, answers without a key: a request without one
    to every /v1 path and method the app serves (its OpenAPI document) is a 401."""
    app = create_app(settings)
    paths = {path: methods for path, methods in app.openapi()["paths"].items()
             if path.startswith("/v1/")}
    assert len(paths) > 15
    async with node(settings) as client:
        for template, methods in paths.items():
            path = re.sub(r"\{[^}]+\}", str(uuid.uuid4()), template)
            for method in methods:
                resp = await client.request(method.upper(), path, json={})
                assert resp.status_code == 401, (method, template, resp.text)
