"""Routes: liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import asyncio
from typing import Any

import sqlalchemy as sa
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from region_node import schema
from region_node.api.mutation import node_of
from region_node.payment_states import STATUSES

router = APIRouter(tags=["health"])


async def channel_gauges(request: Request) -> None:
    """Refresh the channel's gauges at scrape time: breaker state, open reconciliation
    items by kind, operations by kind and status."""
    from region_node.statement_recon import open_items, operation_counts

    node, link = node_of(request), getattr(request.app.state, "channel", None)
    if link is None:
        return
    link.state()
    async with node.db.engine.connect() as conn:
        items = await open_items(conn)
        counts = await operation_counts(conn)
    link.open_items.clear()
    for kind, n in items.items():
        link.open_items.labels(node.region, kind).set(n)
    for kind, by_status in counts.items():
        for status, n in by_status.items():
            link.settled.labels(node.region, kind, status).set(n)

CHECK_TIMEOUT = 2.0


@router.get("/health/live")
async def live(request: Request) -> JSONResponse:
    """The process is up and serving."""
    return JSONResponse({"status": "live", "region": node_of(request).region})


@router.get("/health/ready")
async def ready(request: Request) -> JSONResponse:
    """Ready when the store answers (503 otherwise). Redis or the bus being down, or a
    replication pair over its convergence SLO (named in `stale_pairs`), leaves the region
    routable but `degraded`: payments do not need them to succeed."""
    node = node_of(request)

    async def database() -> None:
        async with node.db.engine.connect() as conn:
            await conn.execute(sa.text("select 1"))

    async def redis() -> None:
        await node.redis.ping()

    async def bus() -> None:
        relay = getattr(request.app.state, "event_bus", None)
        if relay is None or not relay.is_connected:
            raise RuntimeError("not connected to the event bus")

    checks: dict[str, Any] = {}
    for name, probe in (("database", database), ("redis", redis), ("bus", bus)):
        try:
            await asyncio.wait_for(probe(), CHECK_TIMEOUT)
            checks[name] = "ok"
        except Exception as exc:
            checks[name] = f"failed: {type(exc).__name__}: {exc}"[:200]
    monitor = getattr(request.app.state, "monitor", None)
    stale = monitor.stale_pairs() if monitor is not None else []
    checks["replication"] = "ok" if not stale else f"stale: {', '.join(stale)}"
    link = getattr(request.app.state, "channel", None)
    channel: dict[str, Any] | None = None
    if link is not None and link.configured:
        # The channel is not needed for payments inside the ledger: an open breaker
        # degrades the region (pay-ins 503, payouts queue), it does not take it out.
        state = link.state()
        channel = {"breaker": state, "retry_after": link.breaker.retry_after()}
        checks["channel"] = "ok" if state == "closed" else f"breaker {state}"
    if checks["database"] != "ok":
        status, code = "unavailable", 503
    elif all(v == "ok" for v in checks.values()):
        status, code = "ready", 200
    else:
        status, code = "degraded", 200
    return JSONResponse({"status": status, "region": node.region, "checks": checks,
                         "stale_pairs": stale, "channel": channel}, status_code=code)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    """Prometheus exposition; store-derived gauges are read at scrape time."""
    node = node_of(request)
    pay, out = schema.payments, schema.outbox
    try:
        async with node.db.engine.connect() as conn:
            by_status = (await conn.execute(
                sa.select(pay.c.status, sa.func.count()).group_by(pay.c.status))).all()
            backlog = (await conn.execute(
                sa.select(sa.func.count()).select_from(out)
                .where(out.c.published_at.is_(None), out.c.region == node.region))).scalar_one()
        counts: dict[str, int] = {row[0]: row[1] for row in by_status}
        for status in STATUSES:
            node.metrics.payments.labels(node.region, status).set(counts.get(status, 0))
        node.metrics.outbox_backlog.labels(node.region).set(backlog)
        await channel_gauges(request)
    except Exception:  # the request metrics are still worth serving
        pass
    return Response(node.metrics.render(), media_type="text/plain; version=0.0.4")
