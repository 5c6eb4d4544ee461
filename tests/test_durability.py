"""Durability modes on two real regions: in `regional` mode every payment us-east
acknowledges already exists in its buddy eu-west when the client gets the answer; the
mode changes at runtime, and back in `local` mode nothing waits for the buddy."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import psycopg
import pytest

from cluster.durability import StandbyWatch, default_buddy, plan_durability
from cluster.lab import Cluster, read_cluster, start_cluster, stop_cluster
from replication.durability import Durability, durability, set_durability
from replication.wiring import set_enabled, slot_name
from tests.helpers import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.multiregion]

REGION, BUDDY = "us-east", "eu-west"
WAN_SCALE = 0.5  # us-east <-> eu-west ~38 ms round trip: replication visibly lags an ack
PAYMENTS = 40
WAIT = 30.0
"""Bound on every wait for a condition; a healthy run needs a small fraction of it."""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A two-region lab for this module."""
    lab = start_cluster(tmp_path_factory.mktemp("lab"), regions=2, wan_scale=WAN_SCALE)
    try:
        yield lab
    finally:
        lab.stop()


def _open(client: httpx.Client, deposit: int) -> str:
    resp = client.post("/v1/accounts", json={"currency": "USD", "home_region": REGION},
                       headers={"Idempotency-Key": f"open-{uuid.uuid4()}"})
    assert resp.status_code == 201, resp.text
    account = str(resp.json()["id"])
    if deposit:
        dep = client.post(f"/v1/accounts/{account}/deposits", json={"amount": deposit},
                          headers={"Idempotency-Key": f"dep-{uuid.uuid4()}"})
        assert dep.status_code == 201, dep.text
    return account


def _pay_and_look(client: httpx.Client, buddy: psycopg.Connection, payer: str,
                  payee: str) -> tuple[int, float]:
    """Pay PAYMENTS times; count payments missing at the buddy right at ack time."""
    missing, started = 0, time.perf_counter()
    for _ in range(PAYMENTS):
        resp = client.post("/v1/payments", json={"payer": payer, "payee": payee, "amount": 1,
                                                 "currency": "USD"},
                           headers={"Idempotency-Key": f"pay-{uuid.uuid4()}"})
        assert resp.status_code == 201, resp.text
        row = buddy.execute("select status from payments where id = %s",
                            (resp.json()["id"],)).fetchone()
        missing += row is None
    return missing, (time.perf_counter() - started) / PAYMENTS


def _at_buddy(buddy: psycopg.Connection, table: str, ids: list[str]) -> int:
    row = buddy.execute(f"select count(*) from {table} where id = any(%s::uuid[])",
                        (ids,)).fetchone()
    return int(row[0]) if row else 0


def test_regional_mode_has_every_ack_at_the_buddy(cluster: Cluster) -> None:
    dsn, buddy_dsn = cluster.region(REGION).dsn, cluster.region(BUDDY).dsn
    with httpx.Client(base_url=cluster.region(REGION).api_url, timeout=30,
                      headers=cluster.auth_headers()) as client, \
            psycopg.connect(buddy_dsn, autocommit=True) as buddy:
        payer, payee = _open(client, 1_000_000), _open(client, 0)
        wait_for(lambda: _at_buddy(buddy, "accounts", [payer, payee]) == 2, WAIT,
                 "the accounts to replicate before anything is measured")
        local_missing, local_latency = _pay_and_look(client, buddy, payer, payee)

        state = set_durability(dsn, REGION, "regional", BUDDY, buddy_dsn)
        assert (state.mode, state.buddy, state.standby) == (
            "regional", BUDDY, "pc_us_east_to_eu_west")
        wait_for(lambda: durability(dsn, REGION, [REGION, BUDDY]).sync_state == "sync", WAIT,
                 "the buddy's standby to be sync")
        regional_missing, regional_latency = _pay_and_look(client, buddy, payer, payee)

        back = set_durability(dsn, REGION, "local", buddy_dsn=buddy_dsn)
        assert (back.mode, back.buddy) == ("local", None)
        after_missing, after_latency = _pay_and_look(client, buddy, payer, payee)
        # Local mode does not wait for the buddy, shown without a race: with the buddy's
        # subscription stopped, a payment is acknowledged that the buddy does not have.
        set_enabled(buddy_dsn, REGION, False)
        try:
            resp = client.post("/v1/payments", json={"payer": payer, "payee": payee,
                                                     "amount": 1, "currency": "USD"})
            assert resp.status_code == 201, resp.text
            unreplicated = str(resp.json()["id"])
            assert _at_buddy(buddy, "payments", [unreplicated]) == 0
        finally:
            set_enabled(buddy_dsn, REGION, True)
        wait_for(lambda: _at_buddy(buddy, "payments", [unreplicated]) == 1, WAIT,
                 "the payment to reach the buddy once its subscription runs again")

    print(f"\nmissing at the buddy at ack time: local {local_missing}/{PAYMENTS} "
          f"({local_latency * 1000:.1f} ms/payment), regional {regional_missing}/{PAYMENTS} "
          f"({regional_latency * 1000:.1f} ms), local again {after_missing}/{PAYMENTS} "
          f"({after_latency * 1000:.1f} ms)")
    assert regional_missing == 0
    # How many local-mode acks the buddy lacked at ack time (and whether regional is slower
    # per payment) depends on the machine's load: bench/durability.py measures the cost.


