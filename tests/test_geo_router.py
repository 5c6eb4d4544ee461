"""The geo router on three real regions: two router processes in front of the lab's nodes
(PostgreSQL 18, Redis, NATS, region nodes, WAN emulator - nothing mocked).

What a user of the router would notice: each client served by its nearest region, the
request and trace ids carried through, writes sent straight to the data's owner, every
router answering the same, draining that moves new requests away without failing the
ones in flight, and a crashed region's clients served by the next nearest region after
`fall` failed probes - with GETs retried, requests without an Idempotency-Key never sent
twice - and back after `rise` good probes.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import psycopg
import pytest
from typer.testing import CliRunner

from cluster.cli import app
from cluster.lab import REGION_NAMES, Cluster, read_cluster, start_cluster
from cluster.servers import free_port
from geo_router.client import RouterAdmin, metric_value, resolve
from geo_router.owners import OwnerMap, OwnershipUnavailable
from tests.helpers import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.multiregion, pytest.mark.timeout(120)]

INTERVAL, FALL, RISE = 0.4, 3, 2
ROUTER_ENV = {"PAYCLUSTER_ROUTER_PROBE_INTERVAL_SECONDS": str(INTERVAL),
              "PAYCLUSTER_ROUTER_PROBE_TIMEOUT_SECONDS": "0.3",
              "PAYCLUSTER_ROUTER_FALL": str(FALL), "PAYCLUSTER_ROUTER_RISE": str(RISE),
              "PAYCLUSTER_ROUTER_OWNERSHIP_REFRESH_SECONDS": "1"}
WAIT = 30.0
"""Bound on every wait for a condition; a healthy run needs a small fraction of it. The
failover is held to the router's settings by counting probes (FALL failed ones mark a
region down, RISE good ones bring it back), not by timing it on a loaded machine."""
ROUTED, REASON, ATTEMPTS = "paycluster-routed-to", "paycluster-route-reason", \
    "paycluster-route-attempts"
SERVED_BY = "paycluster-served-by"


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Three regions at a tenth of the default WAN delays and two routers (deployed in
    us-east and eu-west) probing every 0.4 s; everything stopped even on failure."""
    cluster = start_cluster(tmp_path_factory.mktemp("georouter"), regions=3, wan_scale=0.1,
                            routers=2, router_env=ROUTER_ENV)
    try:
        yield cluster
    finally:
        cluster.stop()


def client(lab: Cluster, region: str | None = None, router: int = 0) -> httpx.Client:
    """An HTTP client of a router, located in `region` (X-Client-Region), that sends the
    lab's admin key (the router passes it on to the region)."""
    headers = {"X-Client-Region": region} if region else {}
    return httpx.Client(base_url=lab.routers[router].url, timeout=10,
                        headers={**headers, **lab.auth_headers()})


def open_account(http: httpx.Client, **body: Any) -> httpx.Response:
    resp = http.post("/v1/accounts", json={"currency": "USD", **body},
                     headers={"Idempotency-Key": f"gr-{uuid.uuid4()}"})
    assert resp.status_code == 201, resp.text
    return resp


def router_metric(lab: Cluster, name: str, router: int = 0, **labels: str) -> float:
    with RouterAdmin(lab.routers[router].admin_url) as admin:
        return metric_value(admin.metrics(), name, **labels)


# --------------------------------------------------------------------------- routing


