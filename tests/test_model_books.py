"""Model-based test of the books: random operation sequences through the public API of a
real two-region lab, checked against a model of what every account must hold.

Hypothesis' rule-based state machine drives accounts opened in both regions (customers
and merchants, of three principals), deposits, withdrawals, automatic and manual
payments within and across regions, full and partial captures, cancels, partial and full
refunds within and across regions (a cross-region refund is waited for like a payment: it
succeeds, or fails and re-credits the merchant when the payer has closed), closing
accounts (also payees that holds point at), retries with the same Idempotency-Key (same
body through the other region: the stored answer; another body: 422) and requests made
with another principal's key (403, nothing moves). Every request enters through a random
region, so writes for the other region's accounts are forwarded.

After every sequence, once the cluster is quiet, it checks: every balance and hold equals
the model, and every payment record its modelled status and amounts; the journal sums to
zero; nothing is left in transit or on hold except for payments still `requires_capture`;
no negative available balance; both regions hold the same rows; zero replication
conflicts. A failure is shrunk by Hypothesis to a short sequence, printed as steps.

In `make test` the run is derandomized and bounded (PAYCLUSTER_MODEL_EXAMPLES examples of
PAYCLUSTER_MODEL_STEPS steps); `make fuzz` runs many more with fresh seeds.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import psycopg
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    multiple,
    precondition,
    rule,
    run_state_machine_as_test,
)

from cluster.invariants import ledger_findings
from cluster.lab import Cluster, start_cluster

pytestmark = [pytest.mark.integration, pytest.mark.multiregion, pytest.mark.slow, pytest.mark.lab]

EXAMPLES = int(os.environ.get("PAYCLUSTER_MODEL_EXAMPLES", "6"))
STEPS = int(os.environ.get("PAYCLUSTER_MODEL_STEPS", "30"))
FUZZ = os.environ.get("PAYCLUSTER_MODEL_FUZZ") == "1"
SETTLE_SECONDS = 30.0


@dataclass
class Acct:
    """What the model knows of one account."""

    id: str
    principal: str
    home: str
    kind: str
    balance: int = 0
    held: int = 0
    closed: bool = False


@dataclass
class Pay:
    """What the model knows of one payment."""

    id: str
    payer: Acct
    payee: Acct
    amount: int
    status: str
    held: int = 0
    captured: int = 0
    refunded: int = 0

    @property
    def cross(self) -> bool:
        return self.payer.home != self.payee.home


@dataclass
class Sent:
    """A mutation that was answered, to be retried with its key."""

    path: str
    body: dict[str, Any]
    key: str
    principal: str
    status: int
    answer: dict[str, Any]


@dataclass
class World:
    """The lab and the principals every sequence shares (each sequence opens its own
    accounts, so sequences never see each other's money)."""

    lab: Cluster
    keys: dict[str, str] = field(default_factory=dict)  # principal name -> API key
    http: dict[str, httpx.Client] = field(default_factory=dict)  # region -> client


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    lab = start_cluster(tmp_path_factory.mktemp("lab"), regions=2, wan_scale=0)
    clients: dict[str, httpx.Client] = {}
    try:
        for name in lab.names:
            clients[name] = httpx.Client(base_url=lab.region(name).api_url, timeout=30)
        world = World(lab, {"admin": lab.admin_key}, clients)
        admin = {"Authorization": f"Bearer {lab.admin_key}"}
        for name, role in (("alice", "customer"), ("bob", "customer"), ("shop", "merchant")):
            made = clients[lab.names[0]].post("/v1/admin/principals", headers=admin,
                                              json={"name": f"model-{name}", "role": role})
            assert made.status_code == 201, made.text
            world.keys[name] = made.json()["api_key"]["key"]
        # Keys replicate like the ledger: wait until every region knows them.
        deadline = time.monotonic() + SETTLE_SECONDS
        for key in world.keys.values():
            for client in clients.values():
                while client.get(f"/v1/accounts/{uuid.uuid4()}",
                                 headers={"Authorization": f"Bearer {key}"}).status_code == 401:
                    assert time.monotonic() < deadline, "keys never replicated"
                    time.sleep(0.05)
        yield world
    finally:
        for client in clients.values():
            client.close()
        lab.stop()


amounts = st.integers(min_value=1, max_value=3_000)
deposits = st.integers(min_value=1, max_value=10_000)


def _stored_amount(sent: Sent) -> bool:
    """A request with an amount whose answer the key certainly stored (a success: some
    refusals are made before a key is claimed, and leave nothing to be reused)."""
    return "amount" in sent.body and sent.status in (200, 201)


class Books(RuleBasedStateMachine):
    """The state machine; `world` is set by the test before it runs."""

    world: World

    accounts = Bundle("accounts")
    payments = Bundle("payments")

    def __init__(self) -> None:
        super().__init__()
        self.accts: list[Acct] = []
        self.pays: list[Pay] = []
        self.sent: list[Sent] = []

    # ------------------------------------------------------------------ plumbing

    @property
    def regions(self) -> list[str]:
        return self.world.lab.names

    def call(self, method: str, path: str, principal: str, entry: str,
             body: dict[str, Any] | None = None, key: str | None = None,
             ) -> tuple[int, dict[str, Any]]:
        """One request through region `entry`, as `principal`, retried (same key) on a
        503 from a forward in flight: the answer a client ends up with."""
        headers = {"Authorization": f"Bearer {self.world.keys[principal]}"}
        if key is not None:
            headers["Idempotency-Key"] = key
        deadline = time.monotonic() + SETTLE_SECONDS
        while True:
            resp = self.world.http[entry].request(method, path, json=body, headers=headers)
            if resp.status_code != 503 or time.monotonic() > deadline:
                return resp.status_code, resp.json()
            time.sleep(0.05)

    def mutate(self, path: str, principal: str, entry: str,
               body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        key = f"model-{uuid.uuid4()}"
        status, answer = self.call("POST", path, principal, entry, body, key)
        self.sent.append(Sent(path, body, key, principal, status, answer))
        return status, answer

    def settle(self, pay: Pay) -> str:
        """Wait until a cross-region payment has left `processing`; its status."""
        deadline = time.monotonic() + SETTLE_SECONDS
        while True:
            status, doc = self.call("GET", f"/v1/payments/{pay.id}?consistency=strong",
                                    "admin", pay.payer.home)
            assert status == 200, doc
            if doc["status"] != "processing":
                return str(doc["status"])
            assert time.monotonic() < deadline, f"payment {pay.id} stuck processing"
            time.sleep(0.02)

    def settle_refund(self, pay: Pay, refund_id: str) -> tuple[str, dict[str, Any]]:
        """Wait until a cross-region refund has left `pending` (read at the region serving
        the payee's home, its only writer); its status and body."""
        deadline = time.monotonic() + SETTLE_SECONDS
        while True:
            status, doc = self.call("GET", f"/v1/refunds/{refund_id}?consistency=strong",
                                    "admin", pay.payee.home)
            assert status == 200, doc
            if doc["status"] != "pending":
                return str(doc["status"]), doc
            assert time.monotonic() < deadline, f"refund {refund_id} stuck pending"
            time.sleep(0.02)

    def expect(self, got: tuple[int, dict[str, Any]], status: int, code: str | None = None
               ) -> dict[str, Any]:
        assert got[0] == status, (status, code, got)
        if code is not None:
            assert got[1]["error"]["code"] == code, (code, got)
        return got[1]

    # ------------------------------------------------------------------ accounts

    @initialize(target=accounts)
    def customers(self) -> Any:
        """A funded customer in each region and a merchant in each: sequences start where
        money can move at once, within and across regions."""
        made = []
        for who, home, kind in (("alice", 0, "customer"), ("bob", 1, "customer"),
                                ("shop", 0, "merchant"), ("shop", 1, "merchant")):
            acct = self._open(who, self.regions[home], kind, self.regions[home])
            if kind == "customer":
                self.deposit(acct, 10_000, home)
            made.append(acct)
        return multiple(*made)

    @rule(target=accounts, who=st.sampled_from(["alice", "bob", "shop"]),
          home=st.integers(0, 1), entry=st.integers(0, 1))
    def open_account(self, who: str, home: int, entry: int) -> Acct:
        kind = "merchant" if who == "shop" else "customer"
        return self._open(who, self.regions[home], kind, self.regions[entry])

    def _open(self, who: str, home: str, kind: str, entry: str) -> Acct:
        doc = self.expect(self.mutate("/v1/accounts", who, entry, {
            "currency": "USD", "kind": kind, "home_region": home}), 201)
        acct = Acct(doc["id"], who, home, kind)
        self.accts.append(acct)
        return acct

    @rule(who=st.sampled_from(["alice", "bob", "shop"]), home=st.integers(0, 1))
    def open_overdraft_account(self, who: str, home: int) -> None:
        """Only an admin makes an account that may overdraw: an entry point for money."""
        got = self.mutate("/v1/accounts", who, self.regions[home], {
            "currency": "USD", "home_region": self.regions[home], "allow_overdraft": True})
        self.expect(got, 403, "overdraft_requires_admin")

    @rule(acct=accounts, amount=deposits, entry=st.integers(0, 1))
    def deposit(self, acct: Acct, amount: int, entry: int) -> None:
        got = self.mutate(f"/v1/accounts/{acct.id}/deposits", "admin", self.regions[entry],
                          {"amount": amount})
        if acct.closed:
            self.expect(got, 400, "account_closed")
            return
        self.expect(got, 201)
        acct.balance += amount

    @rule(acct=accounts, amount=amounts, entry=st.integers(0, 1))
    def withdraw(self, acct: Acct, amount: int, entry: int) -> None:
        got = self.mutate(f"/v1/accounts/{acct.id}/withdrawals", acct.principal,
                          self.regions[entry], {"amount": amount})
        if acct.closed:
            self.expect(got, 400, "account_closed")
        elif acct.balance - acct.held < amount:
            self.expect(got, 402, "insufficient_funds")
        else:
            self.expect(got, 201)
            acct.balance -= amount

    @rule(acct=accounts, entry=st.integers(0, 1))
    def close(self, acct: Acct, entry: int) -> None:
        got = self.mutate(f"/v1/accounts/{acct.id}/close", acct.principal,
                          self.regions[entry], {})
        if acct.balance or acct.held:
            self.expect(got, 409, "account_not_empty")
        else:
            self.expect(got, 200)
            acct.closed = True

    # ------------------------------------------------------------------ payments

    @rule(target=payments, payer=accounts, payee=accounts, amount=amounts,
          manual=st.booleans(), entry=st.integers(0, 1))
    def pay(self, payer: Acct, payee: Acct, amount: int, manual: bool, entry: int
            ) -> Any:
        got = self.mutate("/v1/payments", payer.principal, self.regions[entry], {
            "payer": payer.id, "payee": payee.id, "amount": amount, "currency": "USD",
            "capture_method": "manual" if manual else "automatic"})
        if payer is payee:
            self.expect(got, 400)
            return multiple()
        if payee.closed and payer.home == payee.home:
            self.expect(got, 400, "account_closed")
            return multiple()
        if payer.closed:
            self.expect(got, 400, "account_closed")
            return multiple()
        if payer.balance - payer.held < amount:
            self.expect(got, 402, "insufficient_funds")
            return multiple()
        doc = self.expect(got, 201)
        pay = Pay(doc["id"], payer, payee, amount, str(doc["status"]))
        self.pays.append(pay)
        if manual:
            assert pay.status == "requires_capture", doc
            pay.held = amount
            payer.held += amount
            return pay
        payer.balance -= amount
        pay.captured = amount
        self._complete(pay, amount)
        return pay

    def _complete(self, pay: Pay, amount: int) -> None:
        """`amount` left the payer: the payee gets it, or (cross-region, payee closed)
        the saga gives it back and the payment fails."""
        if not pay.cross:
            assert pay.status == "succeeded", pay
            pay.payee.balance += amount
            return
        pay.status = self.settle(pay)
        if pay.payee.closed:
            assert pay.status == "failed", pay
            pay.payer.balance += amount
            pay.captured = 0
        else:
            assert pay.status == "succeeded", pay
            pay.payee.balance += amount

    @rule(pay=payments, partial=st.one_of(st.none(), amounts), entry=st.integers(0, 1))
    def capture(self, pay: Pay, partial: int | None, entry: int) -> None:
        body = {} if partial is None else {"amount": partial}
        got = self.mutate(f"/v1/payments/{pay.id}/capture", pay.payer.principal,
                          self.regions[entry], body)
        if pay.status != "requires_capture":
            self.expect(got, 409, "payment_unexpected_state")
            return
        amount = pay.held if partial is None else partial
        if amount > pay.held:
            self.expect(got, 400)
            return
        if pay.payee.closed and not pay.cross:
            self.expect(got, 400, "account_closed")
            return
        doc = self.expect(got, 200)
        pay.status = str(doc["status"])
        pay.payer.held -= pay.held
        pay.held = 0
        pay.payer.balance -= amount
        pay.captured = amount
        self._complete(pay, amount)

    @rule(pay=payments, by_payee=st.booleans(), entry=st.integers(0, 1))
    def cancel(self, pay: Pay, by_payee: bool, entry: int) -> None:
        who = pay.payee.principal if by_payee else pay.payer.principal
        got = self.mutate(f"/v1/payments/{pay.id}/cancel", who, self.regions[entry], {})
        if pay.status != "requires_capture":
            self.expect(got, 409, "payment_unexpected_state")
            return
        self.expect(got, 200)
        pay.status = "canceled"
        pay.payer.held -= pay.held
        pay.held = 0

    @rule(pay=payments, partial=st.one_of(st.none(), amounts), entry=st.integers(0, 1))
    def refund(self, pay: Pay, partial: int | None, entry: int) -> None:
        body = {} if partial is None else {"amount": partial}
        got = self.mutate(f"/v1/payments/{pay.id}/refunds", pay.payee.principal,
                          self.regions[entry], body)
        refundable = pay.captured - pay.refunded
        amount = refundable if partial is None else partial
        if pay.status != "succeeded":
            self.expect(got, 409, "payment_unexpected_state")
        elif refundable == 0:
            self.expect(got, 409, "charge_already_refunded")
        elif amount > refundable:
            self.expect(got, 400, "amount_too_large")
        elif pay.payee.closed or (pay.payer.closed and not pay.cross):
            # Across regions only the payer's region knows its payer: a closed payer ends
            # the refund `failed` there (below), not refused here.
            self.expect(got, 400, "account_closed")
        elif pay.payee.balance - pay.payee.held < amount:
            self.expect(got, 402, "insufficient_funds")
        elif not pay.cross:
            doc = self.expect(got, 201)
            assert doc["status"] == "succeeded", doc
            pay.refunded += amount
            pay.payee.balance -= amount
            pay.payer.balance += amount
        else:
            doc = self.expect(got, 201)
            status, settled = self.settle_refund(pay, str(doc["id"]))
            if pay.payer.closed:
                # Compensated: the merchant got its money back out of transit.
                assert (status, settled["reason"]) == ("failed", "account_closed"), settled
            else:
                assert status == "succeeded", settled
                pay.refunded += amount
                pay.payee.balance -= amount
                pay.payer.balance += amount

    # ------------------------------------------------------------------ retries, strangers

    @precondition(lambda self: bool(self.sent))
    @rule(which=st.integers(0, 1_000), entry=st.integers(0, 1))
    def retry_same_key(self, which: int, entry: int) -> None:
        sent = self.sent[which % len(self.sent)]
        status, answer = self.call("POST", sent.path, sent.principal, self.regions[entry],
                                   sent.body, sent.key)
        assert (status, answer) == (sent.status, sent.answer), (sent, status, answer)

    @precondition(lambda self: any(_stored_amount(s) for s in self.sent))
    @rule(which=st.integers(0, 1_000), entry=st.integers(0, 1))
    def reuse_key_with_another_body(self, which: int, entry: int) -> None:
        candidates = [s for s in self.sent if _stored_amount(s)]
        sent = candidates[which % len(candidates)]
        body = {**sent.body, "amount": sent.body["amount"] + 1}
        got = self.call("POST", sent.path, sent.principal, self.regions[entry], body,
                        sent.key)
        self.expect(got, 422, "idempotency_key_reused")

    @rule(payer=accounts, payee=accounts, amount=amounts, withdrawal=st.booleans(),
          entry=st.integers(0, 1))
    def use_someone_elses_account(self, payer: Acct, payee: Acct, amount: int,
                                  withdrawal: bool, entry: int) -> None:
        """A stranger's key pays or withdraws from an account: 403, nothing moves."""
        stranger = next(p for p in ("alice", "bob", "shop") if p != payer.principal)
        if withdrawal:
            self.expect(self.mutate(f"/v1/accounts/{payer.id}/withdrawals", stranger,
                                    self.regions[entry], {"amount": amount}), 403)
            return
        got = self.mutate("/v1/payments", stranger, self.regions[entry], {
            "payer": payer.id, "payee": payee.id, "amount": amount, "currency": "USD"})
        self.expect(got, 400 if payer is payee else 403)  # payer is payee: checked first

    # ------------------------------------------------------------------ the books

    def teardown(self) -> None:
        if self.accts:
            self.check_books()

    def check_books(self) -> None:
        """At quiescence: every region's copy equals the model, and the ledger holds."""
        ids = [a.id for a in self.accts]
        pay_ids = [p.id for p in self.pays]
        want_accounts = sorted((a.id, a.balance, a.held, "closed" if a.closed else "open")
                               for a in self.accts)
        want_pays = sorted((p.id, p.status, p.held, p.captured, p.refunded)
                           for p in self.pays)
        deadline = time.monotonic() + SETTLE_SECONDS
        while True:
            views = [self._view(name, ids, pay_ids) for name in self.regions]
            if all(v == (want_accounts, want_pays) for v in views):
                break
            assert time.monotonic() < deadline, {"model": (want_accounts, want_pays),
                                                 "regions": views}
            time.sleep(0.1)
        for name in self.regions:
            failed = [f for f in ledger_findings(name, self.world.lab.region(name).dsn)
                      if not f.ok]
            assert failed == [], failed
            with psycopg.connect(self.world.lab.region(name).dsn) as conn:
                stray_holds = conn.execute(
                    "select id from payments where id = any(%s::uuid[]) and amount_held > 0 "
                    "and status <> 'requires_capture'", (pay_ids,)).fetchall()
            assert stray_holds == [], stray_holds

    def _view(self, region: str, ids: list[str], pay_ids: list[str]
              ) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
        with psycopg.connect(self.world.lab.region(region).dsn) as conn:
            accounts = [(str(r[0]), int(r[1]), int(r[2]), str(r[3])) for r in conn.execute(
                "select id, balance, held, status from accounts where id = any(%s::uuid[])",
                (ids,))]
            pays = [(str(r[0]), str(r[1]), int(r[2]), int(r[3]), int(r[4]))
                    for r in conn.execute(
                        "select id, status, amount_held, amount_captured, amount_refunded "
                        "from payments where id = any(%s::uuid[])", (pay_ids,))]
        return sorted(accounts), sorted(pays)


def test_books_match_the_model(world: World) -> None:
    Books.world = world
    run_state_machine_as_test(Books, settings=settings(
        max_examples=EXAMPLES, stateful_step_count=STEPS, deadline=None,
        derandomize=not FUZZ, database=None, print_blob=True,
        suppress_health_check=list(HealthCheck)))
