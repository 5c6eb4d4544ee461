"""The router's own HTTP APIs.

Public listener (next to the proxy):
- `GET /v1/resolve` - DNS-style: which region a client should connect to directly, its
  endpoint and a TTL. The client is located like a proxied request (X-Client-Region,
  X-Client-Geo, its address) or by parameters `client_region`, `geo`, `client_ip` (the
  EDNS-client-subnet of this API); `id` (an account or payment id) asks for the region
  that owns it, as a write would; `client_id` keys the weighted split.

Admin listener (its own port; never exposed with the public one):
- `GET /admin/regions`, `GET /admin/regions/{name}`: catalog, state, weight, probe history;
- `POST /admin/regions/{name}/drain` / `undrain`: stop / resume sending new requests;
- `PUT /admin/regions/{name}/weight` `{"weight": 0-100 | null}`: gradual shifts (null:
  back to the catalog's weight);
- `GET /admin/events`: region state changes; `POST /admin/reload`: re-read the catalog;
- `GET /metrics` (Prometheus), `GET /health/live`, `GET /health/ready` (ready while at
  least one region is routable).

Every error is in the cluster's one shape.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from geo_router.catalog import CatalogError
from geo_router.errors import RouterError, invalid, unavailable
from geo_router.policy import ROUTABLE, NoRoute
from geo_router.proxy import Receive, Scope, Send, client_address
from geo_router.service import RouterService


def error_response(err: RouterError, request_id: str | None = None) -> JSONResponse:
    """A RouterError as a JSON response."""
    headers = dict(err.headers)
    if request_id:
        headers["x-request-id"] = request_id
    return JSONResponse(err.to_body(), status_code=err.status, headers=headers)


def resolve_app(service: RouterService) -> Any:
    """The ASGI handler of `GET /v1/resolve` for the public listener."""

    async def resolve(scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
        response = _resolve(service, request, request_id)
        response.headers["x-request-id"] = request_id
        await response(scope, receive, send)

    return resolve


def _resolve(service: RouterService, request: Request, request_id: str) -> Response:
    if request.method not in ("GET", "HEAD"):
        return error_response(RouterError(405, "invalid_request_error", "method_not_allowed",
                                          "Use GET /v1/resolve"), request_id)
    q, h = request.query_params, request.headers
    try:
        first_hop = client_address(request.scope, {k.encode(): v.encode() for k, v in h.items()},
                                   service.settings.trust_forwarded_for)
        client_ip = q.get("client_ip") or first_hop
        client = service.locate(q.get("client_region") or h.get("x-client-region"),
                                q.get("geo") or h.get("x-client-geo"), client_ip)
        home = None
        if q.get("id"):
            home = service.homes.home_of_id(q["id"])
            if home is None:
                raise invalid(f"'{q['id']}' is not an account or payment id", "invalid_id",
                              "id")
        key = q.get("client_id") or h.get("x-client-id") or client_ip or request_id
        decision = service.decide(client, key, home)
    except RouterError as err:
        return error_response(err, request_id)
    except NoRoute as exc:
        service.metrics.no_route.inc()
        return error_response(unavailable(str(exc), "no_healthy_region"), request_id)
    service.metrics.resolves.labels(decision.region, decision.reason).inc()
    ttl = service.settings.resolve_ttl_seconds
    body = {
        "region": decision.region, "endpoint": service.endpoint(decision.region), "ttl": ttl,
        "state": service.state_of(decision.region).value, "reason": decision.reason,
        "client": client.to_json(),
        "distance": {"unit": decision.metric,
                     **{k: round(v, 1) for k, v in decision.distance.items()}},
        "alternates": [{"region": name, "endpoint": service.endpoint(name),
                        "state": service.state_of(name).value}
                       for name in decision.order[1:]],
        "skipped": dict(decision.skipped), "router": service.settings.site or None,
    }
    # The answer depends on who asks: shared caches must not hand it to someone else.
    return JSONResponse(body, headers={"cache-control": f"private, max-age={ttl}"})


def admin_app(service: RouterService) -> Starlette:
    """The admin listener's ASGI app."""

    async def live(_: Request) -> Response:
        return JSONResponse({"status": "live", "site": service.settings.site or None})

    async def ready(_: Request) -> Response:
        routable = [n for n in service.catalog.names if service.state_of(n) in ROUTABLE]
        return JSONResponse({"status": "ready" if routable else "unavailable",
                             "routable": routable}, status_code=200 if routable else 503)

    async def metrics(_: Request) -> Response:
        return Response(service.metrics.render(),
                        media_type="text/plain; version=0.0.4; charset=utf-8")

    async def regions(_: Request) -> Response:
        return JSONResponse(service.snapshot())

    async def region(request: Request) -> Response:
        name = request.path_params["name"]
        service.check_region(name)
        return JSONResponse(service.region_view(name))

    async def drain(request: Request) -> Response:
        name = request.path_params["name"]
        service.drain(name, True)
        return JSONResponse(service.region_view(name))

    async def undrain(request: Request) -> Response:
        name = request.path_params["name"]
        service.drain(name, False)
        return JSONResponse(service.region_view(name))

    async def weight(request: Request) -> Response:
        name = request.path_params["name"]
        try:
            doc = json.loads(await request.body() or b"null")
        except ValueError:
            raise invalid("Request body is not valid JSON", "invalid_json") from None
        if not isinstance(doc, dict) or "weight" not in doc:
            raise invalid("Missing required parameter: weight", "parameter_missing", "weight")
        value = doc["weight"]
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise invalid("weight must be an integer from 0 to 100, or null",
                          "invalid_weight", "weight")
        service.set_weight(name, value)
        return JSONResponse(service.region_view(name))

    async def events(_: Request) -> Response:
        return JSONResponse({"events": [t.to_json() for t in service.prober.events]})

    async def reload(_: Request) -> Response:
        try:
            catalog = service.reload()
        except (CatalogError, ValueError) as exc:
            raise invalid(f"Catalog not reloaded: {exc}", "invalid_catalog") from None
        return JSONResponse({"regions": catalog.names})

    async def router_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, RouterError)
        return error_response(exc)

    async def http_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        code = {404: "resource_missing", 405: "method_not_allowed"}.get(exc.status_code,
                                                                       "http_error")
        message = "Unrecognized request URL" if exc.status_code == 404 else str(exc.detail)
        return error_response(RouterError(exc.status_code, "invalid_request_error", code,
                                          message))

    routes = [
        Route("/health/live", live), Route("/health/ready", ready),
        Route("/metrics", metrics),
        Route("/admin/regions", regions),
        Route("/admin/regions/{name}", region),
        Route("/admin/regions/{name}/drain", drain, methods=["POST"]),
        Route("/admin/regions/{name}/undrain", undrain, methods=["POST"]),
        Route("/admin/regions/{name}/weight", weight, methods=["PUT"]),
        Route("/admin/events", events),
        Route("/admin/reload", reload, methods=["POST"]),
    ]
    return Starlette(routes=routes, exception_handlers={RouterError: router_error,
                                                        HTTPException: http_error})
