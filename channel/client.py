"""A typed async client of the channel, for the region nodes (and the lab's tests and CLI).

Every call takes a deadline (`deadline`, seconds; default the client's `timeout`). What a
failure means for the caller:

- `ChannelRejected` (4xx): the channel understood and refused; nothing happened (or, for
  a 409 `reference_reused`, something else already happened under that reference).
- `ChannelUnavailable` (connection refused or reset, deadline passed, 5xx, 503): the
  outcome is UNKNOWN. The request may have taken effect (the channel answers 500 after
  committing sometimes, and a hang runs on after our deadline). Retry with the same
  reference - the channel is idempotent by it - or query `status(reference)` later.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from datetime import date
from types import TracebackType
from typing import Any, Self

import httpx


class ChannelError(Exception):
    """Any failure of a channel call."""

    def __init__(self, message: str, status: int | None = None, code: str | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.retry_after = status, code, retry_after


class ChannelRejected(ChannelError):
    """The channel refused the request (4xx): retrying the same request will not help."""


class ChannelUnavailable(ChannelError):
    """No answer, a deadline passed, or a 5xx: the outcome is unknown (query the status)."""


class ChannelTimeout(ChannelUnavailable):
    """The deadline passed before the channel answered."""


@dataclass(frozen=True)
class ChannelOperation:
    """An operation as the channel reports it (amounts in minor units)."""

    id: str
    reference: str
    kind: str  # payment | refund | payout
    status: str
    amount: int
    currency: str
    version: int
    failure_code: str | None = None
    fee: int = 0
    captured_amount: int = 0
    refunded_amount: int = 0
    payment_reference: str | None = None
    booked_on: str | None = None
    value_date: str | None = None
    replayed: bool = False  # the answer to a retry: the operation already existed

    @classmethod
    def from_json(cls, doc: dict[str, Any], replayed: bool = False) -> ChannelOperation:
        """From the channel's JSON (operation bodies and callbacks' `data`)."""
        return cls(id=doc["id"], reference=doc["reference"], kind=doc["kind"],
                   status=doc["status"], amount=int(doc["amount"]), currency=doc["currency"],
                   version=int(doc["version"]), failure_code=doc.get("failure_code"),
                   fee=int(doc.get("fee") or 0),
                   captured_amount=int(doc.get("captured_amount") or 0),
                   refunded_amount=int(doc.get("refunded_amount") or 0),
                   payment_reference=doc.get("payment_reference"),
                   booked_on=doc.get("booked_on"), value_date=doc.get("value_date"),
                   replayed=replayed)


@dataclass(frozen=True)
class StatementRow:
    """One line of a settlement statement."""

    reference: str
    kind: str
    amount: int
    currency: str
    status: str
    fee: int
    value_date: date


def parse_statement(text: str) -> list[StatementRow]:
    """The rows of a statement CSV (header line first)."""
    return [StatementRow(reference=row["reference"], kind=row["kind"],
                         amount=int(row["amount"]), currency=row["currency"],
                         status=row["status"], fee=int(row["fee"]),
                         value_date=date.fromisoformat(row["value_date"]))
            for row in csv.DictReader(io.StringIO(text))]


class _Http:
    """The shared part: one pooled httpx client, errors mapped once."""

    def __init__(self, base_url: str, key: str, timeout: float,
                 transport: httpx.AsyncBaseTransport | None) -> None:
        self.timeout = timeout
        self._http = httpx.AsyncClient(base_url=base_url.rstrip("/"), transport=transport,
                                       headers={"Authorization": f"Bearer {key}"},
                                       timeout=timeout)

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.aclose()

    async def _call(self, method: str, path: str, deadline: float | None,
                    body: dict[str, Any] | None = None) -> httpx.Response:
        try:
            resp = await self._http.request(method, path, json=body,
                                            timeout=deadline or self.timeout)
        except httpx.TimeoutException as exc:
            raise ChannelTimeout(f"channel did not answer {method} {path} in time: "
                                 f"{type(exc).__name__}") from None
        except httpx.TransportError as exc:
            raise ChannelUnavailable(f"channel unreachable for {method} {path}: "
                                     f"{type(exc).__name__}") from None
        if resp.status_code < 400:
            return resp
        try:
            error = resp.json().get("error", {})
        except ValueError:
            error = {}
        message = f"{method} {path}: {resp.status_code} {error.get('message', resp.text[:200])}"
        retry_after = resp.headers.get("retry-after")
        cls = ChannelUnavailable if resp.status_code >= 500 else ChannelRejected
        raise cls(message, resp.status_code, error.get("code"),
                  float(retry_after) if retry_after else None)


class ChannelClient(_Http):
    """The merchant API: what a region calls.

    `base_url` is the channel's merchant URL, `api_key` the merchant key; `timeout` the
    default deadline of a call in seconds.
    """

    def __init__(self, base_url: str, api_key: str, timeout: float = 5.0,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        super().__init__(base_url, api_key, timeout, transport)

    async def _op(self, method: str, path: str, deadline: float | None,
                  body: dict[str, Any] | None = None) -> ChannelOperation:
        resp = await self._call(method, path, deadline, body)
        return ChannelOperation.from_json(
            resp.json(), replayed=resp.headers.get("idempotent-replayed") == "true")

    async def authorize(self, reference: str, amount: int, currency: str, card_number: str,
                        exp_month: int, exp_year: int, cvc: str, callback_url: str, *,
                        capture: bool = False, deadline: float | None = None
                        ) -> ChannelOperation:
        """Ask for a card authorization (with `capture`, capture it at once); answered
        `pending`, the result comes by callback. Retry with the same reference."""
        return await self._op("POST", "/v1/payments", deadline, {
            "reference": reference, "amount": amount, "currency": currency,
            "card": {"number": card_number, "exp_month": exp_month, "exp_year": exp_year,
                     "cvc": cvc},
            "callback_url": callback_url, "capture": capture})

    async def capture(self, reference: str, amount: int | None = None, *,
                      deadline: float | None = None) -> ChannelOperation:
        """Capture an authorized payment (all, or `amount` of it); effective at once."""
        return await self._op("POST", f"/v1/payments/{reference}/capture", deadline,
                              {} if amount is None else {"amount": amount})

    async def refund(self, reference: str, payment_reference: str, callback_url: str,
                     amount: int | None = None, *, deadline: float | None = None
                     ) -> ChannelOperation:
        """Refund (part of) a captured payment under our refund `reference`."""
        body: dict[str, Any] = {"reference": reference, "payment_reference": payment_reference,
                                "callback_url": callback_url}
        if amount is not None:
            body["amount"] = amount
        return await self._op("POST", "/v1/refunds", deadline, body)

    async def payout(self, reference: str, amount: int, currency: str, account_number: str,
                     holder_name: str, callback_url: str, *, deadline: float | None = None
                     ) -> ChannelOperation:
        """Pay `amount` out to a bank account; the bank's answer comes by callback."""
        return await self._op("POST", "/v1/payouts", deadline, {
            "reference": reference, "amount": amount, "currency": currency,
            "bank_account": {"account_number": account_number, "holder_name": holder_name},
            "callback_url": callback_url})

    async def status(self, reference: str, *, deadline: float | None = None
                     ) -> ChannelOperation:
        """The operation with our `reference` as it stands (ChannelRejected 404 if unknown)."""
        return await self._op("GET", f"/v1/operations/{reference}", deadline)

    async def statement(self, day: date, *, deadline: float | None = None) -> list[StatementRow]:
        """The settlement statement of `day`."""
        return parse_statement(await self.statement_csv(day, deadline=deadline))

    async def statement_csv(self, day: date, *, deadline: float | None = None) -> str:
        """The settlement statement of `day` as the channel sends it (CSV)."""
        resp = await self._call("GET", f"/v1/statements/{day.isoformat()}.csv", deadline)
        return resp.text


