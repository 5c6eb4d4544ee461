"""The gauges the alert rules and the dashboard read that no request updates on its own
(region_node/ops_metrics.py): ownership epochs and open reconciliation items, as a scrape
of /metrics sees them."""

from __future__ import annotations

import asyncio
import time
import uuid

import httpx
import psycopg
import pytest

from region_node.config import RegionSettings
from tests.conftest import app_client

pytestmark = pytest.mark.integration


async def _metric_lines(client: httpx.AsyncClient, name: str) -> list[str]:
    text = (await client.get("/metrics")).text
    return [line for line in text.splitlines() if line.startswith(name + "{")]


async def test_open_reconciliation_items_and_epochs_are_exported(
        settings: RegionSettings, db_url: str) -> None:
    with psycopg.connect(db_url, autocommit=True) as conn:
        for amount in (1_500, 2_500):
            conn.execute(
                "insert into reconciliation_items (home_region, takeover_epoch, item_id, "
                "item_kind, lost_region, listed_by, currency, amount) "
                "values ('eu-west', 2, %s, 'lost_payment', 'eu-west', 'us-east', 'EUR', %s)",
                (uuid.uuid4(), amount))
    async with app_client(settings) as client:
        deadline = time.monotonic() + 15
        while True:
            items = await _metric_lines(client, "paycluster_reconciliation_open_items")
            amounts = await _metric_lines(client, "paycluster_reconciliation_open_amount")
            epochs = await _metric_lines(client, "paycluster_ownership_epoch")
            if items and epochs:
                break
            assert time.monotonic() < deadline, "ops gauges never exported"
            await asyncio.sleep(0.2)
    assert items == ['paycluster_reconciliation_open_items{currency="EUR",'
                     'item_kind="lost_payment",region="us-east"} 2.0']
    assert amounts == ['paycluster_reconciliation_open_amount{currency="EUR",'
                       'item_kind="lost_payment",region="us-east"} 4000.0']
    # The node bootstraps epoch 1 of its own home region at start.
    assert any('home_region="us-east"' in line and 'serving_region="us-east"' in line
               and line.endswith(" 1.0") for line in epochs), epochs
