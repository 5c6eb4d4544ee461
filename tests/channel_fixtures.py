"""Fixtures for the channel (the acquirer simulator): the real server, started once per
session through `cluster.servers.start_channel`, and a real HTTP receiver of its callbacks.

Imported by conftest.py, so every test module can ask for `channel_server`,
`channel_client`, `channel_admin` and `callback_receiver`.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from channel.client import ChannelAdmin, ChannelClient
from channel.signing import SIGNATURE_HEADER, SignatureError, verify
from cluster.servers import ChannelServer, free_port, start_channel

CHANNEL_TEST_ENV = {
    "PAYCLUSTER_CHANNEL_PROCESSING_SECONDS": "0.05",
    "PAYCLUSTER_CHANNEL_ISSUER_TIMEOUT_SECONDS": "1.0",
    "PAYCLUSTER_CHANNEL_CALLBACK_BACKOFF_SECONDS": "0.1",
    "PAYCLUSTER_CHANNEL_CALLBACK_BACKOFF_MAX_SECONDS": "0.5",
    "PAYCLUSTER_CHANNEL_CALLBACK_MAX_ATTEMPTS": "4",
    "PAYCLUSTER_CHANNEL_CALLBACK_TIMEOUT_SECONDS": "2.0",
}
"""The simulated networks squeezed from seconds to fractions of one for the tests."""


def start_test_channel(data_dir: Path, **env: str) -> ChannelServer:
    """A channel with the tests' fast timings (and `env` on top), under `data_dir`."""
    return start_channel(data_dir, extra_env={**CHANNEL_TEST_ENV, **env})


@pytest.fixture(scope="session")
def channel_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChannelServer]:
    """One channel for the session, stopped by its pid even if tests fail."""
    server = start_test_channel(tmp_path_factory.mktemp("channel"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def channel_client(channel_server: ChannelServer) -> AsyncIterator[ChannelClient]:
    """A merchant client of the session's channel."""
    async with ChannelClient(channel_server.url, channel_server.api_key) as client:
        yield client


@pytest.fixture
async def channel_admin(channel_server: ChannelServer) -> AsyncIterator[ChannelAdmin]:
    """An admin client of the session's channel; faults and outages are lifted after the
    test, so the next one starts from a well-behaved channel."""
    async with ChannelAdmin(channel_server.admin_url, channel_server.admin_key) as admin:
        try:
            yield admin
        finally:
            await admin.up()
            await admin.set_faults()


@dataclass
class Received:
    """One callback as the receiver saw it."""

    raw: bytes
    signature: str
    at: float
    valid: bool
    event: dict[str, Any] = field(default_factory=dict)


class CallbackReceiver:
    """A real HTTP server on 127.0.0.1 that records (and verifies) every callback.

    `answers` scripts the status codes of the next requests (then 200), to make the
    channel retry.
    """

    def __init__(self, secret: str) -> None:
        self.secret = secret
        self.port = free_port()
        self.received: list[Received] = []
        self.answers: list[int] = []
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        """Where to send callbacks."""
        return f"http://127.0.0.1:{self.port}/callbacks"

    async def start(self) -> None:
        """Listen."""
        app = web.Application()
        app.router.add_post("/callbacks", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        """Stop listening."""
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.Response:
        raw = await request.read()
        header = request.headers.get(SIGNATURE_HEADER, "")
        try:
            verify(raw, header, self.secret)
            valid = True
        except SignatureError:
            valid = False
        self.received.append(Received(raw, header, time.monotonic(), valid,
                                      json.loads(raw) if raw else {}))
        status = self.answers.pop(0) if self.answers else 200
        return web.Response(status=status)

    def of(self, reference: str) -> list[Received]:
        """The callbacks about `reference`, in arrival order."""
        return [r for r in self.received if r.event.get("data", {}).get("reference") == reference]

    async def wait_for(self, check: Callable[[], bool], within: float = 60.0) -> None:
        """Wait until `check()` holds; fail the test after `within` seconds."""
        deadline = time.monotonic() + within
        while not check():
            if time.monotonic() > deadline:
                raise AssertionError(f"callbacks not as expected after {within}s: "
                                     f"{[r.event.get('type') for r in self.received]}")
            await asyncio.sleep(0.02)


@pytest.fixture
async def callback_receiver(channel_server: ChannelServer
                            ) -> AsyncIterator[CallbackReceiver]:
    """A receiver of the session channel's callbacks, for one test."""
    receiver = CallbackReceiver(channel_server.callback_secret)
    await receiver.start()
    try:
        yield receiver
    finally:
        await receiver.stop()
