"""Request bodies of the public API. Validated at the edge: strict integers for money,
known currencies, no unknown fields."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, field_validator

from region_node.errors import InvalidRequest
from region_node.money import is_known_currency
from region_node.redact import scrub

Amount = Annotated[StrictInt, Field(gt=0, description="minor units, a positive integer")]


class Body(BaseModel):
    """Base: unknown fields are an error, never silently dropped."""

    model_config = ConfigDict(extra="forbid")


def _currency(value: str) -> str:
    code = value.upper()
    if len(code) != 3 or not is_known_currency(code):
        raise ValueError(f"unknown currency '{value}'")
    return code


def _free_text(value: str | None) -> str | None:
    """Free text is stored and shown back: card numbers masked (first six, last four) and
    secrets hidden before it gets anywhere."""
    return None if value is None else scrub(value)


class OpenAccount(Body):
    """POST /v1/accounts."""

    currency: str
    kind: Literal["customer", "merchant"] = "customer"
    home_region: str | None = Field(None, max_length=64)
    allow_overdraft: StrictBool = False
    # Whose account it is: the caller's by default; an admin may name another principal.
    principal_id: str | None = Field(None, max_length=64)

    _check_currency = field_validator("currency")(_currency)


class Movement(Body):
    """POST /v1/accounts/{id}/deposits and /withdrawals."""

    amount: Amount


class CreatePayment(Body):
    """POST /v1/payments."""

    payer: str
    payee: str
    amount: Amount
    currency: str
    capture_method: Literal["automatic", "manual"] = "automatic"
    description: str | None = Field(None, max_length=500)

    _check_currency = field_validator("currency")(_currency)
    _mask_description = field_validator("description")(_free_text)


class Capture(Body):
    """POST /v1/payments/{id}/capture."""

    amount: Amount | None = None


class Refund(Body):
    """POST /v1/payments/{id}/refunds."""

    amount: Amount | None = None


class CreateSku(Body):
    """POST /v1/skus (admin)."""

    sku: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    stock: Annotated[StrictInt, Field(ge=0, le=10**9)]
    mode: Literal["escrow", "strict"] = "escrow"


class CreateOrder(Body):
    """POST /v1/orders."""

    sku: str = Field(max_length=64)
    quantity: Annotated[StrictInt, Field(gt=0, le=10_000)]
    payer: str
    payee: str
    amount: Amount
    currency: str

    _check_currency = field_validator("currency")(_currency)


class Cancel(Body):
    """POST /v1/payments/{id}/cancel."""

    cancellation_reason: Literal["requested_by_customer", "duplicate", "fraudulent",
                                 "abandoned"] = "requested_by_customer"


def check_amount(amount: int, maximum: int) -> None:
    """The configured ceiling on one movement of money (a 400 above it)."""
    if amount > maximum:
        raise InvalidRequest(f"Amount must be at most {maximum}", code="amount_too_large",
                             param="amount")


class CreatePrincipal(Body):
    """POST /v1/admin/principals."""

    name: str = Field(min_length=1, max_length=200)
    role: Literal["admin", "merchant", "customer"]
    rate_per_second: Annotated[float, Field(gt=0, le=1_000_000)] | None = None
    rate_burst: Annotated[StrictInt, Field(ge=1, le=10_000_000)] | None = None
    home_region: str | None = Field(None, max_length=64)

    _mask_name = field_validator("name")(_free_text)


class ResolveReconciliationItem(Body):
    """POST /v1/admin/reconciliation/resolve (admin): settle one listed item."""

    home_region: str = Field(min_length=1, max_length=64)
    takeover_epoch: Annotated[StrictInt, Field(ge=0)]
    item_id: str = Field(min_length=1, max_length=64)
    resolution: Literal["acknowledge", "claw_back", "write_off"]
    # How it was settled outside the system (stored, replicated and shown back).
    note: str = Field(min_length=1, max_length=2000)

    _mask_note = field_validator("note")(_free_text)

    @field_validator("note")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("a note saying how the item was settled is required")
        return value.strip()
