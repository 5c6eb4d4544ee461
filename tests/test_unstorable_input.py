"""Strings PostgreSQL cannot store are the client's error (400), on every route.

PostgreSQL's text types cannot hold NUL (U+0000), and UTF-8 cannot encode an unpaired
surrogate (U+D800-U+DFFF, which JSON can spell as "\\ud800"). Such a string reaching
SQL was a 500 (found by schemathesis over /openapi.json: a NUL in a principal's name, in
`GET /v1/admin/audit?action=`). The node refuses them at its edge, once for every route:
in the path, in any query parameter, in any header (Idempotency-Key, ...) and anywhere in
a JSON body, with 400 `invalid_string` in the error shape naming where, before anything
is read from or written to the store. Also here: the ownership routes of the failover
guard without a body were a 500 (not JSON), now a 400.

The sweep walks the node's own OpenAPI document (every operation, every declared
parameter and body field), as schemathesis does, with an admin key.
"""

from __future__ import annotations

import json
import re
from typing import Any
from urllib.parse import quote

import httpx
import psycopg
import pytest

pytestmark = pytest.mark.integration

NUL = "\x00"
SURROGATE = "\ud800"
# Kept out of the sweep: the health and metrics endpoints take no input, and the
# OpenAPI document is what the sweep reads.
_SKIP = re.compile(r"^/(health/|metrics$|openapi\.json$|docs|redoc)")


def _counts(db_url: str) -> dict[str, int]:
    """Rows of the tables a request could write, by table."""
    with psycopg.connect(db_url) as conn:
        tables = [r[0] for r in conn.execute(
            "select tablename from pg_tables where schemaname = 'public' "
            "and tablename <> 'alembic_version'")]
        return {t: conn.execute(f'select count(*) from "{t}"').fetchone()[0]  # type: ignore[index]
                for t in tables}


def _invalid_string(resp: httpx.Response, param: str | None, what: str) -> None:
    assert resp.status_code == 400, f"{what}: {resp.status_code} {resp.text}"
    err = resp.json()["error"]
    assert set(err) <= {"type", "code", "message", "param"}, what
    assert (err["type"], err["code"]) == ("invalid_request_error", "invalid_string"), \
        f"{what}: {err}"
    assert err.get("param") == param, f"{what}: {err}"
    assert "cannot be stored" in err["message"]


def _json(doc: object) -> dict[str, Any]:
    """Request kwargs for a JSON body written with escapes (as most clients send it)."""
    return {"content": json.dumps(doc).encode(), "headers": {"content-type": "application/json"}}


async def _operations(client: httpx.AsyncClient) -> list[tuple[str, str, dict[str, Any],
                                                               dict[str, Any]]]:
    """(method, path template, operation, openapi doc) for every operation of the node."""
    resp = await client.get("/openapi.json")
    assert resp.status_code == 200
    doc = resp.json()
    ops = [(method.upper(), path, op, doc) for path, item in doc["paths"].items()
           if not _SKIP.match(path)
           for method, op in item.items() if method in ("get", "post", "put", "patch",
                                                         "delete")]
    assert len(ops) > 30  # the sweep is only as good as its coverage
    return ops


def _body_fields(op: dict[str, Any], doc: dict[str, Any]) -> list[str]:
    """Top-level properties of an operation's JSON body schema (empty if none)."""
    schema = (op.get("requestBody", {}).get("content", {}).get("application/json", {})
              .get("schema", {}))
    ref = schema.get("$ref") or next((s.get("$ref") for s in schema.get("anyOf", [])
                                      if "$ref" in s), None)
    if ref:
        schema = doc["components"]["schemas"][ref.rsplit("/", 1)[-1]]
    return sorted(schema.get("properties", {}))


def _fill(path: str, value: str = "acct_x") -> str:
    return re.sub(r"\{[^}]+\}", quote(value, safe=""), path)


# ---------------------------------------------------------------------- found by schemathesis


@pytest.mark.parametrize("action", ["ban", "release", "take"])
async def test_ownership_routes_without_a_body_are_400(client: httpx.AsyncClient,
                                                       action: str) -> None:
    resp = await client.post(f"/v1/admin/ownership/{action}")
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == "home_region"
    not_json = await client.post(f"/v1/admin/ownership/{action}", content=b"{home",
                                 headers={"content-type": "application/json"})
    assert not_json.status_code == 400 and not_json.json()["error"]["code"] == "invalid_json"
    not_object = await client.post(f"/v1/admin/ownership/{action}", json=["us-east"])
    assert not_object.status_code == 400, not_object.text


