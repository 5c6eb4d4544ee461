"""The failover drill's client workload: payments through the geo router from simulated
clients in every region, at a fixed total rate, each attempt recorded.

Every client says where it is with `X-Client-Region` (geo_router README, "How a request is
routed"), so one router serves clients of every region exactly as the per-region routers
would. A payment is one *intent* with its own Idempotency-Key; the client retries it with
the SAME key on 503 / 409 (key in use) / 429 / 502 / 504 and on transport errors, as a
real client would, until it is answered or its retry budget runs out. Each attempt is
recorded (when it started, how long it took, what came back), so the drill can tell when
writes for a region's users failed and when they succeeded again. The key is also written
into the payment's `description`, so that the stores themselves show whether a key was
ever charged twice.

Accounts (payers homed in every region, funded; payees in every region) are opened
before the fault, through the router too.

Refunds ride along: at `refund_share` of the arrivals the merchant of a payment that was
acknowledged a while ago (so it has usually succeeded, across regions too) refunds part of
it, a *refund intent* with its own key, retried the same way (409 only while the key is in
use: any other 409 is a decision). The refunds of one payment never ask for more than its
amount, so every refused refund is a rule of the system at work, not of the workload. The
drill then checks that every acknowledged refund ended exactly once
(`cluster.drill.measure.refund_loss`).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from collections.abc import Coroutine, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx

from cluster.errors import LabError

CURRENCY = "USD"
CLIENT_REGION = "X-Client-Region"
RETRY_STATUS = frozenset({409, 429, 502, 503, 504})
"""Answers a client retries with the same Idempotency-Key (the request may not have run)."""
DESCRIPTION_PREFIX = "drill"
"""Payments of a drill carry `drill:<run>:<key>` as their description."""


class WorkloadError(LabError):
    """The workload could not set itself up (accounts could not be opened)."""


@dataclass
class Attempt:
    """One HTTP attempt of a payment intent, as the client saw it.

    `started` is in seconds since the drill's t0 (time.monotonic based); `outcome` is
    ``ok`` (201/200), ``declined`` (402: an answer, not an outage), ``error`` (any other
    status) or ``exception`` (no answer: `code` is the exception's class).
    """

    key: str
    n: int
    client: str
    home: str
    started: float
    latency: float
    outcome: str
    status: int | None = None
    code: str | None = None
    payment_id: str | None = None
    served_by: str | None = None

    @property
    def ended(self) -> float:
        """When the answer (or the failure) arrived, seconds since t0."""
        return self.started + self.latency

    @property
    def answered(self) -> bool:
        """The system worked: acknowledged or declined by the business rules."""
        return self.outcome in ("ok", "declined")


@dataclass
class Intent:
    """A logical payment: one key, retried until acknowledged, declined or given up."""

    key: str
    client: str
    payer: str
    home: str
    payee: str
    amount: int
    created: float
    attempts: int = 0
    payment_id: str | None = None
    acked_at: float | None = None
    result: str = "pending"
    ids_seen: list[str] = field(default_factory=list)


@dataclass
class RefundIntent:
    """A merchant's partial refund of an acknowledged payment: one key, retried until
    answered or given up. `payer_home`/`payee_home` are the payment's parties' homes (a
    cross-region refund when they differ); `status` is the refund's as first answered."""

    key: str
    client: str
    payment_id: str
    payer_home: str
    payee_home: str
    amount: int
    created: float
    attempts: int = 0
    refund_id: str | None = None
    status: str | None = None
    acked_at: float | None = None
    result: str = "pending"
    code: str | None = None
    ids_seen: list[str] = field(default_factory=list)

    @property
    def cross_region(self) -> bool:
        """Payer and payee homed apart: the reverse saga."""
        return self.payer_home != self.payee_home


@dataclass
class DrillAccounts:
    """The accounts a drill opened: payers per home region (funded), payees per region."""

    payers: dict[str, list[str]]
    payees: dict[str, list[str]]
    deposited: int

    def to_json(self) -> dict[str, Any]:
        """JSON-able form."""
        return asdict(self)


class Workload:
    """Payments through the router at `rate` per second in total, spread evenly over the
    client regions; payers homed in `focus` make up `focus_share` of them (so RTO for the
    drilled region's users is measured on enough samples); `cross_share` of payments go
    to a payee homed in another region (a cross-region saga). At `refund_share` of the
    arrivals a partial refund of a payment acknowledged at least `refund_after` seconds
    earlier starts as well (its own random stream: the payments stay those of `seed`)."""

    def __init__(self, router_url: str, regions: list[str], *, focus: str, rate: float,
                 t0: float, run_id: str, headers: Mapping[str, str] | None = None,
                 seed: int = 0, focus_share: float = 0.5, cross_share: float = 0.2,
                 give_up_after: float = 30.0, request_timeout: float = 10.0,
                 max_in_flight: int = 256, refund_share: float = 0.1,
                 refund_after: float = 2.0) -> None:
        self.router_url = router_url
        self.regions = list(regions)
        self.focus = focus
        self.rate = rate
        self.t0 = t0
        self.run_id = run_id
        self.headers = dict(headers or {})
        self.rng = random.Random(seed)
        self.focus_share = focus_share
        self.cross_share = cross_share
        self.give_up_after = give_up_after
        self.request_timeout = request_timeout
        self.attempts: list[Attempt] = []
        self.intents: list[Intent] = []
        self.refund_share = refund_share
        self.refund_after = refund_after
        self.refund_rng = random.Random(seed + 1)
        self.refunds: list[RefundIntent] = []
        self._acked: list[Intent] = []
        # What the workload may still ask back per payment (its amount less the refunds
        # planned): never more than captured, so a refusal is the system's, not ours.
        self._refundable: dict[str, int] = {}
        self.accounts: DrillAccounts | None = None
        self._client: httpx.AsyncClient | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._serial = 0
        # At most this many requests in flight (the HTTP pool's size). Arrivals keep
        # their open-loop schedule, but while the cluster does not answer the intents
        # waiting for an attempt queue here, not in the HTTP pool, whose request
        # assignment costs O(queued x connections) per event: with thousands of retrying
        # intents (a stalled region, a lab that stopped) that kept a core busy.
        self.max_in_flight = max_in_flight
        self._slots = asyncio.Semaphore(max_in_flight)

    # ---------------------------------------------------------------- lifecycle

    async def __aenter__(self) -> Workload:
        self._client = httpx.AsyncClient(
            base_url=self.router_url, timeout=self.request_timeout,
            limits=httpx.Limits(max_connections=self.max_in_flight,
                                max_keepalive_connections=64))
        return self

    async def __aexit__(self, *exc: object) -> None:
        for task in list(self._tasks):
            task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()

    def abandon(self) -> None:
        """Cancel every payment still in flight (the drill was interrupted: nobody waits
        for the clients' retries, which may take `give_up_after`)."""
        for task in list(self._tasks):
            task.cancel()

    @property
    def client(self) -> httpx.AsyncClient:
        """The HTTP client (to the router)."""
        if self._client is None:
            raise RuntimeError("use the workload in `async with`")
        return self._client

    def now(self) -> float:
        """Seconds since the drill's t0."""
        return time.monotonic() - self.t0

    # ---------------------------------------------------------------- accounts

    async def _setup_post(self, client_region: str, path: str, body: dict[str, Any]
                          ) -> dict[str, Any]:
        """POST before the fault: retried with one key; anything but 2xx is fatal."""
        headers = {**self.headers, CLIENT_REGION: client_region,
                   "Idempotency-Key": f"drill-setup-{uuid.uuid4()}"}
        last = ""
        for attempt in range(8):
            try:
                resp = await self.client.post(path, json=body, headers=headers)
            except httpx.TransportError as exc:
                last = repr(exc)
            else:
                if resp.status_code in (200, 201):
                    doc: dict[str, Any] = resp.json()
                    return doc
                last = f"{resp.status_code} {resp.text[:300]}"
                if resp.status_code not in RETRY_STATUS:
                    break
            await asyncio.sleep(0.1 * 2 ** attempt)
        raise WorkloadError(f"POST {path} through the router failed: {last}")

    async def open_accounts(self, payers_per_region: int = 4, payees_per_region: int = 2,
                            balance: int = 10_000_000) -> DrillAccounts:
        """Open and fund payers, open payees, in every region (through the router, each as
        a client of its home region)."""

        async def open_one(home: str, kind: str, deposit: int) -> str:
            doc = await self._setup_post(home, "/v1/accounts", {
                "currency": CURRENCY, "kind": kind, "home_region": home})
            account = str(doc["id"])
            if deposit:
                await self._setup_post(home, f"/v1/accounts/{account}/deposits",
                                       {"amount": deposit})
            return account

        payers: dict[str, list[str]] = {}
        payees: dict[str, list[str]] = {}
        for home in self.regions:
            payers[home] = list(await asyncio.gather(*(
                open_one(home, "customer", balance) for _ in range(payers_per_region))))
            payees[home] = list(await asyncio.gather(*(
                open_one(home, "merchant", 0) for _ in range(payees_per_region))))
        self.accounts = DrillAccounts(payers, payees,
                                      balance * payers_per_region * len(self.regions))
        return self.accounts

    # ---------------------------------------------------------------- payments

    def _plan(self, client: str) -> Intent:
        assert self.accounts is not None
        others = [r for r in self.regions if r != self.focus] or [self.focus]
        home = self.focus if self.rng.random() < self.focus_share else self.rng.choice(others)
        payee_home = home
        if self.rng.random() < self.cross_share:
            payee_home = self.rng.choice([r for r in self.regions if r != home] or [home])
        # No long digit runs in the key: the nodes mask card-number-like runs (13+ digits)
        # in descriptions, which would hide the key from the duplicate check.
        self._serial += 1
        key = f"drill-{self.run_id}-n{self._serial}x{uuid.uuid4().hex[:8]}"
        return Intent(key=key, client=client,
                      payer=self.rng.choice(self.accounts.payers[home]), home=home,
                      payee=self.rng.choice(self.accounts.payees[payee_home]),
                      amount=self.rng.randint(1, 500), created=self.now())

    async def _attempt(self, intent: Intent, body: dict[str, Any]) -> Attempt:
        intent.attempts += 1
        headers = {**self.headers, CLIENT_REGION: intent.client,
                   "Idempotency-Key": intent.key}
        started = time.monotonic()
        at = started - self.t0
        try:
            resp = await self.client.post("/v1/payments", json=body, headers=headers)
        except httpx.HTTPError as exc:
            return Attempt(intent.key, intent.attempts, intent.client, intent.home, at,
                           time.monotonic() - started, "exception", code=type(exc).__name__)
        latency = time.monotonic() - started
        served = resp.headers.get("paycluster-served-by")
        if resp.status_code in (200, 201):
            return Attempt(intent.key, intent.attempts, intent.client, intent.home, at, latency,
                           "ok", resp.status_code, payment_id=str(resp.json()["id"]),
                           served_by=served)
        code: str | None = None
        with contextlib.suppress(ValueError, KeyError, TypeError, AttributeError):
            code = str(resp.json()["error"]["code"])
        outcome = "declined" if resp.status_code == 402 else "error"
        return Attempt(intent.key, intent.attempts, intent.client, intent.home, at, latency,
                       outcome, resp.status_code, code or f"http_{resp.status_code}",
                       served_by=served)

    async def _pay(self, intent: Intent) -> None:
        body = {"payer": intent.payer, "payee": intent.payee, "amount": intent.amount,
                "currency": CURRENCY,
                "description": f"{DESCRIPTION_PREFIX}:{self.run_id}:{intent.key}"}
        deadline = intent.created + self.give_up_after
        backoff = 0.1
        while True:
            async with self._slots:
                attempt = await self._attempt(intent, body)
            self.attempts.append(attempt)
            if attempt.payment_id is not None:
                intent.ids_seen.append(attempt.payment_id)
                intent.payment_id = intent.payment_id or attempt.payment_id
                intent.acked_at = attempt.ended
                intent.result = "acked"
                self._acked.append(intent)
                return
            retry = attempt.outcome == "exception" or attempt.status in RETRY_STATUS
            if not retry:
                intent.result = attempt.outcome if attempt.outcome == "declined" else "failed"
                return
            if self.now() + backoff > deadline:
                intent.result = "gave_up"
                return
            # Jittered backoff, capped: a client hammering a failing region helps nobody.
            await asyncio.sleep(backoff * (0.5 + self.rng.random()))
            backoff = min(backoff * 1.5, 1.0)

    # ---------------------------------------------------------------- refunds

    def _plan_refund(self, client: str) -> RefundIntent | None:
        """A partial refund (at most a third of the payment) of a payment acknowledged
        `refund_after` s ago with at least 3 minor units left to ask for (None if there is
        none yet)."""
        assert self.accounts is not None
        ripe = self.now() - self.refund_after
        candidates = [i for i in self._acked if i.acked_at is not None and i.acked_at <= ripe
                      and self._refundable.get(str(i.payment_id), i.amount) >= 3]
        if not candidates:
            return None
        rng = self.refund_rng
        paid = rng.choice(candidates)
        pid = str(paid.payment_id)
        left = self._refundable.get(pid, paid.amount)
        amount = rng.randint(1, max(1, min(left, paid.amount // 3)))
        self._refundable[pid] = left - amount
        payee_home = next(h for h, ids in self.accounts.payees.items() if paid.payee in ids)
        self._serial += 1
        key = f"drill-{self.run_id}-r{self._serial}x{uuid.uuid4().hex[:8]}"
        return RefundIntent(key=key, client=client, payment_id=pid, payer_home=paid.home,
                            payee_home=payee_home, amount=amount, created=self.now())

    async def _refund(self, intent: RefundIntent) -> None:
        """POST the refund with its key until answered: retried on no answer, 429/502/
        503/504 and 409 key in use (still running); any other answer is final."""
        headers = {**self.headers, CLIENT_REGION: intent.client,
                   "Idempotency-Key": intent.key}
        path = f"/v1/payments/{intent.payment_id}/refunds"
        deadline = intent.created + self.give_up_after
        backoff = 0.1
        while True:
            intent.attempts += 1
            code: str | None = None
            status: int | None = None
            try:
                async with self._slots:
                    resp = await self.client.post(path, json={"amount": intent.amount},
                                                  headers=headers)
            except httpx.HTTPError as exc:
                code = type(exc).__name__
            else:
                status = resp.status_code
                if status in (200, 201):
                    doc = resp.json()
                    intent.ids_seen.append(str(doc["id"]))
                    intent.refund_id = intent.refund_id or str(doc["id"])
                    intent.status = intent.status or str(doc.get("status"))
                    intent.acked_at = self.now()
                    intent.result = "acked"
                    return
                with contextlib.suppress(ValueError, KeyError, TypeError, AttributeError):
                    code = str(resp.json()["error"]["code"])
                code = code or f"http_{status}"
            intent.code = code
            retry = status is None or (status in RETRY_STATUS and status != 409) \
                or code == "idempotency_key_in_use"
            if not retry:
                intent.result = "declined" if status == 402 else "refused"
                return
            if self.now() + backoff > deadline:
                intent.result = "gave_up"
                return
            await asyncio.sleep(backoff * (0.5 + self.refund_rng.random()))
            backoff = min(backoff * 1.5, 1.0)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task: asyncio.Task[None] = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def run(self, stop: asyncio.Event) -> None:
        """Start payments (and now and then a refund) at the configured rate until `stop`
        is set, then wait for every intent to be answered or to give up."""
        interval = 1.0 / self.rate
        started = time.monotonic()
        n = 0
        while not stop.is_set():
            client = self.regions[n % len(self.regions)]
            intent = self._plan(client)
            self.intents.append(intent)
            self._spawn(self._pay(intent))
            if self.refund_share > 0 and self.refund_rng.random() < self.refund_share:
                refund = self._plan_refund(client)
                if refund is not None:
                    self.refunds.append(refund)
                    self._spawn(self._refund(refund))
            n += 1
            # Fixed schedule (open loop): a slow answer does not slow the arrivals down,
            # as with real users.
            delay = started + n * interval - time.monotonic()
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)


# --------------------------------------------------------------------------- lag sampling


@dataclass
class LagSample:
    """One reading of one region's monitor: lag per pair (peer -> region), or why not."""

    at: float
    region: str
    pairs: dict[str, float | None]
    breaches: list[str]
    conflicts: int
    error: str | None = None
    slo_seconds: float | None = None
    """The monitor's lag SLO, as the region reported it."""


class LagSampler:
    """Reads every region's `/v1/replication/status` (its convergence monitor) directly,
    every `every` seconds, in the background."""

    def __init__(self, apis: Mapping[str, str], t0: float,
                 headers: Mapping[str, str] | None = None, every: float = 0.5,
                 timeout: float | None = None) -> None:
        self.apis = dict(apis)
        self.t0 = t0
        self.headers = dict(headers or {})
        self.every = every
        # A drill wants a reading per interval (a region that does not answer is a fact
        # of the timeline); the demo waits for the answer, so a loaded node is not sent
        # a new request while it still works on the abandoned one.
        self.timeout = min(2.0, every * 2) if timeout is None else timeout
        self.samples: list[LagSample] = []
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Begin sampling."""
        self._task = asyncio.create_task(self._run())

    async def stop(self, last_round: bool = False) -> None:
        """Stop after the current round; with `last_round`, read every region once more
        (a run that ends with a check wants the state at its end, not up to `every` old)."""
        self._stop.set()
        if self._task is not None:
            await self._task
        if last_round:
            async with httpx.AsyncClient(timeout=self.timeout) as client:
                self.samples.extend(await asyncio.gather(*(
                    self._one(client, region, url) for region, url in self.apis.items())))

    async def _one(self, client: httpx.AsyncClient, region: str, url: str) -> LagSample:
        at = time.monotonic() - self.t0
        try:
            resp = await client.get(f"{url}/v1/replication/status", headers=self.headers)
            resp.raise_for_status()
            doc = resp.json()
        except (httpx.HTTPError, ValueError) as exc:
            return LagSample(at, region, {}, [], 0, error=type(exc).__name__)
        pairs: dict[str, float | None] = {}
        breaches: list[str] = []
        conflicts = 0
        for name, pair in (doc.get("pairs") or {}).items():
            lag = pair.get("lag_seconds")
            pairs[name] = None if lag is None else float(lag)
            if pair.get("breach"):
                breach = pair["breach"]
                cause = breach.get("cause") if isinstance(breach, dict) else breach
                breaches.append(f"{name}: {cause}")
            conflicts += sum(int(v) for v in (pair.get("conflicts") or {}).values())
        slo = doc.get("slo_seconds")
        return LagSample(at, region, pairs, breaches, conflicts,
                         slo_seconds=None if slo is None else float(slo))

    async def _run(self) -> None:
        async with httpx.AsyncClient(timeout=self.timeout) as client:
            while not self._stop.is_set():
                self.samples.extend(await asyncio.gather(*(
                    self._one(client, region, url) for region, url in self.apis.items())))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), self.every)