def test_up_lists_the_routers_and_each_client_reaches_its_nearest_region(lab: Cluster) -> None:
    doc = read_cluster(lab.data_dir)
    assert [r["site"] for r in doc["routers"]] == ["us-east", "eu-west"]
    assert all(r["url"].startswith("http://127.0.0.1:") for r in doc["routers"])
    for name in REGION_NAMES:
        with client(lab, name) as http:
            resp = http.get("/health/ready")
        assert resp.status_code == 200 and resp.json()["region"] == name
        assert (resp.headers[ROUTED], resp.headers[REASON]) == (name, "nearest")
    places = {"48.86,2.35": "eu-west", "35.68,139.69": "ap-southeast",
              "40.71,-74.0": "us-east"}   # Paris, Tokyo, New York
    for point, want in places.items():
        with httpx.Client(base_url=lab.router_url, timeout=10) as http:
            assert http.get("/health/ready", headers={"X-Client-Geo": point}
                            ).json()["region"] == want
        # The DNS-style answer names the region's own endpoint, for a direct connection.
        answer = resolve(lab.router_url, geo=point)
        assert (answer["region"], answer["endpoint"]) == (want, lab.region(want).api_url)
        assert answer["ttl"] == 10 and answer["client"]["source"] == "header-geo"
    # No location at all: the router's own region (DNS brought the client to it).
    with httpx.Client(base_url=lab.routers[1].url, timeout=10) as http:
        assert http.get("/health/ready").json()["region"] == "eu-west"
    # The operator's view lists the routers and what each sees.
    status = CliRunner().invoke(app, ["status", "--json", "--data-dir", str(lab.data_dir)])
    report = __import__("json").loads(status.output)
    assert [r["states"] for r in report["routers"]] == [dict.fromkeys(REGION_NAMES,
                                                                      "healthy")] * 2


def test_requests_pass_through_intact_and_writes_go_to_the_owner(lab: Cluster) -> None:
    trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    key = f"gr-{uuid.uuid4()}"
    body = {"currency": "USD", "home_region": "eu-west"}
    with client(lab, "eu-west") as eu, client(lab, "ap-southeast") as ap:
        first = eu.post("/v1/accounts", json=body, headers={
            "Idempotency-Key": key, "x-request-id": "gr-req-1",
            "traceparent": f"00-{trace}-00f067aa0ba902b7-01"})
        assert first.status_code == 201, first.text
        assert first.headers["x-request-id"] == "gr-req-1"
        # The node continued our trace (its span's parent is the router's span).
        assert first.headers["traceresponse"].split("-")[1] == trace
        assert first.headers[SERVED_BY] == first.headers[ROUTED] == "eu-west"
        account = first.json()["id"]
        # The same request from a client in Singapore: sent straight to the owner (no
        # forwarding hop), which replays the stored answer.
        again = ap.post("/v1/accounts", json=body, headers={"Idempotency-Key": key})
        assert (again.headers[ROUTED], again.headers[REASON]) == ("eu-west", "owner")
        assert again.headers.get("idempotent-replayed") == "true"
        assert again.json()["id"] == account
        deposit = ap.post(f"/v1/accounts/{account}/deposits", json={"amount": 500},
                          headers={"Idempotency-Key": f"gr-{uuid.uuid4()}"})
        assert deposit.status_code == 201, deposit.text
        assert deposit.headers[ROUTED] == deposit.headers[SERVED_BY] == "eu-west"
        strong = ap.get(f"/v1/accounts/{account}", params={"consistency": "strong"})
        assert strong.headers[ROUTED] == "eu-west" and strong.json()["balance"] == 500
        # A local read stays in the client's region.
        local = ap.get(f"/v1/accounts/{account}")
        assert local.headers[ROUTED] == "ap-southeast"
        # The nodes' errors pass through untouched, in the one error shape...
        missing = ap.get("/v1/no-such-thing")
        assert missing.status_code == 404 and missing.json()["error"]["type"]
        # ...and so are the router's own.
        bad = eu.get("/v1/accounts", headers={"X-Client-Region": "atlantis"})
        assert bad.status_code == 400 and ROUTED not in bad.headers
        assert bad.json() == {"error": {
            "type": "invalid_request_error", "code": "unknown_region",
            "message": "Unknown region 'atlantis' in X-Client-Region",
            "param": "X-Client-Region"}}


