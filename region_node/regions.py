"""The region catalog every node shares: names, and the small code each name has inside ids.

A home region is encoded in the last byte of every account and payment id (a UUIDv7 keeps
54 random bits besides), so any region can tell where an id was born without having
replicated its row yet: that is what lets a region forward a request for an account it
has never seen to the account's owner.
"""

from __future__ import annotations

import uuid

DEFAULT_REGION_CODES: dict[str, int] = {"us-east": 1, "eu-west": 2, "ap-southeast": 3,
                                        "us-west": 4, "eu-central": 5, "sa-east": 6}


class RegionCatalog:
    """Region name <-> id code."""

    def __init__(self, codes: dict[str, int] | None = None) -> None:
        self.codes = dict(codes or DEFAULT_REGION_CODES)
        if len(set(self.codes.values())) != len(self.codes) or not all(
                0 < c < 256 for c in self.codes.values()):
            raise ValueError("region codes must be distinct numbers from 1 to 255")
        self.names = {code: name for name, code in self.codes.items()}

    def code(self, region: str) -> int:
        """The id code of a region; KeyError for an unknown region."""
        return self.codes[region]

    def stamp(self, value: uuid.UUID, region: str) -> uuid.UUID:
        """`value` with its last byte replaced by the region's code."""
        raw = bytearray(value.bytes)
        raw[15] = self.code(region)
        return uuid.UUID(bytes=bytes(raw))

    def home_of(self, value: uuid.UUID) -> str | None:
        """The region an id was stamped with, if it is one we know."""
        return self.names.get(value.bytes[15])
