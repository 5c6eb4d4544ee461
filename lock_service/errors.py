"""The lock service's errors: one small hierarchy, mapped to HTTP/gRPC by the caller.

Suggested mapping for region nodes: `LockUnavailable` -> 503 (or 409 when the caller asked
not to wait), `LockLost` and `StaleFencingToken` -> 409 conflict (the step must be retried
from the start under a new lease; nothing it wrote after losing the lease was accepted).
"""

from __future__ import annotations


class LockError(Exception):
    """Base class of every lock-service error."""


class LockUnavailable(LockError):
    """`acquire` gave up: no majority granted the lock within the attempts/time it was given."""

    def __init__(self, name: str, attempts: int, reason: str) -> None:
        self.name = name
        self.attempts = attempts
        self.reason = reason
        super().__init__(f"lock {name!r} not acquired after {attempts} attempt(s): {reason}")


class LockLost(LockError):
    """The lease ended (renewal did not reach a majority in time) while work was guarded by it.

    Whatever the guarded work had not finished must be treated as not done; whatever it
    wrote to a fenced store after another holder wrote was refused there.
    """

    def __init__(self, name: str, fence: int, reason: str = "lease expired") -> None:
        self.name = name
        self.fence = fence
        self.reason = reason
        super().__init__(f"lock {name!r} (fence={fence}) lost: {reason}")


class StaleFencingToken(LockError):
    """A store refused a guarded write: a newer holder of the lock has already written."""

    def __init__(self, lock_name: str, token: int, current: int | None) -> None:
        self.lock_name = lock_name
        self.token = token
        self.current = current
        super().__init__(f"stale fencing token: fence={token} for {lock_name!r}, the store "
                         f"has already seen fence={current}")
