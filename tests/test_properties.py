"""Property-based tests (hypothesis) of the pure parts where a hand-picked example is not
enough: the card masker and secret redaction, the geo router's ownership merge, webhook
signatures and the retry schedule. No servers: this module runs in well under a minute.
"""

from __future__ import annotations

import itertools
import random
import re
from collections.abc import Mapping
from typing import Any

import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from geo_router.owners import OwnerMap
from region_node.redact import luhn_valid, mask_card_numbers, redact_secrets, scrub
from region_node.webhooks.delivery import retry_delay
from region_node.webhooks.signing import (
    DEFAULT_TOLERANCE_SECONDS,
    SignatureError,
    compute,
    parse,
    sign,
    verify,
)

# --------------------------------------------------------------------------- cards


def _luhn_complete(body: str) -> str:
    """`body` plus the check digit that makes it pass Luhn."""
    for check in "0123456789":
        if luhn_valid(body + check):
            return body + check
    raise AssertionError("unreachable: one check digit always fits")


@st.composite
def card_numbers(draw: st.DrawFn) -> str:
    """A Luhn-valid number of 13-19 digits."""
    length = draw(st.integers(13, 19))
    body = draw(st.text("0123456789", min_size=length - 1, max_size=length - 1))
    return _luhn_complete(body)


@st.composite
def spellings(draw: st.DrawFn, digits: str) -> str:
    """`digits` as people write them: single spaces or dashes between any digits."""
    out = [digits[0]]
    for ch in digits[1:]:
        out.append(draw(st.sampled_from(["", "", "", " ", "-"])))
        out.append(ch)
    return "".join(out)


# Text around a card: no digits (so the card is the whole digit run) and no hex letters
# (so nothing around it can form a UUID, whose digits are exempt by design).
FILLER = st.text(st.sampled_from(list("ghijklmnopqrstuvwxyzGHIJKLMNOPQRSTUVWXYZ .,;:!?()/'\"")),
                 max_size=12)
_GROUPS = re.compile(r"\d+(?:[ -]\d+)*")


def surviving_cards(text: str) -> list[str]:
    """Every way of reading a Luhn-valid 13-19 digit number out of `text` as it is
    written: whole digit groups joined by single spaces or dashes (the masker's
    definition of a spelling)."""
    found = []
    for run in _GROUPS.finditer(text):
        groups = re.split(r"[ -]", run.group())
        for i, j in itertools.combinations(range(len(groups) + 1), 2):
            digits = "".join(groups[i:j])
            if 13 <= len(digits) <= 19 and luhn_valid(digits):
                found.append(digits)
    return found


@given(card=card_numbers().flatmap(lambda c: st.tuples(st.just(c), spellings(c))),
       before=FILLER, after=FILLER)
@example(card=("4111111111111111", "4111 1111 1111 1111"), before="card ", after=" ok")
@example(card=("4111111111111111", "4111-1111-1111-1111"), before="", after="")
def test_a_card_in_any_spelling_is_masked_and_nothing_else_changes(
        card: tuple[str, str], before: str, after: str) -> None:
    digits, spelled = card
    out = scrub(before + spelled + after)
    # First six, stars, last four, in place of exactly the card; the text around untouched.
    assert out == before + digits[:6] + "*" * (len(digits) - 10) + digits[-4:] + after
    assert surviving_cards(out) == []


# A part that ends a digit run: at least one character that is neither a digit nor a
# separator, so each card or number below is a run of its own.
BREAK = FILLER.map(lambda s: f"{s}x")
PARTS = st.one_of(card_numbers().flatmap(spellings),
                  st.text("0123456789", min_size=1, max_size=6),  # short numbers
                  st.text("0123456789 -", min_size=1, max_size=8))