class ChannelAdmin(_Http):
    """The admin API: faults, outages, the callback log, statement differences."""

    def __init__(self, admin_url: str, admin_key: str, timeout: float = 5.0,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        super().__init__(admin_url, admin_key, timeout, transport)

    async def set_faults(self, **config: Any) -> dict[str, Any]:
        """Put a fault configuration in force (fields of channel.faults.FaultConfig;
        the ones not given are zero); resets the call counters and the fired log."""
        resp = await self._call("PUT", "/admin/faults", None, config)
        return dict(resp.json()["config"])

    async def faults(self) -> dict[str, Any]:
        """The configuration, the faults that fired so far, the outage in progress."""
        return dict((await self._call("GET", "/admin/faults", None)).json())

    async def down(self, seconds: float, mode: str = "503") -> None:
        """Make the merchant API unavailable for `seconds`: `refuse` closes its listener,
        `reset` accepts connections and resets them before answering, `503` answers
        Service Unavailable with Retry-After."""
        await self._call("POST", "/admin/down", None, {"seconds": seconds, "mode": mode})

    async def up(self) -> None:
        """End an outage now."""
        await self._call("POST", "/admin/up", None)

    async def callbacks(self, reference: str | None = None) -> list[dict[str, Any]]:
        """Every callback (or those of `reference`): faults applied, attempts, outcome."""
        params = f"?reference={reference}" if reference else ""
        return list((await self._call("GET", f"/admin/callbacks{params}", None)).json())

    async def add_difference(self, reference: str, kind: str, **fields: Any
                             ) -> dict[str, Any]:
        """Make the statement differ on purpose: kind `amount` (with amount), `status`
        (with status), `missing`, or `extra` (a row we never had: amount, currency, day)."""
        body = {"reference": reference, "kind": kind, **fields}
        return dict((await self._call("POST", "/admin/statement-differences", None,
                                      body)).json())

    async def clear_differences(self) -> None:
        """Remove every injected difference."""
        await self._call("DELETE", "/admin/statement-differences", None)
