"""`python -m geo_router`: run one router - the public listener (proxy + /v1/resolve) and
the admin listener - until SIGTERM / SIGINT.

Settings come from `PAYCLUSTER_ROUTER_*` (see `config.RouterSettings`); the options below
override the most common ones. When both listeners are up it prints one JSON line to
stdout, `{"router_url": ..., "admin_url": ..., "pid": ...}`, for whoever started it (the
lab waits for that line; with port 0 it is the only way to learn the ports).

On SIGTERM both listeners stop accepting, in-flight requests get
`graceful_shutdown_seconds` to finish, then the process exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import uvicorn
from pydantic import ValidationError

from geo_router.api import admin_app, resolve_app
from geo_router.catalog import CatalogError
from geo_router.config import RouterSettings
from geo_router.proxy import Proxy
from geo_router.service import RouterService
from region_node.redact import RedactFilter


class JsonFormatter(logging.Formatter):
    """One JSON line per event, with the router's site and (when known) region and request."""

    def __init__(self, site: str) -> None:
        super().__init__()
        self.site = site

    def format(self, record: logging.LogRecord) -> str:
        """One line."""
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname.lower(), "logger": record.name,
            "site": self.site or None, "msg": record.getMessage()}
        for key in ("event", "region", "request_id", "status", "reason"):
            if hasattr(record, key):
                entry[key] = getattr(record, key)
        # exc_text first: the redaction filter leaves the scrubbed traceback there.
        if record.exc_text:
            entry["exc"] = record.exc_text
        elif record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


class _Server(uvicorn.Server):
    """A uvicorn server that leaves signals to us: two servers share one process."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _bind(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET,
                         socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def _server(app: Any, settings: RouterSettings) -> _Server:
    config = uvicorn.Config(app, lifespan="off", log_config=None, access_log=False,
                            server_header=False, date_header=False,
                            timeout_graceful_shutdown=int(settings.graceful_shutdown_seconds),
                            timeout_keep_alive=30, loop="none",
                            http="httptools" if _has("httptools") else "h11")
    return _Server(config)


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


async def serve(settings: RouterSettings) -> None:
    """Run the router until a stop signal."""
    service = RouterService(settings)
    proxy = Proxy(service, resolve_app(service))
    public_sock = _bind(settings.host, settings.port)
    admin_sock = _bind(settings.admin_host, settings.admin_port)
    public, admin = _server(proxy, settings), _server(admin_app(service), settings)
    loop = asyncio.get_running_loop()

    def stop() -> None:
        public.should_exit = admin.should_exit = True

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop)
    try:
        await service.start()
        tasks = [asyncio.create_task(public.serve(sockets=[public_sock])),
                 asyncio.create_task(admin.serve(sockets=[admin_sock]))]
        while not (public.started and admin.started):
            if any(t.done() for t in tasks):
                break
            await asyncio.sleep(0.01)
        if public.started and admin.started:
            host, port = public_sock.getsockname()[:2]
            ahost, aport = admin_sock.getsockname()[:2]
            print(json.dumps({"router_url": f"http://{_url_host(host)}:{port}",
                              "admin_url": f"http://{_url_host(ahost)}:{aport}",
                              "pid": os.getpid(), "site": settings.site or None,
                              "regions": service.catalog.names}), flush=True)
        # If one listener fails, stop the other too.
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        stop()
        await asyncio.gather(*tasks, return_exceptions=True)
        for task in done:
            task.result()
    finally:
        await proxy.aclose()
        await service.stop()
        for sock in (public_sock, admin_sock):
            sock.close()


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(prog="python -m geo_router",
                                     description="Run a paycluster geo router (GSLB).")
    parser.add_argument("--port", type=int, help="public port (0 = a free one)")
    parser.add_argument("--admin-port", type=int, help="admin port (0 = a free one)")
    parser.add_argument("--catalog-file", type=Path,
                        help="catalog JSON or the lab's cluster.json")
    parser.add_argument("--site", help="the region this router runs in (a label)")
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in (("port", args.port), ("admin_port", args.admin_port),
                                   ("catalog_file", args.catalog_file),
                                   ("site", args.site)) if v is not None}
    try:
        settings = RouterSettings(**overrides)
    except ValidationError as exc:
        print(f"geo_router: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(settings.site))
    # No API key or card number in a log line (the proxy logs paths and upstream errors).
    handler.addFilter(RedactFilter())
    logging.basicConfig(level=settings.log_level.upper(), handlers=[handler], force=True)
    # httpx logs every request at INFO: far too much for a proxy.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        import uvloop

        run: Any = uvloop.run
    except ImportError:
        run = asyncio.run
    try:
        run(serve(settings))
    except (CatalogError, ValueError, OSError) as exc:
        print(f"geo_router: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