def test_every_router_decides_the_same_and_weights_shift_gradually(lab: Cluster) -> None:
    one, two = (RouterAdmin(r.admin_url) for r in lab.routers)
    try:
        def answers(router: int, region: str, n: int = 100) -> list[str]:
            # GET /v1/resolve as n different clients (X-Client-Id keys the weighted split).
            with client(lab, region, router) as http:
                return [http.get("/v1/resolve", headers={"X-Client-Id": f"client-{i}"}
                                 ).json()["region"] for i in range(n)]

        for region in REGION_NAMES:
            assert answers(0, region, 5) == answers(1, region, 5) == [region] * 5
        one.set_weight("us-east", 50)
        # The other router follows through the shared overrides file.
        wait_for(lambda: two.regions()["regions"][0]["weight"] == 50, WAIT,
                 "router 2 to apply router 1's weight change")
        split = answers(0, "us-east")
        assert split == answers(1, "us-east")  # same client, same answer, on every router
        kept = split.count("us-east") / len(split)
        assert 0.3 < kept < 0.7 and set(split) == {"us-east", "eu-west"}, split
        one.set_weight("us-east", 0)
        wait_for(lambda: two.regions()["regions"][0]["weight"] == 0, WAIT,
                 "router 2 to apply weight 0")
        with client(lab, "us-east", router=1) as http:
            resp = http.get("/health/ready")
        assert (resp.headers[ROUTED], resp.headers[REASON]) == ("eu-west", "weighted")
    finally:
        one.set_weight("us-east", None)
        wait_for(lambda: two.regions()["regions"][0]["weight"] == 100, WAIT,
                 "the weight reset to reach router 2")
        one.close()
        two.close()


# --------------------------------------------------------------------------- drain


def test_drain_moves_new_requests_away_without_failing_in_flight_ones(lab: Cluster) -> None:
    runner, data = CliRunner(), ["--data-dir", str(lab.data_dir)]
    outcome: dict[str, Any] = {}
    release = threading.Event()

    def slow_upload() -> Iterator[bytes]:
        # The body's second half is held back until the drain is done and checked: the
        # request is in flight (streamed through the router to eu-west) the whole time.
        yield b'{"currency": '
        release.wait(WAIT)
        yield b'"USD"}'

    def in_flight() -> None:
        try:
            outcome["resp"] = httpx.post(
                f"{lab.router_url}/v1/accounts", content=slow_upload(), timeout=20,
                headers={"X-Client-Region": "eu-west", "content-type": "application/json",
                         **lab.auth_headers()})
        except httpx.HTTPError as exc:
            outcome["error"] = exc

    before = router_metric(lab, "paycluster_router_decisions_total", region="eu-west")
    worker = threading.Thread(target=in_flight)
    worker.start()
    try:
        wait_for(lambda: router_metric(lab, "paycluster_router_decisions_total",
                                       region="eu-west") > before, WAIT,
                 "the slow request to be routed to eu-west")
        drained = runner.invoke(app, ["router", "drain", "eu-west", *data])
        assert drained.exit_code == 0, drained.output
        assert drained.output.count("eu-west is draining") == 2  # both routers
        # New requests from Ireland go to the next nearest region, on both routers.
        for router in (0, 1):
            with client(lab, "eu-west", router) as http:
                resp = http.get("/health/ready")
            assert resp.status_code == 200
            assert (resp.headers[ROUTED], resp.headers[REASON]) == ("us-east", "failover")
        answer = resolve(lab.router_url, client_region="eu-west")
        assert answer["region"] == "us-east" and answer["skipped"] == {"eu-west": "draining"}
        with RouterAdmin(lab.routers[0].admin_url) as admin:
            view = next(r for r in admin.regions()["regions"] if r["name"] == "eu-west")
        assert (view["state"], view["probe_state"]) == ("draining", "healthy")
        # All of that happened while the request was in flight: not answered yet.
        assert worker.is_alive() and outcome == {}, outcome
        release.set()
        worker.join(WAIT)
        assert not worker.is_alive()
    finally:
        release.set()
        worker.join(WAIT)
        undrained = runner.invoke(app, ["router", "undrain", "eu-west", *data])
    assert "error" not in outcome, outcome.get("error")
    resp = outcome["resp"]
    # The request that was in flight when the drain came finished where it started.
    assert resp.status_code == 201, resp.text
    assert resp.headers[ROUTED] == resp.headers[SERVED_BY] == "eu-west"
    assert resp.json()["home_region"] == "eu-west"
    assert undrained.exit_code == 0, undrained.output
    with client(lab, "eu-west") as http:
        assert http.get("/health/ready").headers[ROUTED] == "eu-west"
    assert read_cluster(lab.data_dir)["routers"]  # still listed, still ours


