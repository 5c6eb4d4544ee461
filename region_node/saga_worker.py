"""The moving parts of a cross-region saga (transfers, refunds), written once.

A saga's first step commits in one region with a message to another (a `transfers` or
`refunds` row). The worker moves it on twice over:

- `push_soon`/`push`: right after commit, send the message to the region serving its
  destination home over gRPC (or apply it here if we serve that home) and finish the
  saga from the answer. At most `saga_max_pushes_in_flight` pushes run at once per
  worker: beyond that a push is not started, and the scan below delivers the message (it
  is the fallback for every push that fails anyway, so nothing is lost, only later).
- `run`: the certainty path. Apply messages that replicated in for homes we serve and
  have no result yet; finish our sagas whose result replicated back; park orphan credits
  (`region_node.suspense`). Everything is idempotent, so it may race the pushes freely.

What differs between sagas (which rows, which service functions, which log words) is a
`Saga`; `transfer_worker.py` and `refund_worker.py` define theirs.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Generic, Protocol, TypeVar

from sqlalchemy.ext.asyncio import AsyncConnection

from region_node.errors import PaymentError
from region_node.node import Node

log = logging.getLogger(__name__)

Msg = TypeVar("Msg")
Out = TypeVar("Out")


class Saga(Protocol[Msg, Out]):
    """One saga's rows, service functions and log words (Msg: its message, Out: the answer).

    `key` is what a push and a finish are addressed by: the payment id of a transfer,
    the refund id of a refund."""

    name: str
    """`transfer` or `refund`: log lines and the scan's error."""
    wake: str
    """The wake-up (`region_node.wakeups`) that ends the scan's wait."""
    push_label: str
    """How a push names its key in log lines (`transfer push for payment`)."""
    finish_label: str
    """How a finish names its key in log lines (`payment`, `refund`)."""

    async def message_for(self, conn: AsyncConnection, key: uuid.UUID) -> Msg | None:
        """The message of a just-committed first step (None: nothing to push)."""

    def destination(self, message: Msg) -> str:
        """The home region whose serving region applies the message."""

    def message_id(self, message: Msg) -> uuid.UUID:
        """The message's id (log lines)."""

    async def apply(self, node: Node, message: Msg) -> Out:
        """Apply the message here (this region serves its destination)."""

    async def send(self, node: Node, peer: str, message: Msg) -> Out:
        """Push the message to `peer` over gRPC; its answer."""

    async def finish(self, node: Node, key: uuid.UUID, outcome: Out) -> None:
        """Finish our saga from the answer (no-op if already done)."""

    async def inbound(self, conn: AsyncConnection, homes: list[str], limit: int) -> list[Msg]:
        """Messages replicated in for `homes` that have no result yet."""

    async def settleable(self, conn: AsyncConnection, homes: list[str],
                         limit: int) -> list[tuple[uuid.UUID, Out]]:
        """(key, answer) of our unfinished sagas whose result replicated back."""

    async def park_orphans(self, node: Node, limit: int) -> int:
        """Park the orphan credits listed for our clearing accounts; returns how many."""


def served_homes(node: Node) -> list[str]:
    """Home regions this region writes for right now (its own unless the map says who
    serves it)."""
    me = node.region
    snapshot = node.ownership.snapshot()
    homes = {o.home_region for o in snapshot if o.serving_region == me}
    if not any(o.home_region == me for o in snapshot):
        homes.add(me)
    return sorted(homes)


class SagaWorker(Generic[Msg, Out]):
    """Push and scan loops of one saga for one region node."""

    def __init__(self, node: Node, saga: Saga[Msg, Out], batch: int = 100,
                 max_pushes_in_flight: int | None = None) -> None:
        """`max_pushes_in_flight` defaults to the node's `saga_max_pushes_in_flight`."""
        self.node = node
        self.saga = saga
        self.batch = batch
        self.max_pushes_in_flight = (max_pushes_in_flight if max_pushes_in_flight is not None
                                     else node.settings.saga_max_pushes_in_flight)
        self.pushes_skipped = 0
        """Pushes not started because the bound was reached (the scan delivers them)."""
        self._pushes: set[asyncio.Task[None]] = set()

    def served_homes(self) -> list[str]:
        """Home regions this region writes for right now."""
        return served_homes(self.node)

    @property
    def pushes_in_flight(self) -> int:
        """Pushes started and not yet done."""
        return len(self._pushes)

    def push_soon(self, key: uuid.UUID) -> bool:
        """Start pushing a just-committed first step without making the client wait for
        it; False when the bound on pushes in flight is reached (the scan delivers it:
        a backlog of pushes would only pile up tasks and connections on a slow link)."""
        if len(self._pushes) >= self.max_pushes_in_flight:
            self.pushes_skipped += 1
            log.debug("%s %s left to the scan: %d pushes in flight", self.saga.push_label,
                      key, len(self._pushes))
            return False
        task = asyncio.create_task(self.push(key))
        self._pushes.add(task)
        task.add_done_callback(self._pushes.discard)
        return True

    async def push(self, key: uuid.UUID) -> None:
        """Send the message to the region serving its destination and finish from the
        answer; failures are left to the scan."""
        async with self.node.db.engine.connect() as conn:
            message = await self.saga.message_for(conn, key)
        if message is None:
            return
        owner = (await self.node.ownership.owner(self.saga.destination(message))
                 ).serving_region
        try:
            if owner == self.node.region:
                outcome = await self.saga.apply(self.node, message)
            else:
                outcome = await self.saga.send(self.node, owner, message)
            await self.saga.finish(self.node, key, outcome)
        except PaymentError as exc:
            # The replicated message row gets it there later; nothing is lost.
            log.info("%s %s deferred: %s", self.saga.push_label, key, exc.message)
        except Exception:
            log.exception("%s %s failed", self.saga.push_label, key)

    async def run_once(self) -> int:
        """One pass of the certainty path; returns how many messages and sagas it moved
        (orphan credits parked included)."""
        homes = self.served_homes()
        async with self.node.db.engine.connect() as conn:
            inbound = await self.saga.inbound(conn, homes, self.batch)
            settleable = await self.saga.settleable(conn, homes, self.batch)
        done = 0
        for message in inbound:
            try:
                await self.saga.apply(self.node, message)
                done += 1
            except PaymentError as exc:
                log.info("%s %s not applied: %s", self.saga.name,
                         self.saga.message_id(message), exc.message)
        for key, outcome in settleable:
            try:
                await self.saga.finish(self.node, key, outcome)
                done += 1
            except PaymentError as exc:
                log.info("%s %s not settled here: %s", self.saga.finish_label, key,
                         exc.message)
        return done + await self.saga.park_orphans(self.node, self.batch)

    async def run(self, stop: asyncio.Event) -> None:
        """Scan until stopped (at once again after a full batch); errors are logged, never
        fatal. Pushes still in flight are cancelled on the way out."""
        while not stop.is_set():
            moved = 0
            try:
                moved = await self.run_once()
            except Exception:
                log.exception("%s scan failed", self.saga.name)
            if moved < self.batch:
                # Woken by the probe (`transfers` / `refunds`) or after the interval.
                await self.node.db.wakeups.wait(self.saga.wake, stop,
                                                self.node.settings.transfer_poll_seconds)
        for task in list(self._pushes):
            task.cancel()
