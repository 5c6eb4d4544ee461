"""The channel's storage: an append-only JSON-lines journal, replayed into memory at start.

Why a journal and not a database: the channel plays a third party, so it must not share
(or even resemble) our ledger's PostgreSQL; its state is small (operations, callbacks,
statement differences) and read far more often than written. Every change appends one
line (the whole new record), fsync'd before the API answers, so an acknowledged operation
survives a crash; at start the journal is read once and the last line per key wins. A
torn last line (a crash mid-write) is ignored: its request was never acknowledged. The
file is also the simulator's audit trail: nothing in it is ever rewritten.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger("channel.store")

JOURNAL_FILE = "journal.jsonl"


class Journal:
    """Appends records to `<data_dir>/journal.jsonl` and reads them back."""

    def __init__(self, data_dir: Path, fsync: bool = True) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self.path = data_dir / JOURNAL_FILE
        self._fsync = fsync
        self._fd: int | None = None

    def replay(self) -> Iterator[dict[str, Any]]:
        """Every complete record, oldest first (call before the first `append`)."""
        if not self.path.exists():
            return
        good_end = 0
        with open(self.path, "rb") as fh:
            for number, raw in enumerate(fh, start=1):
                if not raw.endswith(b"\n"):
                    # Cut it off, or the next append would be glued to it.
                    log.warning("journal: dropping a torn last line (%d)", number)
                    os.truncate(self.path, good_end)
                    return
                good_end += len(raw)
                yield json.loads(raw)

    def append(self, record: dict[str, Any]) -> None:
        """Write one record durably. Synchronous on purpose: called from the event loop
        with no await between the check and the write, each change is atomic."""
        if self._fd is None:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        line = json.dumps(record, separators=(",", ":"), sort_keys=True).encode() + b"\n"
        os.write(self._fd, line)
        if self._fsync:
            os.fsync(self._fd)

    def close(self) -> None:
        """Close the file (appends reopen it)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
