"""The operator's overrides - drained regions and weights - kept in one small JSON file.

Routers are stateless except for these operator decisions. So that every router (one per
region) applies the same ones, and a restarted router does not forget them, they live in
a file that all routers of a deployment share (in the lab: `<data_dir>/router/
overrides.json`). A change through any router's admin API is applied at once by that
router and written to the file; every router re-reads the file when it changes (checked on
every probe round), so the others follow within one probe interval.

Writes re-read the file first and replace it atomically (write, then rename): a reader
never sees half a file. Two operators changing different regions at the same instant
through two routers could still lose one change (last writer wins); operator commands
are rare and idempotent, and the CLI sends each to every router.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class OverrideStore:
    """Drained regions and weight overrides, optionally persisted to `path`."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self.drained: set[str] = set()
        self.weights: dict[str, int] = {}
        self.updated_at: float | None = None
        self._seen: tuple[int, int] | None = None

    def _stamp(self) -> tuple[int, int] | None:
        if self.path is None:
            return None
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        return st.st_mtime_ns, st.st_size

    def reload_if_changed(self) -> bool:
        """Re-read the file if it changed since we last read or wrote it; True if it did.

        A file that cannot be parsed is logged and ignored (the last good state stays):
        one bad edit must not undrain every region.
        """
        stamp = self._stamp()
        if stamp is None or stamp == self._seen:
            return False
        assert self.path is not None
        try:
            doc = json.loads(self.path.read_text())
            drained = {str(n) for n in doc.get("drained", [])}
            weights = {str(k): int(v) for k, v in (doc.get("weights") or {}).items()}
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            log.warning("ignoring unreadable overrides file %s: %s", self.path, exc)
            self._seen = stamp
            return False
        self._seen = stamp
        changed = drained != self.drained or weights != self.weights
        self.drained, self.weights = drained, weights
        self.updated_at = doc.get("updated_at") if isinstance(doc.get("updated_at"),
                                                              float) else self.updated_at
        return changed

    def set_drained(self, region: str, drained: bool) -> None:
        """Drain (no new requests) or undrain a region; persisted."""
        self.reload_if_changed()
        if drained:
            self.drained.add(region)
        else:
            self.drained.discard(region)
        self._save()

    def set_weight(self, region: str, weight: int | None) -> None:
        """Override a region's weight (0-100); None goes back to the catalog's."""
        if weight is not None and not 0 <= weight <= 100:
            raise ValueError(f"weight must be 0-100, got {weight}")
        self.reload_if_changed()
        if weight is None:
            self.weights.pop(region, None)
        else:
            self.weights[region] = weight
        self._save()

    def _save(self) -> None:
        self.updated_at = time.time()
        if self.path is None:
            return
        doc = {"drained": sorted(self.drained), "weights": dict(sorted(self.weights.items())),
               "updated_at": self.updated_at}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps(doc, indent=2) + "\n")
            os.replace(tmp, self.path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        self._seen = self._stamp()

    def to_json(self) -> dict[str, Any]:
        """As the admin API shows it."""
        return {"drained": sorted(self.drained), "weights": dict(self.weights),
                "file": str(self.path) if self.path else None, "updated_at": self.updated_at}
