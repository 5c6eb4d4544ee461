"""WAN-link emulator: TCP proxies with latency, jitter and cut/heal between the lab's regions.

All regions of the local lab run on one machine and the kernel's netem is not available, so
every cross-region TCP connection (PostgreSQL logical replication, gRPC between nodes, the
Redis lock quorum) is pointed at a `Link`: a TCP proxy on 127.0.0.1 that forwards to the
real server and delays, holds or breaks the bytes the way a WAN between two regions would.

Model, per link (one ordered pair src -> dst and one service; clients in src, server in dst):

- Latency: every chunk read from one side is released to the other side `rtt / 2` later,
  so a request/response exchange costs one `rtt`. Each direction of each connection has a
  release-time queue: the reader keeps reading while earlier chunks wait, so a long
  transfer costs one delay plus its transfer time, not one delay per chunk (a real link is
  a pipe, not a stop-and-wait channel). The bytes in flight per direction are bounded by a
  window (`window_bytes`), like a TCP receive window; a full window pauses reading and so
  pushes back on the sender.
- Jitter: each chunk's one-way delay gets a uniform random offset in +-jitter/2, so one
  round trip varies by at most +-jitter. Release times are clamped to be monotonic per
  direction: jitter stretches gaps between chunks but never reorders bytes, exactly as TCP
  would present a jittery path to the application.
- Cut, mode "reset": all live connections are reset (RST) and new ones are reset right after
  accept - a firewall rejecting traffic; clients see errors at once.
- Cut, mode "blackhole": connections stay open and nothing is delivered - a partition as
  TCP experiences it; clients only notice through their own timeouts. New connections are
  accepted and hang (no connection to the server is made until heal, as a SYN would not
  get through). Data sent meanwhile is buffered up to `blackhole_limit` bytes per direction
  and delivered on heal; past the limit the connection is reset (a sender that has been
  stuck that long would have timed out on a real network too).
- Heal restores normal operation.

Not modelled: the TCP handshake round trip (the client's connect() completes locally),
bandwidth limits, and packet loss other than a full cut.

A `WanEmulator` holds the links of a cluster keyed by (src, dst, service) and changes them
per region pair; a small HTTP control API (`ControlServer`) lets another process change a
running emulator, `WanControl` is its synchronous client, and `python -m cluster.wan` runs
an emulator as a process of its own.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import random
import signal
import socket
import struct
import sys
from collections import deque
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, cast

import httpx

from cluster.errors import LabError

log = logging.getLogger(__name__)

LOCALHOST = "127.0.0.1"
"""Every listener of the emulator binds here only: the lab must never be reachable from outside."""

REGIONS: tuple[str, ...] = ("us-east", "eu-west", "ap-southeast")
"""The lab's region names, in the order the default latency table is written."""

# Round-trip times in milliseconds between the regions, rounded from public AWS inter-region
# ping tables (cloudping-style measurements of us-east-1 / N. Virginia, eu-west-1 / Ireland
# and ap-southeast-1 / Singapore). Published figures differ by source and year (e.g. a 2017
# table gives ~80 / ~217 / ~238 ms; newer measurements show Ireland-Singapore nearer
# 160-180 ms since more direct cable routes): these are plausible defaults, not
# measurements, and any pair can be changed at runtime with `WanEmulator.set`.
DEFAULT_RTT_MS: dict[frozenset[str], float] = {
    frozenset({"us-east", "eu-west"}): 75.0,
    frozenset({"us-east", "ap-southeast"}): 215.0,
    frozenset({"eu-west", "ap-southeast"}): 170.0,
}

CutMode = Literal["reset", "blackhole"]
CUT_MODES: tuple[str, ...] = ("reset", "blackhole")

DEFAULT_WINDOW_BYTES = 8 * 1024 * 1024
"""In-flight bytes per direction before reading pauses (about a large TCP window)."""

DEFAULT_BLACKHOLE_LIMIT = 64 * 1024 * 1024
"""Bytes per direction held during a blackhole cut before the connection is reset."""

CHUNK_BYTES = 64 * 1024
CONNECT_TIMEOUT_SECONDS = 10.0
"""Seconds to reach the target server; a server that does not answer gets the client reset."""


def default_rtt_seconds(a: str, b: str, scale: float = 1.0) -> float:
    """Round-trip time in seconds between regions `a` and `b` from the default table.

    `scale` multiplies the table (0 turns delays off, 0.1 makes a fast test cluster that
    keeps the regions' relative distances). The same region gives 0. Raises ValueError for
    a pair that is not in the table or a negative scale.
    """
    if scale < 0 or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number >= 0, got {scale!r}")
    if a == b:
        return 0.0
    try:
        rtt_ms = DEFAULT_RTT_MS[frozenset({a, b})]
    except KeyError:
        raise ValueError(
            f"no default latency between {a!r} and {b!r}; known regions: {', '.join(REGIONS)}"
        ) from None
    return rtt_ms / 1000.0 * scale


