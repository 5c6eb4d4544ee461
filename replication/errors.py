"""The one base of replication's errors, so a caller (the lab, the CLI) can catch them all."""

from __future__ import annotations


class ReplicationError(RuntimeError):
    """A replication step (wiring, alignment, handover, reconciliation) could not be done.

    Subclasses name the step: `replication.wiring.WiringError`,
    `replication.align.AlignError`, `replication.failover.HandoverError`,
    `replication.reconcile.ReconcileError`.
    """
