"""The router's state and decisions, shared by the proxy, the resolve API and the admin API:
catalog + probes + overrides + owner map -> the policy.

It holds no per-client state: everything a decision depends on is the catalog, the probe
results, the operator's overrides (a shared file) and the nodes' ownership map - so routers
in every region reach the same decisions.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import httpx

from geo_router.catalog import Catalog, load_catalog, parse_catalog
from geo_router.config import RouterSettings
from geo_router.errors import invalid, not_found
from geo_router.health import Prober, ProbeResult, Transition
from geo_router.locate import ClientLocation, LocationError, Locator
from geo_router.metrics import RouterMetrics
from geo_router.overrides import OverrideStore
from geo_router.owners import HomeFinder, OwnerMap, OwnershipUnavailable
from geo_router.policy import ROUTABLE, Candidate, Decision, State, choose

log = logging.getLogger("geo_router")


class RouterService:
    """Everything a routing decision needs, kept current in the background."""

    def __init__(self, settings: RouterSettings) -> None:
        self.settings = settings
        self.metrics = RouterMetrics()
        self.catalog = self._read_catalog()
        self.locator = self._make_locator(self.catalog)
        self.overrides = OverrideStore(settings.state_file)
        self.overrides.reload_if_changed()
        self.homes = HomeFinder(settings.region_codes)
        self.owners = OwnerMap()
        self._owners_failing = False
        self.started_at = time.time()
        # Probes get their own small pool: they must not queue behind proxied requests.
        self._probe_client = httpx.AsyncClient(
            trust_env=False, limits=httpx.Limits(max_connections=32, max_keepalive_connections=16))
        self.prober = Prober(self._probe_client, interval=settings.probe_interval_seconds,
                             timeout=settings.probe_timeout_seconds, fall=settings.fall,
                             rise=settings.rise, path=settings.probe_path,
                             on_probe=self._on_probe, on_transition=self._on_transition)
        self.prober.set_regions(self.catalog)
        self._tasks: list[asyncio.Task[None]] = []

    # ------------------------------------------------------------------ lifecycle

    def _read_catalog(self) -> Catalog:
        if self.settings.catalog_file is not None:
            return load_catalog(self.settings.catalog_file)
        return parse_catalog({"regions": self.settings.catalog})

    def _make_locator(self, catalog: Catalog) -> Locator:
        return Locator(catalog.location_of, self.settings.cidr_locations,
                       self.settings.default_location)

    async def start(self) -> None:
        """Probe every region once (so the first request already has states), then keep
        probing, following the overrides file and the ownership map in the background."""
        await self.prober.round()
        self._publish_states()
        if self.settings.prefer_owner:
            with contextlib.suppress(Exception):
                await self._refresh_owners()
        self.prober.start()
        self._tasks = [asyncio.create_task(self._maintain(), name="geo-router-maintain")]

    async def stop(self) -> None:
        """Stop the background work and close the probe client."""
        await self.prober.stop()
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        await self._probe_client.aclose()

    async def _maintain(self) -> None:
        interval = self.settings.probe_interval_seconds
        last_owners = time.monotonic()
        while True:
            await asyncio.sleep(interval)
            try:
                if self.overrides.reload_if_changed():
                    log.info("operator overrides changed on disk: %s",
                             self.overrides.to_json(), extra={"event": "overrides_reloaded"})
                self._publish_states()
                if (self.settings.prefer_owner and time.monotonic() - last_owners
                        >= self.settings.ownership_refresh_seconds):
                    last_owners = time.monotonic()
                    await self._refresh_owners()
            except Exception as exc:  # keep going: a stale map or state is better than none
                log.warning("background refresh failed: %s: %s", type(exc).__name__, exc)

    async def _refresh_owners(self) -> None:
        # Every routable region at once, highest epoch wins (OwnerMap.refresh_all): after a
        # crash or partition takeover, one region's copy may still show the old owner.
        endpoints = {name: self.endpoint(name) for name in self.catalog.names
                     if self.state_of(name) in ROUTABLE}
        if not endpoints:
            return  # nothing to ask; the region states already say why
        try:
            answered = await self.owners.refresh_all(
                self._probe_client, endpoints, self.settings.probe_timeout_seconds,
                self._api_key())
        except OwnershipUnavailable as exc:
            # The old map stays. Warn once per outage, not every refresh interval.
            if not self._owners_failing:
                log.warning("ownership map not refreshed, keeping the last one: %s", exc,
                            extra={"event": "ownership_unavailable"})
            self._owners_failing = True
            return
        if self._owners_failing:
            log.info("ownership map refreshed again from %s", ", ".join(answered),
                     extra={"event": "ownership_refreshed"})
        self._owners_failing = False
        if len(answered) < len(endpoints):
            log.debug("ownership read from %s (no answer from %s)", ", ".join(answered),
                      ", ".join(n for n in endpoints if n not in answered))

    def _api_key(self) -> str:
        """The key for the nodes' /v1 API: configured, else the lab's geo router key (a
        non-admin principal's: reading ownership needs no more) from the catalog file
        (cluster.json `router_key`, mode 0600), re-read so a restarted lab's key is used."""
        if self.settings.api_key or self.settings.catalog_file is None:
            return self.settings.api_key
        try:
            doc = json.loads(Path(self.settings.catalog_file).read_text())
        except (OSError, ValueError):
            return ""
        key = doc.get("router_key") if isinstance(doc, dict) else None
        return key if isinstance(key, str) else ""

    def reload(self) -> Catalog:
        """Re-read the catalog (e.g. after a region was added); probes follow at once.

        New regions start unprobed (down) and join after their first good probe.
        """
        catalog = self._read_catalog()
        locator = self._make_locator(catalog)
        self.catalog, self.locator = catalog, locator
        self.prober.set_regions(catalog)
        log.info("catalog reloaded: %s", ", ".join(catalog.names),
                 extra={"event": "catalog_reloaded"})
        self._publish_states()
        return catalog

    # ------------------------------------------------------------------ probes -> metrics

    def _on_probe(self, region: str, result: ProbeResult) -> None:
        outcome = "failed" if not result.ok else result.status
        self.metrics.probes.labels(region, outcome).inc()
        self.metrics.probe_seconds.labels(region).observe(result.seconds)

    def _on_transition(self, t: Transition) -> None:
        self.metrics.state_changes.labels(t.region, t.old.value if t.old else "none",
                                          t.new.value).inc()
        self.metrics.set_state(t.region, self.state_of(t.region))
        level = logging.WARNING if t.new == State.DOWN else logging.INFO
        log.log(level, "region %s: %s -> %s (%s)", t.region, t.old.value if t.old else "-",
                t.new.value, t.reason, extra={"event": "region_state", "region": t.region})

    def _publish_states(self) -> None:
        for name in self.catalog.names:
            self.metrics.set_state(name, self.state_of(name))
            self.metrics.region_weight.labels(name).set(self.weight_of(name))

    # ------------------------------------------------------------------ queries

    def check_region(self, name: str) -> None:
        """404 in the error shape for a region the catalog does not list."""
        if name not in self.catalog:
            raise not_found(f"No such region: '{name}' (known: "
                            f"{', '.join(self.catalog.names)})", code="unknown_region",
                            param="region")

    def state_of(self, name: str) -> State:
        """Effective state: draining (operator) wins over the probe state."""
        if name in self.overrides.drained:
            return State.DRAINING
        return self.prober.state(name)

    def weight_of(self, name: str) -> int:
        """Effective weight: the operator's override, else the catalog's."""
        override = self.overrides.weights.get(name)
        return override if override is not None else self.catalog.get(name).weight

    def endpoint(self, name: str) -> str:
        """Base URL of a region's API."""
        return self.catalog.get(name).endpoint

    def candidates(self) -> list[Candidate]:
        """Every catalog region as the policy sees it now."""
        return [Candidate(r.name, r.location, self.state_of(r.name), self.weight_of(r.name))
                for r in self.catalog]

    def locate(self, region: str | None, geo: str | None, client_ip: str | None
               ) -> ClientLocation:
        """The client's location; RouterError 400 for a bad header."""
        try:
            return self.locator.locate(region, geo, client_ip)
        except LocationError as exc:
            raise invalid(str(exc), exc.code, exc.param) from None

    def decide(self, client: ClientLocation, client_key: str,
               home: str | None = None) -> Decision:
        """Where to send a client (NoRoute if nowhere); counted in the metrics.

        `home` is the home region of the data the request names (owner preference).
        """
        owner = self.owners.owner_of(home) if self.settings.prefer_owner else None
        return choose(self.candidates(), client, client_key=client_key,
                      latency_ms=self.settings.latency_ms, owner=owner,
                      tie_km=self.settings.tie_km, tie_ms=self.settings.tie_ms)

    # ------------------------------------------------------------------ operator changes

    def drain(self, name: str, drained: bool = True) -> None:
        """Drain or undrain a region (new requests only; in-flight ones finish)."""
        self.check_region(name)
        self.overrides.set_drained(name, drained)
        log.warning("region %s %s by the operator", name, "drained" if drained else
                    "undrained", extra={"event": "drain", "region": name})
        self._publish_states()

    def set_weight(self, name: str, weight: int | None) -> None:
        """Set (or with None, reset) a region's weight."""
        self.check_region(name)
        if weight is not None and (isinstance(weight, bool) or not 0 <= weight <= 100):
            raise invalid(f"weight must be an integer from 0 to 100, got {weight!r}",
                          code="invalid_weight", param="weight")
        self.overrides.set_weight(name, weight)
        log.warning("region %s weight set to %s by the operator", name,
                    "catalog default" if weight is None else weight,
                    extra={"event": "weight", "region": name})
        self._publish_states()

    # ------------------------------------------------------------------ admin views

    def region_view(self, name: str) -> dict[str, Any]:
        """One region for the admin API: catalog entry, effective state and weight, probes."""
        entry = self.catalog.get(name)
        health = self.prober.regions.get(name)
        return {**entry.to_json(), "state": self.state_of(name).value,
                "drained": name in self.overrides.drained,
                "catalog_weight": entry.weight, "weight": self.weight_of(name),
                **(health.to_json() if health is not None else {})}

    def snapshot(self) -> dict[str, Any]:
        """The router's whole view for `GET /admin/regions`."""
        s = self.settings
        return {"site": s.site, "started_at": self.started_at,
                "probe": {"interval_seconds": s.probe_interval_seconds,
                          "timeout_seconds": s.probe_timeout_seconds, "fall": s.fall,
                          "rise": s.rise, "path": s.probe_path, "rounds": self.prober.rounds},
                "prefer_owner": s.prefer_owner, "default_location": s.default_location,
                "regions": [self.region_view(n) for n in self.catalog.names],
                "overrides": self.overrides.to_json(), "ownership": self.owners.to_json()}

