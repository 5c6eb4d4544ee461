"""The acquirer's books and rules: operations, their state machine, settlement, statements.

Everything that changes state runs on the event loop without awaiting between the check
and the journal write, so concurrent requests for one reference are serialized for free:
the first creates the operation, the others find it (idempotency by our reference).

State machines (a status never goes back):

    payment: pending -> authorized -> captured        (capture=false, approved card)
             pending -> captured                      (capture=true, approved card)
             pending -> declined | failed             (declined, no funds / issuer timeout)
    refund:  pending -> succeeded
    payout:  pending -> paid | returned | failed      (returned: account closed; failed:
                                                       the bank timed out)
"""

from __future__ import annotations

import asyncio
import csv
import hashlib
import io
import json
import logging
import uuid
from datetime import UTC, date, datetime, timedelta
from typing import Any

from channel.callbacks import Dispatcher
from channel.cards import BankOutcome, CardOutcome, CardToken, mask_account
from channel.config import ChannelSettings
from channel.faults import FaultConfig, Faults
from channel.models import (
    BOOKED,
    AuthorizeIn,
    DifferenceIn,
    Kind,
    Operation,
    PayoutIn,
    RefundIn,
    StatementDifference,
    Status,
)
from channel.store import Journal

log = logging.getLogger("channel.engine")

STATEMENT_COLUMNS = ("reference", "kind", "amount", "currency", "status", "fee", "value_date")