def test_switching_durability_under_concurrent_load(cluster: Cluster) -> None:
    """Four clients pay without pause while us-east goes regional and back to local: every
    payment is acknowledged (no error, none stuck), each one sent once the standby was
    sync and answered before the switch back was already at the buddy when acknowledged,
    and in the end the buddy has every payment."""
    dsn, buddy_dsn = cluster.region(REGION).dsn, cluster.region(BUDDY).dsn
    with httpx.Client(base_url=cluster.region(REGION).api_url, timeout=WAIT,
                      headers=cluster.auth_headers()) as setup:
        pairs = [(_open(setup, 100_000), _open(setup, 0)) for _ in range(4)]
    with psycopg.connect(buddy_dsn, autocommit=True) as buddy:
        wait_for(lambda: _at_buddy(buddy, "accounts", [a for p in pairs for a in p]) == 8,
                 WAIT, "the accounts at the buddy")
    stop = threading.Event()
    acks: list[tuple[float, float, str, bool]] = []  # sent, answered, id, at buddy then
    failures: list[str] = []

    def pay(payer: str, payee: str) -> None:
        with httpx.Client(base_url=cluster.region(REGION).api_url, timeout=WAIT,
                          headers=cluster.auth_headers()) as http, \
                psycopg.connect(buddy_dsn, autocommit=True) as at_buddy:
            while not stop.is_set():
                sent = time.monotonic()
                try:
                    resp = http.post("/v1/payments", json={
                        "payer": payer, "payee": payee, "amount": 1, "currency": "USD"},
                        headers={"Idempotency-Key": f"sw-{uuid.uuid4()}"})
                except httpx.HTTPError as exc:
                    failures.append(repr(exc))
                    return
                answered = time.monotonic()
                if resp.status_code != 201:
                    failures.append(resp.text)
                    return
                pid = str(resp.json()["id"])
                acks.append((sent, answered, pid, _at_buddy(at_buddy, "payments", [pid]) == 1))

    def sent_after(t: float) -> int:
        return sum(1 for a in acks if a[0] > t)

    with ThreadPoolExecutor(len(pairs)) as pool:
        clients = [pool.submit(pay, *pair) for pair in pairs]
        try:
            wait_for(lambda: sent_after(0) >= 8 or failures, WAIT, "payments in local mode")
            set_durability(dsn, REGION, "regional", BUDDY, buddy_dsn)
            wait_for(lambda: durability(dsn, REGION, [REGION, BUDDY]).sync_state == "sync",
                     WAIT, "the buddy's standby to be sync under load")
            synced = time.monotonic()
            wait_for(lambda: sent_after(synced) >= 8 or failures, WAIT,
                     "payments in regional mode")
            switching_back = time.monotonic()
            set_durability(dsn, REGION, "local", buddy_dsn=buddy_dsn)
            local_again = time.monotonic()
            wait_for(lambda: sent_after(local_again) >= 8 or failures, WAIT,
                     "payments in local mode again")
        finally:
            stop.set()
            for done in clients:
                done.result()
    assert failures == []
    regional = [a for a in acks if a[0] > synced and a[1] < switching_back]
    assert regional and all(at_buddy for *_, at_buddy in regional), regional
    ids = [a[2] for a in acks]
    with psycopg.connect(buddy_dsn, autocommit=True) as buddy:
        wait_for(lambda: _at_buddy(buddy, "payments", ids) == len(ids), WAIT,
                 "every payment at the buddy")
    print(f"\n{len(acks)} payments while switching, {len(regional)} in regional mode (all "
          f"at the buddy at ack), {sum(a[3] for a in acks)} at the buddy at ack overall")