def test_no_routable_region_is_a_503_in_the_error_shape(lab: Cluster) -> None:
    with RouterAdmin(lab.routers[0].admin_url) as admin:
        try:
            for name in REGION_NAMES:
                admin.drain(name)
            with client(lab, "us-east") as http:
                resp = http.get("/v1/accounts/anything")
            assert resp.status_code == 503 and resp.headers["retry-after"] == "1"
            err = resp.json()["error"]
            assert (err["type"], err["code"]) == ("api_error", "no_healthy_region")
            assert "us-east draining" in err["message"]
        finally:
            for name in REGION_NAMES:
                admin.undrain(name)


# --------------------------------------------------------------------------- ownership


def test_the_router_merges_every_regions_ownership_with_a_key_of_its_own(lab: Cluster) -> None:
    key = read_cluster(lab.data_dir)["router_key"]
    assert key.startswith("pck_") and key != lab.admin_key
    bearer = {"Authorization": f"Bearer {key}"}
    answers = []
    for name in REGION_NAMES:
        api = lab.region(name).api_url
        got = httpx.get(f"{api}/v1/cluster/ownership", headers=bearer, timeout=5)
        assert got.status_code == 200, got.text
        answers.append(got.json())
        # Least privilege: all the router's key may do is read; operator routes refuse it.
        denied = httpx.get(f"{api}/v1/replication/status", headers=bearer, timeout=5)
        assert denied.status_code == 403, denied.text
        assert denied.json()["error"]["code"] == "admin_required"
    expected = OwnerMap()
    expected.merge(answers)
    assert set(expected.serving) == set(REGION_NAMES)

    def router_view(router: int) -> dict[str, Any] | None:
        with RouterAdmin(lab.routers[router].admin_url) as admin:
            view: dict[str, Any] = admin.regions()["ownership"]
        return view if view["answered"] == list(REGION_NAMES) else None

    # Every router asks every region (the map is refreshed each second here).
    for router in range(len(lab.routers)):
        view = wait_for(lambda r=router: router_view(r), 10, "every region's ownership answer")
        assert view["asked"] == list(REGION_NAMES)
        assert (view["serving"], view["epochs"]) == (expected.serving, expected.epochs)
        assert set(view["sources"]) == set(REGION_NAMES)
        assert set(view["sources"].values()) <= set(REGION_NAMES)


def test_regions_that_do_not_answer_are_skipped_and_none_keeps_the_map(lab: Cluster) -> None:
    key = read_cluster(lab.data_dir)["router_key"]
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there: connection refused
    endpoints = {"nowhere": dead, **{n: lab.region(n).api_url for n in REGION_NAMES}}

    async def refresh(owners: OwnerMap, ends: dict[str, str], api_key: str) -> list[str]:
        async with httpx.AsyncClient(trust_env=False) as http:
            return await owners.refresh_all(http, ends, 2.0, api_key)

    owners = OwnerMap()
    assert asyncio.run(refresh(owners, endpoints, key)) == list(REGION_NAMES)
    assert owners.asked == ["nowhere", *REGION_NAMES] and owners.answered == list(REGION_NAMES)
    assert set(owners.serving) == set(REGION_NAMES)
    before = owners.to_json()
    # No answer at all (one region unreachable, the others refuse a wrong key): the map
    # stays as it was, and the error says why per region.
    with pytest.raises(OwnershipUnavailable) as failed:
        asyncio.run(refresh(owners, {"nowhere": dead, "us-east": endpoints["us-east"]},
                            "pck_aaaaaaaaaaaa_" + "b" * 40))
    assert set(failed.value.failures) == {"nowhere", "us-east"}
    assert "401" in failed.value.failures["us-east"]
    after = owners.to_json()
    assert (after["asked"], after["answered"]) == (["nowhere", "us-east"], [])
    kept = ("serving", "epochs", "banned", "sources", "updated_at")
    assert [after[k] for k in kept] == [before[k] for k in kept]