class ChannelError(Exception):
    """A request the channel refuses; mapped once to an HTTP answer by the API."""

    def __init__(self, status: int, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.param = status, code, message, param


def _now() -> datetime:
    return datetime.now(UTC)


def _hash(fields: dict[str, Any]) -> str:
    """Fingerprint of a request's business fields: a retry must match it exactly."""
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


class Channel:
    """The simulator's state and behaviour, independent of HTTP."""

    def __init__(self, settings: ChannelSettings) -> None:
        self.settings = settings
        self.journal = Journal(settings.data_dir, fsync=settings.fsync)
        self.faults = Faults()
        self.dispatcher = Dispatcher(settings, self.faults, self.journal)
        self.operations: dict[str, Operation] = {}
        self.differences: dict[str, StatementDifference] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    # ----------------------------------------------------------------- lifecycle

    def load(self) -> None:
        """Rebuild the state from the journal: the last record of each key wins."""
        for record in self.journal.replay():
            kind = record["t"]
            if kind == "op":
                op = Operation.from_record(record["op"])
                self.operations[op.reference] = op
            elif kind == "event":
                self.dispatcher.restore(record["event"], record["url"])
            elif kind == "delivery":
                self.dispatcher.finished(record["event_id"], record["outcome"])
            elif kind == "difference":
                diff = StatementDifference(**record["difference"])
                self.differences[diff.id] = diff
            elif kind == "differences_cleared":
                self.differences.clear()
            elif kind == "faults":
                self.faults.configure(FaultConfig(**record["config"]))

    async def start(self) -> None:
        """Start sending callbacks and finish what a previous run left pending."""
        await self.dispatcher.start()
        self.dispatcher.resume_unfinished()
        for op in self.operations.values():
            if op.status is Status.PENDING:
                self._schedule(op)

    async def stop(self) -> None:
        """Stop processing and delivering; the journal keeps everything for the next run."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.dispatcher.stop()
        self.journal.close()

    # ----------------------------------------------------------------- operations

    def get(self, reference: str) -> Operation:
        """The operation with our `reference`; 404 if the channel never saw it."""
        op = self.operations.get(reference)
        if op is None:
            raise ChannelError(404, "not_found", "no operation with this reference",
                               "reference")
        return op

    def authorize(self, body: AuthorizeIn, card: CardToken) -> tuple[Operation, bool]:
        """Accept a card payment (pending); the issuer's answer comes by callback.

        Returns the operation and whether it was created now (False: a retry of the same
        request, answered with the operation as it stands)."""
        fields = {"kind": "payment", "amount": body.amount, "currency": body.currency,
                  "card": card.token, "capture": body.capture}
        existing = self._existing(body.reference, fields)
        if existing is not None:
            return existing, False
        op = self._new(Kind.PAYMENT, body.reference, body.amount, body.currency,
                       body.callback_url, fields)
        op.auto_capture = body.capture
        op.card = {"token": card.token, "bin": card.bin, "last4": card.last4,
                   "brand": card.brand}
        op.behaviour = card.outcome.value
        self._save(op)
        self._schedule(op)
        log.info("payment %s accepted: %s %s card %s", op.reference, op.amount, op.currency,
                 card.masked)
        return op, True

    def capture(self, reference: str, amount: int | None) -> tuple[Operation, bool]:
        """Capture an authorized payment (all of it, or `amount` of it) now.

        Capturing a captured payment again with the same amount (or none) is answered as
        it stands (a retry); anything else that is not `authorized` is a 409."""
        op = self.get(reference)
        if op.kind is not Kind.PAYMENT:
            raise ChannelError(409, "not_a_payment", "only a card payment can be captured")
        if op.status is Status.CAPTURED and amount in (None, op.captured_amount):
            return op, False
        if op.status is not Status.AUTHORIZED:
            raise ChannelError(409, "not_authorized",
                               f"the payment is {op.status.value}, not authorized")
        amount = op.amount if amount is None else amount
        if amount > op.amount:
            raise ChannelError(400, "amount_too_large",
                               "capture amount exceeds the authorized amount", "amount")
        self._capture(op, amount)
        return op, True

    def refund(self, body: RefundIn) -> tuple[Operation, bool]:
        """Accept a refund of a captured payment (pending until the network settles it)."""
        payment = self.get(body.payment_reference)
        fields = {"kind": "refund", "payment_reference": body.payment_reference,
                  "amount": body.amount}
        existing = self._existing(body.reference, fields)
        if existing is not None:
            return existing, False
        if payment.kind is not Kind.PAYMENT or payment.status is not Status.CAPTURED:
            raise ChannelError(409, "not_captured", "only a captured payment can be refunded",
                               "payment_reference")
        left = payment.captured_amount - payment.refunded_amount - payment.refund_pending_amount
        amount = left if body.amount is None else body.amount
        if amount <= 0 or amount > left:
            raise ChannelError(400, "amount_too_large",
                               f"at most {left} {payment.currency} is left to refund", "amount")
        op = self._new(Kind.REFUND, body.reference, amount, payment.currency,
                       body.callback_url, fields)
        op.payment_reference = payment.reference
        payment.refund_pending_amount += amount
        self._touch(payment)
        self._save(payment)
        self._save(op)
        self._schedule(op)
        return op, True

    def payout(self, body: PayoutIn, outcome: BankOutcome) -> tuple[Operation, bool]:
        """Accept a payout to a bank account (pending until the bank answers)."""
        account = body.bank_account.account_number
        fields = {"kind": "payout", "amount": body.amount, "currency": body.currency,
                  "account": hashlib.sha256(account.encode()).hexdigest()}
        existing = self._existing(body.reference, fields)
        if existing is not None:
            return existing, False
        op = self._new(Kind.PAYOUT, body.reference, body.amount, body.currency,
                       body.callback_url, fields)
        op.bank_account = mask_account(account)
        op.behaviour = outcome.value
        self._save(op)
        self._schedule(op)
        return op, True

    def _existing(self, reference: str, fields: dict[str, Any]) -> Operation | None:
        op = self.operations.get(reference)
        if op is None:
            return None
        if op.request_hash != _hash(fields):
            raise ChannelError(409, "reference_reused",
                               "this reference was used for a different request", "reference")
        return op

    def _new(self, kind: Kind, reference: str, amount: int, currency: str, url: str,
             fields: dict[str, Any]) -> Operation:
        stamp = _now().isoformat()
        return Operation(id=f"op_{uuid.uuid4().hex}", reference=reference, kind=kind,
                         status=Status.PENDING, amount=amount, currency=currency,
                         callback_url=url, request_hash=_hash(fields), created_at=stamp,
                         updated_at=stamp)

    # ----------------------------------------------------------------- processing

    def _schedule(self, op: Operation) -> None:
        """Let the simulated issuer or bank answer after its processing time."""
        slow = op.behaviour in (CardOutcome.TIMEOUT.value, BankOutcome.TIMEOUT.value)
        delay = (self.settings.issuer_timeout_seconds if slow
                 else self.settings.processing_seconds)
        task = asyncio.get_running_loop().create_task(self._process_after(op.reference, delay))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _process_after(self, reference: str, delay: float) -> None:
        await asyncio.sleep(delay)
        op = self.operations[reference]
        if op.status is not Status.PENDING:
            return
        if op.kind is Kind.PAYMENT:
            self._answer_payment(op)
        elif op.kind is Kind.REFUND:
            self._answer_refund(op)
        else:
            self._answer_payout(op)

    def _answer_payment(self, op: Operation) -> None:
        behaviour = CardOutcome(op.behaviour)
        if behaviour is CardOutcome.APPROVE:
            if op.auto_capture:
                self._capture(op, op.amount)
            else:
                self._set(op, Status.AUTHORIZED)
        elif behaviour is CardOutcome.DECLINE:
            self._set(op, Status.DECLINED, failure_code="card_declined")
        elif behaviour is CardOutcome.INSUFFICIENT_FUNDS:
            self._set(op, Status.DECLINED, failure_code="insufficient_funds")
        elif behaviour is CardOutcome.EXPIRED:
            self._set(op, Status.DECLINED, failure_code="expired_card")
        else:
            self._set(op, Status.FAILED, failure_code="issuer_timeout")

    def _answer_refund(self, op: Operation) -> None:
        payment = self.operations[op.payment_reference or ""]
        payment.refund_pending_amount -= op.amount
        payment.refunded_amount += op.amount
        self._touch(payment)
        self._save(payment)
        self._set(op, Status.SUCCEEDED)

    def _answer_payout(self, op: Operation) -> None:
        behaviour = BankOutcome(op.behaviour)
        if behaviour is BankOutcome.PAY:
            self._set(op, Status.PAID, fee=self.settings.payout_fee_fixed)
        elif behaviour is BankOutcome.RETURN:
            self._set(op, Status.RETURNED, failure_code="account_closed")
        else:
            self._set(op, Status.FAILED, failure_code="bank_timeout")

    def _capture(self, op: Operation, amount: int) -> None:
        op.captured_amount = amount
        # Integer basis points, rounded half up: no float ever touches an amount.
        fee = (amount * self.settings.card_fee_bps + 5_000) // 10_000 + self.settings.card_fee_fixed
        self._set(op, Status.CAPTURED, fee=fee)

    def _set(self, op: Operation, status: Status, *, failure_code: str | None = None,
             fee: int = 0) -> None:
        """Move `op` to `status`, journal it, and send its callback."""
        op.status, op.failure_code, op.fee = status, failure_code, fee
        self._touch(op)
        if status in BOOKED:
            today = _now().date()
            op.booked_on = today.isoformat()
            op.value_date = (today + timedelta(days=self.settings.settlement_days)).isoformat()
        self._save(op)
        log.info("%s %s %s%s", op.kind.value, op.reference, status.value,
                 f" ({failure_code})" if failure_code else "")
        event = {"id": f"evt_{uuid.uuid4().hex}", "type": f"{op.kind.value}.{status.value}",
                 "created": op.updated_at, "data": op.public()}
        self.dispatcher.submit(event, op.callback_url)

    def _touch(self, op: Operation) -> None:
        op.version += 1
        op.updated_at = _now().isoformat()

    def _save(self, op: Operation) -> None:
        self.journal.append({"t": "op", "op": op.to_record()})
        self.operations[op.reference] = op

    # ----------------------------------------------------------------- faults

    def set_faults(self, config: FaultConfig) -> None:
        """Put a fault configuration in force (journalled: it survives a restart)."""
        self.journal.append({"t": "faults", "config": config.model_dump()})
        self.faults.configure(config)

    # ----------------------------------------------------------------- statements

    def add_difference(self, body: DifferenceIn) -> StatementDifference:
        """Record a deliberate statement difference (for reconciliation tests)."""
        if body.kind in ("amount", "status", "missing") and body.reference not in self.operations:
            raise ChannelError(404, "not_found", "no operation with this reference", "reference")
        if body.kind == "amount" and body.amount is None:
            raise ChannelError(400, "amount_required", "an amount difference needs `amount`",
                               "amount")
        if body.kind == "status" and not body.status:
            raise ChannelError(400, "status_required", "a status difference needs `status`",
                               "status")
        if body.kind == "extra" and (body.amount is None or body.currency is None):
            raise ChannelError(400, "amount_required",
                               "an extra row needs `amount` and `currency`", "amount")
        diff = StatementDifference(id=f"diff_{uuid.uuid4().hex[:16]}",
                                   reference=body.reference, kind=body.kind,
                                   amount=body.amount, currency=body.currency,
                                   status=body.status,
                                   day=body.day or _now().date().isoformat(),
                                   created_at=_now().isoformat())
        self.journal.append({"t": "difference", "difference": diff.__dict__})
        self.differences[diff.id] = diff
        return diff

    def clear_differences(self) -> None:
        """Forget every injected difference."""
        self.journal.append({"t": "differences_cleared"})
        self.differences.clear()

    def statement_rows(self, day: date) -> list[dict[str, str]]:
        """The settlement statement of `day`: every operation booked that day (captured,
        declined, failed, refunded, paid, returned), with injected differences applied."""
        iso = day.isoformat()
        rows: dict[str, dict[str, str]] = {}
        for op in sorted(self.operations.values(), key=lambda o: (o.updated_at, o.reference)):
            if op.booked_on != iso:
                continue
            amount = op.captured_amount if op.kind is Kind.PAYMENT else op.amount
            if op.status in (Status.DECLINED, Status.FAILED, Status.RETURNED):
                amount = op.amount
            rows[op.reference] = {"reference": op.reference, "kind": op.kind.value,
                                  "amount": str(amount), "currency": op.currency,
                                  "status": op.status.value, "fee": str(op.fee),
                                  "value_date": op.value_date or ""}
        for diff in sorted(self.differences.values(), key=lambda d: d.created_at):
            row = rows.get(diff.reference)
            if diff.kind == "extra" and diff.day == iso:
                value = (day + timedelta(days=self.settings.settlement_days)).isoformat()
                rows[diff.reference] = {"reference": diff.reference, "kind": "payment",
                                        "amount": str(diff.amount), "currency": diff.currency or "",
                                        "status": diff.status or Status.CAPTURED.value,
                                        "fee": "0", "value_date": value}
            elif row is None:
                continue
            elif diff.kind == "missing":
                del rows[diff.reference]
            elif diff.kind == "amount":
                row["amount"] = str(diff.amount)
            elif diff.kind == "status":
                row["status"] = str(diff.status)
        return list(rows.values())

    def statement_csv(self, day: date) -> str:
        """`statement_rows` as CSV with a header line."""
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=STATEMENT_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.statement_rows(day))
        return out.getvalue()
