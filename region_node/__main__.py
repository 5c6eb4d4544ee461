"""`python -m region_node`: migrate the region's database, then serve the node."""

from __future__ import annotations

import uvicorn

from region_node import logs, migrate
from region_node.app import create_app
from region_node.config import RegionSettings
from region_node.rpc.tls import RpcTls


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
    uvicorn.run(create_app(settings), host=settings.api_host, port=settings.api_port,
                log_config=None, access_log=False, timeout_graceful_shutdown=10)


if __name__ == "__main__":
    main()
