"""Asynchronous results: signed callbacks, delivered at least once, with injected faults.

Each event is posted as JSON to the callback URL of its operation, signed
(`channel.signing`, header `Channel-Signature`) at every attempt. A receiver's non-2xx
answer, a timeout or a refused connection is retried with exponential backoff up to
`callback_max_attempts`. The faults in force decide, per event (see `channel.faults`),
whether it is dropped (never sent: the lost callback a compensation job must make up
for), delayed, held back until the next callback to the same URL has gone (reordered) or
sent twice. While the channel is down nothing is sent; deliveries resume afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import httpx

from channel.config import ChannelSettings
from channel.faults import Faults
from channel.signing import SIGNATURE_HEADER, sign
from channel.store import Journal

log = logging.getLogger("channel.callbacks")


@dataclass
class Delivery:
    """One event on its way to a receiver, and what happened to it."""

    event: dict[str, Any]
    url: str
    faults: list[str] = field(default_factory=list)
    attempts: list[dict[str, Any]] = field(default_factory=list)
    outcome: str | None = None  # delivered | dropped | failed

    @property
    def key(self) -> str:
        """What fault decisions about this event are keyed by (stable across runs)."""
        data = self.event["data"]
        return f"{data['reference']}|{self.event['type']}|{data['version']}"

    def public(self) -> dict[str, Any]:
        """The admin API's view."""
        data = self.event["data"]
        return {"event_id": self.event["id"], "type": self.event["type"],
                "reference": data["reference"], "version": data["version"], "url": self.url,
                "faults": self.faults, "attempts": self.attempts, "outcome": self.outcome}


class Dispatcher:
    """Delivers events; one task per event so a slow receiver delays nobody else."""

    def __init__(self, settings: ChannelSettings, faults: Faults, journal: Journal) -> None:
        self.settings = settings
        self.faults = faults
        self.journal = journal
        self.deliveries: dict[str, Delivery] = {}
        self._held: defaultdict[str, list[asyncio.Event]] = defaultdict(list)
        self._tasks: set[asyncio.Task[None]] = set()
        self._client: httpx.AsyncClient | None = None

    async def start(self) -> None:
        """Open the HTTP client (call inside the running loop)."""
        self._client = httpx.AsyncClient(timeout=self.settings.callback_timeout_seconds)

    async def stop(self) -> None:
        """Cancel deliveries in flight (the journal resumes them at the next start)."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()

    def restore(self, event: dict[str, Any], url: str) -> None:
        """Know an event from the journal (not yet sent again: see `submit`)."""
        self.deliveries[event["id"]] = Delivery(event, url)

    def finished(self, event_id: str, outcome: str) -> None:
        """Mark a journalled delivery as finished."""
        if event_id in self.deliveries:
            self.deliveries[event_id].outcome = outcome

    def submit(self, event: dict[str, Any], url: str, *, journal: bool = True) -> None:
        """Queue an event for delivery; with `journal`, record it first (durably)."""
        if journal:
            self.journal.append({"t": "event", "event": event, "url": url})
        delivery = self.deliveries.setdefault(event["id"], Delivery(event, url))
        task = asyncio.get_running_loop().create_task(self._run(delivery))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def resume_unfinished(self) -> None:
        """Send again every journalled event whose delivery never finished."""
        for delivery in list(self.deliveries.values()):
            if delivery.outcome is None:
                self.submit(delivery.event, delivery.url, journal=False)

    def _finish(self, delivery: Delivery, outcome: str) -> None:
        delivery.outcome = outcome
        self.journal.append({"t": "delivery", "event_id": delivery.event["id"],
                             "outcome": outcome})

    async def _run(self, delivery: Delivery) -> None:
        decide = self.faults.decide
        config = self.faults.config
        if decide("callback_drop", delivery.key):
            delivery.faults.append("drop")
            self._finish(delivery, "dropped")
            log.info("callback %s %s dropped (fault)", delivery.event["type"], delivery.key)
            return
        if decide("callback_delay", delivery.key):
            delivery.faults.append("delay")
            await asyncio.sleep(config.callback_delay_seconds)
        held = decide("callback_reorder", delivery.key)
        if held:
            delivery.faults.append("reorder")
            waiter = asyncio.Event()
            self._held[delivery.url].append(waiter)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(waiter.wait(), config.callback_reorder_max_seconds)
        duplicate = decide("callback_duplicate", delivery.key)
        if duplicate:
            delivery.faults.append("duplicate")
        delivered = await self._deliver(delivery, release_held=not held)
        if duplicate:
            # The same event (same id) once more, as an acquirer retrying after a lost ack.
            await asyncio.sleep(0.05)
            await self._wait_up()
            delivered = await self._post(delivery) or delivered
        self._finish(delivery, "delivered" if delivered else "failed")

    async def _deliver(self, delivery: Delivery, release_held: bool) -> bool:
        """Post until a 2xx or the last attempt; True once delivered."""
        delay = self.settings.callback_backoff_seconds
        for attempt in range(1, self.settings.callback_max_attempts + 1):
            await self._wait_up()
            ok = await self._post(delivery)
            if attempt == 1 and release_held:
                # Callbacks held back for reordering go now, behind this one.
                for waiter in self._held.pop(delivery.url, []):
                    waiter.set()
            if ok:
                return True
            if attempt < self.settings.callback_max_attempts:
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.settings.callback_backoff_max_seconds)
        log.warning("callback %s to %s failed after %d attempts", delivery.key, delivery.url,
                    self.settings.callback_max_attempts)
        return False

    async def _post(self, delivery: Delivery) -> bool:
        assert self._client is not None, "Dispatcher.start() was not called"
        body = json.dumps(delivery.event, separators=(",", ":")).encode()
        headers = {"content-type": "application/json",
                   SIGNATURE_HEADER: sign(body, self.settings.callback_secret)}
        attempt: dict[str, Any] = {"at": time.time()}
        try:
            resp = await self._client.post(delivery.url, content=body, headers=headers)
            attempt["status"] = resp.status_code
            ok = 200 <= resp.status_code < 300
        except httpx.HTTPError as exc:
            attempt["error"] = type(exc).__name__
            ok = False
        delivery.attempts.append(attempt)
        return ok

    async def _wait_up(self) -> None:
        """While the channel is down it sends nothing either."""
        remaining = self.faults.down_remaining
        while remaining > 0:
            await asyncio.sleep(min(remaining, 0.2))
            remaining = self.faults.down_remaining
