"""The demo workload: a shop day across the lab's regions, driven through the public REST
API only, then checked from the outside and from every region's own database.

Customers and merchants are homed in every region. Every request comes from a client in a
random region. With a geo router (the default when the lab runs one), all traffic goes
through it: each request says where its client is (`X-Client-Region`), reads are served
by that region, and writes go straight to the region that owns the data (the router's
owner preference) - so few requests need a forwarding hop. Without a router, each request
goes to its client's region directly and most writes are forwarded to the owner. Most
payments are
cross-region (payer and payee homed apart): those answer 201 `processing` and turn
`succeeded` once the payee's region has credited the payee. For each of them (or a sample,
see `watch_every`) the demo measures how long after the acknowledgement the payment is
`succeeded` in BOTH regions' local copies. Some payments hold funds first (manual capture:
captured, partly captured or canceled), a few payments are refunded (within and across
regions), one payment is retried with its Idempotency-Key through another region, a few
exceed the payer's balance (402), merchants withdraw a payout. Meanwhile every region's
`/v1/replication/status` is sampled for the worst lag.

After quiescence (nothing `processing`, every region's copy of the ledger identical) the
summary reads every region's PostgreSQL directly: totals per region's view (balances,
money in transit in the clearing accounts, outside money in the funding accounts), and the
checks: every view identical, the journal sums to zero, balances plus in-transit equal
deposits minus withdrawals, every account holds what the client expects (nothing lost or
applied twice), no conflicts, every pair within the SLO.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import statistics
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx
import psycopg
from rich.console import Console
from rich.table import Table

from cluster.drill.workload import LagSample, LagSampler
from cluster.errors import LabError
from cluster.stats import percentile
from region_node.money import format_amount

CURRENCY = "USD"
CUSTOMERS_PER_REGION = 4
MERCHANTS_PER_REGION = 2
OVERDRAFT_ATTEMPTS = 3
REFUNDS = 10
# Retries of one logical request with the same Idempotency-Key (transport errors, 409, 503):
# for up to RETRY_SECONDS, backing off to at most RETRY_MAX_SLEEP_SECONDS between tries. A
# budget in time, not in tries: on a loaded machine a 409 `idempotency_key_in_use` lasts as
# long as the first attempt is still running, which can be seconds. The budget outlasts one
# attempt's timeout (REQUEST_TIMEOUT_SECONDS) plus the claim lock of an attempt abandoned
# mid-request (the node's idempotency_lock_seconds, 60 s): one slow first attempt on a
# starved machine must not use the whole budget and leave only a 409 to answer.
REQUEST_TIMEOUT_SECONDS = 30.0
RETRY_SECONDS = 120.0
RETRY_MAX_SLEEP_SECONDS = 1.0
RETRYABLE_STATUS = {409, 429, 502, 503, 504}
SERVED_BY = "paycluster-served-by"
ROUTED_TO = "paycluster-routed-to"
CLIENT_REGION = "X-Client-Region"
POLL_SECONDS = 0.02
"""How often a watched cross-region payment is read in both regions (the resolution of
the convergence figures)."""
LAG_SAMPLE_SECONDS = 0.5
QUIESCE_TIMEOUT = 60.0


class DemoError(LabError):
    """A node answered something the demo cannot continue from."""


def money(minor: int, currency: str | None = CURRENCY) -> str:
    """Integer minor units as `1,234.56 USD` through the node's one formatter
    (region_node.money.format_amount: the currency's own exponent, no floats); without
    the code if `currency` is None (the demo's tables, all in CURRENCY)."""
    text = format_amount(minor, currency or CURRENCY)
    return text if currency else text.rsplit(" ", 1)[0]


@dataclass(frozen=True)
class RegionEndpoint:
    """How the demo reaches one region: its REST API and (for the checks) its database."""

    name: str
    api_url: str
    dsn: str


@dataclass
class Account:
    """An account the demo opened, with what the client expects its balance to be."""

    label: str
    kind: str
    home: str
    id: str = ""
    deposited: int = 0
    withdrawn: int = 0
    expected: int = 0
    actual: dict[str, Any] = field(default_factory=dict)


@dataclass
class RegionView:
    """One region's own copy of the ledger, read from its PostgreSQL."""

    by_kind: dict[str, int] = field(default_factory=dict)
    accounts: dict[str, tuple[int, int]] = field(default_factory=dict)
    fingerprint: tuple[Any, ...] = ()
    unbalanced_journals: int = 0
    journal_sum: int = 0
    processing: int = 0
    """Payments `processing` and refunds `pending`: money in transit."""

    @property
    def user_balances(self) -> int:
        """Customers' and merchants' money."""
        return sum(v for k, v in self.by_kind.items() if k in ("customer", "merchant"))

    @property
    def in_transit(self) -> int:
        """Money in the clearing accounts (debited at the payer's region, not yet credited)."""
        return self.by_kind.get("clearing", 0)

    @property
    def outside(self) -> int:
        """The funding accounts: minus what came in from outside (deposits - withdrawals)."""
        return self.by_kind.get("funding", 0)


@dataclass
class DemoResult:
    """Everything the summary shows; `ok` is False if any check failed."""

    regions: list[str]
    wan_scale: float | None
    accounts: list[Account] = field(default_factory=list)
    payments: dict[str, dict[str, Any]] = field(default_factory=dict)
    declined: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    checks: list[tuple[str, bool, str]] = field(default_factory=list)
    phase_payments: int = 0
    forwarded: int = 0
    via_router: str | None = None
    router: dict[str, Any] = field(default_factory=dict)
    cross_region: int = 0
    requests: int = 0
    retries: int = 0
    payment_seconds: float = 0.0
    quiesce_seconds: float = 0.0
    total_seconds: float = 0.0
    convergence: list[float] = field(default_factory=list)
    unconverged: int = 0
    worst_lag: dict[str, float] = field(default_factory=dict)
    slo_seconds: float | None = None
    breaches: set[str] = field(default_factory=set)
    conflicts: int = 0
    transit_mid_run: dict[str, int] = field(default_factory=dict)
    views: dict[str, RegionView] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when every check passed and no request failed unexpectedly."""
        return not self.errors and all(passed for _, passed, _ in self.checks)

    @property
    def payments_per_second(self) -> float:
        """Payments created per second during the payments phase."""
        return self.phase_payments / self.payment_seconds if self.payment_seconds else 0.0


KEY_SPREAD_LIMIT = 10.0
"""Seconds the demo waits for a key it just made to replicate to the region it asks."""


class Api:
    """Client of the v1 REST API of every region: Idempotency-Key on every mutation, safe
    retries with the same key."""

    def __init__(self, clients: dict[str, httpx.AsyncClient], result: DemoResult,
                 rng: random.Random) -> None:
        self.clients = clients
        self.result = result
        self.rng = rng

    def pick(self) -> str:
        """A random region to send a request to."""
        return self.rng.choice(list(self.clients))

    async def post(self, via: str, path: str, body: dict[str, Any], key: str | None = None,
                   expect: tuple[int, ...] = (200, 201)) -> httpx.Response:
        """POST through region `via` with an Idempotency-Key; retry transient failures
        with the SAME key, which makes the retry safe: the owner either replays the stored
        result or runs the request for the first time, never twice."""
        headers = {"Idempotency-Key": key or f"demo-{uuid.uuid4()}"}
        deadline = time.monotonic() + RETRY_SECONDS
        attempt = 0
        while True:
            last = time.monotonic() >= deadline
            self.result.requests += 1
            try:
                resp = await self.clients[via].post(path, json=body, headers=headers)
            except httpx.TransportError:
                if last:
                    raise
            else:
                if resp.status_code not in RETRYABLE_STATUS or last:
                    if resp.status_code not in expect:
                        raise DemoError(f"POST {path} via {via} -> {resp.status_code}: "
                                        f"{resp.text[:300]}")
                    return resp
            self.result.retries += 1
            await asyncio.sleep(min(RETRY_MAX_SLEEP_SECONDS, 0.05 * 2**attempt))
            attempt += 1

    async def get(self, via: str, path: str, **params: Any) -> httpx.Response:
        """GET through region `via` (any status; the caller judges)."""
        self.result.requests += 1
        return await self.clients[via].get(path, params=params or None)

    async def get_json(self, via: str, path: str, **params: Any) -> dict[str, Any]:
        """GET a JSON document; DemoError on anything but 200."""
        resp = await self.get(via, path, **params)
        if resp.status_code != 200:
            raise DemoError(f"GET {path} via {via} -> {resp.status_code}: {resp.text[:300]}")
        body: dict[str, Any] = resp.json()
        return body


# --------------------------------------------------------------------------- database views

_FINGERPRINT_SQL = """
select
  (select md5(coalesce(string_agg(id::text || ':' || balance || ':' || held || ':' || status,
                                  ',' order by id), '')) from accounts),
  (select md5(coalesce(string_agg(id::text || ':' || status || ':' || amount_captured || ':'
                                  || amount_refunded, ',' order by id), '')) from payments),
  (select count(*) from journal_entries),
  (select count(*) from transfer_results),
  (select md5(coalesce(string_agg(id::text || ':' || status, ',' order by id), ''))
     from refunds)
"""


def read_view(dsn: str) -> RegionView:
    """One region's view of the ledger, straight from its PostgreSQL."""
    with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
        view = RegionView()
        view.by_kind = {str(kind): int(total) for kind, total in conn.execute(
            "select kind, coalesce(sum(balance), 0) from accounts group by kind")}
        view.accounts = {str(i): (int(b), int(h)) for i, b, h in conn.execute(
            "select id, balance, held from accounts")}
        row = conn.execute(_FINGERPRINT_SQL).fetchone()
        view.fingerprint = tuple(row) if row else ()
        unbalanced = conn.execute(
            "select count(*) from (select journal_id from journal_entries"
            " group by journal_id, currency having sum(amount) <> 0) t").fetchone()
        view.unbalanced_journals = int(unbalanced[0]) if unbalanced else 0
        total = conn.execute("select coalesce(sum(amount), 0) from journal_entries").fetchone()
        view.journal_sum = int(total[0]) if total else 0
        # Money in transit either way: payments processing and cross-region refunds
        # pending (the reverse saga).
        processing = conn.execute(
            "select (select count(*) from payments where status = 'processing')"
            " + (select count(*) from refunds where status = 'pending')").fetchone()
        view.processing = int(processing[0]) if processing else 0
    return view


async def read_views(regions: list[RegionEndpoint]) -> dict[str, RegionView]:
    """Every region's view, read concurrently."""
    views = await asyncio.gather(*(asyncio.to_thread(read_view, r.dsn) for r in regions))
    return {r.name: v for r, v in zip(regions, views, strict=True)}


# --------------------------------------------------------------------------- workload


async def _open_accounts(api: Api, homes: list[str], payments: int) -> list[Account]:
    # Fund customers generously for the requested volume, so that only the deliberate
    # overdraft attempts are declined.
    funding = 10_000_00 + payments * 2_000
    accounts = [Account(f"{kind}-{home}-{i + 1}", kind, home)
                for home in homes
                for kind, count in (("customer", CUSTOMERS_PER_REGION),
                                    ("merchant", MERCHANTS_PER_REGION))
                for i in range(count)]

    async def open_one(acct: Account) -> None:
        resp = await api.post(api.pick(), "/v1/accounts",
                              {"currency": CURRENCY, "kind": acct.kind, "home_region": acct.home},
                              expect=(201,))
        acct.id = resp.json()["id"]
        if acct.kind == "customer":
            await api.post(api.pick(), f"/v1/accounts/{acct.id}/deposits", {"amount": funding},
                           expect=(201,))
            acct.deposited = funding

    await asyncio.gather(*(open_one(a) for a in accounts))
    return accounts


@dataclass
class _Plan:
    payer: Account
    payee: Account
    amount: int
    via: str
    manual: bool
    # For manual payments: "capture", "partial" or "cancel".
    then: str = ""


class _Watcher:
    """Measures ack -> `succeeded` visible in both the payer's and the payee's region."""

    def __init__(self, api: Api, result: DemoResult, every: int) -> None:
        self.api = api
        self.result = result
        self.every = max(1, every)
        self.seen = 0
        self.tasks: set[asyncio.Task[None]] = set()

    def ack(self, payment: dict[str, Any], acked_at: float, plan: _Plan) -> None:
        """A cross-region payment was acknowledged at `acked_at` (monotonic)."""
        self.seen += 1
        if payment.get("status") not in ("processing", "succeeded"):
            return
        if (self.seen - 1) % self.every:
            return
        task = asyncio.create_task(self._watch(payment["id"], acked_at,
                                               (plan.payer.home, plan.payee.home)))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _watch(self, payment_id: str, acked_at: float, regions: tuple[str, ...],
                     give_up_after: float = 30.0) -> None:
        pending = set(regions)
        while pending:
            for region in list(pending):
                with contextlib.suppress(httpx.HTTPError):
                    resp = await self.api.get(region, f"/v1/payments/{payment_id}")
                    served_by = resp.headers.get(SERVED_BY, region)
                    if (resp.status_code == 200 and served_by == region
                            and resp.json().get("status") == "succeeded"):
                        pending.discard(region)
            if not pending:
                break
            if time.monotonic() - acked_at > give_up_after:
                self.result.unconverged += 1
                return
            await asyncio.sleep(POLL_SECONDS)
        self.result.convergence.append(time.monotonic() - acked_at)

    async def drain(self) -> None:
        """Wait for every watch to finish."""
        while self.tasks:
            await asyncio.gather(*list(self.tasks))


async def _pay(api: Api, plan: _Plan, result: DemoResult, watcher: _Watcher) -> None:
    body = {"payer": plan.payer.id, "payee": plan.payee.id, "amount": plan.amount,
            "currency": CURRENCY, "capture_method": "manual" if plan.manual else "automatic",
            "description": "demo order"}
    cross = plan.payer.home != plan.payee.home
    try:
        resp = await api.post(plan.via, "/v1/payments", body, expect=(201, 402))
        acked_at = time.monotonic()
        # The region that took the request (the router's choice, or the one we called)
        # forwarded it if someone else served it.
        took = resp.headers.get(ROUTED_TO, plan.via)
        if resp.headers.get(SERVED_BY, took) != took:
            result.forwarded += 1
        if resp.status_code == 402:
            result.errors.append(f"unexpected 402 for {plan.payer.label}: {resp.text[:200]}")
            return
        payment = resp.json()
        if plan.manual:
            via = api.pick()
            if plan.then == "cancel":
                resp = await api.post(via, f"/v1/payments/{payment['id']}/cancel", {})
            else:
                amount = plan.amount if plan.then == "capture" else max(1, plan.amount // 2)
                resp = await api.post(via, f"/v1/payments/{payment['id']}/capture",
                                      {"amount": amount})
            acked_at = time.monotonic()
            payment = resp.json()
        result.payments[payment["id"]] = payment
        if cross:
            result.cross_region += 1
            watcher.ack(payment, acked_at, plan)
    except (DemoError, httpx.HTTPError) as exc:
        result.errors.append(f"payment {plan.payer.label}->{plan.payee.label}: {exc}")


async def _payments(api: Api, accounts: list[Account], count: int, concurrency: int,
                    rng: random.Random, result: DemoResult, watcher: _Watcher,
                    regions: list[RegionEndpoint]) -> None:
    customers = [a for a in accounts if a.kind == "customer"]
    merchants = [a for a in accounts if a.kind == "merchant"]
    manual_every = 10  # one payment in ten holds funds first (TCC try/confirm/cancel)
    plans = []
    for i in range(count):
        manual = i % manual_every == manual_every - 1
        then = ("capture", "capture", "partial", "cancel")[(i // manual_every) % 4]
        payer = rng.choice(customers)
        # Mostly customers paying merchants; some customer-to-customer transfers.
        payee = rng.choice(merchants if rng.random() < 0.8 else
                           [c for c in customers if c is not payer])
        plans.append(_Plan(payer, payee, rng.randint(1_00, 50_00), api.pick(), manual,
                           then if manual else ""))
    gate = asyncio.Semaphore(concurrency)
    done = 0
    snapshot: list[asyncio.Task[None]] = []

    async def take_snapshot() -> None:
        # Money in transit as each region sees it while payments are flowing.
        with contextlib.suppress(psycopg.Error):
            result.transit_mid_run = {n: v.in_transit
                                      for n, v in (await read_views(regions)).items()}

    async def run(plan: _Plan) -> None:
        nonlocal done
        async with gate:
            await _pay(api, plan, result, watcher)
        done += 1
        if done == count // 2:
            snapshot.append(asyncio.create_task(take_snapshot()))

    started = time.perf_counter()
    await asyncio.gather(*(run(p) for p in plans))
    result.payment_seconds = time.perf_counter() - started
    result.phase_payments = len(result.payments)
    await asyncio.gather(*snapshot)


async def _refunds(api: Api, result: DemoResult, rng: random.Random) -> None:
    """Refund a few payments, local and cross-region. A cross-region refund answers
    `pending` (the merchant's region debited the merchant into transit) and is waited for
    until the payer's region has credited the payer (`succeeded`), so the books read
    afterwards see it whole."""
    automatic = [p for p in result.payments.values()
                 if p.get("capture_method") == "automatic"
                 and p.get("status") in ("succeeded", "processing")]
    for i, payment in enumerate(rng.sample(automatic, min(REFUNDS, len(automatic)))):
        # Alternate full refunds (no amount) and partial ones.
        body = {} if i % 2 == 0 else {"amount": max(1, int(payment["amount"]) // 3)}
        try:
            refund = (await api.post(api.pick(), f"/v1/payments/{payment['id']}/refunds",
                                     body)).json()
            deadline = time.monotonic() + 30
            while refund.get("status") == "pending" and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
                refund = await _strong(api, f"/v1/refunds/{refund['id']}")
            if refund.get("status") != "succeeded":
                result.errors.append(f"refund of {payment['id']} ended {refund.get('status')}")
        except (DemoError, httpx.HTTPError) as exc:
            result.errors.append(f"refund of {payment['id']}: {exc}")


async def _strong(api: Api, path: str) -> dict[str, Any]:
    """A read answered by the owner, whichever region we ask."""
    return await api.get_json(api.pick(), path, consistency="strong")


async def _overdrafts(api: Api, accounts: list[Account], result: DemoResult) -> None:
    customers = [a for a in accounts if a.kind == "customer"]
    # Payers from different regions, payees elsewhere: declined at the payer's owner.
    payers = [customers[i * CUSTOMERS_PER_REGION % len(customers)]
              for i in range(OVERDRAFT_ATTEMPTS)]
    for payer in payers:
        elsewhere = [c for c in customers if c.home != payer.home]
        payee = (elsewhere or [c for c in customers if c is not payer])[-1]
        before = await _strong(api, f"/v1/accounts/{payer.id}")
        body = {"payer": payer.id, "payee": payee.id, "amount": before["available"] + 1,
                "currency": CURRENCY, "description": "more than the payer has"}
        resp = await api.post(api.pick(), "/v1/payments", body, expect=(201, 402))
        after = await _strong(api, f"/v1/accounts/{payer.id}")
        error = resp.json().get("error", {}) if resp.status_code == 402 else {}
        result.declined.append({"payer": payer.label, "status": resp.status_code,
                                "code": error.get("code"), "amount": body["amount"],
                                "unchanged": after["balance"] == before["balance"]})
        if resp.status_code == 201:  # would be a bug; keep the books right for the checks
            result.payments[resp.json()["id"]] = resp.json()


async def _replay(api: Api, accounts: list[Account], result: DemoResult) -> None:
    """Send one payment twice with the same key, through two different regions: one
    payment, one charge, the same answer."""
    payer = next(a for a in accounts if a.kind == "customer")
    payee = next(a for a in accounts if a.kind == "merchant" and a.home == payer.home)
    regions = list(api.clients)
    first_via, second_via = regions[0], regions[-1]
    body = {"payer": payer.id, "payee": payee.id, "amount": 12_34, "currency": CURRENCY,
            "description": "retried by the client"}
    key = f"demo-replay-{uuid.uuid4()}"
    first = (await api.post(first_via, "/v1/payments", body, key=key, expect=(201,))).json()
    before = await _strong(api, f"/v1/accounts/{payer.id}")
    second = await api.post(second_via, "/v1/payments", body, key=key, expect=(200, 201))
    after = await _strong(api, f"/v1/accounts/{payer.id}")
    result.payments[first["id"]] = first
    same = second.json().get("id") == first["id"] and after["balance"] == before["balance"]
    result.checks.append(("idempotent replay", same,
                          f"same key via {first_via}, then via {second_via}: one payment, "
                          "payer charged once" if same else
                          f"replay returned {second.text[:200]}"))


async def _payouts(api: Api, accounts: list[Account]) -> None:
    for merchant in (a for a in accounts if a.kind == "merchant"):
        current = await _strong(api, f"/v1/accounts/{merchant.id}")
        amount = int(current["available"]) // 10
        if amount > 0:
            await api.post(api.pick(), f"/v1/accounts/{merchant.id}/withdrawals",
                           {"amount": amount}, expect=(201,))
            merchant.withdrawn += amount


def _fold_lag(samples: list[LagSample], result: DemoResult) -> None:
    """The demo's convergence figures from the lag sampler's readings: worst lag per pair,
    breaches, the most conflicts a region reported, the monitor's SLO."""
    for sample in samples:
        if sample.slo_seconds is not None:
            result.slo_seconds = sample.slo_seconds
        for name, lag in sample.pairs.items():
            if lag is not None:
                result.worst_lag[name] = max(result.worst_lag.get(name, 0.0), lag)
        result.breaches.update(sample.breaches)
        result.conflicts = max(result.conflicts, sample.conflicts)


async def _quiesce(api: Api, regions: list[RegionEndpoint], result: DemoResult) -> None:
    """Wait until no payment is `processing` anywhere and every region's copy is identical."""
    started = time.monotonic()
    deadline = started + QUIESCE_TIMEOUT
    while True:
        views = await read_views(regions)
        prints = {v.fingerprint for v in views.values()}
        if len(prints) == 1 and all(v.processing == 0 for v in views.values()):
            break
        if time.monotonic() > deadline:
            busy = {n: v.processing for n, v in views.items() if v.processing}
            raise DemoError(f"not quiescent after {QUIESCE_TIMEOUT:.0f}s: {len(prints)} "
                            f"different views, processing {busy}")
        await asyncio.sleep(0.1)
    result.views = views
    result.quiesce_seconds = time.monotonic() - started


async def _settle(api: Api, regions: list[RegionEndpoint], result: DemoResult) -> None:
    """Final states from the owners; compare every region's view with the client's books."""
    # Each payment as the region that owns it answers (its home region: no failover here).
    fresh = await asyncio.gather(*(
        api.get_json(p["home_region"] if p.get("home_region") in api.clients else api.pick(),
                     f"/v1/payments/{pid}") for pid, p in result.payments.items()))
    result.payments = {p["id"]: p for p in fresh}
    by_id = {a.id: a for a in result.accounts}
    for a in result.accounts:
        a.expected = a.deposited - a.withdrawn
    for p in result.payments.values():
        if p["status"] != "succeeded":
            continue
        moved = int(p.get("amount_captured") or 0) - int(p.get("amount_refunded") or 0)
        by_id[p["payer"]].expected -= moved
        by_id[p["payee"]].expected += moved
    for a in result.accounts:
        a.actual = await api.get_json(a.home, f"/v1/accounts/{a.id}")

    views = result.views
    net_in = sum(a.deposited - a.withdrawn for a in result.accounts)
    same = len({v.fingerprint for v in views.values()}) == 1
    result.checks.append((
        "every region's view identical", same,
        f"accounts, payments, {next(iter(views.values())).fingerprint[2]} journal entries "
        f"and transfer results match in {', '.join(views)}" if same else
        "views differ: " + "; ".join(f"{n}: {v.fingerprint}" for n, v in views.items())))
    zero = all(v.unbalanced_journals == 0 and v.journal_sum == 0 for v in views.values())
    result.checks.append(("journal sums to zero", zero,
                          "every journal balances, in every region's view" if zero else
                          "; ".join(f"{n}: {v.unbalanced_journals} unbalanced, total "
                                    f"{v.journal_sum}" for n, v in views.items())))
    conserved = all(v.user_balances + v.in_transit == net_in == -v.outside
                    for v in views.values())
    result.checks.append(("balances + in-transit = deposits - withdrawals", conserved,
                          f"{money(net_in)} in every region's view" if conserved else
                          "; ".join(f"{n}: {money(v.user_balances)} + {money(v.in_transit)}"
                                    for n, v in views.items()) + f" vs {money(net_in)}"))
    wrong = [a.label for a in result.accounts
             if any(v.accounts.get(a.id, (None, None))[0] != a.expected
                    for v in views.values())]
    result.checks.append(("every balance as expected", not wrong,
                          "the client's books match every account in every region: no "
                          "payment lost or applied twice" if not wrong
                          else f"differs: {', '.join(wrong)}"))
    statuses = Counter(p["status"] for p in result.payments.values())
    unsettled = {s: n for s, n in statuses.items() if s in ("processing", "failed",
                                                            "requires_capture")}
    result.checks.append(("every payment settled", not unsettled,
                          f"{statuses.get('succeeded', 0)} succeeded, "
                          f"{statuses.get('canceled', 0)} canceled" if not unsettled
                          else f"left: {unsettled}"))
    held = [a.label for a in result.accounts if int(a.actual.get("held") or 0) != 0]
    negative = [a.label for a in result.accounts if int(a.actual.get("available", 0)) < 0]
    result.checks.append(("no funds on hold, none negative", not held and not negative,
                          "every hold captured or canceled, no available balance below zero"
                          if not held and not negative else f"held {held}, negative {negative}"))
    declined_ok = all(d["status"] == 402 and d["unchanged"] for d in result.declined)
    result.checks.append(("overdrafts declined", declined_ok,
                          f"{len(result.declined)} payments over balance got 402, "
                          "nothing moved" if declined_ok else f"{result.declined}"))
    if len(regions) > 1:
        result.checks.append(("replication conflicts zero", result.conflicts == 0,
                              "PostgreSQL 18 conflict counters stayed 0" if not result.conflicts
                              else f"{result.conflicts} conflicts"))
        slo = result.slo_seconds
        worst = max(result.worst_lag.values(), default=0.0)
        within = not result.breaches and (slo is None or worst < slo)
        result.checks.append(("every pair within the SLO", within,
                              f"worst lag {worst:.2f}s < {slo:g}s" if within and slo
                              else "; ".join(sorted(result.breaches)) or f"worst {worst:.2f}s"))
        converged = result.unconverged == 0
        result.checks.append(("cross-region payments converged", converged,
                              f"{len(result.convergence)} watched payments succeeded in both "
                              "regions" if converged else
                              f"{result.unconverged} not succeeded in both regions within 30s"))


async def run_demo_async(regions: list[RegionEndpoint], payments: int = 600,
                         concurrency: int = 16, seed: int | None = None,
                         console: Console | None = None, wan_scale: float | None = None,
                         watch_every: int = 2, router_url: str | None = None,
                         api_key: str | None = None) -> DemoResult:
    """Run the demo workload against `regions` and check the books (see the module doc).

    `api_key` (the lab's bootstrap admin key) goes with every request; the demo also makes
    a customer principal with a key of its own and shows what that key may not do.

    `watch_every` samples the convergence measurement: every n-th cross-region payment is
    watched (each watch reads the payment in two regions every POLL_SECONDS). With
    `router_url`, every request goes through that geo router, as from a client in the
    region it is "sent via" (X-Client-Region); the databases are still read directly.
    """
    console = console or Console()
    rng = random.Random(seed)
    result = DemoResult([r.name for r in regions], wan_scale, via_router=router_url)
    started = time.perf_counter()
    limits = httpx.Limits(max_connections=concurrency * 3 + 8)
    auth = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with contextlib.AsyncExitStack() as stack:
        if router_url is None:
            clients = {r.name: await stack.enter_async_context(
                           httpx.AsyncClient(base_url=r.api_url, timeout=REQUEST_TIMEOUT_SECONDS,
                                             limits=limits, headers=auth))
                       for r in regions}
        else:
            # One client per client region, all to the router: the header is the location.
            clients = {r.name: await stack.enter_async_context(
                           httpx.AsyncClient(base_url=router_url,
                                             timeout=REQUEST_TIMEOUT_SECONDS, limits=limits,
                                             headers={CLIENT_REGION: r.name, **auth}))
                       for r in regions}
        api = Api(clients, result, rng)
        watcher = _Watcher(api, result, watch_every)
        # Every region's own monitor, read directly (not through the router).
        sampler = LagSampler({r.name: r.api_url for r in regions}, time.monotonic(),
                             auth, every=LAG_SAMPLE_SECONDS, timeout=30.0)

        async def phase(text: str, coro: Any) -> Any:
            t0 = time.perf_counter()
            with console.status(text):
                value = await coro
            console.print(f"[green]✓[/] {text} [dim]({time.perf_counter() - t0:.2f}s)[/]")
            return value

        homes = [r.name for r in regions]
        sampler.start()
        try:
            result.accounts = await phase(
                f"open {CUSTOMERS_PER_REGION} customers + {MERCHANTS_PER_REGION} merchants "
                f"homed in each of {len(homes)} region(s), fund the customers",
                _open_accounts(api, homes, payments))
            await phase(f"run {payments} payments sent to random regions ({concurrency} at "
                        "a time)",
                        _payments(api, result.accounts, payments, concurrency, rng, result,
                                  watcher, regions))
            await phase("wait for every cross-region payment to succeed in both regions",
                        watcher.drain())
            await phase(f"refund {REFUNDS} payments, local and cross-region",
                        _refunds(api, result, rng))
            await phase("retry one payment with the same Idempotency-Key via another region",
                        _replay(api, result.accounts, result))
            await phase(f"try {OVERDRAFT_ATTEMPTS} payments above the payer's balance",
                        _overdrafts(api, result.accounts, result))
            await phase("pay merchants out (withdraw 10%)", _payouts(api, result.accounts))
            await phase("security: no key -> 401; a customer's own key may not spend "
                        "another's account -> 403, nothing moves",
                        _security(api, result.accounts, result))
            await phase("wait for quiescence: nothing processing, every region identical",
                        _quiesce(api, regions, result))
        finally:
            await sampler.stop(last_round=True)
            _fold_lag(sampler.samples, result)
        await phase("read back payments, balances and every region's database",
                    _settle(api, regions, result))
    result.total_seconds = time.perf_counter() - started
    return result


async def _security(api: Api, accounts: list[Account], result: DemoResult) -> None:
    """A request without a key is refused (401); a customer principal made through the
    admin API gets a key of its own (shown once), opens its own account with it, and may
    not pay from someone else's (403)."""
    via = api.pick()
    client = api.clients[via]
    bare = await client.post("/v1/payments", json={}, headers={"Authorization": ""})
    result.checks.append(("no API key -> 401", bare.status_code == 401,
                          f"POST /v1/payments without a key: {bare.status_code}"))
    # No Idempotency-Key here: a response that shows a new key is never stored.
    made = await client.post("/v1/admin/principals", json={"name": "demo customer",
                                                           "role": "customer"})
    if made.status_code != 201:
        raise DemoError(f"POST /v1/admin/principals -> {made.status_code}: {made.text[:300]}")
    own_key = made.json()["api_key"]["key"]
    mine = {"Authorization": f"Bearer {own_key}"}
    someone = next(a for a in accounts if a.kind == "customer")
    payee = next(a for a in accounts if a.kind == "merchant")
    # A new key is known in the region that made it at once and elsewhere once it has
    # replicated; the router may send these calls to another region (the payer's owner),
    # so a 401 in the first moments means "not there yet", as for any client.
    started = time.perf_counter()

    async def once_known(path: str, body: dict[str, Any]) -> httpx.Response:
        while True:
            resp = await client.post(path, json=body, headers=mine)
            if resp.status_code != 401 or time.perf_counter() - started > KEY_SPREAD_LIMIT:
                return resp
            await asyncio.sleep(0.2)

    opened = await once_known("/v1/accounts", {"currency": CURRENCY})
    stolen = await once_known("/v1/payments", {"payer": someone.id, "payee": payee.id,
                                               "amount": 1, "currency": CURRENCY})
    waited = time.perf_counter() - started
    result.checks.append((
        "another principal's payer account -> 403", stolen.status_code == 403
        and opened.status_code == 201,
        f"customer key paying from {someone.label}: {stolen.status_code}; own account "
        f"opened: {opened.status_code}; the new key worked everywhere asked within "
        f"{waited:.2f} s"))


def run_demo(cluster: Any, payments: int = 600, concurrency: int = 16, seed: int | None = None,
             console: Console | None = None, watch_every: int = 2,
             use_router: bool = True) -> DemoResult:
    """Run the demo against a running `cluster.lab.Cluster` (synchronous wrapper); through
    its first geo router if it runs one and `use_router`."""
    regions = [RegionEndpoint(r.name, r.api_url, r.dsn) for r in cluster.regions]
    scale = getattr(cluster, "wan_scale", None) if len(regions) > 1 else None
    routers = list(getattr(cluster, "routers", []) or []) if use_router else []
    result = asyncio.run(run_demo_async(
        regions, payments, concurrency, seed, console, wan_scale=scale,
        watch_every=watch_every, router_url=routers[0].url if routers else None,
        api_key=getattr(cluster, "admin_key", None) or None))
    if routers:
        result.router = router_figures(routers[0].admin_url, [r.name for r in regions])
    return result


def router_figures(admin_url: str, regions: list[str]) -> dict[str, Any]:
    """What the router did during the demo, from its Prometheus metrics: requests answered
    per region, decisions by reason, failovers and requests it could not place."""
    from geo_router.client import metric_value

    with contextlib.suppress(httpx.HTTPError):
        text = httpx.get(f"{admin_url}/metrics", timeout=5).text
        return {
            "requests": {r: int(metric_value(text, "paycluster_router_requests_total",
                                             region=r)) for r in regions},
            "reasons": {why: int(metric_value(text, "paycluster_router_decisions_total",
                                              reason=why))
                        for why in ("nearest", "owner", "weighted", "failover")},
            "failovers": int(metric_value(text, "paycluster_router_failovers_total")),
            "refused": int(metric_value(text, "paycluster_router_requests_total",
                                        region="none")),
        }
    return {}


# --------------------------------------------------------------------------- summary


def print_summary(result: DemoResult, console: Console | None = None) -> None:
    """Rich tables: payments by status, per-region totals, convergence, checks, throughput."""
    console = console or Console()
    statuses: Counter[str] = Counter()
    amounts: Counter[str] = Counter()
    for p in result.payments.values():
        statuses[p["status"]] += 1
        amounts[p["status"]] += int(p["amount"])
    table = Table(title="Payments by status")
    table.add_column("status")
    table.add_column("count", justify="right")
    table.add_column(f"amount ({CURRENCY})", justify="right")
    for status, n in statuses.most_common():
        table.add_row(status, str(n), money(amounts[status], None))
    table.add_row("declined (402)", str(sum(d["status"] == 402 for d in result.declined)),
                  money(sum(d["amount"] for d in result.declined), None), style="dim")
    console.print(table)

    deposits = sum(a.deposited for a in result.accounts)
    withdrawals = sum(a.withdrawn for a in result.accounts)
    totals = Table(title=f"Totals in each region's own database ({CURRENCY}); deposits "
                         f"{money(deposits, None)}, withdrawals {money(withdrawals, None)}")
    for col in ("region's view", "customers + merchants", "in transit (clearing)",
                "in transit mid-run", "outside (funding)", "sum of all accounts"):
        totals.add_column(col, justify="left" if col == "region's view" else "right")
    for name, view in result.views.items():
        totals.add_row(name, money(view.user_balances, None), money(view.in_transit, None),
                       money(result.transit_mid_run.get(name, 0), None),
                       money(view.outside, None), money(sum(view.by_kind.values()), None))
    console.print(totals)

    accounts = Table(title=f"Accounts ({CURRENCY}, as their home region serves them)")
    for col in ("account", "home", "balance", "available", "held", "expected"):
        accounts.add_column(col, justify="left" if col in ("account", "home") else "right")
    for a in result.accounts:
        bal = int(a.actual.get("balance", 0))
        accounts.add_row(a.label, a.home, money(bal, None),
                         money(int(a.actual.get("available", 0)), None),
                         money(int(a.actual.get("held", 0)), None), money(a.expected, None),
                         style=None if bal == a.expected else "red")
    console.print(accounts)

    if len(result.regions) > 1:
        conv = Table(title="Convergence")
        conv.add_column("figure")
        conv.add_column("value", justify="right")
        values = result.convergence
        scale = "n/a" if result.wan_scale is None else f"{result.wan_scale:g}"
        conv.add_row("WAN scale (x default round trips)", scale)
        conv.add_row("cross-region payments / payments forwarded to the owner by a region",
                     f"{result.cross_region} / {result.forwarded} of {result.phase_payments}")
        conv.add_row(f"ack -> succeeded in both regions, p50 (n={len(values)}, polled every "
                     f"{POLL_SECONDS * 1000:.0f} ms)", f"{percentile(values, 50) * 1000:.0f} ms")
        conv.add_row("ack -> succeeded in both regions, p99",
                     f"{percentile(values, 99) * 1000:.0f} ms")
        conv.add_row("ack -> succeeded in both regions, max",
                     f"{max(values, default=float('nan')) * 1000:.0f} ms")
        if values:
            conv.add_row("ack -> succeeded in both regions, mean",
                         f"{statistics.fmean(values) * 1000:.0f} ms")
        worst = max(result.worst_lag.items(), key=lambda kv: kv[1], default=("-", 0.0))
        slo = "" if result.slo_seconds is None else f" (SLO {result.slo_seconds:g}s)"
        conv.add_row(f"worst replication lag seen{slo}", f"{worst[1]:.2f} s ({worst[0]})")
        conv.add_row("replication conflicts", str(result.conflicts))
        conv.add_row("quiescence after the last request", f"{result.quiesce_seconds:.2f} s")
        console.print(conv)

    if result.via_router:
        routed = Table(title=f"Geo router ({result.via_router})")
        routed.add_column("figure")
        routed.add_column("value", justify="right")
        figures = result.router
        if figures:
            routed.add_row("requests answered, by region", ", ".join(
                f"{r} {n}" for r, n in figures["requests"].items()))
            routed.add_row("decisions: nearest region / straight to the data's owner",
                           f"{figures['reasons']['nearest']} / {figures['reasons']['owner']}")
            routed.add_row("decisions: failover / weighted", f"{figures['reasons']['failover']}"
                           f" / {figures['reasons']['weighted']}")
            routed.add_row("retried on another region / refused by the router",
                           f"{figures['failovers']} / {figures['refused']}")
        routed.add_row("payments the receiving region still had to forward",
                       f"{result.forwarded} of {result.phase_payments}")
        console.print(routed)

    checks = Table(title="Checks")
    checks.add_column("")
    checks.add_column("check")
    checks.add_column("detail")
    for name, passed, detail in result.checks:
        checks.add_row("[green]✓[/]" if passed else "[red]✗[/]", name, detail)
    if result.errors:
        checks.add_row("[red]✗[/]", "unexpected errors", f"{len(result.errors)}; first: "
                       f"{result.errors[0]}")
    console.print(checks)
    console.print(
        f"{result.phase_payments} payments in {result.payment_seconds:.2f}s = "
        f"[bold]{result.payments_per_second:.0f} payments/s[/] across "
        f"{len(result.regions)} region(s); {result.requests} HTTP requests "
        f"({result.retries} retried) in {result.total_seconds:.2f}s")
    console.print("[bold green]demo OK[/]" if result.ok else "[bold red]demo FAILED[/]")
