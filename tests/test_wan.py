"""WAN-link emulator over real sockets on 127.0.0.1: latency, jitter, throughput, cut and heal,
and the control API (in-process from another thread, and `python -m cluster.wan` as a process).

Each test starts a tiny echo server as the "remote region's" server and talks to it through a
link, measuring what a client in the other region would notice.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import statistics
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from cluster.wan import (
    DEFAULT_RTT_MS,
    ControlServer,
    Link,
    WanControl,
    WanControlError,
    WanEmulator,
    default_rtt_seconds,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

# Delays are checked from below only (the emulator never delivers early, and follows a
# change of the RTT); how little it adds on top is measured by bench/wan.py, since a loaded
# machine can add any amount. Waits for something to happen are bounded by WAIT.
WAIT = 15.0

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass
class EchoServer:
    """An echo server on 127.0.0.1; `accepted` counts the connections that reached it."""

    port: int
    accepted: int = 0
    writers: set[asyncio.StreamWriter] = field(default_factory=set)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)


@pytest.fixture
async def echo() -> AsyncIterator[EchoServer]:
    """Echo server for one test, closed with all its connections afterwards."""
    state = EchoServer(port=0)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        state.tasks.add(task)
        state.writers.add(writer)
        state.accepted += 1
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()
            state.writers.discard(writer)
            state.tasks.discard(task)

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    state.port = server.sockets[0].getsockname()[1]
    try:
        yield state
    finally:
        server.close()
        for writer in list(state.writers):
            writer.transport.abort()
        await asyncio.gather(*state.tasks, return_exceptions=True)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2):
                await server.wait_closed()


@pytest.fixture
async def wan() -> AsyncIterator[WanEmulator]:
    """An emulator (seeded, so jitter is reproducible) closed with all its links afterwards."""
    emulator = WanEmulator(scale=1.0, seed=7)
    try:
        yield emulator
    finally:
        await emulator.close()


@contextlib.asynccontextmanager
async def connection(port: int) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """A client connection to 127.0.0.1:port, aborted on exit whatever happened."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        yield reader, writer
    finally:
        writer.transport.abort()


async def round_trip(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, payload: bytes = b"ping"
) -> float:
    """Seconds from sending `payload` to having it echoed back in full."""
    start = time.perf_counter()
    writer.write(payload)
    await writer.drain()
    async with asyncio.timeout(WAIT):
        echoed = await reader.readexactly(len(payload))
    elapsed = time.perf_counter() - start
    assert echoed == payload
    return elapsed


async def closed_within(reader: asyncio.StreamReader, seconds: float) -> bool:
    """True if the peer closes or resets the connection within `seconds` (data is skipped)."""
    try:
        async with asyncio.timeout(seconds):
            while await reader.read(65536):
                pass
    except TimeoutError:
        return False
    except ConnectionError:
        return True
    return True


async def nothing_within(reader: asyncio.StreamReader, seconds: float) -> bool:
    """True if no byte arrives (and the connection stays open) for `seconds`."""
    try:
        async with asyncio.timeout(seconds):
            await reader.read(1)
    except TimeoutError:
        return True
    return False


async def eventually(condition: Callable[[], bool], seconds: float) -> bool:
    """Poll `condition` (state inside the emulator has no event to wait on) for `seconds`."""
    for _ in range(int(seconds / 0.01)):
        if condition():
            return True
        await asyncio.sleep(0.01)
    return condition()


def test_default_latency_table_is_symmetric_and_scaled() -> None:
    """The three regions have plausible RTTs; scale 0 turns delay off; unknown pairs fail."""
    assert default_rtt_seconds("us-east", "eu-west") == pytest.approx(0.075)
    assert default_rtt_seconds("eu-west", "us-east") == default_rtt_seconds("us-east", "eu-west")
    assert (default_rtt_seconds("us-east", "ap-southeast")
            > default_rtt_seconds("eu-west", "ap-southeast"))
    assert (default_rtt_seconds("eu-west", "ap-southeast")
            > default_rtt_seconds("us-east", "eu-west"))
    assert default_rtt_seconds("us-east", "ap-southeast", scale=0.1) == pytest.approx(0.0215)
    assert default_rtt_seconds("us-east", "ap-southeast", scale=0) == 0.0
    assert default_rtt_seconds("eu-west", "eu-west") == 0.0
    assert len(DEFAULT_RTT_MS) == 3
    with pytest.raises(ValueError):
        default_rtt_seconds("us-east", "mars")
    with pytest.raises(ValueError):
        default_rtt_seconds("us-east", "eu-west", scale=-1)


