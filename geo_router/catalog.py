"""The regions the router routes to: name, location, public endpoint and weight.

The catalog comes from the cluster's config. Two file formats are read:

- an explicit catalog: `{"regions": [{"name", "endpoint", "lat"?, "lon"?, "weight"?}]}`;
- the local lab's `cluster.json` (`{"regions": {name: {"api_url": ...}}}`), so a router
  started by the lab, or reloaded after `paycluster region add`, knows every region the
  lab runs without a second file to keep in step.

A region without coordinates is placed at the data-centre location of its name
(`KNOWN_LOCATIONS`); an unknown name without coordinates is a configuration error.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from geo_router.geo import GeoPoint

DEFAULT_WEIGHT = 100
"""Weights are percentages (0-100): a region keeps that share of the traffic that would go
to it and passes the rest to the next candidate (see `policy`); 100 = all of it."""

KNOWN_LOCATIONS: dict[str, tuple[str, GeoPoint]] = {
    # Approximate centres of the metro areas the cloud regions of these names run in.
    "us-east": ("N. Virginia", GeoPoint(39.04, -77.49)),
    "eu-west": ("Ireland", GeoPoint(53.35, -6.26)),
    "ap-southeast": ("Singapore", GeoPoint(1.35, 103.82)),
    "us-west": ("Oregon", GeoPoint(45.84, -119.70)),
    "eu-central": ("Frankfurt", GeoPoint(50.11, 8.68)),
    "sa-east": ("Sao Paulo", GeoPoint(-23.55, -46.63)),
}
"""Where the region names used by paycluster (region_node.regions) are."""


class CatalogError(ValueError):
    """The catalog cannot be read or is inconsistent."""


@dataclass(frozen=True, slots=True)
class RegionEntry:
    """One region as the router knows it."""

    name: str
    location: GeoPoint
    endpoint: str
    weight: int = DEFAULT_WEIGHT
    place: str = ""

    def to_json(self) -> dict[str, Any]:
        """The entry as the admin API shows it."""
        return {"name": self.name, "place": self.place, "lat": self.location.lat,
                "lon": self.location.lon, "endpoint": self.endpoint, "weight": self.weight}


class Catalog:
    """An ordered, immutable set of regions by name."""

    def __init__(self, regions: list[RegionEntry]) -> None:
        names = [r.name for r in regions]
        if len(set(names)) != len(names):
            raise CatalogError(f"duplicate region names in {names}")
        self._regions = {r.name: r for r in regions}

    def __iter__(self) -> Iterator[RegionEntry]:
        return iter(self._regions.values())

    def __len__(self) -> int:
        return len(self._regions)

    def __contains__(self, name: object) -> bool:
        return name in self._regions

    def get(self, name: str) -> RegionEntry:
        """The region called `name`; KeyError if the catalog has none."""
        return self._regions[name]

    @property
    def names(self) -> list[str]:
        """Region names in catalog order."""
        return list(self._regions)

    def location_of(self, name: str) -> GeoPoint | None:
        """Where a region name is: the catalog's entry, else KNOWN_LOCATIONS, else None.

        Clients may name a region the cluster does not run (X-Client-Region: sa-east):
        they are then routed by where that region is.
        """
        if name in self._regions:
            return self._regions[name].location
        known = KNOWN_LOCATIONS.get(name)
        return known[1] if known else None


def _endpoint(value: object, name: str) -> str:
    text = str(value or "").rstrip("/")
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise CatalogError(f"region {name}: endpoint must be an http(s) URL, got {value!r}")
    return text


def _entry(name: str, raw: Mapping[str, Any]) -> RegionEntry:
    endpoint = _endpoint(raw.get("endpoint") or raw.get("api_url"), name)
    place, location = KNOWN_LOCATIONS.get(name, ("", None))
    if raw.get("lat") is not None or raw.get("lon") is not None:
        try:
            location = GeoPoint(float(raw["lat"]), float(raw["lon"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise CatalogError(f"region {name}: bad lat/lon: {exc}") from None
        place = str(raw.get("place") or "")
    if location is None:
        raise CatalogError(f"region {name}: no lat/lon given and the name is not one of "
                           f"{', '.join(KNOWN_LOCATIONS)}")
    weight = raw.get("weight", DEFAULT_WEIGHT)
    if isinstance(weight, bool) or not isinstance(weight, int) or not 0 <= weight <= 100:
        raise CatalogError(f"region {name}: weight must be an integer 0-100, got {weight!r}")
    return RegionEntry(name, location, endpoint, weight, place)


def parse_catalog(doc: Mapping[str, Any]) -> Catalog:
    """A catalog from either file format (see the module docstring)."""
    regions = doc.get("regions")
    if isinstance(regions, list):
        entries = []
        for raw in regions:
            if not isinstance(raw, Mapping) or not raw.get("name"):
                raise CatalogError(f"every region needs a name: {raw!r}")
            entries.append(_entry(str(raw["name"]), raw))
        return Catalog(entries)
    if isinstance(regions, Mapping):
        # cluster.json: a region whose node entry is missing is still starting; it is
        # listed anyway (the probes will find it down until it answers).
        return Catalog([_entry(str(name), raw) for name, raw in regions.items()])
    raise CatalogError("expected a 'regions' list (catalog) or mapping (cluster.json)")


def load_catalog(path: Path) -> Catalog:
    """Read a catalog file; CatalogError if it is missing, not JSON, or inconsistent."""
    try:
        doc = json.loads(path.read_text())
    except OSError as exc:
        raise CatalogError(f"cannot read the catalog {path}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise CatalogError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(doc, Mapping):
        raise CatalogError(f"{path}: expected a JSON object")
    catalog = parse_catalog(doc)
    if not len(catalog):
        raise CatalogError(f"{path} lists no regions")
    return catalog