@given(parts=st.lists(st.tuples(PARTS, BREAK), max_size=6))
def test_no_luhn_valid_number_survives_and_scrub_is_idempotent(
        parts: list[tuple[str, str]]) -> None:
    """Cards among other numbers, each in a digit run of its own: no 13-19 digit spelling
    that passes Luhn is left in the output, and scrubbing again changes nothing."""
    once = scrub("".join(a + b for a, b in parts))
    assert surviving_cards(once) == []
    assert scrub(once) == once


GLUED = "2042335333092 112334200"
"""A Luhn-valid 13-digit group glued to more digits: the mask keeps its last four (3092),
which with the next group (112334200) spell another Luhn-valid 13-digit number."""


@settings(max_examples=200)
@given(parts=st.lists(st.one_of(PARTS, FILLER, st.sampled_from([" ", "-", " - "])),
                      max_size=8))
@example(parts=[GLUED])
def test_no_luhn_valid_number_survives_whatever_it_is_glued_to(parts: list[str]) -> None:
    """Cards glued to other numbers and to each other, any separators between them."""
    once = scrub("".join(parts))
    assert surviving_cards(once) == []
    assert scrub(once) == once


@given(st.one_of(st.text(), st.text("0123456789 -pckwhsecBearr_x", max_size=60)))
def test_scrub_is_idempotent_on_any_text(text: str) -> None:
    once = scrub(text)
    assert scrub(once) == once


@given(st.text())
def test_text_without_long_digit_runs_or_secret_markers_is_untouched(text: str) -> None:
    assume(not re.search(r"pck_|whsec_|(?i:bearer)", text))
    assume(all(sum(c.isdigit() for c in m.group()) < 13 for m in _GROUPS.finditer(text)))
    assert scrub(text) == text == mask_card_numbers(text) == redact_secrets(text)


_LOWER_DIGITS = "abcdefghijklmnopqrstuvwxyz0123456789"
_ALNUM = _LOWER_DIGITS + "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@given(prefix=st.text(_LOWER_DIGITS, min_size=12, max_size=12),
       secret=st.text(_ALNUM, min_size=40, max_size=40),
       hook=st.text(_ALNUM, min_size=40, max_size=40),
       before=FILLER, between=FILLER.map(lambda s: f" {s} "),
       after=FILLER.map(lambda s: f" {s}"))
def test_secrets_are_hidden_and_api_keys_keep_only_their_prefix(
        prefix: str, secret: str, hook: str, before: str, between: str, after: str) -> None:
    key = f"pck_{prefix}_{secret}"
    text = f"{before} {key}{between}whsec_{hook}{between}Bearer {secret}{after}"
    out = scrub(text)
    assert secret not in out and hook not in out
    assert f"pck_{prefix}_****" in out and "whsec_****" in out and "Bearer ****" in out
    assert out.startswith(before) and out.endswith(after)
    assert scrub(out) == out


# --------------------------------------------------------------------------- ownership

HOMES = ("us-east", "eu-west", "ap-southeast")


History = dict[str, list[tuple[int, str]]]


@st.composite
def histories(draw: st.DrawFn) -> History:
    """Per home an increasing list of epochs, each with the one region that serves it
    (one insert per (home, epoch))."""
    history: History = {}
    for home in HOMES:
        epochs = draw(st.lists(st.integers(1, 10**16), min_size=1, max_size=4, unique=True))
        history[home] = [(e, draw(st.sampled_from(HOMES))) for e in sorted(epochs)]
    return history


@st.composite
def answers_of(draw: st.DrawFn, history: History) -> list[dict[str, Any]]:
    """Answers of several regions to GET /v1/cluster/ownership, each a possibly stale view
    of `history`: a region shows some epoch of a home, banned or not (a ban reaches
    regions one by one, and never goes away)."""
    answers = []
    for region in draw(st.lists(st.sampled_from(HOMES), min_size=1, max_size=5)):
        rows = []
        for home in draw(st.lists(st.sampled_from(HOMES), unique=True, max_size=3)):
            epoch, serving = draw(st.sampled_from(history[home]))
            rows.append({"home_region": home, "serving_region": serving, "epoch": epoch,
                         "banned": draw(st.booleans())})
        answers.append({"region": region, "ownership": rows})
    return answers


