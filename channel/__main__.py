"""`python -m channel`: run the acquirer simulator until SIGTERM / SIGINT.

Settings come from `PAYCLUSTER_CHANNEL_*` (see `config.ChannelSettings`). When both
listeners are up it prints one JSON line to stdout,
`{"channel_url": ..., "admin_url": ..., "pid": ...}` (with port 0 the only way to learn the
ports); secrets are never printed (they are in the settings, or in
`<data_dir>/secrets.json`).

The merchant listener can be closed and reopened on the same port while the process
runs: that is the `refuse` outage (`POST /admin/down`), a channel whose connections are
refused, not one that answers errors. In the `reset` outage a bare TCP server takes the
port meanwhile and resets every connection it accepts, before any byte of an answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import struct
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import uvicorn
from pydantic import ValidationError

from channel.api import admin_app, merchant_app
from channel.cards import MaskingFilter
from channel.config import ChannelSettings
from channel.engine import Channel
from channel.faults import DownMode

log = logging.getLogger("channel")

STARTUP_POLLS = 3000
"""Checks, 10 ms apart, that both listeners serve before giving up (30 s)."""


class JsonFormatter(logging.Formatter):
    """One JSON line per event."""

    def format(self, record: logging.LogRecord) -> str:
        """One line."""
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname.lower(), "logger": record.name,
            "msg": record.getMessage()}
        if record.exc_text:
            entry["exc"] = record.exc_text
        return json.dumps(entry)


class _Server(uvicorn.Server):
    """A uvicorn server that leaves signals to us: two servers share one process."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _bind(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET,
                         socket.SOCK_STREAM)
    # Reopening the merchant port after a `refuse` outage must not wait for TIME_WAIT.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(1024)
    sock.setblocking(False)
    return sock


def _server(app: Any) -> _Server:
    config = uvicorn.Config(app, lifespan="off", log_config=None, access_log=False,
                            server_header=False, loop="none",
                            timeout_graceful_shutdown=1,
                            # past the nodes' httpx pools (5 s): the client closes first
                            timeout_keep_alive=75)
    return _Server(config)


async def _reset(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Reset a connection (RST, not FIN): what a crashed load balancer looks like."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        # SO_LINGER on with a zero timeout turns close() into a reset.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class Listener:
    """One uvicorn server on a fixed address that can be closed and opened again.

    Opens and closes are serialized (a lock), so "down, then up" always ends open, even
    when the up arrives while the close is still draining connections.
    """

    def __init__(self, app: Any, host: str, port: int) -> None:
        self.app, self.host = app, host
        sock = _bind(host, port)
        self.port = int(sock.getsockname()[1])
        self._sock: socket.socket | None = sock
        self._server: _Server | None = None
        self._task: asyncio.Task[None] | None = None
        self._resetter: asyncio.Server | None = None
        self._lock = asyncio.Lock()

    async def open(self) -> None:
        """Serve (binding the port again if it was closed); returns once it accepts."""
        async with self._lock:
            if self._task is not None:
                return
            await self._stop_resetting()
            sock = self._sock or _bind(self.host, self.port)
            self._sock = None
            server = self._server = _server(self.app)
            self._task = asyncio.get_running_loop().create_task(server.serve(sockets=[sock]))
            for _ in range(STARTUP_POLLS):
                if server.started or self._task.done():
                    break
                await asyncio.sleep(0.01)
            if not server.started:
                raise OSError(f"the listener on {self.url} did not start")

    async def close(self, resetting: bool = False) -> None:
        """Stop serving and close open connections (uvicorn closes the socket). With
        `resetting`, keep accepting on the port but reset every connection at once."""
        async with self._lock:
            if self._server is not None and self._task is not None:
                self._server.should_exit = True
                await asyncio.gather(self._task, return_exceptions=True)
            self._server, self._task = None, None
            await self._stop_resetting()
            if resetting:
                sock = self._sock or _bind(self.host, self.port)
                self._sock = None
                self._resetter = await asyncio.start_server(_reset, sock=sock)

    async def _stop_resetting(self) -> None:
        if self._resetter is not None:
            self._resetter.close()
            await self._resetter.wait_closed()
            self._resetter = None

    @property
    def url(self) -> str:
        """http://host:port."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


async def serve(settings: ChannelSettings) -> None:
    """Run the channel until a stop signal."""
    channel = Channel(settings)
    channel.load()
    merchant = Listener(merchant_app(channel), settings.host, settings.port)
    reopen: list[asyncio.TimerHandle] = []
    background: set[asyncio.Task[None]] = set()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()

    def cancel_reopen() -> None:
        for handle in reopen:
            handle.cancel()
        reopen.clear()

    def reopen_later() -> None:
        task = loop.create_task(merchant.open())
        background.add(task)
        task.add_done_callback(background.discard)

    async def down(seconds: float, mode: DownMode) -> None:
        cancel_reopen()
        channel.faults.go_down(seconds, mode)
        if mode is DownMode.UNAVAILABLE:
            # The merchant app answers 503 itself; it needs its listener (which an
            # earlier refuse or reset outage this one replaces may have closed).
            await merchant.open()
        else:
            await merchant.close(resetting=mode is DownMode.RESET)
            reopen.append(loop.call_later(seconds, reopen_later))
        log.info("channel down for %.1f s (%s)", seconds, mode.value)

    async def up() -> None:
        cancel_reopen()
        channel.faults.come_up()
        await merchant.open()
        log.info("channel up")

    admin = Listener(admin_app(channel, down, up), settings.admin_host, settings.admin_port)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await channel.start()
    try:
        await merchant.open()
        await admin.open()
        print(json.dumps({"channel_url": merchant.url, "admin_url": admin.url,
                          "pid": os.getpid()}), flush=True)
        await stopping.wait()
    finally:
        cancel_reopen()
        for task in list(background):
            task.cancel()
        await asyncio.gather(merchant.close(), admin.close(), *background,
                             return_exceptions=True)
        await channel.stop()


def main(argv: list[str] | None = None) -> int:
    """Command line entry point (settings only from the environment)."""
    if argv or sys.argv[1:]:
        print("usage: python -m channel   (configure with PAYCLUSTER_CHANNEL_* variables)",
              file=sys.stderr)
        return 2
    try:
        settings = ChannelSettings().with_secrets()
    except ValidationError as exc:
        print(f"channel: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(MaskingFilter())
    logging.basicConfig(level=settings.log_level.upper(), handlers=[handler], force=True)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        asyncio.run(serve(settings))
    except OSError as exc:
        print(f"channel: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
