"""Lease renewal while the holder works, and the `async with locks.hold(...)` scope.

The watchdog renews every `ttl * renew_fraction`; a renewal that fails is retried at short
intervals until the lease's `valid_until`. If none reached a majority by then, the lease is
marked lost, whatever keys of ours are left are released (so the next holder need not wait
for them to expire), and `on_lost` runs - for `hold()`, that cancels the guarded body, which
then sees `LockLost` from its `async with`.

Cancelling is best effort by nature: a write already on the wire when the lease ends can
still arrive. That is why guarded writes carry the fencing token and the store checks it
(`lock_service.fencing`); the watchdog only keeps such late writes rare.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from types import TracebackType

from lock_service.errors import LockLost, LockUnavailable
from lock_service.quorum import Lease, LockService

log = logging.getLogger(__name__)


class Watchdog:
    """Renews one lease in a background task until stopped or the lease is lost."""

    def __init__(self, service: LockService, lease: Lease,
                 on_lost: Callable[[Lease], None] | None = None) -> None:
        """Prepare; nothing runs until `start()`."""
        self.service = service
        self.lease = lease
        self.on_lost = on_lost
        self.renewals = 0
        self.failed_renewals = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start renewing in the background (on the running loop)."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"lock-watchdog:{self.lease.name}")

    async def stop(self) -> None:
        """Stop renewing (does not release the lease)."""
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        lease = self.lease
        settings = self.service.settings
        interval = lease.ttl * settings.renew_fraction
        # Retries of a failed renewal: several per remaining lease, none faster than 10 ms.
        retry_gap = max(0.01, lease.ttl / 20)
        while not lease.released:
            await asyncio.sleep(max(0.0, lease.renewed_at + interval - time.monotonic()))
            while True:
                if lease.released:
                    return
                if time.monotonic() >= lease.valid_until:
                    self._lose("no renewal reached a majority before the lease ended")
                    return
                if await self.service.renew(lease):
                    self.renewals += 1
                    break
                self.failed_renewals += 1
                left = lease.valid_until - time.monotonic()
                if left > 0:
                    await asyncio.sleep(min(retry_gap, left))

    def _lose(self, reason: str) -> None:
        lease = self.lease
        lease.mark_lost(reason)
        log.warning("lock %s lost (fence=%s): %s", lease.name, lease.fence, reason,
                    extra={"lock": lease.name, "fence": lease.fence})
        # Our keys that are left would block the next holder until they expire.
        self.service._release_tasks(lease.name, lease.owner, lease._inflight)
        if self.on_lost is not None:
            self.on_lost(lease)


class HeldLock:
    """`async with service.hold(name) as lease:` - acquire, renew, cancel on loss, release.

    The body runs in the current task. If the lease is lost, the task is cancelled (the body
    sees `CancelledError` at its next await) and the `async with` raises `LockLost` instead.
    A cancellation from outside is passed on untouched.
    """

    def __init__(self, service: LockService, name: str, *, ttl: float | None = None,
                 wait: float | None = None) -> None:
        """Prepare; the lock is acquired on `__aenter__`."""
        self.service = service
        self.name = name
        self.ttl = ttl
        self.wait = wait
        self.lease: Lease | None = None
        self.watchdog: Watchdog | None = None
        self._task: asyncio.Task[object] | None = None
        self._cancelling = 0
        self._we_cancelled = False
        self._exiting = False
        self._gate: asyncio.Lock | None = None

    async def __aenter__(self) -> Lease:
        service = self.service
        wait = service.settings.acquire_wait_seconds if self.wait is None else self.wait
        deadline = time.monotonic() + wait
        # Tasks of this process queue for the lock locally first, so only one of them at a
        # time competes across the regions: many local contenders would otherwise split the
        # servers' votes among themselves and retry in a crowd.
        gate = service._gates.enter(self.name)
        try:
            async with asyncio.timeout(wait):
                await gate.acquire()
        except TimeoutError:
            service._gates.leave(self.name)
            raise LockUnavailable(self.name, 0, "other tasks of this process held it") from None
        except BaseException:
            service._gates.leave(self.name)
            raise
        try:
            lease = await service.acquire(self.name, ttl=self.ttl,
                                          wait=max(0.0, deadline - time.monotonic()))
        except BaseException:
            gate.release()
            service._gates.leave(self.name)
            raise
        self._gate = gate
        self.lease = lease
        self._task = asyncio.current_task()
        if self._task is not None:
            self._cancelling = self._task.cancelling()
        self.watchdog = self.service.watch(lease, on_lost=self._on_lost)
        return lease

    def _on_lost(self, lease: Lease) -> None:
        # After the body has finished there is nothing left to stop.
        if not self._exiting and self._task is not None:
            self._we_cancelled = True
            self._task.cancel(msg=f"lock {lease.name!r} lost")

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        # Set before the first await: from here on the watchdog never cancels this task.
        self._exiting = True
        lease = self.lease
        assert lease is not None and self.watchdog is not None
        try:
            await self.watchdog.stop()
            # Shielded: an outside cancellation must not leave our keys to expire.
            await asyncio.shield(self.service.release(lease))
        except Exception:  # a failed release only delays the next holder (keys expire)
            log.exception("releasing lock %s failed", lease.name)
        finally:
            if self._gate is not None:
                self._gate.release()
                self._gate = None
                self.service._gates.leave(self.name)
        if not self._we_cancelled:
            if lease.lost and exc_type is None:
                # The body ended after the loss without reaching an await (nothing to cancel).
                raise LockLost(lease.name, lease.fence, lease.lost_reason)
            return
        assert self._task is not None
        if self._task.uncancel() > self._cancelling and exc_type is asyncio.CancelledError:
            return  # someone else cancelled us as well: that cancellation goes on
        raise LockLost(lease.name, lease.fence, lease.lost_reason) from exc