async def test_latency_matches_configured_rtt_and_follows_changes(
    wan: WanEmulator, echo: EchoServer
) -> None:
    """A request/response through a 100 ms link takes at least 100 ms; `set` changes it
    live, up and down (a slower RTT is visible from below whatever the machine's load)."""
    async with connection(echo.port) as (reader, writer):
        direct = [await round_trip(reader, writer) for _ in range(3)]
    link = await wan.add_link("us-east", "eu-west", "grpc", "127.0.0.1", echo.port, rtt_seconds=0.1)
    async with connection(link.listen_port) as (reader, writer):
        samples = [await round_trip(reader, writer) for _ in range(5)]
        for rtt in samples:
            assert 0.09 <= rtt, samples
        # Change the pair's RTT while the connection is open: the next exchange follows it.
        wan.set("us-east", "eu-west", rtt_seconds=0.4)
        slower = [await round_trip(reader, writer) for _ in range(2)]
        for rtt in slower:
            assert 0.36 <= rtt, slower
        wan.set("us-east", "eu-west", rtt_seconds=0.03)
        faster = [await round_trip(reader, writer) for _ in range(3)]
        for rtt in faster:
            assert 0.027 <= rtt, faster
    assert link.state()["rtt_ms"] == 30.0
    print(f"\nlatency: direct {statistics.median(direct) * 1000:.2f} ms, "
          f"rtt=100ms link median {statistics.median(samples) * 1000:.1f} ms "
          f"(min {min(samples) * 1000:.1f}, max {max(samples) * 1000:.1f}), "
          f"after set rtt=30ms median {statistics.median(faster) * 1000:.1f} ms")


async def test_default_rtt_from_table_with_scale(echo: EchoServer) -> None:
    """Links added without an rtt get the table's figure times the emulator's scale."""
    emulator = WanEmulator(scale=0.5)
    try:
        link = await emulator.add_link("us-east", "ap-southeast", "redis", "127.0.0.1", echo.port)
        assert link.rtt_seconds == pytest.approx(0.1075)
        async with connection(link.listen_port) as (reader, writer):
            rtt = await round_trip(reader, writer)
        assert 0.9 * 0.1075 <= rtt
    finally:
        await emulator.close()


async def test_jitter_varies_delay_but_never_reorders_bytes(
    wan: WanEmulator, echo: EchoServer
) -> None:
    """With jitter, round trips spread out, yet numbered messages arrive in the order sent."""
    rtt, jitter = 0.06, 0.04
    link = await wan.add_link("eu-west", "ap-southeast", "postgres", "127.0.0.1", echo.port,
                              rtt_seconds=rtt, jitter_seconds=jitter)
    async with connection(link.listen_port) as (reader, writer):
        samples = [await round_trip(reader, writer) for _ in range(10)]
    assert all(rtt - jitter - 0.002 <= s for s in samples), samples
    assert max(samples) - min(samples) > 0.01, samples  # jitter is really applied

    # Messages 1 ms apart with +-20 ms of one-way jitter would overtake each other if every
    # chunk were delayed independently; the stream must come back exactly in order.
    count = 300
    async with connection(link.listen_port) as (reader, writer):

        async def send() -> None:
            for i in range(count):
                writer.write(b"%06d\n" % i)
                await writer.drain()
                await asyncio.sleep(0.001)

        sender = asyncio.create_task(send())
        received: list[int] = []
        async with asyncio.timeout(WAIT):
            while len(received) < count:
                received.append(int(await reader.readline()))
        await sender
    assert received == list(range(count))
    print(f"\njitter: rtt 60 ms +-40 ms, 10 round trips {min(samples) * 1000:.1f}.."
          f"{max(samples) * 1000:.1f} ms; {count} messages in order")