# Round trips (ms) for the regions a lab can add beyond the three of cluster.wan's table,
# rounded from the same public inter-region ping tables (us-west-2 / Oregon, eu-central-1 /
# Frankfurt, sa-east-1 / Sao Paulo); plausible defaults, changeable at runtime like the rest.
EXTRA_RTT_MS: dict[frozenset[str], float] = {
    frozenset({"us-west", "us-east"}): 65.0,
    frozenset({"us-west", "eu-west"}): 125.0,
    frozenset({"us-west", "ap-southeast"}): 165.0,
    frozenset({"us-west", "eu-central"}): 145.0,
    frozenset({"us-west", "sa-east"}): 175.0,
    frozenset({"eu-central", "us-east"}): 90.0,
    frozenset({"eu-central", "eu-west"}): 25.0,
    frozenset({"eu-central", "ap-southeast"}): 160.0,
    frozenset({"eu-central", "sa-east"}): 205.0,
    frozenset({"sa-east", "us-east"}): 115.0,
    frozenset({"sa-east", "eu-west"}): 180.0,
    frozenset({"sa-east", "ap-southeast"}): 325.0,
}


def link_rtt(src: str, dst: str, scale: float = 1.0) -> float:
    """Default round trip in seconds between two regions, times `scale`.

    DEFAULT_RTT_MS for the default three regions, EXTRA_RTT_MS for the others; ValueError
    for a pair neither knows or a negative scale.
    """
    if src == dst or frozenset({src, dst}) in DEFAULT_RTT_MS:
        return default_rtt_seconds(src, dst, scale)
    default_rtt_seconds(src, src, scale)  # validates the scale
    try:
        return EXTRA_RTT_MS[frozenset({src, dst})] / 1000.0 * scale
    except KeyError:
        raise ValueError(f"no default round trip between {src!r} and {dst!r}") from None


def _check_seconds(name: str, value: float) -> float:
    value = float(value)
    if value < 0 or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number of seconds >= 0, got {value!r}")
    return value


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close a connection with an RST instead of a FIN, so the peer sees a reset, not an EOF."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        # SO_LINGER with a zero timeout makes close() abort the connection with an RST.
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


_EOF = b""
"""Queue marker: the source half-closed; deliver a FIN after the data before it."""
_RST = None
"""Queue marker: the source reset; reset the whole connection once the data before it is out."""


