"""A region that dies in the middle of its answer, behind a real geo router.

Two stand-in regions on raw sockets (the router sees HTTP/1.1 from each, nothing more):
both answer the health probe; us-east then sends a status line and a Content-Length for
everything else and resets the connection before the body, as a node killed between its
headers and its body would; eu-west answers in full. The router reads small answers whole
before relaying them, so the client never gets a truncated message: a safe request (GET,
or a POST with an Idempotency-Key) is retried on eu-west, any other request gets a 502
`upstream_broken` in the error shape and is never sent to eu-west.
"""

from __future__ import annotations

import json
import socket
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import pytest

from cluster.lab import RouterProcess, start_router
from tests.helpers import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

READY = json.dumps({"status": "ready"}).encode()
ANSWER = json.dumps({"id": "acct_1", "home_region": "eu-west"}).encode()


@dataclass
class StandIn:
    """A one-thread-per-connection HTTP/1.1 server on 127.0.0.1 that answers
    `GET /health/ready` in full and everything else in full or broken off."""

    breaks: bool
    requests: list[str] = field(default_factory=list)
    sock: socket.socket = field(default_factory=socket.socket)

    def start(self) -> int:
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        threading.Thread(target=self._accept, daemon=True).start()
        return int(self.sock.getsockname()[1])

    def stop(self) -> None:
        self.sock.close()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            buf = b""
            while True:
                while b"\r\n\r\n" not in buf:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    buf += chunk
                head, _, buf = buf.partition(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                length = next((int(v) for k, _, v in (line.partition(":") for line in lines[1:])
                               if k.strip().lower() == "content-length"), 0)
                while len(buf) < length:
                    buf += conn.recv(65536)
                buf = buf[length:]
                request = lines[0].rsplit(" ", 1)[0]
                if request == "GET /health/ready":
                    body, broken = READY, False
                else:
                    self.requests.append(request)
                    body, broken = ANSWER, self.breaks
                conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                             b"content-length: %d\r\n\r\n" % len(body))
                if broken:
                    # A reset (linger 0), as from a process killed mid-answer.
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                    struct.pack("ii", 1, 0))
                    return
                conn.sendall(body)


@pytest.fixture(scope="module")
def regions() -> Iterator[dict[str, StandIn]]:
    """us-east breaks off its answers, eu-west answers in full."""
    stand_ins = {"us-east": StandIn(breaks=True), "eu-west": StandIn(breaks=False)}
    try:
        yield stand_ins
    finally:
        for stand_in in stand_ins.values():
            stand_in.stop()


@pytest.fixture(scope="module")
def router(regions: dict[str, StandIn],
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[RouterProcess]:
    """A router whose catalog names the two stand-ins; stopped by its pid even on failure."""
    data_dir = tmp_path_factory.mktemp("router-broken")
    catalog = data_dir / "catalog.json"
    catalog.write_text(json.dumps({"regions": [
        {"name": name, "endpoint": f"http://127.0.0.1:{stand_in.start()}"}
        for name, stand_in in regions.items()]}))
    proc = start_router(data_dir, "us-east", {
        "PAYCLUSTER_ROUTER_CATALOG_FILE": str(catalog),
        "PAYCLUSTER_ROUTER_PREFER_OWNER": "false",
        "PAYCLUSTER_ROUTER_PROBE_INTERVAL_SECONDS": "0.5"})
    try:
        yield proc
    finally:
        proc.stop()


def _send(router: RouterProcess, method: str, key: str | None = None) -> httpx.Response:
    headers = {"X-Client-Region": "us-east", **({"Idempotency-Key": key} if key else {})}
    return httpx.request(method, f"{router.url}/v1/accounts", headers=headers, timeout=20,
                         json={"currency": "USD"} if method == "POST" else None)


def test_a_broken_answer_is_retried_when_safe_and_a_clear_502_otherwise(
        router: RouterProcess, regions: dict[str, StandIn]) -> None:
    # Both stand-ins routable first (the router probes them on its own).
    wait_for(lambda: _send(router, "GET").status_code == 200, 30, "the regions to be routable")
    east, west = regions["us-east"], regions["eu-west"]
    east.requests.clear()
    west.requests.clear()

    got = _send(router, "GET")
    assert got.status_code == 200 and got.content == ANSWER
    assert (got.headers["Paycluster-Routed-To"], got.headers["Paycluster-Route-Attempts"],
            got.headers["Paycluster-Route-Reason"]) == ("eu-west", "2", "failover")

    keyed = _send(router, "POST", key="broken-answer-1")
    assert keyed.status_code == 200 and keyed.content == ANSWER
    assert keyed.headers["Paycluster-Route-Attempts"] == "2"

    plain = _send(router, "POST")
    assert plain.status_code == 502, plain.text
    err = plain.json()["error"]
    assert err["code"] == "upstream_broken" and "Idempotency-Key" in err["message"]
    assert (plain.headers["Paycluster-Routed-To"],
            plain.headers["Paycluster-Route-Attempts"]) == ("us-east", "1")
    # Each request went to us-east once; only the safe ones went on to eu-west.
    assert east.requests == ["GET /v1/accounts", "POST /v1/accounts", "POST /v1/accounts"]
    assert west.requests == ["GET /v1/accounts", "POST /v1/accounts"]
