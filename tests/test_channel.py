"""The channel (acquirer simulator) as a real server: `python -m channel` started by
`cluster.servers.start_channel`, called over HTTP by `channel.client`, its callbacks
received by a real aiohttp server on 127.0.0.1 (tests/channel_fixtures.py).

Most tests share the session's channel and tell their operations apart by unique
references; the fault-determinism and crash tests start channels of their own.
"""

from __future__ import annotations

import ast
import asyncio
import json
import time
import uuid
from collections import Counter
from datetime import date, timedelta
from pathlib import Path

import httpx
import psutil
import pytest

from channel.cards import mask_card_numbers, tokenize
from channel.client import (
    ChannelAdmin,
    ChannelClient,
    ChannelOperation,
    ChannelRejected,
    ChannelTimeout,
    ChannelUnavailable,
    parse_statement,
)
from channel.faults import roll
from channel.signing import SignatureError, compute, parse, sign, verify
from channel.store import Journal
from cluster.servers import ChannelServer
from tests.channel_fixtures import CallbackReceiver, start_test_channel

pytestmark = pytest.mark.integration

APPROVE, APPROVE_MC = "4242424242424242", "5555555555554444"
DECLINE, NO_FUNDS, TIMEOUT = "4000000000000002", "4000000000009995", "4000000000000119"
OTHER_VALID = "4111111111111111"  # not a test card: approved like any valid number
ALL_CARDS = (APPROVE, APPROVE_MC, DECLINE, NO_FUNDS, TIMEOUT, OTHER_VALID)
PAY_ACCOUNT, RETURN_ACCOUNT, SLOW_ACCOUNT = "000123456789", "000111111116", "000333333335"


