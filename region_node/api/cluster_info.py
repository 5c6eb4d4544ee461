"""Routes for operators: replication state and ownership as this region sees them."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from region_node.api.mutation import node_of

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
        {"home_region": o.home_region, "serving_region": o.serving_region, "epoch": o.epoch}
        for o in node.ownership.snapshot()]})
