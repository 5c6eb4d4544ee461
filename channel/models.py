"""The channel's records and its API's request bodies.

Money is an integer amount of minor units plus an ISO 4217 currency code, never a float:
amounts are `StrictInt`, so `10.0` or `"10"` is refused rather than coerced.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt

Amount = Annotated[StrictInt, Field(gt=0, le=10**13)]
Currency = Annotated[str, Field(pattern=r"^[A-Z]{3}$")]
Reference = Annotated[str, Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_.:-]+$")]
CallbackUrl = Annotated[str, Field(pattern=r"^https?://[^\s]+$", max_length=2000)]


class Kind(StrEnum):
    """What an operation is."""

    PAYMENT = "payment"
    REFUND = "refund"
    PAYOUT = "payout"


class Status(StrEnum):
    """Every status an operation can have; FINAL lists those that never change again
    (except a captured payment's refunded amount)."""

    PENDING = "pending"
    AUTHORIZED = "authorized"
    CAPTURED = "captured"
    DECLINED = "declined"
    FAILED = "failed"
    SUCCEEDED = "succeeded"
    PAID = "paid"
    RETURNED = "returned"


FINAL = frozenset({Status.CAPTURED, Status.DECLINED, Status.FAILED, Status.SUCCEEDED,
                   Status.PAID, Status.RETURNED})
BOOKED = frozenset({Status.CAPTURED, Status.DECLINED, Status.FAILED, Status.SUCCEEDED,
                    Status.PAID, Status.RETURNED})
"""Statuses that put an operation on the day's statement (money moved, or definitely not)."""


@dataclass
class Operation:
    """One operation at the channel, identified by our (the merchant's) reference."""

    id: str
    reference: str
    kind: Kind
    status: Status
    amount: int
    currency: str
    callback_url: str
    request_hash: str
    created_at: str
    updated_at: str
    version: int = 1
    captured_amount: int = 0
    refunded_amount: int = 0
    # Refunds accepted but not yet settled: counted against what is left to refund.
    refund_pending_amount: int = 0
    auto_capture: bool = False
    payment_reference: str | None = None
    card: dict[str, str] | None = None  # token, bin, last4, brand: never the number
    bank_account: str | None = None  # masked
    behaviour: str = ""  # the test outcome the card or account selects
    failure_code: str | None = None
    fee: int = 0
    booked_on: str | None = None  # ISO date it reached a statement status
    value_date: str | None = None

    def to_record(self) -> dict[str, Any]:
        """Everything, for the journal."""
        return dataclasses.asdict(self)

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Operation:
        """Back from the journal."""
        values = dict(record)
        values["kind"], values["status"] = Kind(values["kind"]), Status(values["status"])
        return cls(**values)

    def public(self) -> dict[str, Any]:
        """What the API answers and callbacks carry (no request hash, no card token)."""
        out: dict[str, Any] = {
            "id": self.id, "reference": self.reference, "kind": self.kind.value,
            "status": self.status.value, "amount": self.amount, "currency": self.currency,
            "failure_code": self.failure_code, "fee": self.fee, "booked_on": self.booked_on,
            "value_date": self.value_date, "created_at": self.created_at,
            "updated_at": self.updated_at, "version": self.version}
        if self.kind is Kind.PAYMENT:
            out["captured_amount"] = self.captured_amount
            out["refunded_amount"] = self.refunded_amount
            out["auto_capture"] = self.auto_capture
            if self.card:
                out["card"] = {"brand": self.card["brand"], "last4": self.card["last4"],
                               "masked": f"{self.card['bin']}******{self.card['last4']}"}
        if self.kind is Kind.REFUND:
            out["payment_reference"] = self.payment_reference
        if self.kind is Kind.PAYOUT:
            out["bank_account"] = self.bank_account
        return out


@dataclass
class StatementDifference:
    """A deliberate difference between the statement and the channel's own books."""

    id: str
    reference: str
    kind: str  # amount | status | missing | extra
    amount: int | None = None
    currency: str | None = None
    status: str | None = None
    day: str | None = None  # for `extra`: the statement it appears on
    created_at: str = field(default="")


# --------------------------------------------------------------------------- requests


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CardIn(_Body):
    """A card as the merchant sends it: exists only until it is tokenized."""

    number: Annotated[str, Field(min_length=12, max_length=23)]
    exp_month: Annotated[StrictInt, Field(ge=1, le=12)]
    exp_year: Annotated[StrictInt, Field(ge=2000, le=2100)]
    cvc: Annotated[str, Field(pattern=r"^\d{3,4}$")]


class AuthorizeIn(_Body):
    """POST /v1/payments: authorize (and with `capture`, capture at once) a card payment."""

    reference: Reference
    amount: Amount
    currency: Currency
    card: CardIn
    callback_url: CallbackUrl
    capture: StrictBool = False


class CaptureIn(_Body):
    """POST /v1/payments/{reference}/capture: capture all or part of an authorization."""

    amount: Amount | None = None


class RefundIn(_Body):
    """POST /v1/refunds: refund (part of) a captured payment."""

    reference: Reference
    payment_reference: Reference
    amount: Amount | None = None
    callback_url: CallbackUrl


class BankAccountIn(_Body):
    """The receiving bank account of a payout."""

    account_number: Annotated[str, Field(pattern=r"^[0-9A-Z]{6,34}$")]
    holder_name: Annotated[str, Field(min_length=1, max_length=140)]


class PayoutIn(_Body):
    """POST /v1/payouts: send money to a bank account."""

    reference: Reference
    amount: Amount
    currency: Currency
    bank_account: BankAccountIn
    callback_url: CallbackUrl


class DifferenceIn(_Body):
    """POST /admin/statement-differences: make the statement disagree on purpose."""

    reference: Reference
    kind: Annotated[str, Field(pattern=r"^(amount|status|missing|extra)$")]
    amount: Amount | None = None
    currency: Currency | None = None
    status: str | None = None
    day: str | None = Field(None, pattern=r"^\d{4}-\d{2}-\d{2}$")


class DownIn(_Body):
    """POST /admin/down: be down for a while."""

    seconds: Annotated[float, Field(gt=0, le=3600)]
    mode: Annotated[str, Field(pattern=r"^(refuse|reset|503)$")] = "503"