# --------------------------------------------------------------------------- failover


@dataclass
class Traffic:
    """A client near `region` that keeps reading an account (GET: safe to retry),
    opening accounts without an Idempotency-Key (not safe: never sent twice) and with one
    (safe: the router may retry it on the next region; a request retried so is sent again
    with the same key, and must be replayed, not run twice)."""

    router_url: str
    account: str
    auth: dict[str, str]
    region: str = "us-east"
    gets: list[dict[str, Any]] = field(default_factory=list)
    posts: list[dict[str, Any]] = field(default_factory=list)
    keyed: list[dict[str, Any]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self, period: float = 0.03, max_seconds: float = 60.0) -> None:
        deadline = time.monotonic() + max_seconds
        with httpx.Client(base_url=self.router_url, timeout=10,
                          headers={"X-Client-Region": self.region, **self.auth}) as http:
            while not self.stop.is_set() and time.monotonic() < deadline:
                key = {"Idempotency-Key": f"gr-keyed-{uuid.uuid4()}"}
                for kind, call in (("get", lambda: http.get(f"/v1/accounts/{self.account}")),
                                   ("post", lambda: http.post("/v1/accounts",
                                                              json={"currency": "USD"})),
                                   ("keyed", lambda key=key: http.post(
                                       "/v1/accounts", headers=key, json={"currency": "USD"}))):
                    at = time.monotonic()
                    try:
                        resp = call()
                    except httpx.HTTPError as exc:
                        record: dict[str, Any] = {"at": at, "done": time.monotonic(),
                                                  "status": None, "error": str(exc)}
                    else:
                        record = {"at": at, "done": time.monotonic(),
                                  "status": resp.status_code,
                                  "routed": resp.headers.get(ROUTED),
                                  "reason": resp.headers.get(REASON),
                                  "attempts": int(resp.headers.get(ATTEMPTS, 0)),
                                  "body": resp.json()}
                    if kind == "keyed" and record.get("attempts") == 2:
                        again = http.post("/v1/accounts", headers=key,
                                          json={"currency": "USD"})
                        record["again"] = (again.status_code, again.json().get("id"),
                                           again.headers.get("idempotent-replayed"))
                        record["again_attempts"] = int(again.headers.get(ATTEMPTS, 0))
                    {"get": self.gets, "post": self.posts, "keyed": self.keyed}[kind].append(
                        record)
                time.sleep(period)


def accounts_homed(lab: Cluster, home: str) -> int:
    """Accounts homed in `home`, counted in that region's own database (its writer)."""
    with psycopg.connect(lab.region(home).dsn, autocommit=True) as conn:
        row = conn.execute("select count(*) from accounts where home_region = %s",
                           (home,)).fetchone()
    return int(row[0]) if row else 0


def _transition_probes(view: dict[str, Any], at: float, count: int) -> list[bool]:
    """The outcome of the `count` + 1 probes up to a transition at `at` (wall clock)."""
    upto = [p for p in view["history"] if p["at"] <= at]
    return [p["ok"] for p in upto[-count - 1:]]


