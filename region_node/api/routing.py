"""Any region accepts any request: writes (and strong reads) for data another region owns
are forwarded over gRPC to that region and answered exactly as it answered."""

from __future__ import annotations

import uuid

from fastapi import Request
from fastapi.responses import Response

from region_node.api.audit_trail import mark_audited
from region_node.api.auth import principal_header
from region_node.api.mutation import node_of
from region_node.errors import InvalidRequest, NotFound, RegionUnavailable
from region_node.forwarding import FORWARD_HEADERS, FORWARDED_FROM, ForwardedRequest, Header
from region_node.ids import parse_id

SERVED_BY = "Paycluster-Served-By"
OWNER = "Paycluster-Owner"


def home_of(request: Request, value: uuid.UUID | None) -> str | None:
    """Home region stamped in an id, if that region is part of this cluster.

    An id stamped with a region this cluster does not have (or no stamp at all) cannot
    name anything here: it is handled locally, which answers 404.
    """
    if value is None:
        return None
    node = node_of(request)
    home = node.home_of(value)
    if home is None or home == node.region or home in node.settings.peers:
        return home
    if any(o.home_region == home for o in node.ownership.snapshot()):
        return home
    return None


def existing_id(raw: str, what: str, param: str | None = None) -> uuid.UUID:
    """A client-given id; one that is not a UUID names nothing we have: 404."""
    parsed = parse_id(raw)
    if parsed is None:
        raise NotFound(f"No such {what}: '{raw}'", param=param)
    return parsed


async def from_owner(request: Request, missing: NotFound) -> Response:
    """A row that is not here may not have replicated yet: ask its owner (recorded by
    `owner_route`) before answering 404."""
    owner = getattr(request.state, "owner", None)
    if owner is not None and owner != node_of(request).region:
        return await forward(request, owner)
    raise missing


def known_home(request: Request, home: str) -> str:
    """Validate a client-given home region against the catalog."""
    if home not in node_of(request).catalog.codes:
        raise InvalidRequest(f"Unknown region '{home}'", code="unknown_region",
                             param="home_region")
    return home


async def owner_route(request: Request, home: str | None, *,
                      write: bool = True) -> Response | None:
    """Forward the request if another region serves `home`; None means: serve it here.

    Reads (`write=False`) stay local unless `?consistency=strong` asks for the owner.
    The owner region is recorded for the `Paycluster-Owner` response header.
    """
    node = node_of(request)
    if home is None:
        return None
    owner = (await node.ownership.owner(home)).serving_region
    request.state.owner = owner
    if owner == node.region:
        return None
    if not write and request.query_params.get("consistency") != "strong":
        return None
    return await forward(request, owner)


async def forward(request: Request, owner: str) -> Response:
    """Send the request to `owner` over gRPC and relay its answer."""
    node = node_of(request)
    if request.headers.get(FORWARDED_FROM):
        # Two regions disagree about ownership (a handover in progress): never ping-pong.
        raise RegionUnavailable(
            f"Region {node.region} does not serve this data and will not forward it twice; "
            "retry shortly", code="misrouted")
    body = await request.body()
    # The principal this region authenticated goes along instead of the key itself: the
    # owner may not have the key yet (it replicates), see api/auth.py.
    carried = principal_header(request)
    sent = [Header(k, v) for k, v in request.headers.items()
            if k.lower() in FORWARD_HEADERS
            and not (carried is not None and k.lower() == "authorization")]
    if carried is not None:
        sent.append(Header(*carried))
    reply = await node.peers.forward(owner, ForwardedRequest(
        method=request.method, path=request.url.path, query=request.url.query,
        headers=tuple(sent), body=body, origin_region=node.region))
    mark_audited(request)  # the owner wrote the audit row
    headers = {h.name: h.value for h in reply.headers
               if h.name.lower() not in ("x-request-id", "content-length",
                                         SERVED_BY.lower(), OWNER.lower())}
    headers[SERVED_BY] = reply.served_by
    headers[OWNER] = owner
    node.metrics.forwarded.labels(node.region, owner).inc()
    return Response(reply.body, status_code=reply.status, headers=headers,
                    media_type=headers.get("content-type"))
