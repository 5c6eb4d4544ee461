"""The geo router's decisions, without servers: table-driven tests of where a client is,
which region is nearest, how states, weights and owner preference change the choice, the
fall/rise hysteresis, and the headers the proxy sends upstream."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from geo_router.catalog import KNOWN_LOCATIONS, CatalogError, load_catalog, parse_catalog
from geo_router.geo import GeoPoint, great_circle_km, parse_point
from geo_router.health import ProbeResult, RegionHealth
from geo_router.locate import ClientLocation, LocationError, Locator
from geo_router.overrides import OverrideStore
from geo_router.owners import HomeFinder, OwnerMap, body_names_owner, wants_owner
from geo_router.policy import Candidate, NoRoute, State, choose
from geo_router.proxy import parse_traceparent, upstream_headers

H, DG, DN, DR = State.HEALTHY, State.DEGRADED, State.DOWN, State.DRAINING
LAB = ("us-east", "eu-west", "ap-southeast")


def loc(name: str) -> GeoPoint:
    return KNOWN_LOCATIONS[name][1]


def regions(states: dict[str, State] | None = None, weights: dict[str, int] | None = None,
            names: tuple[str, ...] = LAB) -> list[Candidate]:
    """The lab's regions (all healthy, weight 100 unless given)."""
    states, weights = states or {}, weights or {}
    return [Candidate(n, loc(n), states.get(n, H), weights.get(n, 100)) for n in names]


def at_region(name: str) -> ClientLocation:
    return ClientLocation("header-region", loc(name), name)


def at(point: str) -> ClientLocation:
    return ClientLocation("header-geo", parse_point(point))


# ----------------------------------------------------------------------------- location

LOCATOR = Locator(lambda n: loc(n) if n in KNOWN_LOCATIONS else None,
                  {"10.0.0.0/8": "eu-west", "10.1.0.0/16": "ap-southeast",
                   "192.0.2.0/24": "-23.5,-46.6", "2001:db8::/32": "us-west"},
                  default="us-east")


@pytest.mark.parametrize(("region", "geo", "ip", "source", "want_region", "want_point"), [
    # An explicit region wins over everything else.
    ("eu-west", "1.3,103.8", "10.1.2.3", "header-region", "eu-west", loc("eu-west")),
    # A region the cluster does not run is placed where that region is.
    ("sa-east", None, None, "header-region", "sa-east", loc("sa-east")),
    # Then a point.
    (None, "35.68,139.69", "10.1.2.3", "header-geo", None, GeoPoint(35.68, 139.69)),
    (None, " -33.9 , 151.2 ", None, "header-geo", None, GeoPoint(-33.9, 151.2)),
    # Then the CIDR table, longest prefix first; IPv6 too; a point as a value.
    (None, None, "10.1.2.3", "cidr", "ap-southeast", loc("ap-southeast")),
    (None, None, "10.200.0.1", "cidr", "eu-west", loc("eu-west")),
    (None, None, "192.0.2.77", "cidr", None, GeoPoint(-23.5, -46.6)),
    (None, None, "2001:db8::1", "cidr", "us-west", loc("us-west")),
    # Then the default: an address outside the table, no address, garbage address.
    (None, None, "127.0.0.1", "default", "us-east", loc("us-east")),
    (None, None, None, "default", "us-east", loc("us-east")),
    (None, None, "not-an-ip", "default", "us-east", loc("us-east")),
])
def test_location_sources_in_order(region: str | None, geo: str | None, ip: str | None,
                                   source: str, want_region: str | None,
                                   want_point: GeoPoint) -> None:
    found = LOCATOR.locate(region, geo, ip)
    assert (found.source, found.region, found.point) == (source, want_region, want_point)


@pytest.mark.parametrize(("region", "geo", "code", "param"), [
    ("mars-north", None, "unknown_region", "X-Client-Region"),
    (None, "53.3", "invalid_geo", "X-Client-Geo"),
    (None, "91,0", "invalid_geo", "X-Client-Geo"),
    (None, "abc,def", "invalid_geo", "X-Client-Geo"),
])
def test_a_bad_location_header_is_the_clients_error(region: str | None, geo: str | None,
                                                    code: str, param: str) -> None:
    with pytest.raises(LocationError) as err:
        LOCATOR.locate(region, geo, "10.1.2.3")
    assert (err.value.code, err.value.param) == (code, param)


