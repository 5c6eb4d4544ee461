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

import asyncio
import json
import re
import time
import uuid
from collections.abc import Iterable, Mapping
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

    Every routable region is asked (`refresh_all`) and the answers are merged per home
    region, keeping the row with the highest epoch: epochs only grow (each takeover's is a
    fresh fencing token), so after a crash or a partition an isolated or lagging region,
    which still shows the old owner, loses to any region that saw the takeover. A row also
    never goes back to a lower epoch than the map already holds, for the same reason (a
    round in which only the stale region answered changes nothing).

    Until a report arrives every home region counts as serving itself, which is true until
    the first failover; a stale map costs a forwarding hop, never correctness.
    """

    def __init__(self) -> None:
        self.serving: dict[str, str] = {}
        self.epochs: dict[str, int] = {}
        self.banned: dict[str, bool] = {}
        # home -> the region whose answer supplied the row kept.
        self.sources: dict[str, str] = {}
        # The regions asked in the last refresh, and those of them that answered.
        self.asked: list[str] = []
        self.answered: list[str] = []
        self.updated_at: float | None = None

    def owner_of(self, home: str | None) -> str | None:
        """The region serving `home` (None if `home` is None)."""
        if home is None:
            return None
        return self.serving.get(home, home)

    def merge(self, docs: Iterable[Mapping[str, Any]]) -> None:
        """Apply several `GET /v1/cluster/ownership` answers (one per region) at once: per
        home region the row with the highest epoch wins, against each other and against
        the map held so far (ties: the first answer given, or the row held). A malformed
        answer raises ValueError before anything changes."""
        rows = [(str(doc.get("region") or ""), row) for doc in docs for row in _rows(doc)]
        serving, epochs = dict(self.serving), dict(self.epochs)
        banned, sources = dict(self.banned), dict(self.sources)
        for region, (home, serving_region, epoch, is_banned) in rows:
            held = epochs.get(home)
            # Same epoch, same row (one insert per (home, epoch)); only a ban can have
            # reached one region before another, and a ban never goes away.
            if held is not None and epoch == held:
                banned[home] = banned.get(home, False) or is_banned
                continue
            if held is not None and epoch < held:
                continue
            serving[home], epochs[home], banned[home] = serving_region, epoch, is_banned
            sources[home] = region
        self.serving, self.epochs, self.banned, self.sources = serving, epochs, banned, sources
        self.updated_at = time.time()

    async def refresh_all(self, client: httpx.AsyncClient, endpoints: Mapping[str, str],
                          limit: float, api_key: str = "") -> list[str]:
        """Ask every region of `endpoints` (name -> base URL) at once, each within `limit`
        seconds, and merge the answers; regions that fail to answer are skipped. Returns
        the regions that answered; with none, the map is left as it was and
        OwnershipUnavailable says why each failed."""
        names = list(endpoints)
        results = await asyncio.gather(
            *(fetch_ownership(client, endpoints[n], limit, api_key) for n in names),
            return_exceptions=True)
        docs: list[Mapping[str, Any]] = []
        answered: list[str] = []
        failures: dict[str, str] = {}
        for name, result in zip(names, results, strict=True):
            if isinstance(result, BaseException):
                if not isinstance(result, _FETCH_ERRORS):
                    raise result
                failures[name] = f"{type(result).__name__}: {result}".rstrip(": ")
                continue
            try:
                _rows(result)  # checked here so one malformed answer only skips its region
            except (ValueError, KeyError, TypeError) as exc:
                failures[name] = f"{type(exc).__name__}: {exc}"
                continue
            docs.append(result)
            answered.append(name)
        # asked / answered describe the last round, the map the answers merged so far.
        self.asked, self.answered = names, answered
        if not docs:
            raise OwnershipUnavailable(failures)
        self.merge(docs)
        return answered

    def to_json(self) -> dict[str, Any]:
        """As the admin API shows it: the map, which region supplied each home's row, the
        regions asked and answering in the last refresh."""
        return {"serving": dict(self.serving), "epochs": dict(self.epochs),
                "banned": dict(self.banned), "sources": dict(self.sources),
                "asked": list(self.asked), "answered": list(self.answered),
                "updated_at": self.updated_at}


class OwnershipUnavailable(Exception):
    """No region answered `GET /v1/cluster/ownership`; `failures` says why, per region."""

    def __init__(self, failures: Mapping[str, str]) -> None:
        self.failures = dict(failures)
        detail = "; ".join(f"{n}: {why}" for n, why in self.failures.items())
        super().__init__(f"no region answered the ownership read ({detail or 'none asked'})")


_FETCH_ERRORS = (httpx.HTTPError, asyncio.TimeoutError, ValueError, KeyError, TypeError)
"""What a region failing to answer looks like (network, timeout, status, bad JSON)."""


async def fetch_ownership(client: httpx.AsyncClient, endpoint: str, limit: float,
                          api_key: str = "") -> dict[str, Any]:
    """One region's `GET /v1/cluster/ownership` answer, within `limit` seconds in all (with
    `api_key` as the bearer key); raises on any failure (see _FETCH_ERRORS)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    resp = await asyncio.wait_for(client.get(f"{endpoint}/v1/cluster/ownership",
                                             timeout=limit, headers=headers), limit)
    resp.raise_for_status()
    doc = resp.json()
    if not isinstance(doc, dict):
        raise ValueError("the ownership answer is not a JSON object")
    return doc


def _rows(doc: Mapping[str, Any]) -> list[tuple[str, str, int, bool]]:
    """(home, serving, epoch, banned) of each row of an ownership answer; ValueError (or
    KeyError / TypeError) if it is malformed."""
    rows = doc.get("ownership")
    if not isinstance(rows, list):
        raise ValueError("no 'ownership' list in the answer")
    return [(str(row["home_region"]), str(row["serving_region"]), int(row.get("epoch") or 0),
             row.get("banned") is True) for row in rows]