def ref(prefix: str = "t") -> str:
    """A reference no other test uses."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


async def authorize(client: ChannelClient, receiver: CallbackReceiver, reference: str,
                    amount: int = 1000, card: str = APPROVE, currency: str = "EUR",
                    capture: bool = False) -> ChannelOperation:
    """Authorize with the usual test expiry and CVC."""
    return await client.authorize(reference, amount, currency, card, 12, 2030, "123",
                                  receiver.url, capture=capture)


async def settled(client: ChannelClient, reference: str, within: float = 10.0
                  ) -> ChannelOperation:
    """The operation once it is no longer pending."""
    deadline = time.monotonic() + within
    while True:
        op = await client.status(reference)
        if op.status != "pending":
            return op
        assert time.monotonic() < deadline, f"{reference} still pending after {within}s"
        await asyncio.sleep(0.05)


def types_of(receiver: CallbackReceiver, reference: str) -> list[str]:
    """The event types received about `reference`, in arrival order."""
    return [r.event["type"] for r in receiver.of(reference)]


# --------------------------------------------------------------------------- signing

BODY = b'{"id":"evt_1","type":"payment.captured"}'
SECRET = "chsec_" + "a" * 40


def test_verify_accepts_a_genuine_signature() -> None:
    header = sign(BODY, SECRET, timestamp=1_800_000_000)
    assert header == f"t=1800000000,v1={compute(BODY, SECRET, 1_800_000_000)}"
    assert verify(BODY, header, SECRET, now=1_800_000_010) == 1_800_000_000


def test_verify_rejects_a_tampered_body_and_a_wrong_secret() -> None:
    header = sign(BODY, SECRET, timestamp=1_800_000_000)
    with pytest.raises(SignatureError, match="tampered"):
        verify(BODY.replace(b"captured", b"declined"), header, SECRET, now=1_800_000_000)
    with pytest.raises(SignatureError, match="wrong secret"):
        verify(BODY, header, "chsec_" + "b" * 40, now=1_800_000_000)


def test_verify_rejects_a_stale_or_future_timestamp() -> None:
    header = sign(BODY, SECRET, timestamp=1_800_000_000)
    verify(BODY, header, SECRET, now=1_800_000_300)  # exactly at the tolerance: accepted
    with pytest.raises(SignatureError, match="stale"):
        verify(BODY, header, SECRET, now=1_800_000_301)
    with pytest.raises(SignatureError, match="stale"):
        verify(BODY, header, SECRET, now=1_799_999_000)
    verify(BODY, header, SECRET, tolerance=3600, now=1_800_001_000)


@pytest.mark.parametrize("header", ["", "t=123", "v1=abc", "t=abc,v1=00", "garbage",
                                    "t=1,t=2,v1=00"])
def test_verify_rejects_malformed_headers(header: str) -> None:
    with pytest.raises(SignatureError, match="malformed"):
        verify(BODY, header, SECRET, now=1)


def test_parse_skips_unknown_schemes() -> None:
    header = sign(BODY, SECRET, timestamp=1_800_000_000) + ",v2=beef"
    assert parse(header) == (1_800_000_000, [compute(BODY, SECRET, 1_800_000_000)])
    verify(BODY, header, SECRET, now=1_800_000_000)


# --------------------------------------------------------------------------- cards

def test_tokenize_keeps_six_and_four_and_checks_luhn() -> None:
    token = tokenize("4242 4242 4242 4242", "k1")
    assert (token.bin, token.last4, token.brand, token.masked) == (
        "424242", "4242", "visa", "424242******4242")
    assert token.token == tokenize(APPROVE, "k1").token != tokenize(APPROVE, "k2").token
    assert APPROVE not in token.token
    assert tokenize(APPROVE_MC, "k1").brand == "mastercard"
    with pytest.raises(ValueError, match="not valid"):
        tokenize("4242424242424241", "k1")  # Luhn fails
    with pytest.raises(ValueError, match="not valid"):
        tokenize("4242-abc", "k1")


def test_masker_hides_valid_card_numbers_only() -> None:
    text = f"card {APPROVE} or 4000-0000-0000-0002, order 1234567890123, id 12345678901234567890"
    assert mask_card_numbers(text) == ("card 424242******4242 or 400000******0002, "
                                       "order 1234567890123, id 12345678901234567890")


# --------------------------------------------------------------------------- journal

def test_journal_drops_a_torn_last_line_and_appends_after_it(tmp_path: Path) -> None:
    journal = Journal(tmp_path, fsync=True)
    journal.append({"t": "op", "n": 1})
    journal.close()
    with open(journal.path, "ab") as fh:
        fh.write(b'{"t": "op", "n"')  # a crash in the middle of a write
    again = Journal(tmp_path)
    assert list(again.replay()) == [{"n": 1, "t": "op"}]
    again.append({"t": "op", "n": 2})
    again.close()
    assert list(Journal(tmp_path).replay()) == [{"n": 1, "t": "op"}, {"n": 2, "t": "op"}]


# --------------------------------------------------------------------------- the API

async def test_authorize_capture_refund_with_signed_callbacks(
        channel_client: ChannelClient, callback_receiver: CallbackReceiver) -> None:
    reference = ref("pay")
    op = await authorize(channel_client, callback_receiver, reference, amount=10_000)
    assert (op.status, op.amount, op.currency, op.replayed) == ("pending", 10_000, "EUR", False)
    await callback_receiver.wait_for(lambda: types_of(callback_receiver, reference)
                                     == ["payment.authorized"])
    assert (await channel_client.status(reference)).status == "authorized"

    captured = await channel_client.capture(reference, 8_000)  # a partial capture
    assert (captured.status, captured.captured_amount) == ("captured", 8_000)
    # 1.40 % of 80.00 rounded half up, plus the fixed 0.25: 1.37 in minor units.
    assert captured.fee == 112 + 25
    today = date.today()
    assert captured.booked_on == today.isoformat()
    assert captured.value_date == (today + timedelta(days=1)).isoformat()
    again = await channel_client.capture(reference)  # a retry of the capture
    assert again.replayed and again.version == captured.version

    refund_ref = ref("rf")
    refund = await channel_client.refund(refund_ref, reference, callback_receiver.url, 3_000)
    assert (refund.kind, refund.status, refund.payment_reference) == ("refund", "pending",
                                                                      reference)
    with pytest.raises(ChannelRejected) as too_much:
        await channel_client.refund(ref("rf"), reference, callback_receiver.url, 5_001)
    assert too_much.value.status == 400 and too_much.value.code == "amount_too_large"
    await callback_receiver.wait_for(lambda: types_of(callback_receiver, refund_ref)
                                     == ["refund.succeeded"])
    payment = await channel_client.status(reference)
    assert (payment.captured_amount, payment.refunded_amount) == (8_000, 3_000)

    callbacks = callback_receiver.of(reference) + callback_receiver.of(refund_ref)
    assert [c.event["type"] for c in callbacks] == ["payment.authorized", "payment.captured",
                                                    "refund.succeeded"]
    for cb in callbacks:
        assert cb.valid, "every callback verifies with the shared secret"
        assert cb.signature.startswith("t=")
    versions = [c.event["data"]["version"] for c in callback_receiver.of(reference)]
    assert versions == sorted(versions) and len(set(versions)) == 2
    # A callback replayed later than the window is refused by the same verify function.
    first = callbacks[0]
    stamp, _ = parse(first.signature)
    with pytest.raises(SignatureError, match="stale"):
        verify(first.raw, first.signature, callback_receiver.secret, now=stamp + 301)
    with pytest.raises(SignatureError, match="tampered"):
        verify(first.raw.replace(b"authorized", b"captured"), first.signature,
               callback_receiver.secret)


@pytest.mark.parametrize(("card", "status", "failure", "event"), [
    (APPROVE_MC, "authorized", None, "payment.authorized"),
    (OTHER_VALID, "authorized", None, "payment.authorized"),
    (DECLINE, "declined", "card_declined", "payment.declined"),
    (NO_FUNDS, "declined", "insufficient_funds", "payment.declined"),
])
async def test_test_cards(channel_client: ChannelClient, callback_receiver: CallbackReceiver,
                          card: str, status: str, failure: str | None, event: str) -> None:
    reference = ref("card")
    await authorize(channel_client, callback_receiver, reference, card=card)
    op = await settled(channel_client, reference)
    assert (op.status, op.failure_code) == (status, failure)
    await callback_receiver.wait_for(lambda: types_of(callback_receiver, reference) == [event])
    if status == "declined":
        with pytest.raises(ChannelRejected) as refused:
            await channel_client.capture(reference)
        assert (refused.value.status, refused.value.code) == (409, "not_authorized")


async def test_an_expired_card_is_declined(channel_client: ChannelClient,
                                          callback_receiver: CallbackReceiver) -> None:
    reference = ref("exp")
    last_month = date.today().replace(day=1) - timedelta(days=1)
    await channel_client.authorize(reference, 1_000, "EUR", APPROVE, last_month.month,
                                   last_month.year, "123", callback_receiver.url)
    op = await settled(channel_client, reference)
    assert (op.status, op.failure_code) == ("declined", "expired_card")
    this_month = date.today()
    current = ref("exp")
    await channel_client.authorize(current, 1_000, "EUR", APPROVE, this_month.month,
                                   this_month.year, "123", callback_receiver.url)
    assert (await settled(channel_client, current)).status == "authorized"


async def test_time_out_card_stays_pending_then_fails(
        channel_client: ChannelClient, callback_receiver: CallbackReceiver) -> None:
    reference = ref("slow")
    started = time.monotonic()
    await authorize(channel_client, callback_receiver, reference, card=TIMEOUT)
    await asyncio.sleep(0.4)  # far longer than a normal answer (0.05 s in the tests)
    assert (await channel_client.status(reference)).status == "pending"
    assert callback_receiver.of(reference) == []
    op = await settled(channel_client, reference)
    assert (op.status, op.failure_code) == ("failed", "issuer_timeout")
    assert time.monotonic() - started >= 1.0  # the issuer time-out of the tests
    await callback_receiver.wait_for(lambda: types_of(callback_receiver, reference)
                                     == ["payment.failed"])


async def test_automatic_capture(channel_client: ChannelClient,
                                 callback_receiver: CallbackReceiver) -> None:
    reference = ref("auto")
    await authorize(channel_client, callback_receiver, reference, amount=2_500, capture=True)
    op = await settled(channel_client, reference)
    assert (op.status, op.captured_amount, op.fee) == ("captured", 2_500, 35 + 25)
    await callback_receiver.wait_for(lambda: types_of(callback_receiver, reference)
                                     == ["payment.captured"])


@pytest.mark.parametrize(("account", "status", "failure", "fee"), [
    (PAY_ACCOUNT, "paid", None, 20),
    ("DE0012345678", "paid", None, 20),
    (RETURN_ACCOUNT, "returned", "account_closed", 0),
    (SLOW_ACCOUNT, "failed", "bank_timeout", 0),
])
async def test_payouts(channel_client: ChannelClient, callback_receiver: CallbackReceiver,
                       account: str, status: str, failure: str | None, fee: int) -> None:
    reference = ref("po")
    op = await channel_client.payout(reference, 4_200, "USD", account, "Ada Lovelace",
                                     callback_receiver.url)
    assert (op.kind, op.status, op.amount, op.currency) == ("payout", "pending", 4_200, "USD")
    final = await settled(channel_client, reference)
    assert (final.status, final.failure_code, final.fee) == (status, failure, fee)
    await callback_receiver.wait_for(lambda: types_of(callback_receiver, reference)
                                     == [f"payout.{status}"])
    data = callback_receiver.of(reference)[0].event["data"]
    assert data["bank_account"] == "****" + account[-4:]
    assert account not in callback_receiver.of(reference)[0].raw.decode()


async def test_idempotent_by_our_reference(channel_client: ChannelClient,
                                           callback_receiver: CallbackReceiver) -> None:
    reference = ref("idem")
    first = await authorize(channel_client, callback_receiver, reference, amount=700)
    retry = await authorize(channel_client, callback_receiver, reference, amount=700)
    assert retry.replayed and not first.replayed and retry.id == first.id
    for changed in ({"amount": 701}, {"card": APPROVE_MC}, {"currency": "USD"}):
        with pytest.raises(ChannelRejected) as reused:
            await authorize(channel_client, callback_receiver, reference,
                            **{"amount": 700, **changed})  # type: ignore[arg-type]
        assert (reused.value.status, reused.value.code) == (409, "reference_reused")
    await settled(channel_client, reference)
    await asyncio.sleep(0.2)
    assert types_of(callback_receiver, reference) == ["payment.authorized"]
    with pytest.raises(ChannelRejected) as unknown:
        await channel_client.status(ref("never"))
    assert unknown.value.status == 404


@pytest.mark.parametrize("amount", [10.5, "1000", 0, -5, True])
async def test_amounts_are_positive_integers_only(channel_server: ChannelServer,
                                                  amount: object) -> None:
    async with httpx.AsyncClient(base_url=channel_server.url, headers={
            "Authorization": f"Bearer {channel_server.api_key}"}) as http:
        resp = await http.post("/v1/payments", json={
            "reference": ref("bad"), "amount": amount, "currency": "EUR",
            "card": {"number": APPROVE, "exp_month": 1, "exp_year": 2030, "cvc": "123"},
            "callback_url": "http://127.0.0.1:9/cb"})
    assert resp.status_code == 400
    error = resp.json()["error"]
    assert (error["type"], error["param"]) == ("invalid_request_error", "amount")
    assert APPROVE not in resp.text, "an error never echoes the request (or its card)"


async def test_keys_are_required(channel_server: ChannelServer) -> None:
    async with httpx.AsyncClient() as http:
        for url, key in ((f"{channel_server.url}/v1/operations/x", None),
                         (f"{channel_server.url}/v1/operations/x", channel_server.admin_key),
                         (f"{channel_server.admin_url}/admin/faults", channel_server.api_key)):
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            resp = await http.get(url, headers=headers)
            assert resp.status_code == 401, url
            assert resp.json()["error"]["code"] == "unauthorized"
        assert (await http.get(f"{channel_server.url}/health")).status_code == 200


async def test_card_numbers_are_never_stored_logged_or_echoed(
        channel_server: ChannelServer, channel_client: ChannelClient,
        callback_receiver: CallbackReceiver) -> None:
    for card in ALL_CARDS:
        await authorize(channel_client, callback_receiver, ref("pan"), card=card,
                        capture=True)
    with pytest.raises(ChannelRejected) as bad:
        await authorize(channel_client, callback_receiver, ref("pan"),
                        card="4242424242424241")  # fails Luhn
    assert (bad.value.code, APPROVE[:-1] in str(bad.value)) == ("incorrect_number", False)
    await callback_receiver.wait_for(lambda: len(callback_receiver.received) >= 5)
    seen = b"".join(r.raw for r in callback_receiver.received)
    files = _files(Path(channel_server.data_dir))
    assert set(files) >= {"journal.jsonl", "channel.log", "secrets.json"}
    for blob in [seen, *files.values()]:
        for card in ALL_CARDS:
            assert card.encode() not in blob
    assert b"424242******4242" in files["channel.log"], "the log shows the masked number"


def _files(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (name -> content)."""
    return {p.name: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


async def test_a_failing_receiver_gets_the_callback_again(
        channel_client: ChannelClient, channel_admin: ChannelAdmin,
        callback_receiver: CallbackReceiver) -> None:
    callback_receiver.answers = [500, 503]
    reference = ref("retry")
    await authorize(channel_client, callback_receiver, reference)
    await callback_receiver.wait_for(lambda: len(callback_receiver.of(reference)) == 3)
    ids = {r.event["id"] for r in callback_receiver.of(reference)}
    assert len(ids) == 1, "a retry is the same event, so the receiver can drop it"
    [log] = await channel_admin.callbacks(reference)
    assert [a.get("status") for a in log["attempts"]] == [500, 503, 200]
    assert log["outcome"] == "delivered" and log["faults"] == []


# --------------------------------------------------------------------------- faults

CALLBACK_FAULTS = {"callback_drop": 0.3, "callback_duplicate": 0.2, "callback_delay": 0.2,
                   "callback_delay_seconds": 1.0, "callback_reorder": 0.2,
                   "callback_reorder_max_seconds": 2.0}


async def _callback_workload(server: ChannelServer, seed: int, count: int
                             ) -> tuple[list[dict[str, object]], CallbackReceiver]:
    """`count` automatically captured payments `w-0`.. on `server` with the callback
    faults under `seed`; returns what fired and the receiver once everything finished."""
    receiver = CallbackReceiver(server.callback_secret)
    await receiver.start()
    try:
        async with ChannelAdmin(server.admin_url, server.admin_key) as admin, \
                ChannelClient(server.url, server.api_key) as client:
            await admin.set_faults(seed=seed, **CALLBACK_FAULTS)
            for i in range(count):
                await authorize(client, receiver, f"w-{i}", amount=100 + i, capture=True)
                await asyncio.sleep(0.02)  # spaced out, so reordering has successors
            deadline = time.monotonic() + 20
            while True:
                log = await admin.callbacks()
                if len(log) == count and all(d["outcome"] for d in log):
                    break
                assert time.monotonic() < deadline, log
                await asyncio.sleep(0.1)
            fired = (await admin.faults())["fired"]
    finally:
        await receiver.stop()
    return fired, receiver


async def test_callback_faults_are_deterministic_for_a_seed(tmp_path: Path) -> None:
    count = 30
    runs = []
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        server = start_test_channel(tmp_path / name)
        try:
            runs.append(await _callback_workload(server, seed, count))
        finally:
            server.stop()
    (fired_a, recv_a), (fired_b, recv_b), (fired_c, _) = runs

    def key_set(fired: list[dict[str, object]]) -> set[tuple[object, object]]:
        return {(f["fault"], f["key"]) for f in fired}

    # Same seed, same workload, two processes: the same faults hit the same callbacks.
    assert key_set(fired_a) == key_set(fired_b)
    assert key_set(fired_a) != key_set(fired_c)
    # And they are exactly the ones the published dice predict.
    expected = {(fault, f"w-{i}|payment.captured|2")
                for i in range(count) for fault in ("callback_drop", "callback_duplicate",
                                                    "callback_delay", "callback_reorder")
                if roll(7, fault, f"w-{i}|payment.captured|2") < CALLBACK_FAULTS[fault]}
    dropped = {k.split("|")[0] for f, k in expected if f == "callback_drop"}
    # A dropped callback is never sent, so no other decision is taken about it.
    expected = {(f, k) for f, k in expected
                if f == "callback_drop" or k.split("|")[0] not in dropped}
    assert key_set(fired_a) == expected
    kinds = {f for f, _ in expected}
    assert kinds == {"callback_drop", "callback_duplicate", "callback_delay",
                     "callback_reorder"}, "the workload meets every kind of callback fault"

    for receiver in (recv_a, recv_b):
        per_ref = Counter(r.event["data"]["reference"] for r in receiver.received)
        duplicated = {k.split("|")[0] for f, k in expected if f == "callback_duplicate"}
        for i in range(count):
            reference = f"w-{i}"
            want = 0 if reference in dropped else 2 if reference in duplicated else 1
            assert per_ref[reference] == want, reference
        assert all(r.valid for r in receiver.received)
        arrival = [r.event["data"]["reference"] for r in receiver.received]
        for fault, key in expected:
            reference = key.split("|")[0]
            if fault == "callback_delay":
                # Delayed by 1 s: overtaken by the callbacks of the next payments.
                later = [f"w-{j}" for j in range(int(reference[2:]) + 1, count)
                         if f"w-{j}" not in dropped]
                assert later and any(arrival.index(w) < arrival.index(reference)
                                     for w in later[:3]), reference
        for fault, key in expected:
            reference = key.split("|")[0]
            if fault == "callback_reorder" and reference != f"w-{count - 1}":
                # Held back until a callback of a later payment went first.
                later = [f"w-{j}" for j in range(int(reference[2:]) + 1, count)
                         if f"w-{j}" not in dropped]
                assert any(w in arrival and arrival.index(w) < arrival.index(reference)
                           for w in later), reference


async def test_500_faults_are_deterministic_and_safe_to_retry(
        channel_client: ChannelClient, channel_admin: ChannelAdmin,
        callback_receiver: CallbackReceiver) -> None:
    reference = ref("err")
    outcomes = []
    for _run in range(2):
        await channel_admin.set_faults(seed=11, error_rate=0.5)  # counters start afresh
        pattern = []
        for _attempt in range(12):
            try:
                await authorize(channel_client, callback_receiver, reference)
                pattern.append("ok")
            except ChannelUnavailable as exc:
                assert (exc.status, exc.code) == (500, "internal_error")
                pattern.append("500")
        outcomes.append(pattern)
    predicted = ["500" if roll(11, "error_rate", f"authorize|{reference}|{n}") < 0.5 else "ok"
                 for n in range(1, 13)]
    assert outcomes[0] == outcomes[1] == predicted
    assert "500" in predicted and "ok" in predicted
    # Twenty-four calls, some refused: still one operation, one callback.
    await channel_admin.set_faults()
    await settled(channel_client, reference)
    await asyncio.sleep(0.2)
    assert types_of(callback_receiver, reference) == ["payment.authorized"]


async def test_500_after_the_effect_leaves_an_operation_to_query(
        channel_client: ChannelClient, channel_admin: ChannelAdmin,
        callback_receiver: CallbackReceiver) -> None:
    await channel_admin.set_faults(error_after_rate=1.0)
    reference = ref("after")
    with pytest.raises(ChannelUnavailable) as lost:
        await authorize(channel_client, callback_receiver, reference, capture=True)
    assert lost.value.status == 500
    await channel_admin.set_faults()
    op = await settled(channel_client, reference)  # it happened nonetheless
    assert op.status == "captured"
    retry = await authorize(channel_client, callback_receiver, reference, capture=True)
    assert retry.replayed and retry.id == op.id


async def test_hang_past_the_deadline_then_take_effect(
        channel_client: ChannelClient, channel_admin: ChannelAdmin,
        callback_receiver: CallbackReceiver) -> None:
    await channel_admin.set_faults(hang_rate=1.0, hang_seconds=1.0)
    reference = ref("hang")
    started = time.monotonic()
    with pytest.raises(ChannelTimeout):
        await channel_client.authorize(reference, 900, "EUR", APPROVE, 12, 2030, "123",
                                       callback_receiver.url, deadline=0.3)
    assert time.monotonic() - started < 0.9, "the caller's deadline, not the hang, ends it"
    await channel_admin.set_faults()
    # The channel got the request; after its hang it acted on it.
    await callback_receiver.wait_for(lambda: types_of(callback_receiver, reference)
                                     == ["payment.authorized"])
    assert (await channel_client.status(reference)).status == "authorized"


@pytest.mark.parametrize("mode", ["503", "refuse", "reset"])
async def test_down_for_a_while(channel_server: ChannelServer, channel_client: ChannelClient,
                                channel_admin: ChannelAdmin,
                                callback_receiver: CallbackReceiver, mode: str) -> None:
    reference = ref("down")
    started = time.monotonic()
    await authorize(channel_client, callback_receiver, reference, card=TIMEOUT)
    await channel_admin.down(3.0, mode)
    with pytest.raises(ChannelUnavailable) as down:
        await channel_client.status(reference)
    if mode == "503":
        assert (down.value.status, down.value.code) == (503, "channel_down")
        assert down.value.retry_after is not None and down.value.retry_after >= 1
    else:
        assert down.value.status is None, "no HTTP answer at all"
        port = channel_server.port
        if mode == "refuse":  # nobody listens
            with pytest.raises(ConnectionRefusedError):
                await asyncio.open_connection("127.0.0.1", port)
        else:  # the connection is taken, then reset before any answer
            with pytest.raises(ConnectionResetError):
                await _http_get_raw(port)
    assert (await channel_admin.faults())["down_seconds"] > 0, "the admin API stays up"
    # The time-out card fails (after 1 s) while the channel is down; its callback waits
    # for the end of the outage.
    await asyncio.sleep(max(0.0, started + 1.6 - time.monotonic()))
    assert callback_receiver.of(reference) == []
    deadline = time.monotonic() + 10
    while True:
        try:
            op = await channel_client.status(reference)
            break
        except ChannelUnavailable:
            assert time.monotonic() < deadline, "the channel never came back"
            await asyncio.sleep(0.1)
    assert op.status == "failed"
    await callback_receiver.wait_for(lambda: types_of(callback_receiver, reference)
                                     == ["payment.failed"])


async def _http_get_raw(port: int) -> bytes:
    """GET /health over a bare TCP connection; what came back before the server closed."""
    writer = None
    try:
        # A reset can already fail the connect (the kernel accepted, the server reset it).
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /health HTTP/1.1\r\nHost: channel\r\n\r\n")
        await writer.drain()
        return await reader.read()
    finally:
        if writer is not None:
            writer.close()


async def test_up_ends_an_outage_early_and_outages_replace_each_other(
        channel_client: ChannelClient, channel_admin: ChannelAdmin) -> None:
    for first, then in (("refuse", "503"), ("reset", "refuse"), ("503", "reset")):
        await channel_admin.down(60, first)
        with pytest.raises(ChannelUnavailable):
            await channel_client.status("anything")
        await channel_admin.down(60, then)
        with pytest.raises(ChannelUnavailable) as down:
            await channel_client.status("anything")
        assert down.value.status == (503 if then == "503" else None)
        await channel_admin.up()
        with pytest.raises(ChannelRejected) as unknown:  # answered again: a plain 404
            await channel_client.status(ref("none"))
        assert unknown.value.status == 404


# --------------------------------------------------------------------------- concurrency

async def test_many_clients_at_once_each_reference_processed_once(
        channel_server: ChannelServer, channel_admin: ChannelAdmin,
        callback_receiver: CallbackReceiver) -> None:
    references = [ref("conc") for _ in range(20)]
    clients = [ChannelClient(channel_server.url, channel_server.api_key) for _ in range(8)]
    try:
        # Every client sends every reference, all at once: 160 requests, 20 payments.
        answers = await asyncio.gather(*[
            authorize(client, callback_receiver, reference, amount=500, capture=True)
            for client in clients for reference in references])
    finally:
        await asyncio.gather(*[c.aclose() for c in clients])
    created = Counter(a.reference for a in answers if not a.replayed)
    assert created == Counter(references), "exactly one request created each payment"
    for reference in references:
        assert len({a.id for a in answers if a.reference == reference}) == 1
    await callback_receiver.wait_for(lambda: all(
        types_of(callback_receiver, r) == ["payment.captured"] for r in references))
    await asyncio.sleep(0.3)  # nothing more arrives
    assert Counter(r.event["data"]["reference"] for r in callback_receiver.received
                   ) == Counter(references)
    logs = await asyncio.gather(*[channel_admin.callbacks(r) for r in references])
    assert all(len(log) == 1 and log[0]["outcome"] == "delivered" for log in logs)


# --------------------------------------------------------------------------- statements

async def test_statement_of_the_day(channel_client: ChannelClient,
                                    channel_admin: ChannelAdmin,
                                    callback_receiver: CallbackReceiver) -> None:
    today = date.today()
    value = (today + timedelta(days=1)).isoformat()
    tag = uuid.uuid4().hex[:8]
    captured, partial, declined, held = (f"st-{tag}-{n}" for n in ("cap", "part", "dec", "auth"))
    refund, paid, returned = f"st-{tag}-rf", f"st-{tag}-po", f"st-{tag}-ret"
    await authorize(channel_client, callback_receiver, captured, amount=10_000, capture=True)
    await authorize(channel_client, callback_receiver, partial, amount=5_000, currency="USD")
    await authorize(channel_client, callback_receiver, declined, amount=999, card=DECLINE)
    await authorize(channel_client, callback_receiver, held, amount=1_234)
    await channel_client.payout(paid, 7_000, "EUR", PAY_ACCOUNT, "Ada", callback_receiver.url)
    await channel_client.payout(returned, 800, "EUR", RETURN_ACCOUNT, "Bob",
                                callback_receiver.url)
    await settled(channel_client, partial)
    await channel_client.capture(partial, 4_000)
    await settled(channel_client, captured)
    await channel_client.refund(refund, captured, callback_receiver.url, 2_500)
    for reference in (declined, held, paid, returned, refund):
        await settled(channel_client, reference)
    if date.today() != today:
        pytest.skip("the day changed during the test")

    def mine(rows: list[dict[str, str]]) -> dict[str, dict[str, str]]:
        return {r["reference"]: r for r in rows if r["reference"].startswith(f"st-{tag}")}

    csv_text = await channel_client.statement_csv(today)
    header, *_ = csv_text.splitlines()
    assert header == "reference,kind,amount,currency,status,fee,value_date"
    rows = mine([r.__dict__ | {"amount": str(r.amount), "fee": str(r.fee),
                               "value_date": r.value_date.isoformat()}
                 for r in parse_statement(csv_text)])
    expected = {
        captured: ("payment", "10000", "EUR", "captured", str(140 + 25)),
        partial: ("payment", "4000", "USD", "captured", str(56 + 25)),
        declined: ("payment", "999", "EUR", "declined", "0"),
        refund: ("refund", "2500", "EUR", "succeeded", "0"),
        paid: ("payout", "7000", "EUR", "paid", "20"),
        returned: ("payout", "800", "EUR", "returned", "0"),
    }
    assert {k: (r["kind"], r["amount"], r["currency"], r["status"], r["fee"])
            for k, r in rows.items()} == expected, "authorized-only payments are not settled"
    assert {r["value_date"] for r in rows.values()} == {value}
    assert (await channel_client.statement(today - timedelta(days=3000))) == []

    # Deliberate differences for reconciliation tests, listed exactly as injected.
    try:
        await channel_admin.add_difference(captured, "amount", amount=9_999)
        await channel_admin.add_difference(partial, "status", status="declined")
        await channel_admin.add_difference(paid, "missing")
        await channel_admin.add_difference(f"st-{tag}-ghost", "extra", amount=4_321,
                                           currency="EUR")
        with pytest.raises(ChannelRejected):
            await channel_admin.add_difference(f"st-{tag}-none", "missing")
        rows = mine([r.__dict__ | {"amount": str(r.amount)}
                     for r in await channel_client.statement(today)])
        assert rows[captured]["amount"] == "9999"
        assert rows[partial]["status"] == "declined"
        assert paid not in rows
        assert (rows[f"st-{tag}-ghost"]["amount"], rows[f"st-{tag}-ghost"]["status"]) == (
            "4321", "captured")
        assert set(rows) == set(expected) - {paid} | {f"st-{tag}-ghost"}
        # The channel's own view is untouched.
        assert (await channel_client.status(captured)).captured_amount == 10_000
    finally:
        await channel_admin.clear_differences()
    assert mine([r.__dict__ for r in await channel_client.statement(today)]).keys() == \
        expected.keys()


# --------------------------------------------------------------------------- durability

async def test_a_killed_channel_keeps_what_it_acknowledged(tmp_path: Path) -> None:
    server = start_test_channel(tmp_path / "crash",
                                PAYCLUSTER_CHANNEL_ISSUER_TIMEOUT_SECONDS="2.0")
    receiver = CallbackReceiver(server.callback_secret)
    await receiver.start()
    try:
        async with ChannelClient(server.url, server.api_key) as client:
            done, waiting = "k-done", "k-waiting"
            await authorize(client, receiver, done, amount=3_000, capture=True)
            await settled(client, done)
            await authorize(client, receiver, waiting, amount=4_000, card=TIMEOUT)
            keys = (server.api_key, server.callback_secret)
            server.kill()  # SIGKILL: no shutdown code runs
            server.restart()
            assert (server.api_key, server.callback_secret) == keys, "same keys after restart"
        async with ChannelClient(server.url, server.api_key) as client:
            op = await client.status(done)
            assert (op.status, op.captured_amount) == ("captured", 3_000)
            assert (await client.status(waiting)).status == "pending"
            # The restarted channel finishes what was pending and sends its callback.
            final = await settled(client, waiting)
            assert (final.status, final.failure_code) == ("failed", "issuer_timeout")
            await receiver.wait_for(lambda: types_of(receiver, waiting) == ["payment.failed"])
            retry = await authorize(client, receiver, done, amount=3_000, capture=True)
            assert retry.replayed and retry.id == op.id
    finally:
        await receiver.stop()
        server.stop()
    assert not server.is_running()


# --------------------------------------------------------------------------- standalone, CLI

def test_the_channel_imports_nothing_of_ours() -> None:
    """It plays a third party: it must run (and be reasoned about) without our code."""
    ours = {"region_node", "replication", "lock_service", "geo_router", "cluster", "bench"}
    offenders = []
    for path in Path(__file__).resolve().parents[1].joinpath("channel").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] in ours]
    assert offenders == []