def _sync_standbys(lab: Cluster) -> dict[str, set[tuple[str, str]]]:
    """(application_name, sync_state) of every walsender, per region."""
    out = {}
    for region in lab.regions:
        with psycopg.connect(region.dsn, autocommit=True) as conn:
            out[region.name] = {(str(a), str(s)) for a, s in conn.execute(
                "select application_name, sync_state from pg_stat_replication")}
    return out


def _pay_for(lab: Cluster, region: str, seconds: float) -> int:
    """Payments between two fresh accounts of `region` for `seconds`; how many succeeded
    (every one must, each within WAIT)."""
    with httpx.Client(base_url=lab.region(region).api_url, timeout=WAIT,
                      headers=lab.auth_headers()) as client:
        opened = []
        for deposit in (10_000, 0):
            resp = client.post("/v1/accounts", json={"currency": "USD", "home_region": region})
            assert resp.status_code == 201, resp.text
            opened.append(str(resp.json()["id"]))
            if deposit:
                dep = client.post(f"/v1/accounts/{opened[-1]}/deposits",
                                  json={"amount": deposit})
                assert dep.status_code == 201, dep.text
        done, stop_at = 0, time.monotonic() + seconds
        while time.monotonic() < stop_at:
            resp = client.post("/v1/payments", json={"payer": opened[0], "payee": opened[1],
                                                     "amount": 1, "currency": "USD"})
            assert resp.status_code == 201, resp.text
            done += 1
    return done


def _local_is_the_way_out(lab: Cluster) -> None:
    """The buddy's standby gone (its subscription disabled; the lease quorum unaffected):
    REGION's commits wait; `local` mode, set without the buddy, lets them through again."""
    dsn, buddy_dsn = lab.region(REGION).dsn, lab.region(BUDDY).dsn
    with httpx.Client(base_url=lab.region(REGION).api_url, timeout=30,
                      headers=lab.auth_headers()) as client:
        payer, payee = _open(client, 100), _open(client, 0)
        body = {"payer": payer, "payee": payee, "amount": 1, "currency": "USD"}
        set_enabled(buddy_dsn, REGION, False)
        try:
            with pytest.raises(httpx.ReadTimeout):  # the commit waits for the buddy
                client.post("/v1/payments", json=body, timeout=3)
            assert durability(dsn, REGION, lab.names).sync_state is None
            assert set_durability(dsn, REGION, "local").mode == "local"
            resp = client.post("/v1/payments", json=body)
            assert resp.status_code == 201, resp.text
        finally:
            set_enabled(buddy_dsn, REGION, True)


