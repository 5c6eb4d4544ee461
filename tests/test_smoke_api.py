import pytest
pytestmark = pytest.mark.integration

async def test_basic_flow(client):
    r = await client.post("/v1/accounts", json={"currency": "USD"})
    assert r.status_code == 201, r.text
    a = r.json()["id"]
    b = (await client.post("/v1/accounts", json={"currency": "USD", "kind": "merchant"})).json()["id"]
    r = await client.post(f"/v1/accounts/{a}/deposits", json={"amount": 1000})
    assert r.status_code == 201, r.text
    r = await client.post("/v1/payments", json={"payer": a, "payee": b, "amount": 300, "currency": "USD"})
    assert r.status_code == 201, r.text
    assert r.json()["status"] == "succeeded"
    r = await client.post("/v1/payments", json={"payer": a, "payee": b, "amount": 3000, "currency": "USD"})
    assert r.status_code == 402, r.text
    print(r.json())
    r = await client.post("/v1/payments", json={"payer": a, "payee": b, "amount": 200, "currency": "USD", "capture_method": "manual"})
    assert r.status_code == 201 and r.json()["status"] == "requires_capture", r.text
    pid = r.json()["id"]
    r = await client.post(f"/v1/payments/{pid}/capture", json={"amount": 150})
    assert r.status_code == 200 and r.json()["amount_captured"] == 150, r.text
    r = await client.post(f"/v1/payments/{pid}/refunds", json={"amount": 100})
    assert r.status_code == 201, r.text
    acc = (await client.get(f"/v1/accounts/{a}")).json()
    assert acc["balance"] == 1000 - 300 - 150 + 100 and acc["held"] == 0, acc
    r = await client.get(f"/v1/accounts/{a}/entries", params={"limit": 2})
    assert r.status_code == 200 and r.json()["has_more"], r.text
    r = await client.get("/health/ready"); print(r.json())
    r = await client.get("/metrics"); assert b"paycluster_payments" in r.content
