"""Gauges for the operator's alerts and dashboard that no request path updates on its own:
ownership epochs, whether this region holds the lease of every home it serves, and the
open reconciliation items (deploy/prometheus/rules/paycluster.rules.yml alerts on them).

A worker refreshes them every `interval` seconds, so a scrape never waits on the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

from prometheus_client import Gauge

from region_node import ownership as own
from region_node import reconciliation

if TYPE_CHECKING:
    from region_node.leases import OwnershipLeases
    from region_node.node import Node

log = logging.getLogger(__name__)


class OpsMetrics:
    """Ownership, lease and reconciliation gauges of one node (in the node's registry)."""

    def __init__(self, node: Node, leases: OwnershipLeases | None,
                 interval: float = 5.0) -> None:
        self.node = node
        self.leases = leases
        self.interval = interval
        registry = node.metrics.registry
        self.epoch = Gauge(
            "paycluster_ownership_epoch", "Current ownership epoch of a home region as this "
            "region's store sees it", ["region", "home_region", "serving_region"],
            registry=registry)
        self.lease_held = Gauge(
            "paycluster_ownership_lease_held", "1 while this region holds a valid lease for a "
            "home region its store says it serves, 0 while it serves it without one "
            "(its writes for that home get 503 lease_lost)", ["region", "home_region"],
            registry=registry)
        self.open_items = Gauge(
            "paycluster_reconciliation_open_items", "Reconciliation items not settled yet",
            ["region", "item_kind", "currency"], registry=registry)
        self.open_amount = Gauge(
            "paycluster_reconciliation_open_amount", "Minor units of the open "
            "reconciliation items", ["region", "item_kind", "currency"], registry=registry)

    async def refresh(self) -> None:
        """Read the store once and set every gauge (series that went away are removed, so
        a settled item or a handed-over home stops alerting)."""
        region = self.node.region
        async with self.node.db.reads.connect() as conn:
            owners = (await conn.execute(own.CURRENT_ALL)).all()
            _items, summary = await reconciliation.list_items(conn)
        self.epoch.clear()
        for row in owners:
            self.epoch.labels(region, row.home_region, row.serving_region).set(row.epoch)
        self.lease_held.clear()
        if self.leases is not None:
            held = {entry["home_region"] for entry in self.leases.snapshot()
                    if entry["remaining_seconds"] > 0}
            for row in owners:
                if row.serving_region == region and not row.banned:
                    self.lease_held.labels(region, row.home_region).set(
                        1 if row.home_region in held else 0)
        self.open_items.clear()
        self.open_amount.clear()
        for group in summary["open_by_kind_and_currency"]:
            labels = (region, group["item_kind"], group["currency"] or "")
            self.open_items.labels(*labels).set(group["count"])
            self.open_amount.labels(*labels).set(group["amount"])

    async def run(self, stop: asyncio.Event) -> None:
        """Refresh until `stop`; a store that cannot be read keeps the last values."""
        while not stop.is_set():
            try:
                await self.refresh()
            except Exception as exc:
                log.warning("ops metrics not refreshed: %r", exc,
                            extra={"event": "ops_metrics_error"})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.interval)