def ownership_answers() -> st.SearchStrategy[list[dict[str, Any]]]:
    return histories().flatmap(answers_of)


def ownership_rounds() -> st.SearchStrategy[list[list[dict[str, Any]]]]:
    return histories().flatmap(lambda h: st.lists(answers_of(h), min_size=1, max_size=5))


def _state(owners: OwnerMap) -> tuple[dict[str, str], dict[str, int], dict[str, bool]]:
    return dict(owners.serving), dict(owners.epochs), dict(owners.banned)


def _expected(answers: list[Mapping[str, Any]]) -> tuple[dict[str, str], dict[str, int],
                                                         dict[str, bool]]:
    rows = [row for a in answers for row in a["ownership"]]
    epochs: dict[str, int] = {}
    for row in rows:
        epochs[row["home_region"]] = max(epochs.get(row["home_region"], 0), row["epoch"])
    top = [r for r in rows if r["epoch"] == epochs[r["home_region"]]]
    serving = {r["home_region"]: r["serving_region"] for r in top}
    banned = {h: any(r["banned"] for r in top if r["home_region"] == h) for h in epochs}
    return serving, epochs, banned


@given(answers=ownership_answers(), seed=st.randoms(use_true_random=False))
def test_owner_map_merge_is_order_independent(answers: list[dict[str, Any]],
                                              seed: random.Random) -> None:
    """All at once, in any order, or one answer at a time in any order: the same map, the
    highest epoch per home with the ban of any region that saw one at that epoch."""
    expected = _expected(answers)
    together = OwnerMap()
    together.merge(answers)
    assert _state(together) == expected
    shuffled = list(answers)
    seed.shuffle(shuffled)
    again = OwnerMap()
    again.merge(shuffled)
    assert _state(again) == expected
    one_by_one = OwnerMap()
    for answer in reversed(shuffled):
        one_by_one.merge([answer])
    assert _state(one_by_one) == expected


@given(rounds=ownership_rounds())
def test_owner_map_epochs_and_bans_never_go_back(rounds: list[list[dict[str, Any]]]) -> None:
    """Round after round (some answered only by a stale region): a home's epoch never
    decreases, and a ban seen at an epoch stays until a higher epoch replaces it."""
    owners = OwnerMap()
    for answers in rounds:
        before_epochs, before_banned = dict(owners.epochs), dict(owners.banned)
        owners.merge(answers)
        for home, epoch in before_epochs.items():
            assert owners.epochs[home] >= epoch
            if owners.epochs[home] == epoch and before_banned[home]:
                assert owners.banned[home]
    # And the map is what one merge of every round's answers gives.
    assert _state(owners) == _expected([a for answers in rounds for a in answers])


# --------------------------------------------------------------------------- signatures

SECRETS = st.text(_ALNUM, min_size=8, max_size=40).map(lambda s: "whsec_" + s)
TIMESTAMPS = st.integers(1_000_000_000, 4_000_000_000)


@given(body=st.binary(max_size=200), secrets=st.lists(SECRETS, min_size=1, max_size=3,
                                                      unique=True),
       ts=TIMESTAMPS, skew=st.integers(-DEFAULT_TOLERANCE_SECONDS, DEFAULT_TOLERANCE_SECONDS))
def test_a_signed_body_verifies_with_each_secret_within_the_tolerance(
        body: bytes, secrets: list[str], ts: int, skew: int) -> None:
    header = sign(body, secrets, timestamp=ts)
    assert parse(header) == (ts, [compute(body, s, ts) for s in secrets])
    for secret in secrets:
        verify(body, header, secret, now=ts + skew)


@given(body=st.binary(max_size=200), secret=SECRETS, other=SECRETS, ts=TIMESTAMPS,
       flip=st.integers(0, 10**6), late=st.integers(1, 10**6))
