"""The FastAPI application of a region node and the background workers it runs."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

from fastapi import FastAPI

from lock_service.config import LockSettings
from lock_service.quorum import LockService
from region_node import write_guard
from region_node.api import (
    accounts,
    admin,
    auth,
    channel,
    cluster_info,
    errors,
    health,
    payments,
    reconciliation,
    refunds,
    stock,
)
from region_node.api import webhooks as webhook_routes
from region_node.api.audit_trail import AuditTrail
from region_node.api.middleware import BodyLimit, RequestContext, StorableInput
from region_node.api.payment_fast_path import PaymentFastPath
from region_node.channel_link import ChannelLink
from region_node.channel_worker import ChannelWorker
from region_node.config import RegionSettings
from region_node.event_bus import EventBus
from region_node.event_consumer import NotificationConsumer
from region_node.hold_expiry import HoldExpiryWorker
from region_node.janitor import KeyJanitor
from region_node.leases import OwnershipLeases
from region_node.node import Node
from region_node.ops_metrics import OpsMetrics
from region_node.outbox_relay import OutboxRelay
from region_node.principals import Authenticator
from region_node.probe import Probe
from region_node.rate_limit import RateLimiter
from region_node.refund_worker import RefundWorker
from region_node.replication_monitor import ConvergenceMonitor, HeartbeatWriter
from region_node.rpc.server import start_grpc_server
from region_node.stock_mover import QuorumStockLock, StockMover
from region_node.transfer_worker import TransferWorker
from region_node.webhooks.delivery import WebhookWorker

log = logging.getLogger(__name__)

Worker = Callable[[asyncio.Event], Coroutine[Any, Any, None]]


def _ownership_leases(node: Node, settings: RegionSettings) -> OwnershipLeases | None:
    """The node's ownership leases, registered as its write guard; None for a node
    without a lock quorum of several regions (nobody else could take over its home)."""
    if len(settings.lock_redis_urls) < 2:
        return None
    urls = [url for _, url in sorted(settings.lock_redis_urls.items())]
    leases = OwnershipLeases(node.db, settings.region, urls,
                             ttl_seconds=settings.ownership_lease_ttl_seconds,
                             renew_seconds=settings.ownership_lease_renew_seconds,
                             margin_seconds=settings.ownership_lease_margin_seconds,
                             op_timeout_seconds=settings.ownership_lease_op_timeout_seconds,
                             ownership=node.ownership)
    write_guard.register_guard(settings.region, leases)
    return leases


def create_app(settings: RegionSettings | None = None) -> FastAPI:
    """Build the app; connections open and workers start in the lifespan."""
    settings = settings or RegionSettings()
    node = Node.connect(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        stop = asyncio.Event()
        workers: list[Worker] = []
        bus = EventBus(settings)
        app.state.event_bus = bus
        await node.ownership.bootstrap()
        transfer_worker = TransferWorker(node)
        app.state.transfer_worker = transfer_worker
        # The reverse saga (refunds).
        refund_worker = RefundWorker(node)
        app.state.refund_worker = refund_worker
        grpc_server = None
        if settings.grpc_port:
            # gRPC listens where the API does: loopback in the lab, the container's or
            # task's interfaces in a deployment (the other regions dial it).
            grpc_server, grpc_service = await start_grpc_server(node, app,
                                                                host=settings.api_host)
        lock_urls = [url for _, url in sorted(settings.lock_redis_urls.items())] or [
            settings.redis_url]
        lock_service = LockService(lock_urls, LockSettings(redis_urls=lock_urls,
                                                           ttl_seconds=settings.lock_ttl_seconds))
        stock_mover = StockMover(node, QuorumStockLock(lock_service))
        leases = _ownership_leases(node, settings)
        app.state.leases = leases
        if leases is not None:
            # Before serving: writes need the lease (an earlier run's must expire first).
            await leases.start(wait_seconds=settings.ownership_lease_ttl_seconds + 2.0)
            workers.append(leases.run)
        app.state.stock_mover = stock_mover
        if node.hot_path is not None:
            await node.hot_path.start()
        workers.append(node.ownership.run)
        workers.append(OpsMetrics(node, leases).run)
        workers.append(HeartbeatWriter(node.db.reads, settings.region,
                                       settings.heartbeat_seconds).run)
        monitor = ConvergenceMonitor(node.db.reads, settings.region, sorted(settings.peers),
                                     settings.replication_slo_seconds,
                                     registry=node.metrics.registry)
        app.state.monitor = monitor
        if settings.peers:
            workers.append(monitor.run)
        if settings.run_workers and link.configured:
            chan = ChannelWorker(node, link)
            workers += [chan.run_compensation, chan.run_queue]
            if settings.channel.run_statement_job:
                workers.append(chan.run_statements)
        if settings.run_workers:
            workers += [HoldExpiryWorker(node).run, KeyJanitor(node).run,
                        OutboxRelay(node.db, settings, bus=bus).run,
                        NotificationConsumer(node.db, settings).run,
                        transfer_worker.run, refund_worker.run, stock_mover.run,
                        WebhookWorker(node).run,
                        # Wakes the workers above for work that came from outside.
                        Probe(node).run]
        tasks = [asyncio.create_task(w(stop), name=getattr(w, "__qualname__", "worker"))
                 for w in workers]
        log.info("region node %s serving", settings.region)
        try:
            yield
        finally:
            stop.set()
            if grpc_server is not None:
                await grpc_server.stop(grace=2)
                await grpc_service.close()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await asyncio.wait_for(task, 5)
            await bus.close()
            if leases is not None:
                write_guard.register_guard(settings.region, None)
                await leases.aclose()
            await lock_service.aclose()
            await rate_limiter.aclose()
            await link.aclose()
            await node.close()

    # FastAPI's own OpenTelemetry hooks are off: the node traces with region_node.tracing,
    # and asking OpenTelemetry for its providers on every request cost ~3% of a loaded
    # node's CPU with nothing configured.
    app = FastAPI(title="paycluster region node", version="1.0.0", lifespan=lifespan,
                  telemetry={"tracing": False, "metrics": False, "logs": False,
                             "operation_spans": False},
                  description="Public API v1: accounts, deposits, payments (automatic and "
                              "manual capture), refunds. Amounts are integer minor units.")
    app.state.node = node
    # Pay-ins and payouts through the external channel, behind a circuit breaker.
    link = ChannelLink(settings.channel, region=settings.region, api_host=settings.api_host,
                       api_port=settings.api_port, registry=node.metrics.registry)
    app.state.channel = link
    # Every /v1 route authenticates its caller (api/auth.py); keys are cached briefly.
    auth.install(app, Authenticator(node.db.engine, settings.auth_cache_seconds))
    # Per-key limits, checked by the auth dependency (api/auth.py) after authentication.
    rate_limiter = RateLimiter.from_url(settings.redis_url, settings.rate_limit_per_second,
                                        settings.rate_limit_burst,
                                        fallback_seconds=settings.rate_limit_fallback_seconds)
    app.state.rate_limiter = rate_limiter
    errors.install(app)
    app.include_router(accounts.router)
    app.include_router(payments.router)
    app.include_router(refunds.router)
    app.include_router(webhook_routes.router)
    app.include_router(stock.router)
    app.include_router(health.router)
    app.include_router(cluster_info.router)
    app.include_router(admin.router)
    app.include_router(reconciliation.router)
    app.include_router(channel.router)
    app.include_router(channel.callbacks)
    # Innermost: POST /v1/payments served without FastAPI's per-request machinery (the
    # route's own functions, in FastAPI's order: api/payment_fast_path.py).
    app.add_middleware(PaymentFastPath)
    # The audit trail sees the request id and the matched route.
    app.add_middleware(AuditTrail)
    # Outside the audit trail, inside the body limit: strings PostgreSQL cannot store are
    # refused before anything reads or writes the store.
    app.add_middleware(StorableInput)
    # Outermost first: the request id and metrics see everything, including 413s.
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestContext, metrics=node.metrics, region=settings.region)
    return app