@pytest.mark.parametrize(("table", "default"), [
    ({"10.0.0.0/33": "eu-west"}, "us-east"),
    ({"10.0.0.0/8": "atlantis"}, "us-east"),
    ({}, "nowhere"),
])
def test_a_bad_location_config_is_refused_at_start(table: dict[str, str], default: str) -> None:
    with pytest.raises(ValueError):
        Locator(lambda n: loc(n) if n in KNOWN_LOCATIONS else None, table, default)


def test_great_circle_distances() -> None:
    # Dublin - N. Virginia is about 5,450 km; a point is 0 km from itself; symmetric.
    assert great_circle_km(loc("eu-west"), loc("us-east")) == pytest.approx(5450, rel=0.02)
    assert great_circle_km(loc("ap-southeast"), loc("ap-southeast")) == 0
    assert great_circle_km(loc("us-east"), loc("sa-east")) == pytest.approx(
        great_circle_km(loc("sa-east"), loc("us-east")))


# ----------------------------------------------------------------------------- nearest

@pytest.mark.parametrize(("client", "want"), [
    (at_region("us-east"), "us-east"),
    (at_region("eu-west"), "eu-west"),
    (at_region("ap-southeast"), "ap-southeast"),
    (at("48.86,2.35"), "eu-west"),          # Paris
    (at("35.68,139.69"), "ap-southeast"),   # Tokyo
    (at("37.77,-122.42"), "us-east"),       # San Francisco
    (at("-23.55,-46.63"), "us-east"),       # Sao Paulo
    (at("-33.87,151.21"), "ap-southeast"),  # Sydney
    (at("25.2,55.27"), "ap-southeast"),     # Dubai: 5,800 km to Singapore, 5,900 to Dublin
    (at("30.04,31.24"), "eu-west"),         # Cairo
    (at_region("us-west"), "us-east"),      # a region the cluster does not run
])
def test_nearest_region(client: ClientLocation, want: str) -> None:
    decision = choose(regions(), client, client_key="c")
    dist = {n: great_circle_km(client.point, loc(n)) for n in LAB}
    assert decision.region == min(dist, key=dist.__getitem__) == want
    assert decision.reason == "nearest" and decision.metric == "km"
    # The rest, nearest first: where a safe request is retried.
    assert list(decision.order) == sorted(LAB, key=dist.__getitem__)


def test_latency_table_overrides_geography_when_it_covers_every_region() -> None:
    table = {"us-east": {"us-east": 40.0, "eu-west": 5.0, "ap-southeast": 200.0}}
    decision = choose(regions(), at_region("us-east"), client_key="c", latency_ms=table)
    assert (decision.region, decision.metric) == ("eu-west", "ms")
    assert decision.order == ("eu-west", "us-east", "ap-southeast")
    # A row that misses a region would mix units: geography decides.
    partial = {"us-east": {"eu-west": 5.0}}
    assert choose(regions(), at_region("us-east"), client_key="c",
                  latency_ms=partial).region == "us-east"
    # A client located by a point has no row.
    assert choose(regions(), at("38.9,-77.0"), client_key="c", latency_ms=table
                  ).metric == "km"


# ----------------------------------------------------------------------------- states