class _Pipe:
    """One direction of one proxied connection: reads chunks, releases them after the delay."""

    def __init__(self, conn: _Connection, source: asyncio.StreamReader, upstream: bool) -> None:
        self._conn = conn
        self._link = conn.link
        self._source = source
        self.upstream = upstream  # client -> server (src -> dst) when True
        self._queue: deque[tuple[float, bytes | None]] = deque()
        self._buffered = 0
        self._last_release = 0.0
        self._wake = asyncio.Event()  # writer: something to deliver or the cut was healed
        self._space = asyncio.Event()  # reader: the window has room or the mode changed
        self.reader_task: asyncio.Task[None] | None = None
        self.writer_task: asyncio.Task[None] | None = None

    def start_reader(self) -> None:
        self.reader_task = asyncio.create_task(self._read_loop())

    def start_writer(self, dest: asyncio.StreamWriter) -> None:
        self.writer_task = asyncio.create_task(self._write_loop(dest))

    def notify(self) -> None:
        """Make both loops re-check the link's state (called on cut and heal)."""
        self._wake.set()
        self._space.set()

    def tasks(self) -> list[asyncio.Task[None]]:
        return [t for t in (self.reader_task, self.writer_task) if t is not None]

    def _enqueue(self, item: bytes | None) -> None:
        loop = asyncio.get_running_loop()
        # Monotonic release times: a chunk never overtakes the one read before it.
        release = max(loop.time() + self._link.one_way_delay_seconds(), self._last_release)
        self._last_release = release
        was_empty = not self._queue
        self._queue.append((release, item))
        if item:
            self._buffered += len(item)
        if was_empty:
            # The writer sleeps only on an empty queue (or a blackhole); a non-empty queue
            # means it is already timing the head, which this chunk cannot precede.
            self._wake.set()

    async def _read_loop(self) -> None:
        link = self._link
        while True:
            # Outside a blackhole a full window pauses reading, which pushes back on the
            # sender through TCP flow control instead of buffering without bound.
            while not link.blackholed and self._buffered >= link.window_bytes:
                self._space.clear()
                await self._space.wait()
            data: bytes | None
            try:
                data = await self._source.read(CHUNK_BYTES)
            except OSError:  # ConnectionResetError and the like
                data = None
            if not data and self._conn.held_before_connect:
                # A client giving up while its connection is held by a blackhole never got
                # through (its SYN was lost), so the server must never hear of it.
                self._conn.finish(rst=True)
                return
            if not data:
                self._enqueue(_EOF if data == b"" else _RST)
                return
            if link.blackholed and self._buffered + len(data) > link.blackhole_limit:
                link.counters["connections_overflowed"] += 1
                self._conn.finish(rst=True)
                return
            self._enqueue(data)

    async def _write_loop(self, dest: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        link = self._link
        counter = "bytes_up" if self.upstream else "bytes_down"
        while True:
            if not self._queue or link.blackholed:
                self._wake.clear()
                await self._wake.wait()
                continue
            wait_seconds = self._queue[0][0] - loop.time()
            if wait_seconds > 0:
                # Only the head's time matters: later chunks are never due earlier.
                await asyncio.sleep(wait_seconds)
                continue
            now = loop.time()
            marker: bytes | None = b"data"
            while self._queue and self._queue[0][0] <= now:
                _, item = self._queue.popleft()
                if not item:  # _EOF or _RST: nothing after it can follow
                    marker = item
                    break
                dest.write(item)
                self._buffered -= len(item)
                link.counters[counter] += len(item)
            if self._buffered < link.window_bytes:
                self._space.set()
            try:
                if marker == _EOF and dest.can_write_eof():
                    dest.write_eof()
                await dest.drain()
            except OSError:
                # The destination is gone: stop feeding it, let the other direction drain.
                if self.reader_task is not None:
                    self.reader_task.cancel()
                self._conn.pipe_done(self, failed=True)
                return
            if marker is _RST:
                self._conn.finish(rst=True)
                return
            if marker == _EOF:
                self._conn.pipe_done(self, failed=False)
                return


class _Connection:
    """A proxied client connection: client <-> Link <-> target server."""

    def __init__(
        self, link: Link, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.link = link
        self._client_reader = reader
        self._client_writer = writer
        self._server_writer: asyncio.StreamWriter | None = None
        self.pipes: list[_Pipe] = []
        self._finished: set[_Pipe] = set()
        self._failed = False
        self._rst = False
        self._done = asyncio.Event()
        self._setup_task: asyncio.Task[None] | None = None
        self._connected = False

    @property
    def held_before_connect(self) -> bool:
        """True while a blackhole keeps this connection from reaching the server at all."""
        return not self._connected and self.link.blackholed

    def finish(self, rst: bool) -> None:
        """End the connection (idempotent); `rst` resets both sides instead of closing them."""
        self._rst = self._rst or rst
        self._done.set()

    def pipe_done(self, pipe: _Pipe, failed: bool) -> None:
        """A direction is over: EOF delivered, or its destination failed."""
        self._finished.add(pipe)
        self._failed = self._failed or failed
        if len(self._finished) == 2:
            self.finish(rst=self._failed)

    def notify(self) -> None:
        for pipe in self.pipes:
            pipe.notify()

    async def run(self) -> None:
        """Proxy until both directions are done or the connection is reset; then clean up."""
        up = _Pipe(self, self._client_reader, upstream=True)
        self.pipes.append(up)
        up.start_reader()  # buffer what the client sends even before the server is reached
        self._setup_task = asyncio.create_task(self._connect(up))
        try:
            await self._done.wait()
        finally:
            tasks = [self._setup_task, *(t for p in self.pipes for t in p.tasks())]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for writer in (self._client_writer, self._server_writer):
                if writer is None:
                    continue
                if self._rst:
                    _reset(writer)
                else:
                    writer.close()

    async def _connect(self, up: _Pipe) -> None:
        link = self.link
        # During a blackhole the SYN would not get through: connect only after heal.
        await link.wait_passable()
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_SECONDS):
                reader, writer = await asyncio.open_connection(link.target_host, link.target_port)
        except (OSError, TimeoutError):
            link.counters["connect_failures"] += 1
            self.finish(rst=True)
            return
        self._connected = True
        self._server_writer = writer
        up.start_writer(writer)
        down = _Pipe(self, reader, upstream=False)
        self.pipes.append(down)
        down.start_reader()
        down.start_writer(self._client_writer)

    def abort(self) -> None:
        """Reset both sides now (a reset cut, or the link closing)."""
        self.finish(rst=True)


class Link:
    """A TCP proxy on 127.0.0.1 emulating the WAN from region `src` to a server in region `dst`.

    Create it, `await start()`, point clients at `listen_port`. `rtt_seconds` and
    `jitter_seconds` are the round trip and its jitter; see the module docstring for the
    delay and cut model.
    """

    def __init__(
        self,
        src: str,
        dst: str,
        service: str,
        target_host: str,
        target_port: int,
        *,
        listen_port: int = 0,
        rtt_seconds: float = 0.0,
        jitter_seconds: float = 0.0,
        window_bytes: int = DEFAULT_WINDOW_BYTES,
        blackhole_limit: int = DEFAULT_BLACKHOLE_LIMIT,
        rng: random.Random | None = None,
        listen_host: str = LOCALHOST,
    ) -> None:
        """Configure the link; nothing listens until `start()`. `listen_host` stays
        loopback in the lab; a containerised emulator serves other containers."""
        if window_bytes <= 0 or blackhole_limit <= 0:
            raise ValueError("window_bytes and blackhole_limit must be positive")
        self.src = src
        self.dst = dst
        self.service = service
        self.target_host = target_host
        self.target_port = int(target_port)
        self.listen_port = int(listen_port)
        self.listen_host = listen_host
        self.rtt_seconds = _check_seconds("rtt", rtt_seconds)
        self.jitter_seconds = _check_seconds("jitter", jitter_seconds)
        self.window_bytes = window_bytes
        self.blackhole_limit = blackhole_limit
        self.cut_mode: CutMode | None = None
        self.counters: dict[str, int] = dict.fromkeys(
            (
                "connections_total", "connections_refused", "connections_overflowed",
                "connect_failures", "bytes_up", "bytes_down",
            ),
            0,
        )
        self._rng = rng or random.Random()
        self._server: asyncio.Server | None = None
        self._connections: set[_Connection] = set()
        self._handlers: set[asyncio.Task[Any]] = set()
        self._passable: asyncio.Event | None = None
        self._closed = False

    @property
    def blackholed(self) -> bool:
        """True while a blackhole cut holds all traffic of this link."""
        return self.cut_mode == "blackhole"

    @property
    def connections_active(self) -> int:
        """Connections currently open through this link (including ones held by a blackhole)."""
        return len(self._connections)

    def one_way_delay_seconds(self) -> float:
        """Delay in seconds for one chunk in one direction: rtt/2 plus up to +-jitter/2."""
        delay_seconds = self.rtt_seconds / 2
        if self.jitter_seconds:
            delay_seconds += self._rng.uniform(-self.jitter_seconds / 2, self.jitter_seconds / 2)
        return max(delay_seconds, 0.0)

    async def start(self) -> int:
        """Start listening on `listen_host` (a free port if `listen_port` is 0); returns the
        port."""
        if self._server is not None:
            return self.listen_port
        self._passable = asyncio.Event()
        if not self.blackholed:
            self._passable.set()
        self._server = await asyncio.start_server(
            self._on_client, self.listen_host, self.listen_port, limit=CHUNK_BYTES * 2
        )
        self.listen_port = int(self._server.sockets[0].getsockname()[1])
        return self.listen_port

    async def close(self) -> None:
        """Stop listening and reset every connection of the link; waits until they are gone."""
        self._closed = True
        if self._server is not None:
            self._server.close()
        for conn in list(self._connections):
            conn.abort()
        if self._handlers:
            await asyncio.gather(*self._handlers, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2.0):
                    await self._server.wait_closed()
            self._server = None

    def set(self, rtt_seconds: float | None = None, jitter_seconds: float | None = None) -> None:
        """Change the round-trip time and/or jitter (seconds); applies to chunks read from now."""
        if rtt_seconds is not None:
            self.rtt_seconds = _check_seconds("rtt", rtt_seconds)
        if jitter_seconds is not None:
            self.jitter_seconds = _check_seconds("jitter", jitter_seconds)

    def cut(self, mode: CutMode = "reset") -> None:
        """Cut the link: "reset" resets live and new connections, "blackhole" holds all traffic."""
        if mode not in CUT_MODES:
            raise ValueError(f"cut mode must be one of {', '.join(CUT_MODES)}, got {mode!r}")
        self.cut_mode = mode
        if self._passable is not None:
            # Connections waiting for the blackhole to lift must wake up to be reset.
            if mode == "blackhole":
                self._passable.clear()
            else:
                self._passable.set()
        if mode == "reset":
            for conn in list(self._connections):
                conn.abort()
        else:
            # Readers paused on a full window resume, so held data is counted against the limit.
            for conn in self._connections:
                conn.notify()

    def heal(self) -> None:
        """End a cut: held data flows (in order, at once) and new connections go through."""
        self.cut_mode = None
        if self._passable is not None:
            self._passable.set()
        for conn in self._connections:
            conn.notify()

    async def wait_passable(self) -> None:
        """Wait until the link is not blackholed."""
        assert self._passable is not None, "link not started"
        await self._passable.wait()

    def state(self) -> dict[str, Any]:
        """JSON-able view: ports, settings (milliseconds), cut state and counters."""
        return {
            "src": self.src,
            "dst": self.dst,
            "service": self.service,
            "listen_host": self.listen_host,
            "listen_port": self.listen_port,
            "target_host": self.target_host,
            "target_port": self.target_port,
            "rtt_ms": round(self.rtt_seconds * 1000, 3),
            "jitter_ms": round(self.jitter_seconds * 1000, 3),
            "cut": self.cut_mode,
            "connections_active": self.connections_active,
            **self.counters,
        }

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.cut_mode == "reset" or self._closed:
            self.counters["connections_refused"] += 1
            _reset(writer)
            return
        task = asyncio.current_task()
        assert task is not None
        conn = _Connection(self, reader, writer)
        self._connections.add(conn)
        self._handlers.add(task)
        self.counters["connections_total"] += 1
        try:
            await conn.run()
        finally:
            self._connections.discard(conn)
            self._handlers.discard(task)


class WanEmulator:
    """All WAN links of a cluster, keyed by (src, dst, service), changed per region pair.

    Settings made with `set` and cuts made with `cut` are remembered per ordered pair, so a
    link added later for that pair starts with them. Methods must be called on the event
    loop the emulator runs on (the HTTP control API does that for other processes).
    """

    def __init__(
        self,
        scale: float = 1.0,
        *,
        seed: int | None = None,
        window_bytes: int = DEFAULT_WINDOW_BYTES,
        blackhole_limit: int = DEFAULT_BLACKHOLE_LIMIT,
        listen_host: str = LOCALHOST,
    ) -> None:
        """`scale` multiplies the default RTT table for links added without `rtt_seconds`;
        links listen on `listen_host`."""
        if scale < 0 or not math.isfinite(scale):
            raise ValueError(f"scale must be a finite number >= 0, got {scale!r}")
        self.scale = scale
        self._rng = random.Random(seed)
        self._window_bytes = window_bytes
        self._blackhole_limit = blackhole_limit
        self.listen_host = listen_host
        self._links: dict[tuple[str, str, str], Link] = {}
        self._pairs: dict[tuple[str, str], tuple[float, float]] = {}
        self._cuts: dict[tuple[str, str], CutMode] = {}

    @property
    def links(self) -> list[Link]:
        """Every link, in the order they were added."""
        return list(self._links.values())

    def link(self, src: str, dst: str, service: str) -> Link:
        """The link of one service from `src` to `dst`; KeyError if there is none."""
        return self._links[(src, dst, service)]

    async def add_link(
        self,
        src: str,
        dst: str,
        service: str,
        target_host: str,
        target_port: int,
        listen_port: int = 0,
        rtt_seconds: float | None = None,
        jitter_seconds: float | None = None,
    ) -> Link:
        """Create and start a link; its `listen_port` is the bound port (a free one if 0).

        Without `rtt_seconds`/`jitter_seconds` the pair's current settings apply (from an
        earlier `set` or link of the pair), else the default table times `scale` and no
        jitter. A pair that is cut starts cut. ValueError if the key exists or no round trip
        is known for the pair.
        """
        key = (src, dst, service)
        if key in self._links:
            raise ValueError(f"link {src} -> {dst} {service!r} already exists")
        pair_rtt_seconds, pair_jitter_seconds = self._pairs.get((src, dst), (None, None))
        if rtt_seconds is None:
            rtt_seconds = (pair_rtt_seconds if pair_rtt_seconds is not None
                           else default_rtt_seconds(src, dst, self.scale))
        if jitter_seconds is None:
            jitter_seconds = pair_jitter_seconds if pair_jitter_seconds is not None else 0.0
        link = Link(
            src, dst, service, target_host, target_port, listen_port=listen_port,
            rtt_seconds=rtt_seconds, jitter_seconds=jitter_seconds,
            window_bytes=self._window_bytes, blackhole_limit=self._blackhole_limit,
            rng=random.Random(self._rng.random()), listen_host=self.listen_host,
        )
        if (src, dst) in self._cuts:
            link.cut(self._cuts[(src, dst)])
        await link.start()
        self._links[key] = link
        self._pairs.setdefault((src, dst), (link.rtt_seconds, link.jitter_seconds))
        return link

    async def remove_link(self, src: str, dst: str, service: str) -> None:
        """Close and forget one link; KeyError if there is none."""
        link = self._links.pop((src, dst, service))
        await link.close()

    def _matching(self, src: str, dst: str, both_directions: bool) -> list[Link]:
        pairs = {(src, dst), (dst, src)} if both_directions else {(src, dst)}
        found = [link for link in self._links.values() if (link.src, link.dst) in pairs]
        if not found:
            raise LookupError(f"no links between {src} and {dst}")
        return found

    def _pairs_of(self, src: str, dst: str, both_directions: bool) -> list[tuple[str, str]]:
        return [(src, dst), (dst, src)] if both_directions else [(src, dst)]

    def set(
        self,
        src: str,
        dst: str,
        rtt_seconds: float | None = None,
        jitter_seconds: float | None = None,
        both_directions: bool = True,
    ) -> list[Link]:
        """Set rtt and/or jitter (seconds) on every service of the pair; returns those links.

        Both directions by default, since a path's round trip is the same whichever side
        opened the connection. LookupError if the pair has no links.
        """
        if rtt_seconds is not None:
            rtt_seconds = _check_seconds("rtt", rtt_seconds)
        if jitter_seconds is not None:
            jitter_seconds = _check_seconds("jitter", jitter_seconds)
        links = self._matching(src, dst, both_directions)
        for link in links:
            link.set(rtt_seconds=rtt_seconds, jitter_seconds=jitter_seconds)
        for pair in self._pairs_of(src, dst, both_directions):
            old_rtt_seconds, old_jitter_seconds = self._pairs.get(pair, (None, None))
            new_rtt_seconds = rtt_seconds if rtt_seconds is not None else old_rtt_seconds
            new_jitter_seconds = (jitter_seconds if jitter_seconds is not None
                                  else old_jitter_seconds)
            if new_rtt_seconds is not None:
                self._pairs[pair] = (new_rtt_seconds, new_jitter_seconds or 0.0)
        return links

    def cut(
        self, src: str, dst: str, mode: CutMode = "reset", both_directions: bool = True
    ) -> list[Link]:
        """Cut every service of the pair; returns those links. LookupError if it has none.

        A direction is who opens the connection: `both_directions=False` cuts connections
        that clients in `src` open to servers in `dst` and leaves `dst` -> `src` running.
        """
        if mode not in CUT_MODES:
            raise ValueError(f"cut mode must be one of {', '.join(CUT_MODES)}, got {mode!r}")
        links = self._matching(src, dst, both_directions)
        for pair in self._pairs_of(src, dst, both_directions):
            self._cuts[pair] = mode
        for link in links:
            link.cut(mode)
        return links

    def heal(self, src: str, dst: str, both_directions: bool = True) -> list[Link]:
        """Heal every service of the pair; returns those links. LookupError if it has none."""
        links = self._matching(src, dst, both_directions)
        for pair in self._pairs_of(src, dst, both_directions):
            self._cuts.pop(pair, None)
        for link in links:
            link.heal()
        return links

    def state(self) -> dict[str, Any]:
        """JSON-able view of the emulator: scale and every link's ports, settings, counters."""
        return {"scale": self.scale, "links": [link.state() for link in self._links.values()]}

    async def close(self) -> None:
        """Close every link (resetting their connections)."""
        links = list(self._links.values())
        self._links.clear()
        await asyncio.gather(*(link.close() for link in links), return_exceptions=True)


# --- HTTP control API --------------------------------------------------------------------


class _HttpError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


_REASONS = {
    200: "OK", 201: "Created", 400: "Bad Request", 404: "Not Found",
    405: "Method Not Allowed", 409: "Conflict", 413: "Payload Too Large",
    500: "Internal Server Error",
}
_MAX_BODY = 64 * 1024


def _str_field(body: Mapping[str, Any], name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value:
        raise _HttpError(400, f"{name!r} must be a non-empty string")
    return value


def _bool_field(body: Mapping[str, Any], name: str, default: bool) -> bool:
    value = body.get(name, default)
    if not isinstance(value, bool):
        raise _HttpError(400, f"{name!r} must be true or false")
    return value


def _ms_field(body: Mapping[str, Any], name: str) -> float | None:
    """An optional non-negative millisecond field, returned in seconds."""
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _HttpError(400, f"{name!r} must be a number of milliseconds")
    if value < 0 or not math.isfinite(value):
        raise _HttpError(400, f"{name!r} must be >= 0")
    return float(value) / 1000.0


def _port_field(body: Mapping[str, Any], name: str, default: int | None = None) -> int:
    value = body.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535:
        raise _HttpError(400, f"{name!r} must be a TCP port number")
    return value


class ControlServer:
    """The emulator's HTTP control API on 127.0.0.1 (JSON in, JSON out; one request per connection).

    `GET /links`, `GET /health`, `POST /links/cut {src,dst,mode?,both_directions?}`,
    `POST /links/heal {src,dst,both_directions?}`, `POST /links/set {src,dst,rtt_ms?,jitter_ms?,
    both_directions?}`, `POST /links/add {src,dst,service,target_host,target_port,listen_port?,
    rtt_ms?,jitter_ms?}`. Errors are `{"error": message}` with 400, 404, 405 or 409.
    Plain asyncio rather than uvicorn so it can run inside another program's event loop
    without taking over its signal handling.
    """

    def __init__(self, emulator: WanEmulator) -> None:
        """Serve `emulator`; nothing listens until `start()`."""
        self.emulator = emulator
        self.port = 0
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        """Base URL of the API, e.g. http://127.0.0.1:8123."""
        return f"http://{LOCALHOST}:{self.port}"

    async def start(self, port: int = 0) -> int:
        """Listen on 127.0.0.1 (a free port if 0); returns the port."""
        self._server = await asyncio.start_server(self._on_client, LOCALHOST, port)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    async def close(self) -> None:
        """Stop listening."""
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2.0):
                    await self._server.wait_closed()
            self._server = None

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        status, payload = 500, {"error": "internal error"}
        try:
            # A bounded read: a stuck or slow client must not pin the handler forever.
            async with asyncio.timeout(10.0):
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, target, _version = lines[0].split(" ", 2)
                headers = {}
                for line in lines[1:]:
                    name, sep, value = line.partition(":")
                    if sep:
                        headers[name.strip().lower()] = value.strip()
                length = int(headers.get("content-length", "0"))
                if length > _MAX_BODY:
                    raise _HttpError(413, "request body too large")
                body = await reader.readexactly(length) if length else b""
            status, payload = await self._dispatch(method, target.split("?", 1)[0], body)
        except _HttpError as exc:
            status, payload = exc.status, {"error": exc.message}
        except (ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            status, payload = 400, {"error": "malformed HTTP request"}
        except (TimeoutError, ConnectionError):
            writer.close()
            return
        except Exception as exc:  # a bug must answer 500, not leave the client hanging
            log.exception("control API request failed")
            status, payload = 500, {"error": f"internal error: {exc}"}
        data = json.dumps(payload).encode()
        reason = _REASONS.get(status, "Unknown")
        writer.write(
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode() + data
        )
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()

    async def _dispatch(self, method: str, path: str, raw: bytes) -> tuple[int, Any]:
        routes = {"/links", "/health", "/links/cut", "/links/heal", "/links/set", "/links/add"}
        if path not in routes:
            raise _HttpError(404, f"no route {path}")
        if path in ("/links", "/health"):
            if method != "GET":
                raise _HttpError(405, f"use GET {path}")
            return 200, self.emulator.state() if path == "/links" else {"ok": True}
        if method != "POST":
            raise _HttpError(405, f"use POST {path}")
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            raise _HttpError(400, "body must be JSON") from None
        if not isinstance(body, dict):
            raise _HttpError(400, "body must be a JSON object")
        src, dst = _str_field(body, "src"), _str_field(body, "dst")
        emu = self.emulator
        try:
            if path == "/links/add":
                link = await emu.add_link(
                    src, dst, _str_field(body, "service"), _str_field(body, "target_host"),
                    _port_field(body, "target_port"), _port_field(body, "listen_port", 0),
                    rtt_seconds=_ms_field(body, "rtt_ms"),
                    jitter_seconds=_ms_field(body, "jitter_ms"),
                )
                return 201, link.state()
            both = _bool_field(body, "both_directions", True)
            if path == "/links/cut":
                mode = body.get("mode", "reset")
                if mode not in CUT_MODES:
                    raise _HttpError(400, f"'mode' must be one of {', '.join(CUT_MODES)}")
                links = emu.cut(src, dst, mode=cast(CutMode, mode), both_directions=both)
            elif path == "/links/heal":
                links = emu.heal(src, dst, both_directions=both)
            else:
                links = emu.set(
                    src, dst, rtt_seconds=_ms_field(body, "rtt_ms"),
                    jitter_seconds=_ms_field(body, "jitter_ms"), both_directions=both,
                )
        except LookupError as exc:
            raise _HttpError(404, str(exc.args[0] if exc.args else exc)) from None
        except OSError as exc:  # add_link could not bind the requested port
            raise _HttpError(409, f"cannot listen: {exc}") from None
        except ValueError as exc:
            raise _HttpError(400, str(exc)) from None
        return 200, {"links": [link.state() for link in links]}


class WanControlError(LabError):
    """The control API refused a request; `status` is its HTTP status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"WAN control API: {status} {message}")
        self.status = status


class WanControl:
    """Synchronous client of a running emulator's control API (for the CLI and tests).

    Times are in milliseconds here, as on the wire and on the command line.
    """

    def __init__(self, control_url: str, timeout_seconds: float = 5.0) -> None:
        """Talk to the API at `control_url`, e.g. http://127.0.0.1:8123."""
        self._client = httpx.Client(base_url=control_url.rstrip("/"), timeout=timeout_seconds)

    def close(self) -> None:
        """Close the HTTP client."""
        self._client.close()

    def __enter__(self) -> WanControl:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        resp = self._client.request(method, path, json=body)
        if resp.status_code >= 400:
            try:
                message = str(resp.json().get("error", resp.text))
            except ValueError:
                message = resp.text
            raise WanControlError(resp.status_code, message)
        return resp.json()

    def links(self) -> list[dict[str, Any]]:
        """Every link's state (ports, rtt_ms, jitter_ms, cut, counters)."""
        return list(self._call("GET", "/links")["links"])

    def cut(
        self, src: str, dst: str, mode: CutMode = "reset", both_directions: bool = True
    ) -> list[dict[str, Any]]:
        """Cut the pair ("reset" or "blackhole"); returns the affected links' state."""
        body = {"src": src, "dst": dst, "mode": mode, "both_directions": both_directions}
        return list(self._call("POST", "/links/cut", body)["links"])

    def heal(self, src: str, dst: str, both_directions: bool = True) -> list[dict[str, Any]]:
        """Heal the pair; returns the affected links' state."""
        body = {"src": src, "dst": dst, "both_directions": both_directions}
        return list(self._call("POST", "/links/heal", body)["links"])

    def set(
        self,
        src: str,
        dst: str,
        rtt_ms: float | None = None,
        jitter_ms: float | None = None,
        both_directions: bool = True,
    ) -> list[dict[str, Any]]:
        """Set the pair's round-trip time and/or jitter; returns the affected links' state."""
        body = {
            "src": src, "dst": dst, "rtt_ms": rtt_ms, "jitter_ms": jitter_ms,
            "both_directions": both_directions,
        }
        return list(self._call("POST", "/links/set", body)["links"])

    def add(
        self,
        src: str,
        dst: str,
        service: str,
        target_host: str,
        target_port: int,
        listen_port: int = 0,
        rtt_ms: float | None = None,
        jitter_ms: float | None = None,
    ) -> dict[str, Any]:
        """Add a link; returns its state, whose `listen_port` is where clients connect."""
        body = {
            "src": src, "dst": dst, "service": service, "target_host": target_host,
            "target_port": target_port, "listen_port": listen_port, "rtt_ms": rtt_ms,
            "jitter_ms": jitter_ms,
        }
        return dict(self._call("POST", "/links/add", body))


# --- process entry point: python -m cluster.wan ------------------------------------------


def _load_config(path: Path) -> tuple[float | None, list[dict[str, Any]]]:
    """Read a links file: {"scale"?: float, "links": [{src,dst,service,target_host,target_port,
    listen_port?,rtt_ms?,jitter_ms?}, ...]}."""
    config = json.loads(path.read_text())
    if not isinstance(config, dict) or not isinstance(config.get("links", []), list):
        raise ValueError(f"{path}: expected an object with a 'links' list")
    scale = config.get("scale")
    return (float(scale) if scale is not None else None), list(config.get("links", []))


async def _add_from_config(emulator: WanEmulator, specs: Iterable[Mapping[str, Any]]) -> None:
    for index, spec in enumerate(specs):
        rtt_ms, jitter_ms = spec.get("rtt_ms"), spec.get("jitter_ms")
        try:
            src, dst, service = spec["src"], spec["dst"], spec["service"]
            target_host, target_port = spec["target_host"], int(spec["target_port"])
        except KeyError as exc:
            raise ValueError(f"link #{index} in the config has no {exc.args[0]!r}") from None
        await emulator.add_link(
            src, dst, service, target_host, target_port, int(spec.get("listen_port", 0)),
            rtt_seconds=None if rtt_ms is None else float(rtt_ms) / 1000.0,
            jitter_seconds=None if jitter_ms is None else float(jitter_ms) / 1000.0,
        )


async def run_emulator(
    control_port: int, config: Path | None = None, scale: float | None = None,
    listen_host: str = LOCALHOST,
) -> None:
    """Run an emulator with its control API until SIGTERM or SIGINT, then close everything.

    Prints one JSON line to stdout when ready: {"control_url": ..., "links": [...]}, so a
    parent process that passed port 0 learns where to connect.
    """
    file_scale, specs = _load_config(config) if config else (None, [])
    emulator = WanEmulator(scale=scale if scale is not None else (file_scale or 1.0),
                           listen_host=listen_host)
    control = ControlServer(emulator)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await _add_from_config(emulator, specs)
        await control.start(control_port)
        ready = {"control_url": control.url, "links": emulator.state()["links"]}
        sys.stdout.write(json.dumps(ready) + "\n")
        sys.stdout.flush()
        await stop.wait()
    finally:
        await control.close()
        await emulator.close()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


def main(argv: list[str] | None = None) -> int:
    """Command line: python -m cluster.wan --control-port P [--config links.json] [--scale S]."""
    parser = argparse.ArgumentParser(
        prog="python -m cluster.wan", description="Run the WAN-link emulator and its control API."
    )
    parser.add_argument("--control-port", type=int, required=True,
                        help="port of the HTTP control API on 127.0.0.1 (0 = a free one)")
    parser.add_argument("--config", type=Path, help="JSON file with the links to create")
    parser.add_argument("--scale", type=float, help="multiplier of the default RTT table")
    # The control API stays on loopback either way: cuts are made from inside the host or
    # container that runs the emulator, never by a peer on the network.
    parser.add_argument("--listen-host", default=LOCALHOST,
                        help="address the links listen on (a container: 0.0.0.0)")
    args = parser.parse_args(argv)
    try:
        asyncio.run(run_emulator(args.control_port, args.config, args.scale,
                                 args.listen_host))
    except (OSError, ValueError) as exc:
        print(f"cluster.wan: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
