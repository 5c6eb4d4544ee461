"""The public JSON shape of a payment (used by the API, events and the saga alike)."""

from __future__ import annotations

from typing import Any

from sqlalchemy.engine import Row


def to_api(row: Row[Any] | dict[str, Any]) -> dict[str, Any]:
    """The public JSON shape of a payment."""
    m = row._mapping if isinstance(row, Row) else row
    return {
        "id": str(m["id"]), "object": "payment", "payer": str(m["payer_id"]),
        "payee": str(m["payee_id"]), "amount": m["amount"], "currency": m["currency"],
        "capture_method": m["capture_method"], "status": m["status"],
        "amount_capturable": m["amount_held"], "amount_captured": m["amount_captured"],
        "amount_refunded": m["amount_refunded"],
        "hold_expires_at": m["hold_expires_at"].isoformat() if m["hold_expires_at"] else None,
        "description": m["description"], "failure_code": m["failure_code"],
        "home_region": m["home_region"],
        "created_at": m["created_at"].isoformat(), "updated_at": m["updated_at"].isoformat(),
    }