async def test_throughput_is_not_throttled_by_delay(wan: WanEmulator, echo: EchoServer) -> None:
    """5 MB echoed through a 1 s link costs about one RTT plus transfer time, not one RTT
    per chunk: 20 chunks delayed one after the other would take 20 s at least."""
    rtt, chunk = 1.0, 256 * 1024
    link = await wan.add_link("us-east", "eu-west", "postgres", "127.0.0.1", echo.port,
                              rtt_seconds=rtt)
    payload = os.urandom(5 * 1024 * 1024)
    async with connection(link.listen_port) as (reader, writer):

        async def send() -> None:
            for offset in range(0, len(payload), chunk):
                writer.write(payload[offset:offset + chunk])
                await writer.drain()

        start = time.perf_counter()
        sender = asyncio.create_task(send())
        async with asyncio.timeout(4 * WAIT):
            echoed = await reader.readexactly(len(payload))
        elapsed = time.perf_counter() - start
        await sender
    assert echoed == payload
    chunks = len(payload) // chunk
    assert rtt <= elapsed < chunks * rtt / 2, elapsed
    state = link.state()
    assert state["bytes_up"] == state["bytes_down"] == len(payload)
    print(f"\nthroughput: 5 MiB echoed through rtt=1s link in {elapsed * 1000:.0f} ms "
          f"({2 * len(payload) / elapsed / 1e6:.0f} MB/s both ways)")


async def test_cut_reset_closes_live_connections_refuses_new_and_heal_restores(
    wan: WanEmulator, echo: EchoServer
) -> None:
    """A reset cut breaks open connections at once and rejects new ones until heal."""
    forward = await wan.add_link("us-east", "eu-west", "grpc", "127.0.0.1", echo.port,
                                 rtt_seconds=0.02)
    backward = await wan.add_link("eu-west", "us-east", "grpc", "127.0.0.1", echo.port,
                                  rtt_seconds=0.02)
    async with connection(forward.listen_port) as (reader, writer):
        await round_trip(reader, writer)
        assert forward.connections_active == 1
        cut = wan.cut("us-east", "eu-west")
        assert {link.service for link in cut} == {"grpc"} and len(cut) == 2
        assert await closed_within(reader, WAIT)
    async with connection(forward.listen_port) as (reader, _writer):
        assert await closed_within(reader, WAIT)
    async with connection(backward.listen_port) as (reader, _writer):
        assert await closed_within(reader, WAIT)
    state = forward.state()
    assert state["cut"] == "reset" and state["connections_refused"] == 1
    assert state["connections_active"] == 0

    wan.heal("us-east", "eu-west")
    for link in (forward, backward):
        async with connection(link.listen_port) as (reader, writer):
            assert await round_trip(reader, writer) >= 0.018
        assert link.state()["cut"] is None

    # One direction only: clients in us-east lose eu-west, eu-west still reaches us-east.
    wan.cut("us-east", "eu-west", both_directions=False)
    async with connection(forward.listen_port) as (reader, _writer):
        assert await closed_within(reader, WAIT)
    async with connection(backward.listen_port) as (reader, writer):
        await round_trip(reader, writer)
    wan.heal("us-east", "eu-west")
    with pytest.raises(LookupError):
        wan.cut("us-east", "ap-southeast")


async def test_half_close_is_delivered_after_the_data(wan: WanEmulator, echo: EchoServer) -> None:
    """A client that sends and shuts down its side gets every byte back, then a clean EOF."""
    link = await wan.add_link("us-east", "eu-west", "grpc", "127.0.0.1", echo.port,
                              rtt_seconds=0.04)
    async with connection(link.listen_port) as (reader, writer):
        writer.write(b"last words")
        writer.write_eof()
        async with asyncio.timeout(WAIT):
            assert await reader.read() == b"last words"  # read() returns at EOF, not at reset
    assert link.state()["bytes_down"] == 10