@pytest.mark.chaos
def test_crashed_region_fails_over_after_fall_probes_and_returns_after_rise(
        lab: Cluster) -> None:
    with client(lab, "eu-west") as eu:
        account = open_account(eu, home_region="eu-west").json()["id"]
    # Readable everywhere (a local read in us-east) before the crash.
    wait_for(lambda: httpx.get(f"{lab.region('us-east').api_url}/v1/accounts/{account}",
                               timeout=5, headers=lab.auth_headers()).status_code == 200, WAIT,
             "the account to replicate to us-east")
    homes = ("us-east", "eu-west")
    created_before = {h: accounts_homed(lab, h) for h in homes}
    metrics_before = {name: router_metric(lab, name) for name in (
        "paycluster_router_failovers_total", "paycluster_router_not_retried_total")}
    traffic = Traffic(lab.router_url, account, lab.auth_headers())
    worker = threading.Thread(target=traffic.run, kwargs={"max_seconds": 6 * WAIT})
    worker.start()

    def gets_after(t: float, routed: str) -> bool:
        return sum(1 for g in traffic.gets if g["at"] > t and g.get("routed") == routed) >= 3

    try:
        wait_for(lambda: gets_after(0, "us-east"), WAIT, "traffic served by us-east first")
        killed_at, killed_wall = time.monotonic(), time.time()
        lab.region("us-east").node.kill()  # type: ignore[union-attr]
        dead_at = time.monotonic()  # (kill returns once the process is gone)
        # Clients near us-east are sent to the next nearest region, eu-west.
        wait_for(lambda: resolve(lab.router_url, client_region="us-east")["region"]
                 == "eu-west", WAIT, "the router to fail us-east over")
        detected_at = time.monotonic()
        print(f"us-east failed over {detected_at - killed_at:.2f}s after the kill "
              f"(fall x interval + interval = {FALL * INTERVAL + INTERVAL:.2f}s)")
        for router in lab.routers:  # every router reaches the same state on its own
            with router.admin() as admin:
                # (A loaded machine may have timed a probe out before: only what follows
                # the kill counts.)
                def marked_down(admin: RouterAdmin = admin) -> list[dict[str, Any]]:
                    return [e for e in admin.events() if e["region"] == "us-east"
                            and e["to"] == "down" and e["at"] >= killed_wall]

                down = wait_for(marked_down, WAIT, f"router ({router.site}) to mark us-east "
                                "down")
                view = next(r for r in admin.regions()["regions"] if r["name"] == "us-east")
            assert len(down) == 1, down
            assert f"{FALL} consecutive failed" in down[0]["reason"]
            # Down after exactly `fall` failed probes: the one before them was good.
            assert _transition_probes(view, down[0]["at"], FALL) == [True] + [False] * FALL, \
                view["history"]
        wait_for(lambda: gets_after(detected_at, "eu-west"), WAIT,
                 "traffic served by eu-west meanwhile")
        restarting_at = time.monotonic()
        lab.restart_node("us-east")
        restarted_wall = time.time()
        wait_for(lambda: resolve(lab.router_url, client_region="us-east")["region"]
                 == "us-east", WAIT, "us-east to come back")
        back_at = time.monotonic()
        print(f"us-east back {time.time() - restarted_wall:.2f}s after its node was ready")
        wait_for(lambda: gets_after(back_at + 0.1, "us-east"), WAIT,
                 "traffic served by us-east again")
    finally:
        traffic.stop.set()
        worker.join(WAIT)
    assert not worker.is_alive()

    # Back after exactly `rise` good probes: at the transition, the last RISE probes were
    # good and the one before them failed.
    with lab.routers[0].admin() as admin:
        since_kill = [e for e in admin.events()
                      if e["region"] == "us-east" and e["at"] >= killed_wall]
        view = next(r for r in admin.regions()["regions"] if r["name"] == "us-east")
    assert [e["to"] for e in since_kill] == ["down", "healthy"], since_kill
    up = since_kill[1:]
    assert f"{RISE} consecutive successful" in up[-1]["reason"]
    assert _transition_probes(view, up[-1]["at"], RISE) == [False] + [True] * RISE, \
        view["history"]
    assert up[-1]["at"] >= restarted_wall - 5  # it came back for the restarted node

    # GETs never failed: retried on eu-west while the router still believed in us-east,
    # then sent to eu-west directly, then to us-east again.
    gets = traffic.gets
    assert gets and all(g["status"] == 200 for g in gets), [g for g in gets
                                                            if g["status"] != 200][:3]
    during = [g for g in gets if dead_at < g["at"] < detected_at]
    assert all(g["routed"] == "eu-west" for g in during), during
    retried = [g for g in gets if g["attempts"] == 2]
    assert retried and all(g["reason"] == "failover" for g in retried)
    after = [g for g in gets if detected_at + 0.1 < g["at"] < restarting_at]
    assert after and all((g["routed"], g["attempts"]) == ("eu-west", 1) for g in after)
    assert [g["routed"] for g in gets if g["at"] > back_at + 0.1] and all(
        g["routed"] == "us-east" for g in gets if g["at"] > back_at + 0.1)

    # Requests without an Idempotency-Key were never sent twice: each reached at most one
    # region (one attempt); those that hit the dead region got the clear 503, or a 502 if
    # it died in the middle of its answer (rare: the request may have run there).
    posts = traffic.posts
    assert all(p["status"] in (201, 502, 503) and p["attempts"] == 1 for p in posts), [
        p for p in posts if p["status"] not in (201, 502, 503) or p["attempts"] != 1][:3]
    broken = [p for p in posts if p["status"] == 502]
    for p in broken:
        assert p["routed"] == "us-east" and p["done"] > killed_at, p
        assert p["body"]["error"]["code"] == "upstream_broken", p
    refused = [p for p in posts if p["status"] == 503]
    assert refused, "no request hit the dead region before it was marked down"
    for p in refused:  # in flight at the kill or sent after it, before the failover
        assert p["routed"] == "us-east" and p["done"] > killed_at and p["at"] < detected_at
        assert p["body"]["error"]["code"] == "upstream_unavailable"
        assert "not retried" in p["body"]["error"]["message"]
    # Requests with an Idempotency-Key that met the dead region were retried on the next
    # one (two attempts, one answer), and sending one again replays that answer.
    keyed = traffic.keyed
    assert keyed and all(k["status"] == 201 for k in keyed), [
        k for k in keyed if k["status"] != 201][:3]
    keyed_retried = [k for k in keyed if k["attempts"] == 2]
    assert keyed_retried, "no keyed request met the dead region"
    for k in keyed_retried:
        assert (k["routed"], k["reason"]) == ("eu-west", "failover"), k
        assert k["again"] == (201, k["body"]["id"], "true"), k
    created = {h: sum(1 for p in [*posts, *keyed]
                      if p["status"] == 201 and p["body"]["home_region"] == h) for h in homes}
    assert created["eu-west"] > 0 and created["us-east"] > 0
    # Each answered POST created exactly one account where it went; a refused one none
    # (at most one, if the crash cut off a request us-east had already committed; so
    # may a keyed one retried elsewhere, whose key was scoped to us-east).
    actual = {h: accounts_homed(lab, h) - created_before[h] for h in homes}
    assert actual["eu-west"] == created["eu-west"]
    assert created["us-east"] <= actual["us-east"] <= created["us-east"] + len(
        keyed_retried) + len(broken) + sum("ConnectError" not in p["body"]["error"]["message"]
                                           for p in refused)
    # The router's own books agree: GETs and keyed POSTs (and their replays) failed over,
    # the refused POSTs were not retried.
    assert router_metric(lab, "paycluster_router_failovers_total") - metrics_before[
        "paycluster_router_failovers_total"] == len(retried) + len(keyed_retried) + sum(
        k["again_attempts"] == 2 for k in keyed_retried)
    assert router_metric(lab, "paycluster_router_not_retried_total") - metrics_before[
        "paycluster_router_not_retried_total"] == len(refused) + len(broken)
