"""Cross-region quorum locks with fencing tokens (one Redis per region).

    from lock_service import LockService, LockSettings, FencedStore

    locks = LockService(["redis://us-east...", "redis://link-to-eu...", "redis://link-to-ap..."])
    async with locks.hold("sku:42:escrow", ttl=5) as lease:
        async with FencedStore(engine).guarded(lease) as conn:
            ...  # guarded writes; refused if a newer holder already wrote

`lock_service.quorum` has the protocol and the proof that tokens only go up,
`lock_service.fencing` the store-side check, `lock_service.watchdog` renewal and cancel.
"""

from lock_service.config import LockSettings
from lock_service.errors import LockError, LockLost, LockUnavailable, StaleFencingToken
from lock_service.fencing import (
    FENCE_TABLE,
    FencedStore,
    advance_fence,
    create_fence_table,
    fence_table,
    fence_table_ddl,
    fenced_update,
)
from lock_service.quorum import Lease, LockService, ServerView
from lock_service.watchdog import HeldLock, Watchdog

__all__ = [
    "FENCE_TABLE",
    "FencedStore",
    "HeldLock",
    "Lease",
    "LockError",
    "LockLost",
    "LockService",
    "LockSettings",
    "LockUnavailable",
    "ServerView",
    "StaleFencingToken",
    "Watchdog",
    "advance_fence",
    "create_fence_table",
    "fence_table",
    "fence_table_ddl",
    "fenced_update",
]