@pytest.mark.lab
def test_regional_at_start_has_a_sync_buddy_before_the_first_payment_and_after_restart(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    """`start_cluster(durability="regional")`: each region's nearest other region is its
    buddy and its walsender is already `sync` when the lab is handed over; cluster.json
    records it; the first payment is at the buddy at ack time; both regions can commit at
    once; with the buddy's standby gone commits wait until `local` is set; a restart of the
    data dir without a mode keeps regional."""
    data_dir = tmp_path_factory.mktemp("reg")  # short: PostgreSQL's socket path is limited
    buddies = {REGION: BUDDY, BUDDY: REGION}
    lab = start_cluster(data_dir, regions=2, wan_scale=0.2, durability="regional")
    try:
        standbys = _sync_standbys(lab)  # before anything else happens
        for name, buddy in buddies.items():
            assert (slot_name(name, buddy), "sync") in standbys[name], standbys
        assert read_cluster(data_dir)["durability"] == {
            n: {"mode": "regional", "buddy": b} for n, b in buddies.items()}
        assert Cluster.load(data_dir).durability[REGION]["buddy"] == BUDDY
        with httpx.Client(base_url=lab.region(REGION).api_url, timeout=30,
                          headers=lab.auth_headers()) as client, \
                psycopg.connect(lab.region(BUDDY).dsn, autocommit=True) as buddy_db:
            payer, payee = _open(client, 100), _open(client, 0)
            resp = client.post("/v1/payments", json={"payer": payer, "payee": payee,
                                                     "amount": 1, "currency": "USD"},
                               headers={"Idempotency-Key": f"pay-{uuid.uuid4()}"})
            assert resp.status_code == 201, resp.text
            assert buddy_db.execute("select 1 from payments where id = %s",
                                    (resp.json()["id"],)).fetchone() is not None
        # Both regions commit at once, each the other's buddy: neither apply worker may
        # wait for the other (that deadlocked with the subscriptions' synchronous_commit on).
        with ThreadPoolExecutor(2) as pool:
            counts = list(pool.map(lambda n: _pay_for(lab, n, 3.0), buddies))
        assert all(c > 0 for c in counts), counts
        standbys = _sync_standbys(lab)
        for name, buddy in buddies.items():
            assert (slot_name(name, buddy), "sync") in standbys[name], standbys
        _local_is_the_way_out(lab)
    finally:
        lab.stop()
    assert stop_cluster(data_dir) == []  # nothing left running
    again = start_cluster(data_dir, regions=2, wan_scale=0.2)  # no mode: as recorded
    try:
        standbys = _sync_standbys(again)
        for name, buddy in buddies.items():
            assert (slot_name(name, buddy), "sync") in standbys[name], standbys
            assert durability(again.region(name).dsn, name, again.names).buddy == buddy
    finally:
        again.stop()


def test_plan_buddies_are_the_nearest_regions_and_a_restart_keeps_the_record() -> None:
    names = ("us-east", "eu-west", "ap-southeast")
    assert {n: default_buddy(n, names) for n in names} == {
        "us-east": "eu-west", "eu-west": "us-east", "ap-southeast": "eu-west"}
    plan = plan_durability(names, "regional", {"ap-southeast": "us-east"})
    assert plan["ap-southeast"] == {"mode": "regional", "buddy": "us-east"}
    assert plan["us-east"] == {"mode": "regional", "buddy": "eu-west"}
    # No mode given: what the data dir recorded (an unknown buddy falls back to the nearest).
    again = plan_durability(names[:2], None, None, {
        "us-east": {"mode": "regional", "buddy": "ap-southeast"},
        "eu-west": {"mode": "local", "buddy": None}})
    assert again == {"us-east": {"mode": "regional", "buddy": "eu-west"},
                     "eu-west": {"mode": "local", "buddy": None}}
    assert plan_durability(names, None) == {n: {"mode": "local", "buddy": None} for n in names}
    for bad in (lambda: plan_durability(names, "sync"),
                lambda: plan_durability(names[:1], "regional"),
                lambda: plan_durability(names, "regional", {"us-east": "us-east"}),
                lambda: plan_durability(names, "regional", {"us-east": "mars"})):
        with pytest.raises(ValueError):
            bad()


def test_standby_watch_hints_once_per_episode_after_the_delay() -> None:
    watch = StandbyWatch(after=10.0)
    missing = Durability(REGION, "regional", BUDDY, "pc_us_east_to_eu_west", None)
    synced = Durability(REGION, "regional", BUDDY, "pc_us_east_to_eu_west", "sync")
    assert watch.observe(missing, REGION, now=100.0) is None
    assert watch.observe(missing, REGION, now=105.0) is None
    hint_line = watch.observe(missing, REGION, now=111.0)
    assert hint_line is not None and "paycluster durability set us-east local" in hint_line
    assert watch.observe(missing, REGION, now=130.0) is None  # told once
    assert watch.observe(synced, REGION, now=131.0) is None  # episode over
    assert watch.observe(missing, REGION, now=140.0) is None
    assert watch.observe(missing, REGION, now=151.0) is not None  # a new episode
