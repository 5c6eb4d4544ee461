"""Where a client is, from the first source that applies:

1. `X-Client-Region: eu-west` - the client (or an edge in front of us) says so;
2. `X-Client-Geo: 53.35,-6.26` - a latitude and longitude;
3. the client's address in a configured CIDR -> location table (longest prefix wins);
4. the configured default location.

A location is a region name (placed by the catalog, or by the known location of that
name) or `lat,lon`. A header that is present but wrong (an unknown region, a malformed
point) is the client's error (400), not a reason to guess: silently routing a client
that asked for Ireland to Virginia would hide its bug.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from geo_router.geo import GeoPoint, parse_point

HEADER_REGION = "x-client-region"
HEADER_GEO = "x-client-geo"

SOURCES = ("header-region", "header-geo", "cidr", "default")
"""Location sources, in the order they are tried."""

LocationOf = Callable[[str], GeoPoint | None]
"""Where a region name is (None for a name nobody knows)."""


class LocationError(ValueError):
    """A client-given location is unusable; `param` names the header or parameter."""

    def __init__(self, message: str, param: str, code: str) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


@dataclass(frozen=True, slots=True)
class ClientLocation:
    """Where a client is and how we know: `region` is set when the source named one (the
    latency table is keyed by it)."""

    source: str
    point: GeoPoint
    region: str | None = None

    def to_json(self) -> dict[str, object]:
        """As the resolve API shows it."""
        return {"source": self.source, "region": self.region, "lat": self.point.lat,
                "lon": self.point.lon}


def _place(value: str, location_of: LocationOf) -> tuple[GeoPoint, str | None]:
    """A configured location: a region name or `lat,lon`; ValueError if neither."""
    value = value.strip()
    point = location_of(value)
    if point is not None:
        return point, value
    return parse_point(value), None


class Locator:
    """Finds a client's location; built once from the settings, safe to share."""

    def __init__(self, location_of: LocationOf, cidr_table: Mapping[str, str],
                 default: str) -> None:
        self._location_of = location_of
        try:
            self._default = _place(default, location_of)
        except ValueError:
            raise ValueError(f"default location {default!r} is neither a known region nor "
                             "'lat,lon'") from None
        table = []
        for cidr, value in cidr_table.items():
            try:
                network = ipaddress.ip_network(cidr.strip(), strict=False)
            except ValueError as exc:
                raise ValueError(f"CIDR table: {exc}") from None
            try:
                table.append((network, _place(value, location_of)))
            except ValueError:
                raise ValueError(f"CIDR table: {value!r} (for {cidr}) is neither a known "
                                 "region nor 'lat,lon'") from None
        # Longest prefix first, so the most specific entry wins.
        self._table = sorted(table, key=lambda item: item[0].prefixlen, reverse=True)

    def locate(self, region: str | None = None, geo: str | None = None,
               client_ip: str | None = None) -> ClientLocation:
        """The client's location from its headers (or resolve parameters) and address."""
        if region:
            name = region.strip()
            point = self._location_of(name)
            if point is None:
                raise LocationError(f"Unknown region '{name}' in X-Client-Region",
                                    param="X-Client-Region", code="unknown_region")
            return ClientLocation("header-region", point, name)
        if geo:
            try:
                return ClientLocation("header-geo", parse_point(geo))
            except ValueError as exc:
                raise LocationError(f"X-Client-Geo must be 'lat,lon' in degrees: {exc}",
                                    param="X-Client-Geo", code="invalid_geo") from None
        if client_ip and self._table:
            found = self.lookup(client_ip)
            if found is not None:
                return found
        default_point, default_name = self._default
        return ClientLocation("default", default_point, default_name)

    def lookup(self, client_ip: str) -> ClientLocation | None:
        """The CIDR table's location of an address (None if no entry matches)."""
        try:
            address = ipaddress.ip_address(client_ip.strip())
        except ValueError:
            return None
        for network, (point, name) in self._table:
            if address.version == network.version and address in network:
                return ClientLocation("cidr", point, name)
        return None
