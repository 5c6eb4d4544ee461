"""Which region owns the data a request names, so the policy can send the request there
and save the hop the nearest region would otherwise make to forward it.

Two public contracts of the region nodes make this possible without their internals:
- every account and payment id carries its home region in its last byte
  (`region_node.regions.RegionCatalog.home_of`);
- `GET /v1/cluster/ownership` lists `home_region -> serving_region` (which changes only on
  a failover).

Only requests a node would forward are worth it: mutations, and reads that ask for
`consistency=strong` (local reads are served by whichever region gets them).
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qs

import httpx

from region_node.regions import RegionCatalog

# /v1/accounts/{id}[/...] and /v1/payments/{id}[/...]: the id names the data.
_ID_IN_PATH = re.compile(r"^/v1/(?:accounts|payments)/([0-9A-Fa-f-]{32,36})(?:/|$)")

BODY_FIELDS: dict[str, str] = {"/v1/payments": "payer", "/v1/orders": "payer",
                               "/v1/accounts": "home_region"}
"""POST paths whose body names the owner: the payer's region writes a payment or order;
an account is opened by the region serving its home_region."""

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class HomeFinder:
    """Home regions from ids, paths and small JSON bodies."""

    def __init__(self, region_codes: Mapping[str, int] | None = None) -> None:
        self.catalog = RegionCatalog(dict(region_codes) if region_codes else None)

    def home_of_id(self, text: object) -> str | None:
        """The home region stamped in an id; None if it is not an id we can place."""
        if not isinstance(text, str):
            return None
        try:
            return self.catalog.home_of(uuid.UUID(text))
        except ValueError:
            return None

    def home_in_path(self, path: str) -> str | None:
        """Home region of the account or payment a path names, if any."""
        match = _ID_IN_PATH.match(path)
        return self.home_of_id(match.group(1)) if match else None

    def home_in_body(self, path: str, body: bytes) -> str | None:
        """Home region named by the JSON body of a POST to `path` (BODY_FIELDS)."""
        field = BODY_FIELDS.get(path)
        if field is None or not body:
            return None
        try:
            doc = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            return None  # the node will answer 400; no preference
        if not isinstance(doc, dict):
            return None
        value = doc.get(field)
        if field == "home_region":
            return value if isinstance(value, str) and value in self.catalog.codes else None
        return self.home_of_id(value)


def wants_owner(method: str, query_string: bytes | str) -> bool:
    """True for requests a node would forward to the owner: mutations and strong reads."""
    if method not in SAFE_METHODS:
        return True
    if not query_string:
        return False
    text = query_string.decode("latin-1") if isinstance(query_string, bytes) else query_string
    return "strong" in parse_qs(text).get("consistency", [])


def body_names_owner(method: str, path: str) -> bool:
    """True when the owner can only be found in the request body."""
    return method == "POST" and path in BODY_FIELDS


class OwnerMap:
    """`home_region -> serving_region` as the nodes last reported it.

    Until a report arrives every home region counts as serving itself, which is true until
    the first failover; a stale map costs a forwarding hop, never correctness.
    """

    def __init__(self) -> None:
        self.serving: dict[str, str] = {}
        self.epochs: dict[str, int] = {}
        self.source: str | None = None
        self.updated_at: float | None = None

    def owner_of(self, home: str | None) -> str | None:
        """The region serving `home` (None if `home` is None)."""
        if home is None:
            return None
        return self.serving.get(home, home)

    def update(self, doc: Mapping[str, Any]) -> None:
        """Apply a `GET /v1/cluster/ownership` answer."""
        rows = doc.get("ownership")
        if not isinstance(rows, list):
            raise ValueError("no 'ownership' list in the answer")
        serving, epochs = {}, {}
        for row in rows:
            serving[str(row["home_region"])] = str(row["serving_region"])
            epochs[str(row["home_region"])] = int(row.get("epoch") or 0)
        self.serving, self.epochs = serving, epochs
        self.source = str(doc.get("region") or "") or None
        self.updated_at = time.time()

    async def refresh(self, client: httpx.AsyncClient, endpoint: str, limit: float,
                      api_key: str = "") -> None:
        """Read the map from the region at `endpoint` within `limit` seconds (with
        `api_key` as the bearer key); raises on any failure."""
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
        resp = await client.get(f"{endpoint}/v1/cluster/ownership", timeout=limit,
                                headers=headers)
        resp.raise_for_status()
        self.update(resp.json())

    def to_json(self) -> dict[str, Any]:
        """As the admin API shows it."""
        return {"serving": dict(self.serving), "epochs": dict(self.epochs),
                "source": self.source, "updated_at": self.updated_at}