@pytest.mark.parametrize(("client", "states", "want", "reason", "skipped"), [
    ("us-east", {"us-east": DN}, "eu-west", "failover", {"us-east": "down"}),
    ("us-east", {"us-east": DR}, "eu-west", "failover", {"us-east": "draining"}),
    ("us-east", {"us-east": DN, "eu-west": DN}, "ap-southeast", "failover",
     {"us-east": "down", "eu-west": "down"}),
    # Degraded: still routable, but after every healthy region, however far.
    ("us-east", {"us-east": DG}, "eu-west", "failover", {"us-east": "degraded"}),
    ("us-east", {"us-east": DG, "eu-west": DN}, "ap-southeast", "failover",
     {"us-east": "degraded", "eu-west": "down"}),
    # All degraded: nearest degraded one.
    ("us-east", dict.fromkeys(LAB, DG), "us-east", "nearest", {}),
    ("ap-southeast", {"ap-southeast": DG, "eu-west": DN, "us-east": DN}, "ap-southeast",
     "nearest", {}),
    # Only the far region is left.
    ("eu-west", {"eu-west": DR, "us-east": DN}, "ap-southeast", "failover",
     {"eu-west": "draining", "us-east": "down"}),
    # Something farther being down changes nothing.
    ("eu-west", {"ap-southeast": DN}, "eu-west", "nearest", {}),
])
def test_states(client: str, states: dict[str, State], want: str, reason: str,
                skipped: dict[str, str]) -> None:
    decision = choose(regions(states), at_region(client), client_key="c")
    assert (decision.region, decision.reason, dict(decision.skipped)) == (want, reason, skipped)
    # Down and draining regions are never in the failover order either.
    assert not {n for n in decision.order if states.get(n) in (DN, DR)}


@pytest.mark.parametrize("states", [dict.fromkeys(LAB, DN), dict.fromkeys(LAB, DR),
                                    {"us-east": DN, "eu-west": DR, "ap-southeast": DN}])
def test_no_routable_region_is_no_route(states: dict[str, State]) -> None:
    with pytest.raises(NoRoute) as err:
        choose(regions(states), at_region("us-east"), client_key="c")
    assert err.value.states == states


# ----------------------------------------------------------------------------- weights

def share(cands: list[Candidate], client: ClientLocation, n: int = 2000,
          **kw: object) -> dict[str, float]:
    """Fraction of n distinct clients sent to each region."""
    counts = Counter(choose(cands, client, client_key=f"client-{i}", **kw).region  # type: ignore[arg-type]
                     for i in range(n))
    return {name: counts[name] / n for name in LAB}


@pytest.mark.parametrize(("weights", "expect"), [
    ({}, {"us-east": 1.0}),
    ({"us-east": 0}, {"eu-west": 1.0}),
    ({"us-east": 30}, {"us-east": 0.3, "eu-west": 0.7}),
    ({"us-east": 80}, {"us-east": 0.8, "eu-west": 0.2}),
    # What eu-west passes on goes to the next one.
    ({"us-east": 50, "eu-west": 50}, {"us-east": 0.5, "eu-west": 0.25, "ap-southeast": 0.25}),
    # Weight 0 everywhere: the last resort is the last region, not an error.
    (dict.fromkeys(LAB, 0), {"ap-southeast": 1.0}),
])
def test_weights_shift_traffic_gradually(weights: dict[str, int],
                                         expect: dict[str, float]) -> None:
    got = share(regions(weights=weights), at_region("us-east"))
    for name in LAB:
        assert got[name] == pytest.approx(expect.get(name, 0.0), abs=0.04), got


