"""Points on the globe and the great-circle distance between them."""

from __future__ import annotations

import math
from dataclasses import dataclass

EARTH_RADIUS_KM = 6371.0088
"""Mean Earth radius (IUGG); the error against the ellipsoid (< 0.5 %) cannot change which
of two regions thousands of kilometres apart is nearer."""


@dataclass(frozen=True, slots=True)
class GeoPoint:
    """A latitude and longitude in degrees."""

    lat: float
    lon: float

    def __post_init__(self) -> None:
        if not (-90.0 <= self.lat <= 90.0 and -180.0 <= self.lon <= 180.0) or \
                math.isnan(self.lat) or math.isnan(self.lon):
            raise ValueError(f"not a point on Earth: {self.lat},{self.lon}")

    def __str__(self) -> str:
        return f"{self.lat:g},{self.lon:g}"


def parse_point(text: str) -> GeoPoint:
    """`"lat,lon"` (degrees, e.g. `"53.35,-6.26"`) as a GeoPoint; ValueError otherwise."""
    parts = text.split(",")
    if len(parts) != 2:
        raise ValueError(f"expected 'lat,lon', got {text!r}")
    try:
        lat, lon = float(parts[0]), float(parts[1])
    except ValueError:
        raise ValueError(f"expected 'lat,lon' in degrees, got {text!r}") from None
    return GeoPoint(lat, lon)


def great_circle_km(a: GeoPoint, b: GeoPoint) -> float:
    """Great-circle distance in kilometres (haversine: exact on a sphere, stable for the
    short distances where the spherical law of cosines loses precision)."""
    phi1, phi2 = math.radians(a.lat), math.radians(b.lat)
    dphi = phi2 - phi1
    dlmb = math.radians(b.lon - a.lon)
    h = math.sin(dphi / 2) ** 2 + math.cos(phi1) * math.cos(phi2) * math.sin(dlmb / 2) ** 2
    return 2 * EARTH_RADIUS_KM * math.asin(min(1.0, math.sqrt(h)))
