"""The demo workload: a small shop day driven through the public REST API only.

Customers and merchants open accounts and fund them, customers pay merchants (mostly
automatic capture; some manual holds that are captured, partly captured or canceled),
a few payments are refunded, merchants withdraw a payout, a few payments exceed the
payer's balance (402), and one request is retried with its Idempotency-Key to show the
replay. The summary then checks the books from the outside: every account's balance is
what the client expects, and the sum of all balances equals deposits minus withdrawals.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

CURRENCY = "USD"
CUSTOMERS = 5
MERCHANTS = 3
OVERDRAFT_ATTEMPTS = 3
REFUNDS = 10
# Retries of one logical request with the same Idempotency-Key (transport errors, 409, 503).
MAX_ATTEMPTS = 4
RETRYABLE_STATUS = {409, 429, 502, 503, 504}


class DemoError(RuntimeError):
    """The node answered something the demo cannot continue from."""


def money(minor: int, currency: str | None = CURRENCY) -> str:
    """Integer minor units as `1,234.56 USD` (no floats near money); no code if None."""
    sign = "-" if minor < 0 else ""
    units, cents = divmod(abs(minor), 100)
    return f"{sign}{units:,}.{cents:02d}" + (f" {currency}" if currency else "")


@dataclass
class Account:
    """An account the demo opened, with what the client expects its balance to be."""

    label: str
    kind: str
    id: str
    deposited: int = 0
    withdrawn: int = 0
    expected: int = 0
    actual: dict[str, Any] = field(default_factory=dict)
    entries: int = 0


@dataclass
class DemoResult:
    """Everything the summary shows; `ok` is False if any check failed."""

    api_url: str
    accounts: list[Account] = field(default_factory=list)
    payments: dict[str, dict[str, Any]] = field(default_factory=dict)
    declined: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    checks: list[tuple[str, bool, str]] = field(default_factory=list)
    phase_payments: int = 0
    requests: int = 0
    retries: int = 0
    payment_seconds: float = 0.0
    total_seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """True when every check passed and no request failed unexpectedly."""
        return not self.errors and all(passed for _, passed, _ in self.checks)

    @property
    def payments_per_second(self) -> float:
        """Payments created per second during the payments phase."""
        return self.phase_payments / self.payment_seconds if self.payment_seconds else 0.0


class Api:
    """Thin client of the v1 REST API: Idempotency-Key on every mutation, safe retries."""

    def __init__(self, client: httpx.AsyncClient, result: DemoResult) -> None:
        self.client = client
        self.result = result

    async def post(self, path: str, body: dict[str, Any], key: str | None = None,
                   expect: tuple[int, ...] = (200, 201)) -> httpx.Response:
        """POST with an Idempotency-Key; retry transient failures with the SAME key.

        Retrying with the same key is what makes the retry safe: the node either replays
        the stored result or runs the request for the first time, never twice.
        """
        headers = {"Idempotency-Key": key or f"demo-{uuid.uuid4()}"}
        for attempt in range(MAX_ATTEMPTS):
            self.result.requests += 1
            try:
                resp = await self.client.post(path, json=body, headers=headers)
            except httpx.TransportError:
                if attempt + 1 == MAX_ATTEMPTS:
                    raise
            else:
                if resp.status_code not in RETRYABLE_STATUS or attempt + 1 == MAX_ATTEMPTS:
                    if resp.status_code not in expect:
                        raise DemoError(f"POST {path} -> {resp.status_code}: {resp.text[:300]}")
                    return resp
            self.result.retries += 1
            await asyncio.sleep(0.05 * 2**attempt)
        raise AssertionError("unreachable")

    async def get(self, path: str, **params: Any) -> dict[str, Any]:
        """GET a JSON document; DemoError on anything but 200."""
        self.result.requests += 1
        resp = await self.client.get(path, params=params or None)
        if resp.status_code != 200:
            raise DemoError(f"GET {path} -> {resp.status_code}: {resp.text[:300]}")
        body: dict[str, Any] = resp.json()
        return body


async def _open_accounts(api: Api, payments: int) -> tuple[list[Account], list[Account]]:
    # Fund customers generously for the requested volume, so that only the deliberate
    # overdraft attempts are declined.
    funding = 10_000_00 + payments * 2_000
    customers = [Account(f"customer-{i + 1}", "customer", "") for i in range(CUSTOMERS)]
    merchants = [Account(f"merchant-{i + 1}", "merchant", "") for i in range(MERCHANTS)]

    async def open_one(acct: Account) -> None:
        resp = await api.post("/v1/accounts", {"currency": CURRENCY, "kind": acct.kind},
                              expect=(201,))
        acct.id = resp.json()["id"]
        if acct.kind == "customer":
            await api.post(f"/v1/accounts/{acct.id}/deposits", {"amount": funding},
                           expect=(201,))
            acct.deposited = acct.expected = funding

    await asyncio.gather(*(open_one(a) for a in customers + merchants))
    return customers, merchants


@dataclass
class _Plan:
    payer: Account
    payee: Account
    amount: int
    manual: bool
    # For manual payments: "capture", "partial" or "cancel".
    then: str = ""


async def _pay(api: Api, plan: _Plan, result: DemoResult) -> None:
    body = {"payer": plan.payer.id, "payee": plan.payee.id, "amount": plan.amount,
            "currency": CURRENCY, "capture_method": "manual" if plan.manual else "automatic",
            "description": "demo order"}
    try:
        resp = await api.post("/v1/payments", body, expect=(201, 402))
        if resp.status_code == 402:
            result.errors.append(f"unexpected 402 for {plan.payer.label}: {resp.text[:200]}")
            return
        payment = resp.json()
        if plan.manual:
            if plan.then == "cancel":
                await api.post(f"/v1/payments/{payment['id']}/cancel", {})
            else:
                amount = plan.amount if plan.then == "capture" else max(1, plan.amount // 2)
                await api.post(f"/v1/payments/{payment['id']}/capture", {"amount": amount})
        result.payments[payment["id"]] = payment
    except (DemoError, httpx.HTTPError) as exc:
        result.errors.append(f"payment {plan.payer.label}->{plan.payee.label}: {exc}")


async def _payments(api: Api, customers: list[Account], merchants: list[Account],
                    count: int, concurrency: int, rng: random.Random,
                    result: DemoResult) -> None:
    manual_every = 10  # one payment in ten holds funds first (TCC try/confirm/cancel)
    plans = []
    for i in range(count):
        manual = i % manual_every == manual_every - 1
        then = ("capture", "capture", "partial", "cancel")[(i // manual_every) % 4]
        plans.append(_Plan(rng.choice(customers), rng.choice(merchants),
                           rng.randint(1_00, 50_00), manual, then if manual else ""))
    gate = asyncio.Semaphore(concurrency)

    async def run(plan: _Plan) -> None:
        async with gate:
            await _pay(api, plan, result)

    started = time.perf_counter()
    await asyncio.gather(*(run(p) for p in plans))
    result.payment_seconds = time.perf_counter() - started
    result.phase_payments = len(result.payments)


async def _refunds(api: Api, result: DemoResult, rng: random.Random) -> None:
    succeeded = [p for p in result.payments.values()
                 if p.get("status") == "succeeded" and p.get("capture_method") == "automatic"]
    for i, payment in enumerate(rng.sample(succeeded, min(REFUNDS, len(succeeded)))):
        # Alternate full refunds (no amount) and partial ones.
        body = {} if i % 2 == 0 else {"amount": max(1, int(payment["amount"]) // 3)}
        try:
            await api.post(f"/v1/payments/{payment['id']}/refunds", body)
        except (DemoError, httpx.HTTPError) as exc:
            result.errors.append(f"refund of {payment['id']}: {exc}")


async def _overdrafts(api: Api, customers: list[Account], result: DemoResult) -> None:
    for payer in customers[:OVERDRAFT_ATTEMPTS]:
        before = await api.get(f"/v1/accounts/{payer.id}")
        body = {"payer": payer.id, "payee": customers[-1].id, "amount": before["available"] + 1,
                "currency": CURRENCY, "description": "more than the payer has"}
        resp = await api.post("/v1/payments", body, expect=(201, 402))
        after = await api.get(f"/v1/accounts/{payer.id}")
        error = resp.json().get("error", {}) if resp.status_code == 402 else {}
        result.declined.append({"payer": payer.label, "status": resp.status_code,
                                "code": error.get("code"), "amount": body["amount"],
                                "unchanged": after["balance"] == before["balance"]})


async def _replay(api: Api, customers: list[Account], merchants: list[Account],
                  result: DemoResult) -> None:
    """Send one payment twice with the same key: one payment, one charge, same answer."""
    payer, payee = customers[0], merchants[0]
    body = {"payer": payer.id, "payee": payee.id, "amount": 12_34, "currency": CURRENCY,
            "description": "retried by the client"}
    key = f"demo-replay-{uuid.uuid4()}"
    first = (await api.post("/v1/payments", body, key=key, expect=(201,))).json()
    before = await api.get(f"/v1/accounts/{payer.id}")
    second = await api.post("/v1/payments", body, key=key, expect=(200, 201))
    after = await api.get(f"/v1/accounts/{payer.id}")
    result.payments[first["id"]] = first
    same = second.json().get("id") == first["id"] and after["balance"] == before["balance"]
    result.checks.append(("idempotent replay", same,
                          "same key sent twice: one payment, payer charged once"
                          if same else f"replay returned {second.text[:200]}"))


async def _payouts(api: Api, merchants: list[Account]) -> None:
    for merchant in merchants:
        current = await api.get(f"/v1/accounts/{merchant.id}")
        amount = int(current["available"]) // 10
        if amount > 0:
            await api.post(f"/v1/accounts/{merchant.id}/withdrawals", {"amount": amount},
                           expect=(201,))
            merchant.withdrawn += amount


async def _count_entries(api: Api, account: Account) -> int:
    count, cursor = 0, None
    while True:
        params: dict[str, Any] = {"limit": 100}
        if cursor:
            params["starting_after"] = cursor
        page = await api.get(f"/v1/accounts/{account.id}/entries", **params)
        count += len(page["data"])
        if not page.get("has_more"):
            return count
        cursor = page.get("next_cursor") or page["data"][-1]["id"]


async def _settle(api: Api, accounts: list[Account], result: DemoResult) -> None:
    """Fetch final states and compare them with what the client expects."""
    fresh = await asyncio.gather(*(api.get(f"/v1/payments/{pid}") for pid in result.payments))
    result.payments = {p["id"]: p for p in fresh}
    by_id = {a.id: a for a in accounts}
    for a in accounts:
        a.expected = a.deposited - a.withdrawn
    for p in result.payments.values():
        moved = int(p.get("amount_captured") or 0) - int(p.get("amount_refunded") or 0)
        by_id[p["payer"]].expected -= moved
        by_id[p["payee"]].expected += moved
    for a in accounts:
        a.actual = await api.get(f"/v1/accounts/{a.id}")
        a.entries = await _count_entries(api, a)

    balances = sum(int(a.actual["balance"]) for a in accounts)
    net_in = sum(a.deposited - a.withdrawn for a in accounts)
    result.checks.append(("journal balances", balances == net_in,
                          f"sum of balances {money(balances)} = deposits - withdrawals "
                          f"{money(net_in)}"))
    wrong = [a.label for a in accounts if int(a.actual["balance"]) != a.expected]
    result.checks.append(("every balance as expected", not wrong,
                          "client-side expectation matches every account" if not wrong
                          else f"differs: {', '.join(wrong)}"))
    held = [a.label for a in accounts if int(a.actual.get("held") or 0) != 0]
    result.checks.append(("no funds left on hold", not held,
                          "every hold was captured or canceled" if not held
                          else f"held: {', '.join(held)}"))
    negative = [a.label for a in accounts if int(a.actual["available"]) < 0]
    result.checks.append(("no negative available", not negative,
                          "no account went below zero" if not negative
                          else f"negative: {', '.join(negative)}"))
    declined_ok = all(d["status"] == 402 and d["unchanged"] for d in result.declined)
    result.checks.append(("overdrafts declined", declined_ok,
                          f"{len(result.declined)} payments over balance got 402, "
                          "nothing moved" if declined_ok else f"{result.declined}"))


async def run_demo_async(api_url: str, payments: int = 300, concurrency: int = 8,
                         seed: int | None = None,
                         console: Console | None = None) -> DemoResult:
    """Run the demo workload against the REST API at `api_url` and check the books."""
    console = console or Console()
    rng = random.Random(seed)
    result = DemoResult(api_url)
    started = time.perf_counter()
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=api_url, timeout=30.0, limits=limits) as client:
        api = Api(client, result)

        async def phase(text: str, coro: Any) -> Any:
            t0 = time.perf_counter()
            with console.status(text):
                value = await coro
            console.print(f"[green]✓[/] {text} [dim]({time.perf_counter() - t0:.2f}s)[/]")
            return value

        customers, merchants = await phase(
            f"open {CUSTOMERS} customer + {MERCHANTS} merchant accounts and fund customers",
            _open_accounts(api, payments))
        result.accounts = customers + merchants
        await phase(f"run {payments} payments ({concurrency} at a time)",
                    _payments(api, customers, merchants, payments, concurrency, rng, result))
        await phase(f"refund {REFUNDS} payments", _refunds(api, result, rng))
        await phase("retry one payment with the same Idempotency-Key",
                    _replay(api, customers, merchants, result))
        await phase(f"try {OVERDRAFT_ATTEMPTS} payments above the payer's balance",
                    _overdrafts(api, customers, result))
        await phase("pay merchants out (withdraw 10%)", _payouts(api, merchants))
        await phase("read back payments, balances and journals",
                    _settle(api, result.accounts, result))
    result.total_seconds = time.perf_counter() - started
    return result


def run_demo(api_url: str, payments: int = 300, concurrency: int = 8, seed: int | None = None,
             console: Console | None = None) -> DemoResult:
    """Synchronous wrapper of `run_demo_async`."""
    return asyncio.run(run_demo_async(api_url, payments, concurrency, seed, console))


def print_summary(result: DemoResult, console: Console | None = None) -> None:
    """Rich tables: payments by status, money moved, accounts, checks, throughput."""
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

    captured = sum(int(p.get("amount_captured") or 0) for p in result.payments.values())
    refunded = sum(int(p.get("amount_refunded") or 0) for p in result.payments.values())
    deposits = sum(a.deposited for a in result.accounts)
    withdrawals = sum(a.withdrawn for a in result.accounts)
    moved = Table(title="Money moved")
    moved.add_column("what")
    moved.add_column(f"amount ({CURRENCY})", justify="right")
    for label, value in (("deposits", deposits), ("captured (customers -> merchants)", captured),
                         ("refunded (merchants -> customers)", refunded),
                         ("net to merchants", captured - refunded),
                         ("withdrawals (payouts)", withdrawals)):
        moved.add_row(label, money(value, None))
    console.print(moved)

    accounts = Table(title=f"Accounts ({CURRENCY})")
    for col in ("account", "kind", "balance", "available", "held", "expected", "entries"):
        accounts.add_column(col, justify="left" if col in ("account", "kind") else "right")
    for a in result.accounts:
        bal = int(a.actual.get("balance", 0))
        accounts.add_row(a.label, a.kind, money(bal, None),
                         money(int(a.actual.get("available", 0)), None),
                         money(int(a.actual.get("held", 0)), None), money(a.expected, None),
                         str(a.entries), style=None if bal == a.expected else "red")
    console.print(accounts)

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
        f"[bold]{result.payments_per_second:.0f} payments/s[/]; {result.requests} HTTP "
        f"requests ({result.retries} retried) in {result.total_seconds:.2f}s against "
        f"{result.api_url}")
    console.print("[bold green]demo OK[/]" if result.ok else "[bold red]demo FAILED[/]")
