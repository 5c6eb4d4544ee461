"""Card numbers at the edge: Luhn check, test cards, tokenization, and masking of logs.

A card number exists only inside the request handler that receives it: `tokenize` turns it
into a `CardToken` (an HMAC of the number, its first six and last four digits, brand and
the test behaviour it selects) before anything is stored, journalled, logged or answered.

The channel keeps its own masker instead of importing `region_node.redact`: it plays a
third party, which ships nothing of ours, and it must keep working while the node's
internals change; a Luhn check and one regex are all it needs.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
from dataclasses import dataclass
from enum import StrEnum


class CardOutcome(StrEnum):
    """What the simulated issuer answers for a card."""

    APPROVE = "approve"
    DECLINE = "decline"
    INSUFFICIENT_FUNDS = "insufficient_funds"
    TIMEOUT = "timeout"
    EXPIRED = "expired"  # any card past its expiry month


TEST_CARDS: dict[str, CardOutcome] = {
    "4242424242424242": CardOutcome.APPROVE,
    "5555555555554444": CardOutcome.APPROVE,
    "4000000000000002": CardOutcome.DECLINE,
    "4000000000009995": CardOutcome.INSUFFICIENT_FUNDS,
    "4000000000000119": CardOutcome.TIMEOUT,
}
"""Numbers with a fixed answer; any other number that passes Luhn is approved."""


class BankOutcome(StrEnum):
    """What the simulated receiving bank does with a payout."""

    PAY = "pay"
    RETURN = "return"
    TIMEOUT = "timeout"


TEST_BANK_ACCOUNTS: dict[str, BankOutcome] = {
    "000123456789": BankOutcome.PAY,
    "000111111116": BankOutcome.RETURN,  # the account is closed: the bank sends it back
    "000333333335": BankOutcome.TIMEOUT,  # the bank never answers in time
}
"""Account numbers with a fixed answer; any other account is paid."""


class InvalidCard(ValueError):
    """Not a card number: wrong length, not digits, or failing the Luhn check."""


def luhn_valid(digits: str) -> bool:
    """True when the string of digits passes the Luhn (mod 10) check."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def brand_of(digits: str) -> str:
    """The card scheme, from the leading digits (enough for a simulator)."""
    if digits.startswith("4"):
        return "visa"
    if digits[:2] in {"51", "52", "53", "54", "55"} or "2221" <= digits[:4] <= "2720":
        return "mastercard"
    if digits[:2] in {"34", "37"}:
        return "amex"
    return "unknown"


@dataclass(frozen=True)
class CardToken:
    """What remains of a card number once it crossed the edge."""

    token: str
    bin: str
    last4: str
    brand: str
    outcome: CardOutcome

    @property
    def masked(self) -> str:
        """First six, stars, last four, as PCI DSS allows to display."""
        return f"{self.bin}******{self.last4}"


def tokenize(number: str, key: str, expired: bool = False) -> CardToken:
    """Check a card number and replace it by a token keyed with `key`; InvalidCard if bad.

    The same number always gives the same token (so a retried request is recognised as the
    same), and the token reveals nothing about the number without `key`. An `expired`
    card is declined whatever its number.
    """
    digits = number.replace(" ", "").replace("-", "")
    if not (digits.isdigit() and 13 <= len(digits) <= 19 and luhn_valid(digits)):
        raise InvalidCard("the card number is not valid")
    mac = hmac.new(key.encode(), digits.encode(), hashlib.sha256).hexdigest()[:32]
    return CardToken(token=f"tok_{mac}", bin=digits[:6], last4=digits[-4:],
                     brand=brand_of(digits),
                     outcome=CardOutcome.EXPIRED if expired
                     else TEST_CARDS.get(digits, CardOutcome.APPROVE))


def mask_account(account: str) -> str:
    """A bank account number reduced to its last four characters."""
    return "****" + account[-4:]


# A run of digits with single spaces or dashes between groups, as people write cards.
_DIGIT_RUN = re.compile(r"(?<!\d)\d(?:[ -]?\d){12,18}(?!\d)")


def mask_card_numbers(text: str) -> str:
    """Every 13-19 digit run in `text` that passes Luhn becomes `411111******1111`."""
    def repl(match: re.Match[str]) -> str:
        digits = re.sub(r"[ -]", "", match.group(0))
        if luhn_valid(digits):
            return f"{digits[:6]}{'*' * (len(digits) - 10)}{digits[-4:]}"
        return match.group(0)

    return _DIGIT_RUN.sub(repl, text)


class MaskingFilter(logging.Filter):
    """A log filter that masks card numbers in a record's message and traceback.

    Belt and braces: no code path logs a number (it is tokenized first), but an exception
    message from a library could still echo a request body.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        """Rewrite the record in place; never drops it."""
        message = record.getMessage()
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = mask_card_numbers(record.exc_text)
        record.msg, record.args = mask_card_numbers(message), None
        return True
