"""A node's link to the channel: the client behind the circuit breaker, the callback URL,
the breaker's gauge, and the calls that start operations there.

A call's outcome is one of: an answer (the operation as the channel has it), a refusal
(`ChannelRejected`: nothing happened there), or unknown (`ChannelUnavailable`, or
`BreakerOpen` when we did not even try): unknown leaves the operation waiting for its
callback or the compensation job, which asks the channel's status API.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from prometheus_client import Gauge

from channel.client import ChannelClient, ChannelOperation
from region_node.breaker import GAUGE_VALUE, BreakerOpen, CircuitBreaker
from region_node.channel_config import ChannelLinkSettings

log = logging.getLogger(__name__)

T = TypeVar("T")

CALLBACK_PATH = "/v1/channel/callbacks"


class ChannelNotConfigured(Exception):
    """This node has no channel URL (PAYCLUSTER_CHANNEL_URL)."""


class ChannelLink:
    """The channel as one node sees it (one per node process)."""

    def __init__(self, settings: ChannelLinkSettings, *, region: str, api_host: str,
                 api_port: int, registry: Any) -> None:
        self.settings = settings
        self.region = region
        self.callback_url = (settings.callback_url
                             or f"http://{api_host}:{api_port}{CALLBACK_PATH}")
        self.client: ChannelClient | None = (
            ChannelClient(settings.url, settings.api_key, timeout=settings.timeout_seconds)
            if settings.url else None)
        self.gauge = Gauge("paycluster_channel_breaker_state",
                           "Channel circuit breaker: 0 closed, 1 half-open, 2 open",
                           ["region"], registry=registry)
        self.open_items = Gauge(
            "paycluster_channel_reconciliation_open_items",
            "Open reconciliation items about the channel (statement and late answers)",
            ["region", "item_kind"], registry=registry)
        self.settled = Gauge(
            "paycluster_channel_operations", "Channel operations stored here by kind, status",
            ["region", "kind", "status"], registry=registry)
        self.breaker = CircuitBreaker(
            failure_threshold=settings.breaker_failure_threshold,
            open_seconds=settings.breaker_open_seconds,
            half_open_successes=settings.breaker_half_open_successes,
            on_change=lambda state: self.gauge.labels(region).set(GAUGE_VALUE[state]))
        self.gauge.labels(region).set(0)

    @property
    def configured(self) -> bool:
        """True if this node has a channel to talk to."""
        return self.client is not None

    def state(self) -> str:
        """The breaker's state now (and the gauge kept in step with it)."""
        state = self.breaker.state
        self.gauge.labels(self.region).set(GAUGE_VALUE[state])
        return state

    async def call(self, fn: Callable[[ChannelClient], Awaitable[T]]) -> T:
        """Run `fn(client)` through the breaker (BreakerOpen, ChannelError as they come)."""
        client = self.client
        if client is None:
            raise ChannelNotConfigured("no channel configured (PAYCLUSTER_CHANNEL_URL)")
        return await self.breaker.call(lambda: fn(client))

    async def payin(self, op_id: uuid.UUID, amount: int, currency: str, number: str,
                    exp_month: int, exp_year: int, cvc: str) -> ChannelOperation:
        """Authorize and capture a card pay-in under our reference (the operation id)."""
        return await self.call(lambda c: c.authorize(
            str(op_id), amount, currency, number, exp_month, exp_year, cvc,
            self.callback_url, capture=True))

    async def payout(self, op_id: uuid.UUID, amount: int, currency: str, account_number: str,
                     holder_name: str) -> ChannelOperation:
        """Pay out to a bank account under our reference (idempotent at the channel)."""
        return await self.call(lambda c: c.payout(
            str(op_id), amount, currency, account_number, holder_name, self.callback_url))

    async def status(self, reference: str) -> ChannelOperation:
        """The operation as the channel has it (ChannelRejected 404 if it never got it)."""
        return await self.call(lambda c: c.status(reference))

    async def aclose(self) -> None:
        """Close the client's pool."""
        if self.client is not None:
            await self.client.aclose()


__all__ = ["CALLBACK_PATH", "BreakerOpen", "ChannelLink", "ChannelNotConfigured"]
