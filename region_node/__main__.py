"""`python -m region_node`: migrate the region's database, then serve the node."""

from __future__ import annotations

import uvicorn

from region_node import logs, migrate
from region_node.app import create_app
from region_node.config import RegionSettings
from region_node.rpc.tls import RpcTls

KEEP_ALIVE_SECONDS = 75
"""How long the node keeps an idle HTTP connection open."""


def main() -> None:
    """Entry point; settings come from PAYCLUSTER_* environment variables."""
    settings = RegionSettings()
    logs.setup(settings.region, settings.log_level)
    try:
        # Before anything else (even migrations): no gRPC to peers without mutual TLS.
        RpcTls.from_settings(settings)
    except ValueError as exc:
        raise SystemExit(f"region node {settings.region} refuses to start: {exc}") from None
    migrate.upgrade(settings.database_url)
    # Keep-alive longer than any client pool keeps an idle connection (httpx 5 s, the geo
    # router's aiohttp 15 s): the client then always closes first. With uvicorn's default
    # 5 s, a request sent on a connection the node was closing at that moment failed with
    # a read error (seen in handovers and behind the router).
    uvicorn.run(create_app(settings), host=settings.api_host, port=settings.api_port,
                log_config=None, access_log=False, timeout_graceful_shutdown=10,
                timeout_keep_alive=KEEP_ALIVE_SECONDS)


if __name__ == "__main__":
    main()