async def test_unreachable_server_resets_the_client(wan: WanEmulator) -> None:
    """When the remote server is down the client is reset rather than left hanging."""
    spare = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    dead_port = spare.sockets[0].getsockname()[1]
    spare.close()
    await spare.wait_closed()
    link = await wan.add_link("us-east", "eu-west", "redis", "127.0.0.1", dead_port,
                              rtt_seconds=0.01)
    async with connection(link.listen_port) as (reader, writer):
        writer.write(b"anyone?")
        assert await closed_within(reader, WAIT)
    assert link.state()["connect_failures"] == 1


async def test_blackhole_holds_traffic_and_delivers_it_after_heal(
    wan: WanEmulator, echo: EchoServer
) -> None:
    """A blackhole keeps connections open and silent; on heal the held bytes arrive in order."""
    link = await wan.add_link("ap-southeast", "us-east", "redis", "127.0.0.1", echo.port,
                              rtt_seconds=0.02)
    async with connection(link.listen_port) as (reader_a, writer_a):
        await round_trip(reader_a, writer_a)
        wan.cut("ap-southeast", "us-east", mode="blackhole")
        writer_a.write(b"held-by-A;")
        writer_a.write(b"and-more")
        async with connection(link.listen_port) as (reader_b, writer_b):
            writer_b.write(b"held-by-B")
            assert await nothing_within(reader_a, 0.3)
            assert await nothing_within(reader_b, 0.05)
            state = link.state()
            assert state["cut"] == "blackhole" and state["connections_active"] == 2
            assert echo.accepted == 1  # B's connection attempt has not reached the server yet
            # A client that gives up during the partition never reaches the server at all.
            async with connection(link.listen_port) as (_reader_c, writer_c):
                writer_c.write(b"gave-up")
                writer_c.close()
            assert await eventually(lambda: link.connections_active == 2, WAIT)

            wan.heal("ap-southeast", "us-east")
            async with asyncio.timeout(WAIT):
                assert await reader_a.readexactly(18) == b"held-by-A;and-more"
                assert await reader_b.readexactly(9) == b"held-by-B"
            assert echo.accepted == 2
            assert await round_trip(reader_b, writer_b) >= 0.018


async def test_blackhole_buffer_is_bounded(echo: EchoServer) -> None:
    """Past the blackhole buffer limit the connection is reset instead of growing memory."""
    emulator = WanEmulator(blackhole_limit=256 * 1024)
    try:
        link = await emulator.add_link("us-east", "eu-west", "postgres", "127.0.0.1", echo.port,
                                       rtt_seconds=0.01)
        async with connection(link.listen_port) as (reader, writer):
            await round_trip(reader, writer)
            link.cut("blackhole")
            writer.write(b"x" * (1024 * 1024))
            assert await closed_within(reader, WAIT)
        assert link.state()["connections_overflowed"] == 1
    finally:
        await emulator.close()


