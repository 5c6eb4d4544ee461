"""A small synchronous client of a router's admin API and of `/v1/resolve`, for the
operator's CLI, the lab and tests."""

from __future__ import annotations

from types import TracebackType
from typing import Any

import httpx


class RouterAdminError(RuntimeError):
    """The router refused an admin request; the message is the router's error message."""

    def __init__(self, status: int, body: Any) -> None:
        err = body.get("error", {}) if isinstance(body, dict) else {}
        self.status = status
        self.code = err.get("code")
        super().__init__(err.get("message") or f"HTTP {status}: {body!r}"[:300])


class RouterAdmin:
    """Client of one router's admin listener (use it in a `with`, or `close()` it)."""

    def __init__(self, admin_url: str, timeout: float = 5.0) -> None:
        self.admin_url = admin_url.rstrip("/")
        self._http = httpx.Client(base_url=self.admin_url, timeout=timeout, trust_env=False)

    def _call(self, method: str, path: str, json: Any = None) -> Any:
        resp = self._http.request(method, path, json=json)
        try:
            body = resp.json()
        except ValueError:
            body = resp.text
        if resp.status_code >= 400:
            raise RouterAdminError(resp.status_code, body)
        return body

    def regions(self) -> dict[str, Any]:
        """The router's whole view: probe settings, regions with state, overrides."""
        doc: dict[str, Any] = self._call("GET", "/admin/regions")
        return doc

    def states(self) -> dict[str, str]:
        """Region -> effective state (healthy, degraded, down, draining)."""
        return {r["name"]: r["state"] for r in self.regions()["regions"]}

    def drain(self, region: str) -> dict[str, Any]:
        """Send no new requests to `region`."""
        doc: dict[str, Any] = self._call("POST", f"/admin/regions/{region}/drain")
        return doc

    def undrain(self, region: str) -> dict[str, Any]:
        """Route to `region` again."""
        doc: dict[str, Any] = self._call("POST", f"/admin/regions/{region}/undrain")
        return doc

    def set_weight(self, region: str, weight: int | None) -> dict[str, Any]:
        """Set `region`'s weight (0-100); None returns to the catalog's weight."""
        doc: dict[str, Any] = self._call("PUT", f"/admin/regions/{region}/weight",
                                         json={"weight": weight})
        return doc

    def events(self) -> list[dict[str, Any]]:
        """Region state changes, oldest first."""
        doc: dict[str, Any] = self._call("GET", "/admin/events")
        return list(doc["events"])

    def reload(self) -> list[str]:
        """Re-read the catalog; the regions it now lists."""
        doc: dict[str, Any] = self._call("POST", "/admin/reload")
        return list(doc["regions"])

    def metrics(self) -> str:
        """The Prometheus exposition text."""
        resp = self._http.get("/metrics")
        resp.raise_for_status()
        return resp.text

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def __enter__(self) -> RouterAdmin:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def resolve(router_url: str, *, client_region: str | None = None, geo: str | None = None,
            client_ip: str | None = None, id: str | None = None,
            client_id: str | None = None, timeout: float = 5.0) -> dict[str, Any]:
    """`GET /v1/resolve` of a router; RouterAdminError for an error answer."""
    params = {k: v for k, v in (("client_region", client_region), ("geo", geo),
                                ("client_ip", client_ip), ("id", id),
                                ("client_id", client_id)) if v}
    resp = httpx.get(f"{router_url.rstrip('/')}/v1/resolve", params=params, timeout=timeout,
                     trust_env=False)
    body = resp.json()
    if resp.status_code >= 400:
        raise RouterAdminError(resp.status_code, body)
    doc: dict[str, Any] = body
    return doc


def metric_value(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of metric `name` whose labels include `labels` (0 if none)."""
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v
                                           for k, v in labels.items()):
                total += sample.value
    return total
