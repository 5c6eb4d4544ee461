"""Routes for operators: replication state and ownership as this region sees them."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from region_node import ownership as own
from region_node.api.mutation import node_of
from region_node.errors import InvalidRequest

router = APIRouter(tags=["cluster"])


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
    home = _admin_home(await request.json())
    epoch = await own.ban(node.db, node.region, home)
    await node.ownership.refresh()
    return JSONResponse({"home_region": home, "epoch": epoch, "region": node.region})


@router.post("/v1/admin/ownership/take")
async def ownership_take(request: Request) -> JSONResponse:
    """Internal (failover guard): make this region the owner of `home_region` under
    `epoch` (the fencing token of the quorum lock `ownership:<home>`, held by the caller).
    409 unless the current epoch is banned in this region's store (caught up) or ours."""
    node = node_of(request)
    body = await request.json()
    home = _admin_home(body)
    epoch = body.get("epoch")
    if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 1:
        raise InvalidRequest("epoch must be a positive integer", param="epoch")
    await own.take(node.db, node.region, home, epoch)
    await node.ownership.refresh()
    return JSONResponse({"home_region": home, "epoch": epoch, "region": node.region})
