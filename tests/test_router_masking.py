"""The geo router masks what it echoes in error bodies by the nodes' one rule.

A real router process (`python -m geo_router`, as the lab starts it) in front of two
regions that do not answer: every error it builds itself - on the public listener (the
proxy and /v1/resolve) and on the admin listener - comes from input a client chose, and a
card number or an API key in that input must come back masked, exactly as a node would
mask it (`region_node.redact.error_body`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest

from cluster.lab import RouterProcess, start_router
from cluster.servers import free_port
from geo_router.errors import RouterError
from region_node.errors import PaymentError

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

CARD = "4111111111111111"
CARD_SPACED = "4111 1111 1111 1111"
MASKED = "411111******1111"
KEY = "pck_abcdef012345_" + "Zq8" * 14
KEY_MASKED = "pck_abcdef012345_****"


@pytest.fixture(scope="module")
def router(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RouterProcess]:
    """A router whose catalog names us-east and eu-west at ports nobody listens on; it is
    stopped by its pid even on failure."""
    data_dir = tmp_path_factory.mktemp("router-masking")
    catalog = data_dir / "catalog.json"
    catalog.write_text(json.dumps({"regions": [
        {"name": name, "endpoint": f"http://127.0.0.1:{free_port()}"}
        for name in ("us-east", "eu-west")]}))
    proc = start_router(data_dir, "us-east", {
        "PAYCLUSTER_ROUTER_CATALOG_FILE": str(catalog),
        "PAYCLUSTER_ROUTER_PROBE_INTERVAL_SECONDS": "0.5",
        "PAYCLUSTER_ROUTER_PROBE_TIMEOUT_SECONDS": "0.2"})
    try:
        yield proc
    finally:
        proc.stop()


def _masked(resp: httpx.Response, status: int, code: str, *secrets: str) -> dict[str, str]:
    """The body is the error shape, with `code`, and none of `secrets` in it."""
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert err["code"] == code and err["type"] and err["message"]
    for secret in secrets:
        assert secret not in resp.text
    return dict(err)


def test_public_listener_masks_what_it_echoes(router: RouterProcess) -> None:
    with httpx.Client(base_url=router.url, timeout=10) as http:
        # /v1/resolve: an id that is no id (a card, as someone pasted it).
        err = _masked(http.get("/v1/resolve", params={"id": CARD}), 400, "invalid_id", CARD)
        assert MASKED in err["message"]
        err = _masked(http.get("/v1/resolve", params={"id": CARD_SPACED}), 400, "invalid_id",
                      CARD_SPACED)
        assert "411111******1111" in err["message"]
        # A region name that is an API key.
        err = _masked(http.get("/v1/resolve", params={"client_region": KEY}), 400,
                      "unknown_region", KEY)
        assert KEY_MASKED in err["message"]
        # The proxy: the location header is the router's to refuse, before any region.
        err = _masked(http.get("/v1/accounts", headers={"X-Client-Region": CARD}), 400,
                      "unknown_region", CARD)
        assert MASKED in err["message"] and err["param"] == "X-Client-Region"


def test_admin_listener_masks_what_it_echoes(router: RouterProcess) -> None:
    with httpx.Client(base_url=router.admin_url, timeout=10) as http:
        err = _masked(http.get(f"/admin/regions/{CARD}"), 404, "unknown_region", CARD)
        assert MASKED in err["message"]
        _masked(http.post(f"/admin/regions/{KEY}/drain"), 404, "unknown_region", KEY)
        _masked(http.put(f"/admin/regions/{CARD}/weight", json={"weight": 5}), 404,
                "unknown_region", CARD)


@pytest.mark.parametrize("text", [
    f"Unknown region '{CARD}'", f"card {CARD_SPACED} and key {KEY}",
    "Bearer abcdefghijklmnop", "epoch=4111111111111111", "nothing to hide",
])
def test_router_and_node_bodies_follow_one_rule(text: str) -> None:
    # The same fields give the same body in both processes (no second copy of the rule).
    node = PaymentError(text, code="some_code", param=text)
    node.type = "invalid_request_error"
    assert RouterError(400, "invalid_request_error", "some_code", text, text).to_body() == \
        node.to_body()
