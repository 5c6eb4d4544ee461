"""The one base of the lab's errors (`cluster/`).

Every error the lab raises on purpose (a cluster that cannot start, a server that
would not come up, a WAN control call refused, a drill or demo that failed) is a
`LabError`, so a command line can catch the lab's failures in one clause and leave
programming errors to surface.
"""

from __future__ import annotations


class LabError(RuntimeError):
    """A failure of the local lab (cluster/): its servers, WAN, demo, drills or workloads."""
