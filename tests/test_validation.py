"""Bad input gets a 4xx in the one error shape and changes nothing."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import psycopg
import pytest

from tests.helpers import open_account

pytestmark = pytest.mark.integration


def _snapshot(db_url: str) -> tuple[Any, ...]:
    with psycopg.connect(db_url) as conn:
        counts = [conn.execute(f"select count(*) from {t}").fetchone()[0]  # type: ignore[index]
                  for t in ("payments", "journal_entries", "outbox", "refunds",
                            "idempotency_keys")]
        sums = conn.execute("select sum(balance), sum(held) from accounts").fetchone()
    return (*counts, sums)


def _assert_error_shape(resp: httpx.Response, status: int, code: str | None = None,
                        param: str | None = None) -> None:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) <= {"type", "code", "message", "param"}
    assert err["type"] and err["code"] and err["message"]
    if code:
        assert err["code"] == code, err
    if param:
        assert err.get("param") == param, err


@pytest.fixture
async def accounts(client: httpx.AsyncClient) -> dict[str, str]:
    return {"payer": await open_account(client, deposit=10_000),
            "payee": await open_account(client, kind="merchant"),
            "eur": await open_account(client, "EUR", deposit=1_000)}


BAD_PAYMENTS: list[tuple[str, dict[str, Any], int, str, str | None]] = [
    ("zero", {"amount": 0}, 400, "invalid_amount", "amount"),
    ("negative", {"amount": -5}, 400, "invalid_amount", "amount"),
    ("fractional", {"amount": 10.5}, 400, "invalid_integer", "amount"),
    ("float that looks whole", {"amount": 10.0}, 400, "invalid_integer", "amount"),
    ("string amount", {"amount": "100"}, 400, "invalid_integer", "amount"),
    ("boolean amount", {"amount": True}, 400, "invalid_integer", "amount"),
    ("beyond maximum", {"amount": 10**13}, 400, "amount_too_large", "amount"),
    ("unknown currency", {"currency": "XYZ"}, 400, "invalid_value", "currency"),
    ("mismatched currency", {"currency": "EUR"}, 400, "currency_mismatch", "payer"),
    ("unknown payer", {"payer": str(uuid.uuid4())}, 404, "resource_missing", "payer"),
    ("malformed payer id", {"payer": "acct_123"}, 404, "resource_missing", "payer"),
    ("payer equals payee", {"payee": "<payer>"}, 400, "invalid_request", "payee"),
    ("unknown field", {"tip": 5}, 400, "unknown_parameter", "tip"),
    ("bad capture method", {"capture_method": "later"}, 400, "invalid_value", "capture_method"),
    ("missing amount", {"amount": None}, 400, "parameter_missing", "amount"),
]


@pytest.mark.parametrize(("case", "change", "status", "code", "param"), BAD_PAYMENTS,
                         ids=[c[0] for c in BAD_PAYMENTS])
async def test_bad_payment_is_refused_and_changes_nothing(
        client: httpx.AsyncClient, db_url: str, accounts: dict[str, str], case: str,
        change: dict[str, Any], status: int, code: str, param: str | None) -> None:
    body: dict[str, Any] = {"payer": accounts["payer"], "payee": accounts["payee"],
                            "amount": 100, "currency": "USD"}
    for key, value in change.items():
        if value is None:
            body.pop(key)
        else:
            body[key] = accounts["payer"] if value == "<payer>" else value
    before = _snapshot(db_url)
    resp = await client.post("/v1/payments", json=body,
                             headers={"Idempotency-Key": f"bad-{uuid.uuid4()}"})
    _assert_error_shape(resp, status, code, param)
    after = _snapshot(db_url)
    # Only a 404/409-style decision may leave its idempotency answer behind; no money moves.
    assert before[:4] == after[:4] and before[5] == after[5]


async def test_malformed_json(client: httpx.AsyncClient, db_url: str) -> None:
    before = _snapshot(db_url)
    resp = await client.post("/v1/payments", content=b'{"payer": "x", "amount": 1',
                             headers={"content-type": "application/json"})
    _assert_error_shape(resp, 400, "invalid_json")
    resp = await client.post("/v1/payments", content=b'[1, 2]',
                             headers={"content-type": "application/json"})
    _assert_error_shape(resp, 400)
    assert _snapshot(db_url) == before


async def test_oversized_body(client: httpx.AsyncClient, db_url: str,
                              accounts: dict[str, str]) -> None:
    before = _snapshot(db_url)
    body = {"payer": accounts["payer"], "payee": accounts["payee"], "amount": 1,
            "currency": "USD", "description": "x" * 200_000}
    resp = await client.post("/v1/payments", json=body)
    _assert_error_shape(resp, 413, "payload_too_large")
    assert _snapshot(db_url) == before


async def test_bad_deposits_and_accounts(client: httpx.AsyncClient, db_url: str,
                                         accounts: dict[str, str]) -> None:
    before = _snapshot(db_url)
    payer = accounts["payer"]
    _assert_error_shape(await client.post(f"/v1/accounts/{payer}/deposits", json={"amount": 0}),
                        400, "invalid_amount", "amount")
    _assert_error_shape(await client.post(f"/v1/accounts/{payer}/deposits",
                                          json={"amount": 1.5}), 400, "invalid_integer")
    _assert_error_shape(await client.post(f"/v1/accounts/{uuid.uuid4()}/deposits",
                                          json={"amount": 10}), 404, "resource_missing")
    _assert_error_shape(await client.post(f"/v1/accounts/{payer}/withdrawals",
                                          json={"amount": 10**9}), 402, "insufficient_funds")
    _assert_error_shape(await client.post("/v1/accounts", json={"currency": "usdd"}),
                        400, "invalid_value", "currency")
    _assert_error_shape(await client.post("/v1/accounts", json={"currency": "USD",
                                                                "kind": "funding"}),
                        400, "invalid_value", "kind")
    _assert_error_shape(await client.get(f"/v1/accounts/{uuid.uuid4()}"), 404)
    _assert_error_shape(await client.get("/v1/payments/not-an-id"), 404)
    _assert_error_shape(await client.get("/v1/nothing-here"), 404)
    assert _snapshot(db_url) == before


async def test_capture_and_refund_limits(client: httpx.AsyncClient, db_url: str,
                                         accounts: dict[str, str]) -> None:
    created = await client.post("/v1/payments", json={
        "payer": accounts["payer"], "payee": accounts["payee"], "amount": 1_000,
        "currency": "USD", "capture_method": "manual"})
    pid = created.json()["id"]
    _assert_error_shape(await client.post(f"/v1/payments/{pid}/capture",
                                          json={"amount": 1_001}), 400, param="amount")
    _assert_error_shape(await client.post(f"/v1/payments/{pid}/refunds"), 409)
    captured = await client.post(f"/v1/payments/{pid}/capture", json={"amount": 600})
    assert captured.status_code == 200
    _assert_error_shape(await client.post(f"/v1/payments/{pid}/refunds",
                                          json={"amount": 601}), 400, "amount_too_large")
    assert (await client.post(f"/v1/payments/{pid}/refunds",
                              json={"amount": 400})).status_code == 201
    assert (await client.post(f"/v1/payments/{pid}/refunds",
                              json={"amount": 200})).status_code == 201
    _assert_error_shape(await client.post(f"/v1/payments/{pid}/refunds",
                                          json={"amount": 1}), 409, "charge_already_refunded")
    _assert_error_shape(await client.post(f"/v1/payments/{pid}/cancel"), 409)
    payment = (await client.get(f"/v1/payments/{pid}")).json()
    assert (payment["amount_captured"], payment["amount_refunded"]) == (600, 600)
    payer = (await client.get(f"/v1/accounts/{accounts['payer']}")).json()
    assert (payer["balance"], payer["held"]) == (10_000, 0)


async def test_ids_of_regions_outside_the_cluster_are_404(client: httpx.AsyncClient) -> None:
    """An id stamped with a region this cluster does not run names nothing: 404, not 503."""
    for code in range(256):
        foreign = uuid.UUID(bytes=uuid.uuid4().bytes[:15] + bytes([code]))
        resp = await client.post(f"/v1/accounts/{foreign}/deposits", json={"amount": 10})
        _assert_error_shape(resp, 404, "resource_missing")
        resp = await client.get(f"/v1/payments/{foreign}")
        _assert_error_shape(resp, 404, "resource_missing")