@pytest.mark.parametrize(("weights", "expect"), [
    ({}, 0.5),
    ({"west": 300 // 4, "east": 100 // 4}, 0.75),
    ({"east": 0}, 1.0),
])
def test_weights_break_ties(weights: dict[str, int], expect: float) -> None:
    # Two regions equally far from the client (within tie_km): the weights split it.
    west, east = GeoPoint(10.0, -0.1), GeoPoint(10.0, 0.1)
    cands = [Candidate("west", west, H, weights.get("west", 100)),
             Candidate("east", east, H, weights.get("east", 100))]
    n = 2000
    got = sum(choose(cands, at("10,0"), client_key=f"k{i}").region == "west"
              for i in range(n)) / n
    assert got == pytest.approx(expect, abs=0.04)
    if weights:
        return
    # Beyond the tolerance it is plain nearest.
    assert {choose(cands, at("10,-0.05"), client_key=f"k{i}", tie_km=1.0).region
            for i in range(50)} == {"west"}


def test_same_client_same_answer_on_every_router() -> None:
    # Stateless: the split is a hash of the client key, not a random draw.
    cands = regions(weights={"us-east": 50})
    first = [choose(cands, at_region("us-east"), client_key=f"k{i}").region for i in range(200)]
    again = [choose(cands, at_region("us-east"), client_key=f"k{i}").region for i in range(200)]
    assert first == again and set(first) == {"us-east", "eu-west"}


# ----------------------------------------------------------------------------- owner

@pytest.mark.parametrize(("owner", "states", "weights", "want", "reason"), [
    ("ap-southeast", {}, {}, "ap-southeast", "owner"),
    ("us-east", {}, {}, "us-east", "owner"),
    (None, {}, {}, "us-east", "nearest"),
    # Only a healthy owner with traffic allowed is preferred.
    ("ap-southeast", {"ap-southeast": DG}, {}, "us-east", "nearest"),
    ("ap-southeast", {"ap-southeast": DN}, {}, "us-east", "nearest"),
    ("ap-southeast", {"ap-southeast": DR}, {}, "us-east", "nearest"),
    ("ap-southeast", {}, {"ap-southeast": 0}, "us-east", "nearest"),
    ("ap-southeast", {"us-east": DN}, {}, "ap-southeast", "owner"),
    ("sa-east", {}, {}, "us-east", "nearest"),  # not in the catalog
])
def test_owner_preference(owner: str | None, states: dict[str, State],
                          weights: dict[str, int], want: str, reason: str) -> None:
    decision = choose(regions(states, weights), at_region("us-east"), client_key="c",
                      owner=owner)
    assert (decision.region, decision.reason) == (want, reason)
    assert decision.order[0] == want and len(set(decision.order)) == len(decision.order)


HOMES = HomeFinder()
ID = {"us-east": "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a01",
      "eu-west": "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a02",
      "ap-southeast": "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a03"}


@pytest.mark.parametrize(("method", "path", "query", "body", "home"), [
    ("POST", f"/v1/accounts/{ID['eu-west']}/deposits", "", b"", "eu-west"),
    ("POST", f"/v1/payments/{ID['ap-southeast']}/capture", "", b"", "ap-southeast"),
    ("GET", f"/v1/accounts/{ID['us-east']}", "consistency=strong", b"", "us-east"),
    ("POST", "/v1/payments", "", json.dumps({"payer": ID["eu-west"]}).encode(), "eu-west"),
    ("POST", "/v1/orders", "", json.dumps({"payer": ID["us-east"]}).encode(), "us-east"),
    ("POST", "/v1/accounts", "", b'{"currency": "USD", "home_region": "ap-southeast"}',
     "ap-southeast"),
    # No owner: the receiving region is the home; a local read; garbage; unknown stamps.
    ("POST", "/v1/accounts", "", b'{"currency": "USD"}', None),
    ("GET", f"/v1/accounts/{ID['us-east']}", "", b"", None),
    ("POST", "/v1/payments", "", b"not json", None),
    ("POST", "/v1/payments", "", b'{"payer": "nope"}', None),
    ("POST", "/v1/accounts/0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4aff/deposits", "", b"", None),
])
def test_the_home_a_request_names(method: str, path: str, query: str, body: bytes,
                                  home: str | None) -> None:
    found = None
    if wants_owner(method, query):
        found = HOMES.home_in_path(path)
        if found is None and body_names_owner(method, path):
            found = HOMES.home_in_body(path, body)
    assert found == home


def test_owner_map_follows_the_nodes_and_defaults_to_home() -> None:
    owners = OwnerMap()
    assert owners.owner_of("eu-west") == "eu-west" and owners.owner_of(None) is None
    owners.merge([{"region": "us-east", "ownership": [
        {"home_region": "eu-west", "serving_region": "us-east", "epoch": 2}]}])
    assert owners.owner_of("eu-west") == "us-east" and owners.epochs == {"eu-west": 2}


def answer(region: str, *rows: tuple[str, str, int, bool]) -> dict[str, object]:
    """A `GET /v1/cluster/ownership` answer as a region node gives it
    (region_node/api/cluster_info.py): its own name and one row per home region."""
    return {"region": region, "ownership": [
        {"home_region": home, "serving_region": serving, "epoch": epoch, "banned": banned}
        for home, serving, epoch, banned in rows]}


# us-east crashed (or was cut off) and eu-west took its home over at epoch 7; us-east's own
# copy, isolated, still says it serves itself at epoch 1.
STALE_US = answer("us-east", ("us-east", "us-east", 1, False), ("eu-west", "eu-west", 1, False),
                  ("ap-southeast", "ap-southeast", 1, False))
FRESH_EU = answer("eu-west", ("us-east", "eu-west", 7, False), ("eu-west", "eu-west", 1, False),
                  ("ap-southeast", "ap-southeast", 1, False))
FRESH_AP = answer("ap-southeast", ("us-east", "eu-west", 7, False),
                  ("eu-west", "eu-west", 1, False), ("ap-southeast", "ap-southeast", 1, False))


@pytest.mark.parametrize("order", [(STALE_US, FRESH_EU, FRESH_AP), (FRESH_AP, STALE_US, FRESH_EU),
                                   (FRESH_EU, STALE_US)])
def test_owner_map_merges_every_region_and_the_highest_epoch_wins(
        order: tuple[dict[str, object], ...]) -> None:
    owners = OwnerMap()
    owners.merge(order)
    # The stale first region in catalog order no longer decides: whatever the order.
    assert owners.owner_of("us-east") == "eu-west" and owners.epochs["us-east"] == 7
    assert owners.owner_of("ap-southeast") == "ap-southeast"
    assert owners.sources["us-east"] in {"eu-west", "ap-southeast"}
    # Equal epochs are the same row: the first answer that gave it is named.
    assert owners.sources["eu-west"] == order[0]["region"]
    shown = owners.to_json()
    assert shown["serving"]["us-east"] == "eu-west" and shown["epochs"]["us-east"] == 7
    assert shown["sources"] == owners.sources and shown["updated_at"] is not None


def test_owner_map_never_goes_back_to_a_lower_epoch() -> None:
    owners = OwnerMap()
    owners.merge([FRESH_EU, STALE_US])
    # A later round in which only the stale region answered changes nothing...
    owners.merge([STALE_US])
    assert owners.owner_of("us-east") == "eu-west" and owners.sources["us-east"] == "eu-west"
    # ...while a newer takeover (us-east back at epoch 9) replaces the row.
    owners.merge([answer("us-east", ("us-east", "us-east", 9, False))])
    assert (owners.owner_of("us-east"), owners.epochs["us-east"]) == ("us-east", 9)
    assert owners.owner_of("eu-west") == "eu-west"  # rows not in the answer stay


def test_owner_map_keeps_a_ban_any_region_has_seen() -> None:
    owners = OwnerMap()
    # A planned handover: eu-west banned epoch 3 in its store; us-east has not seen it yet.
    owners.merge([answer("us-east", ("eu-west", "eu-west", 3, False)),
                  answer("eu-west", ("eu-west", "eu-west", 3, True))])
    assert owners.banned == {"eu-west": True} and owners.owner_of("eu-west") == "eu-west"


@pytest.mark.parametrize("bad", [{"region": "us-east"}, {"ownership": "none"},
                                 {"ownership": [{"home_region": "us-east"}]},
                                 {"ownership": [{"home_region": "x", "serving_region": "y",
                                                 "epoch": "seven"}]}])
def test_a_malformed_answer_changes_nothing(bad: dict[str, object]) -> None:
    owners = OwnerMap()
    owners.merge([FRESH_EU])
    before = owners.to_json()
    with pytest.raises((ValueError, KeyError, TypeError)):
        owners.merge([FRESH_AP, bad])
    assert owners.to_json() == before


# ----------------------------------------------------------------------------- hysteresis

OK, DEG, FAIL = (ProbeResult(True, "ready"), ProbeResult(True, "degraded"),
                 ProbeResult(False, "error", "ConnectError"))


@pytest.mark.parametrize(("probes", "states"), [
    # First probe decides at once.
    ([OK], [H]), ([FAIL], [DN]), ([DEG], [DG]),
    # fall = 3: two failures are not enough, a success resets the count.
    ([OK, FAIL, FAIL, OK, FAIL, FAIL, FAIL], [H, H, H, H, H, H, DN]),
    # rise = 2: one success is not enough, a failure resets the count.
    ([FAIL, OK, FAIL, OK, OK], [DN, DN, DN, DN, H]),
    # Back as degraded if that is what it answers; quality follows the latest answer.
    ([FAIL, DEG, DEG, OK, DEG], [DN, DN, DG, H, DG]),
    ([OK, DEG, FAIL, DEG, FAIL, FAIL, FAIL], [H, DG, DG, DG, DG, DG, DN]),
])
def test_fall_and_rise_hysteresis(probes: list[ProbeResult], states: list[State]) -> None:
    health = RegionHealth("r")
    seen = []
    for result in probes:
        health.observe(result, fall=3, rise=2)
        seen.append(health.state)
    assert seen == states


def test_transitions_say_why() -> None:
    health = RegionHealth("r")
    assert health.observe(OK, 3, 2) is not None
    assert [health.observe(FAIL, 3, 2) for _ in range(2)] == [None, None]
    down = health.observe(FAIL, 3, 2)
    assert down is not None and (down.old, down.new) == (H, DN)
    assert "3 consecutive failed" in down.reason
    assert health.observe(OK, 3, 2) is None
    up = health.observe(OK, 3, 2)
    assert up is not None and up.new == H and "2 consecutive successful" in up.reason


# ----------------------------------------------------------------------------- headers

def hdrs(pairs: list[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    return [(k.encode(), v.encode()) for k, v in pairs]


def test_upstream_headers_like_a_proxy() -> None:
    client_trace = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    out = upstream_headers(hdrs([
        ("host", "pay.example"), ("connection", "keep-alive, x-secret-hop"),
        ("keep-alive", "timeout=5"), ("x-secret-hop", "1"), ("transfer-encoding", "chunked"),
        ("te", "trailers"), ("upgrade", "h2c"), ("content-type", "application/json"),
        ("idempotency-key", "k-1"), ("x-forwarded-for", "203.0.113.9"),
        ("traceparent", client_trace), ("tracestate", "vendor=1"), ("x-custom", "a"),
        ("x-custom", "b")]), client_ip="10.0.0.7", scheme="http", request_id="rid-1",
        span_id="1111222233334444")
    names = [k for k, _ in out]
    got = {k.decode(): v.decode() for k, v in out}
    # Hop-by-hop (also those Connection names) and Host are not forwarded.
    for hop in (b"host", b"connection", b"keep-alive", b"x-secret-hop", b"transfer-encoding",
                b"te", b"upgrade"):
        assert hop not in names
    # Everything else is kept, repeated headers too, in order.
    assert [v for k, v in out if k == b"x-custom"] == [b"a", b"b"]
    assert got["idempotency-key"] == "k-1" and got["tracestate"] == "vendor=1"
    assert got["x-forwarded-for"] == "203.0.113.9, 10.0.0.7"
    assert got["x-forwarded-proto"] == "http" and got["x-forwarded-host"] == "pay.example"
    assert got["x-request-id"] == "rid-1"
    # This hop is a child span of the client's: same trace, same flags, new span id.
    assert got["traceparent"] == "00-4bf92f3577b34da6a3ce929d0e0e4736-1111222233334444-01"


@pytest.mark.parametrize(("incoming", "expect"), [
    # No context: a new sampled trace.
    ([], {"traceparent": None}),
    # An invalid traceparent is replaced, not passed on.
    ([("traceparent", "00-zzzz-00f067aa0ba902b7-01")], {"traceparent": None}),
    # B3 single header: passed on as a child span; traceparent joins the same trace.
    ([("b3", "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1")],
     {"b3": "80f198ee56343ba864fe8b2a57d3eff7-1111222233334444-1-e457b5a2e4d86bd1",
      "traceparent": "00-80f198ee56343ba864fe8b2a57d3eff7-1111222233334444-01"}),
    # B3 multi headers with a 64-bit trace id.
    ([("x-b3-traceid", "a3ce929d0e0e4736"), ("x-b3-spanid", "00f067aa0ba902b7"),
      ("x-b3-sampled", "1")],
     {"x-b3-traceid": "a3ce929d0e0e4736", "x-b3-spanid": "1111222233334444",
      "x-b3-parentspanid": "00f067aa0ba902b7", "x-b3-sampled": "1",
      "traceparent": "00-0000000000000000a3ce929d0e0e4736-1111222233334444-01"}),
    # A bare sampling decision is passed on as is.
    ([("b3", "0")], {"b3": "0", "traceparent": None}),
])
def test_trace_context_passed_on_like_a_mesh(incoming: list[tuple[str, str]],
                                             expect: dict[str, str | None]) -> None:
    out = upstream_headers(hdrs(incoming), client_ip=None, scheme="http", request_id="r",
                           span_id="1111222233334444")
    got = {k.decode(): v.decode() for k, v in out}
    for name, value in expect.items():
        if value is None:
            parsed = parse_traceparent(got[name])
            assert parsed is not None and parsed[1] == "1111222233334444"
        else:
            assert got[name] == value
    assert "x-forwarded-for" not in got


# ----------------------------------------------------------------------------- catalog

def test_catalog_from_cluster_json_and_from_a_catalog_file(tmp_path: Path) -> None:
    lab = parse_catalog({"regions": {"us-east": {"api_url": "http://127.0.0.1:1"},
                                     "eu-west": {"api_url": "http://127.0.0.1:2/"}}})
    assert lab.names == ["us-east", "eu-west"]
    assert lab.get("eu-west").endpoint == "http://127.0.0.1:2"
    assert lab.get("eu-west").location == loc("eu-west") and lab.get("eu-west").weight == 100
    path = tmp_path / "catalog.json"
    path.write_text(json.dumps({"regions": [
        {"name": "edge-1", "endpoint": "https://edge1.example", "lat": 1.0, "lon": 2.0,
         "weight": 40}]}))
    explicit = load_catalog(path)
    assert explicit.get("edge-1").location == GeoPoint(1.0, 2.0)
    assert explicit.get("edge-1").weight == 40
    # Unknown names are placed by the built-in table, or not at all.
    assert lab.location_of("sa-east") == loc("sa-east") and lab.location_of("x") is None


@pytest.mark.parametrize("doc", [
    {"regions": [{"name": "atlantis", "endpoint": "http://a"}]},          # no location
    {"regions": [{"name": "us-east", "endpoint": "ftp://a"}]},            # not http
    {"regions": [{"name": "us-east", "endpoint": "http://a", "weight": 101}]},
    {"regions": [{"name": "us-east", "endpoint": "http://a"},
                 {"name": "us-east", "endpoint": "http://b"}]},           # duplicate
    {"nothing": []},
])
def test_bad_catalogs_are_refused(doc: dict[str, object]) -> None:
    with pytest.raises(CatalogError):
        parse_catalog(doc)


def test_overrides_are_shared_through_the_file(tmp_path: Path) -> None:
    path = tmp_path / "overrides.json"
    one, two = OverrideStore(path), OverrideStore(path)
    one.set_drained("eu-west", True)
    one.set_weight("us-east", 30)
    assert two.reload_if_changed() and two.drained == {"eu-west"}
    assert two.weights == {"us-east": 30}
    assert not two.reload_if_changed()  # nothing new
    two.set_drained("eu-west", False)   # the other router's change survives a write
    assert one.reload_if_changed() and one.drained == set() and one.weights == {"us-east": 30}
    with pytest.raises(ValueError):
        one.set_weight("us-east", 101)
    path.write_text("{ not json")        # a bad edit keeps the last good state
    assert not one.reload_if_changed() and one.weights == {"us-east": 30}
