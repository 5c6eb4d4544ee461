"""The write guard of a region: what bounds its writes besides the ownership log (a
node's ownership leases, `region_node.leases`), registered per region in this process,
and how a write that the guard's fence ended is answered.

`ownership.assert_serving` and the payment hot path ask the guard before a write; the
database layer (`region_node.db`, `region_node.hot_path`) asks it after the server ended a
write's session, to tell a lease that ran out from a shutdown.
"""

from __future__ import annotations

from typing import Protocol

from region_node.errors import RegionUnavailable


class WriteGuard(Protocol):
    """What a writer asks besides the log: the region's ownership leases
    (`region_node.leases.OwnershipLeases`)."""

    def budget_ms(self, home: str) -> int | None:
        """How long a write transaction starting now may take, or None (no lease)."""

    def check(self, home: str, epoch: int) -> None:
        """Raise 503 lease_lost unless a valid lease with token `epoch` is held."""

    def token(self, home: str) -> int | None:
        """The token (epoch) of the lease held for `home`, valid or not; None if none."""

    def fenced_recently(self) -> bool:
        """Whether the guard ended write sessions in the last few seconds (a lease was
        running out)."""


_GUARDS: dict[str, WriteGuard] = {}


def register_guard(region: str, guard: WriteGuard | None) -> None:
    """Make every `assert_serving` for `region` in this process also require `guard`'s
    lease (None: remove it). A region node registers its leases at start."""
    if guard is None:
        _GUARDS.pop(region, None)
    else:
        _GUARDS[region] = guard


def guard_for(region: str | None) -> WriteGuard | None:
    """The write guard registered for `region` in this process, if any."""
    return _GUARDS.get(region) if region is not None else None


def ended_session_error(region: str | None) -> RegionUnavailable:
    """The answer to a write whose session the server ended (SQLSTATE class 57: nothing
    of it committed). When the region's guard has just ended its writers, that is a lease
    running out, and the client sees the same 503 ``lease_lost`` as a write refused
    before it started (a client retries both alike, and a drill tells the fence from an
    outage by the code); otherwise 503 ``region_unavailable`` (a shutdown)."""
    guard = guard_for(region)
    if guard is not None and guard.fenced_recently():
        return RegionUnavailable("this region's ownership lease ran out during the write; "
                                 "retry shortly", code="lease_lost")
    return RegionUnavailable("the region's database ended this write (a shutdown); retry")