async def test_control_api_from_another_thread(wan: WanEmulator, echo: EchoServer) -> None:
    """The HTTP API adds, sets, cuts and heals links while the emulator's loop keeps running."""
    control = ControlServer(wan)
    await control.start()
    client = WanControl(control.url)
    try:
        added = await asyncio.to_thread(
            client.add, "us-east", "eu-west", "grpc", "127.0.0.1", echo.port, rtt_ms=50
        )
        port = added["listen_port"]
        assert port > 0 and added["rtt_ms"] == 50.0 and added["cut"] is None
        links = await asyncio.to_thread(client.links)
        assert [(x["src"], x["dst"], x["service"]) for x in links] == [
            ("us-east", "eu-west", "grpc")
        ]
        async with connection(port) as (reader, writer):
            assert 0.045 <= await round_trip(reader, writer)
            changed = await asyncio.to_thread(client.set, "us-east", "eu-west", rtt_ms=150)
            assert changed[0]["rtt_ms"] == 150.0
            assert 0.135 <= await round_trip(reader, writer)
            cut = await asyncio.to_thread(client.cut, "eu-west", "us-east")
            assert cut[0]["cut"] == "reset"
            assert await closed_within(reader, WAIT)
        await asyncio.to_thread(client.heal, "eu-west", "us-east")
        async with connection(port) as (reader, writer):
            await round_trip(reader, writer)
        state = await asyncio.to_thread(client.links)
        assert state[0]["connections_total"] == 2 and state[0]["bytes_up"] == 12

        with pytest.raises(WanControlError) as missing:
            await asyncio.to_thread(client.cut, "us-east", "ap-southeast")
        assert missing.value.status == 404
        with pytest.raises(WanControlError) as bad_mode:
            await asyncio.to_thread(client.cut, "us-east", "eu-west", "drop")  # type: ignore[arg-type]
        assert bad_mode.value.status == 400
        with pytest.raises(WanControlError) as duplicate:
            await asyncio.to_thread(
                client.add, "us-east", "eu-west", "grpc", "127.0.0.1", echo.port
            )
        assert duplicate.value.status == 400

        def raw_errors() -> list[int]:
            with httpx.Client(base_url=control.url, timeout=5) as http:
                return [
                    http.get("/nope").status_code,
                    http.get("/links/cut").status_code,
                    http.post("/links/set", content=b"{not json").status_code,
                    http.post("/links/set", json={"src": "us-east"}).status_code,
                    http.get("/health").status_code,
                ]

        assert await asyncio.to_thread(raw_errors) == [404, 405, 400, 400, 200]
    finally:
        await asyncio.to_thread(client.close)
        await control.close()


async def test_emulator_process_is_controlled_over_http_and_stops_on_sigterm(
    echo: EchoServer, tmp_path: Path
) -> None:
    """`python -m cluster.wan` runs links from a config, obeys the API, exits 0 on SIGTERM."""
    config = tmp_path / "links.json"
    config.write_text(json.dumps({"links": [{
        "src": "us-east", "dst": "eu-west", "service": "postgres",
        "target_host": "127.0.0.1", "target_port": echo.port, "rtt_ms": 100,
    }]}))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cluster.wan", "--control-port", "0", "--config", str(config),
        cwd=REPO_ROOT, stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(WAIT):
            ready = json.loads(await proc.stdout.readline())
        port = ready["links"][0]["listen_port"]
        client = WanControl(ready["control_url"])
        try:
            async with connection(port) as (reader, writer):
                rtt = await round_trip(reader, writer)
                assert 0.09 <= rtt
                await asyncio.to_thread(client.cut, "us-east", "eu-west", "blackhole")
                writer.write(b"during-partition")
                assert await nothing_within(reader, 0.3)
                await asyncio.to_thread(client.heal, "us-east", "eu-west")
                async with asyncio.timeout(WAIT):
                    assert await reader.readexactly(16) == b"during-partition"
                await asyncio.to_thread(client.cut, "us-east", "eu-west")
                assert await closed_within(reader, WAIT)
            links = await asyncio.to_thread(client.links)
            assert links[0]["cut"] == "reset" and links[0]["connections_total"] == 1
        finally:
            await asyncio.to_thread(client.close)
        os.kill(proc.pid, signal.SIGTERM)
        async with asyncio.timeout(WAIT):
            assert await proc.wait() == 0
        print(f"\nprocess: rtt=100ms link via subprocess measured {rtt * 1000:.1f} ms")
    finally:
        if proc.returncode is None:
            os.kill(proc.pid, signal.SIGKILL)
            await proc.wait()


async def test_link_rejects_bad_settings() -> None:
    """Negative or non-finite delays and unknown cut modes are refused."""
    link = Link("us-east", "eu-west", "grpc", "127.0.0.1", 1)
    with pytest.raises(ValueError):
        link.set(rtt_seconds=-0.1)
    with pytest.raises(ValueError):
        link.set(jitter_seconds=float("nan"))
    with pytest.raises(ValueError):
        link.cut("drop")  # type: ignore[arg-type]
