"""Routes for operators: replication state and ownership as this region sees them."""

from __future__ import annotations

import json
import time
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from region_node import ownership as own
from region_node.api.auth import caller
from region_node.api.mutation import node_of
from region_node.errors import InvalidRequest

# Every route needs a key; /v1/admin/* and /v1/replication/* an admin's (api/auth.py).
router = APIRouter(tags=["cluster"], dependencies=[Depends(caller)])


@router.get("/v1/replication/status")
async def replication_status(request: Request) -> JSONResponse:
    """Lag, apply workers, conflicts and SLO breaches of every pair (peer -> this region)."""
    return JSONResponse(request.app.state.monitor.snapshot())


@router.get("/v1/cluster/ownership")
async def ownership(request: Request) -> JSONResponse:
    """Who serves which home region, with epochs, in this region's copy."""
    node = node_of(request)
    await node.ownership.refresh()
    return JSONResponse({"region": node.region, "ownership": [
        {"home_region": o.home_region, "serving_region": o.serving_region, "epoch": o.epoch,
         "banned": o.banned}
        for o in node.ownership.snapshot()]})


async def _json_object(request: Request) -> dict[str, Any]:
    """The body of the failover guard's routes: a JSON object, or {} when there is none
    (then `home_region` is reported missing); anything else is the client's 400."""
    raw = await request.body()
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except ValueError:
        raise InvalidRequest("Request body is not valid JSON", code="invalid_json") from None
    if not isinstance(body, dict):
        raise InvalidRequest("Request body must be a JSON object", code="invalid_json")
    return body


def _admin_home(body: Any) -> str:
    home = body.get("home_region") if isinstance(body, dict) else None
    if not isinstance(home, str) or not home:
        raise InvalidRequest("home_region is required", param="home_region")
    return home


@router.post("/v1/admin/ownership/ban")
async def ownership_ban(request: Request) -> JSONResponse:
    """Internal (failover guard): at the owner, ban writes for `home_region` under its
    current epoch, after the writes in flight; answers `{home_region, epoch, banned_at}`.
    Never forwarded: it must run in the owner's own store."""
    node = node_of(request)
    home = _admin_home(await _json_object(request))
    epoch = await own.ban(node.db, node.region, home)
    await node.ownership.refresh()
    return JSONResponse({"home_region": home, "epoch": epoch, "region": node.region})


@router.post("/v1/admin/ownership/take")
async def ownership_take(request: Request) -> JSONResponse:
    """Internal (failover guard): make this region the owner of `home_region`.

    With ownership leases (a multi-region node): this node acquires the lease
    ``ownership:<home>`` itself, waiting up to `wait` seconds (default: one lease ttl + 2
    s) for an old owner's lease to expire, and takes its token as the new epoch. Without
    `forced`, 409 unless the current epoch is banned in this region's store (caught up)
    or ours; `forced: true` (crash or partition takeover) skips that and records the
    takeover with `takeover` ({from_region, from_epoch, positions, detail}). Without
    leases: `epoch` (a fencing token held by the caller) is required.
    Answers ``{home_region, epoch, region}``."""
    node = node_of(request)
    body = await _json_object(request)
    home = _admin_home(body)
    leases = getattr(request.app.state, "leases", None)
    if leases is not None:
        wait = body.get("wait", leases.ttl_seconds + 2.0)
        if not isinstance(wait, int | float) or isinstance(wait, bool) or wait < 0:
            raise InvalidRequest("wait must be a number of seconds", param="wait")
        takeover = body.get("takeover")
        epoch = await leases.take(home, wait_seconds=float(wait),
                                  forced=body.get("forced") is True,
                                  takeover=takeover if isinstance(takeover, dict) else None)
    else:
        epoch = body.get("epoch")
        if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 1:
            raise InvalidRequest("epoch must be a positive integer", param="epoch")
        await own.take(node.db, node.region, home, epoch)
    await node.ownership.refresh()
    return JSONResponse({"home_region": home, "epoch": epoch, "region": node.region})


@router.post("/v1/admin/ownership/release")
async def ownership_release(request: Request) -> JSONResponse:
    """Internal (failover guard, planned handover after ban and restamp): give the lease
    of `home_region` back; this node never re-acquires it by itself afterwards (a later
    take does). Answers ``{home_region, region, token}`` (token None: none was held)."""
    home = _admin_home(await _json_object(request))
    leases = getattr(request.app.state, "leases", None)
    token = await leases.release(home) if leases is not None else None
    return JSONResponse({"home_region": home, "region": node_of(request).region,
                         "token": token})


@router.get("/v1/admin/ownership/leases")
async def ownership_leases(request: Request) -> JSONResponse:
    """The ownership leases this node holds (token, seconds left) and its recent lease
    events (acquired, lost, released)."""
    leases = getattr(request.app.state, "leases", None)
    if leases is None:
        return JSONResponse({"region": node_of(request).region, "enabled": False,
                             "leases": [], "events": []})
    now = time.monotonic()
    return JSONResponse({"region": node_of(request).region, "enabled": True,
                         "ttl_seconds": leases.ttl_seconds,
                         "margin_seconds": leases.margin_seconds,
                         "leases": leases.snapshot(),
                         "events": [{"ago_seconds": round(now - t, 3), "home_region": h,
                                     "event": e} for t, h, e in leases.events]})


# GET /v1/admin/reconciliation (items with their resolutions) lives in api/reconciliation.py.