async def test_nul_in_a_principal_name_and_in_an_audit_filter(client: httpx.AsyncClient,
                                                              db_url: str) -> None:
    before = _counts(db_url)
    _invalid_string(await client.post("/v1/admin/principals",
                                      **_json({"name": f"ac{NUL}me", "role": "customer"})),
                    "name", "principal name")
    _invalid_string(await client.get("/v1/admin/audit", params={"action": NUL}), "action",
                    "audit filter")
    assert _counts(db_url) == before
    # The same requests without the NUL work: the refusal is about that character only,
    # and other non-ASCII text is stored and read back intact.
    made = await client.post("/v1/admin/principals",
                             **_json({"name": "Café Zürich 東京", "role": "customer"}))
    assert made.status_code == 201, made.text
    assert made.json()["name"] == "Café Zürich 東京"
    assert (await client.get("/v1/admin/audit", params={"action": "x"})).status_code == 200


# ---------------------------------------------------------------------------- the sweep


async def test_every_route_refuses_unstorable_strings(client: httpx.AsyncClient,
                                                      db_url: str) -> None:
    ops = await _operations(client)
    before = _counts(db_url)
    for method, path, op, doc in ops:
        what = f"{method} {path}"
        # Path parameters.
        if "{" in path:
            _invalid_string(await client.request(method, _fill(path, f"a{NUL}b")), None,
                            f"{what} (path)")
        # Every declared query parameter, and one the route does not know.
        names = [p["name"] for p in op.get("parameters", []) if p["in"] == "query"]
        for name in [*names, "unexpected"]:
            resp = await client.request(method, _fill(path), params={name: f"x{NUL}"})
            _invalid_string(resp, name, f"{what} (query {name})")
        # Headers: the Idempotency-Key every mutation may carry, and any other.
        for header in ("Idempotency-Key", "X-Anything"):
            resp = await client.request(method, _fill(path), headers={header: f"k{NUL}1"})
            _invalid_string(resp, header.lower(), f"{what} (header {header})")
        if method == "GET":
            continue
        # Every field of the body, a NUL and a lone surrogate; and one deep inside.
        for field in [*_body_fields(op, doc), "unexpected"]:
            for bad in (NUL, SURROGATE):
                resp = await client.request(method, _fill(path), **_json({field: f"v{bad}"}))
                _invalid_string(resp, field, f"{what} (body {field} {bad!r})")
        resp = await client.request(method, _fill(path), **_json(
            {"metadata": {"tags": ["ok", f"bad{NUL}"]}}))
        _invalid_string(resp, "metadata.tags.1", f"{what} (nested body)")
        resp = await client.request(method, _fill(path), **_json({f"k{NUL}": 1}))
        _invalid_string(resp, "k\\u0000", f"{what} (body key)")
        # A raw NUL byte in the body (not even JSON).
        resp = await client.request(method, _fill(path), content=b'{"a": "b\x00"}',
                                    headers={"content-type": "application/json"})
        _invalid_string(resp, None, f"{what} (raw NUL)")
    assert _counts(db_url) == before, "a refused request wrote something"


async def test_storable_strings_still_reach_every_route(client: httpx.AsyncClient) -> None:
    # The control for the sweep: the same requests with storable text are never refused
    # as invalid_string, and never a 500 (they fail or succeed on their own merits).
    for method, path, op, doc in await _operations(client):
        what = f"{method} {path}"
        fields = [*_body_fields(op, doc), "unexpected"] if method != "GET" else []
        requests = [client.request(method, _fill(path, "a\u00e9b"),
                                   params={"unexpected": "x\u00e9"},
                                   headers={"X-Anything": "k1"})]
        requests += [client.request(method, _fill(path), **_json({f: "v\u00e9\U0001f600"}))
                     for f in fields]
        for request in requests:
            resp = await request
            assert resp.status_code < 500, f"{what}: {resp.status_code} {resp.text}"
            if resp.status_code == 400:
                assert resp.json()["error"]["code"] != "invalid_string", f"{what}: {resp.text}"


async def test_a_request_id_with_a_nul_is_replaced_not_echoed(client: httpx.AsyncClient) -> None:
    resp = await client.get("/v1/accounts/acct_x", headers={"X-Request-Id": f"rid{NUL}1"})
    _invalid_string(resp, "x-request-id", "request id")
    # Our own id instead: the client's could not be logged, stored or sent back.
    assert re.fullmatch(r"[0-9a-f]{32}", resp.headers["x-request-id"])