def test_cli_starts_operates_and_stops_a_channel(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from cluster.cli import app

    runner = CliRunner()
    data = ["--data-dir", str(tmp_path)]
    started = runner.invoke(app, ["channel", "start", *data])
    assert started.exit_code == 0, started.output
    info = json.loads(started.output)
    try:
        assert info["url"].startswith("http://127.0.0.1:")
        secrets_text = (tmp_path / "channel" / "secrets.json").read_text()
        assert all(v not in started.output for v in json.loads(secrets_text).values())
        assert httpx.get(f"{info['url']}/health").status_code == 200

        set_faults = runner.invoke(app, ["channel", "faults", *data, "--seed", "5",
                                         "--drop", "0.3", "--error", "0.1"])
        assert set_faults.exit_code == 0, set_faults.output
        config = json.loads(set_faults.output)["config"]
        assert (config["seed"], config["callback_drop"], config["error_rate"],
                config["hang_rate"]) == (5, 0.3, 0.1, 0.0)

        assert runner.invoke(app, ["channel", "down", "30", *data, "--mode", "refuse"]
                             ).exit_code == 0
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{info['url']}/health")
        assert runner.invoke(app, ["channel", "up", *data]).exit_code == 0
        assert httpx.get(f"{info['url']}/health").status_code == 200

        today = runner.invoke(app, ["channel", "statement", *data])
        assert today.output == "reference,kind,amount,currency,status,fee,value_date\n"
        assert runner.invoke(app, ["channel", "statement", *data, "--day", "x"]).exit_code == 2
    finally:
        stopped = runner.invoke(app, ["channel", "stop", *data])
    assert stopped.exit_code == 0, stopped.output
    assert not psutil.pid_exists(info["pid"]) or \
        psutil.Process(info["pid"]).status() == psutil.STATUS_ZOMBIE
    assert runner.invoke(app, ["channel", "faults", *data]).exit_code == 1  # none running
