"""The payment state machine: which status may follow which.

    requires_capture --capture--> succeeded (same home region) | processing (cross-region)
    requires_capture --cancel / hold expiry--> canceled
    processing --credit acknowledged by the payee's region--> succeeded
    processing --credit rejected, payer refunded--> failed
    (created) --automatic capture--> succeeded | processing

Refunds do not change the status: a refunded payment stays `succeeded` with
`amount_refunded` telling how much went back.
"""

from __future__ import annotations

from region_node.errors import Conflict

REQUIRES_CAPTURE = "requires_capture"
PROCESSING = "processing"
SUCCEEDED = "succeeded"
CANCELED = "canceled"
FAILED = "failed"

STATUSES = (REQUIRES_CAPTURE, PROCESSING, SUCCEEDED, CANCELED, FAILED)
TERMINAL = frozenset({SUCCEEDED, CANCELED, FAILED})

TRANSITIONS: dict[str, frozenset[str]] = {
    REQUIRES_CAPTURE: frozenset({SUCCEEDED, PROCESSING, CANCELED}),
    PROCESSING: frozenset({SUCCEEDED, FAILED}),
    SUCCEEDED: frozenset(),
    CANCELED: frozenset(),
    FAILED: frozenset(),
}


def check_transition(current: str, target: str, *, action: str) -> None:
    """Raise Conflict (409) unless `current -> target` is an allowed transition."""
    if target not in TRANSITIONS.get(current, frozenset()):
        raise Conflict(f"Cannot {action} a payment whose status is '{current}'",
                       code="payment_unexpected_state")