def test_tampered_stale_or_foreign_signatures_are_refused(
        body: bytes, secret: str, other: str, ts: int, flip: int, late: int) -> None:
    header = sign(body, [secret], timestamp=ts)
    if body:  # any changed byte
        i = flip % len(body)
        changed = body[:i] + bytes([body[i] ^ (1 + flip % 255)]) + body[i + 1:]
        with pytest.raises(SignatureError):
            verify(changed, header, secret, now=ts)
    with pytest.raises(SignatureError):
        verify(body + b" ", header, secret, now=ts)
    if other != secret:
        with pytest.raises(SignatureError):
            verify(body, header, other, now=ts)
    for now in (ts + DEFAULT_TOLERANCE_SECONDS + late, ts - DEFAULT_TOLERANCE_SECONDS - late):
        with pytest.raises(SignatureError, match="stale"):
            verify(body, header, secret, now=now)


# A header as a receiver may get it: printable ASCII (HTTP header values are ASCII).
HEADERS = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=80)


@given(header=st.one_of(HEADERS, st.lists(st.sampled_from(
    ["t=1800000000", "v1=abc", "v2=x", "t=", "t=x", "=", "v1=", "junk", " t=1", ""]),
    max_size=5).map(",".join)))
def test_parse_accepts_a_header_or_refuses_it_with_a_signature_error(header: str) -> None:
    try:
        ts, sigs = parse(header)
    except SignatureError:
        return
    assert ts >= 0 and sigs
    # What parse accepted is really in the header, in order.
    assert f"t={ts}" in header.replace(" ", "")
    assert all(f"v1={s}" in header for s in sigs)
    with pytest.raises(SignatureError):  # never verifies without the secret
        verify(b"{}", header, "whsec_" + "x" * 40, now=ts)


def test_parse_refuses_a_non_ascii_digit_timestamp_with_a_signature_error() -> None:
    with pytest.raises(SignatureError):
        parse("t=\u00b2,v1=abc")


# --------------------------------------------------------------------------- retry delay


@given(failures=st.integers(1, 200), base=st.floats(0.001, 3600),
       cap_factor=st.floats(1, 1000), rand=st.floats(0, 1))
def test_retry_delay_stays_within_half_a_step_and_the_cap(
        failures: int, base: float, cap_factor: float, rand: float) -> None:
    cap = base * cap_factor
    step = min(cap, base * 2 ** (failures - 1))
    delay = retry_delay(failures, base=base, cap=cap, rand=rand)
    assert step / 2 <= delay <= step <= cap
    # More failures never shorten the wait (for the same draw of the jitter).
    assert retry_delay(failures + 1, base=base, cap=cap, rand=rand) >= delay
    # Without a given draw: still within the bounds.
    assert step / 2 <= retry_delay(failures, base=base, cap=cap) <= step


@settings(max_examples=50)
@given(base=st.floats(1, 120), cap_factor=st.floats(2, 200))
def test_a_day_of_retries_is_bounded_by_the_schedule(base: float, cap_factor: float) -> None:
    """Until an event is a day old: at most (day / (cap / 2)) + log2(cap / base) + 1
    attempts, whatever the jitter draws (every wait is at least half its step). Caps
    from 200 s: below that a day is more than a thousand attempts (see the next test)."""
    cap = max(200.0, base * cap_factor)
    rng = random.Random(0)
    total, attempts = 0.0, 0
    while total < 86400:
        attempts += 1
        total += retry_delay(attempts, base=base, cap=cap, rand=rng.random())
    ramp = 1
    while base * 2 ** (ramp - 1) < cap:
        ramp += 1
    assert attempts <= ramp + 86400 / (cap / 2) + 1


def test_retry_delay_after_many_failures_is_the_cap() -> None:
    assert retry_delay(1100, base=1.0, cap=2.0, rand=1.0) == 2.0
