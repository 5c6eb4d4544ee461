"""The region's event bus: NATS JetStream (docs/architecture.md, "Flows", "Events").

One stream (`settings.events_stream`) holds every event under
`<events_subject_prefix>.<region>.<event_type>`. The outbox row id travels as the
`Nats-Msg-Id` header, so JetStream drops a re-publish of the same event inside the
stream's duplicate window, and consumers key their effects on the same id.

The connection reconnects by itself for as long as the process lives; callers only ask
`connect()` whether the bus is usable right now and never block on an outage.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import PubAck, StorageType, StreamConfig

from region_node.config import RegionSettings

log = logging.getLogger(__name__)

DUPLICATE_WINDOW_SECONDS = 300.0
"""JetStream dedupe window. A relay that crashed between publish and mark and comes back
within this window re-publishes without creating a duplicate message; after it, the
consumer's idempotency still keeps the effect single."""

MSG_ID_HEADER = "Nats-Msg-Id"
EVENT_TYPE_HEADER = "Paycluster-Event-Type"
AGGREGATE_ID_HEADER = "Paycluster-Aggregate-Id"
REGION_HEADER = "Paycluster-Region"


class BusUnavailable(RuntimeError):
    """The bus cannot take or deliver a message right now; retry later, nothing is lost."""


class MalformedEvent(ValueError):
    """A message on the events stream that is not a paycluster event (cannot be processed)."""


@dataclass(frozen=True)
class BusEvent:
    """One event as it travels on the bus: the outbox row minus its bookkeeping columns.

    `envelope` is the outbox payload (`{"id", "type", "region", "data"}`) and becomes the
    message body unchanged; the ids that consumers need without parsing the body travel
    as headers.
    """

    id: uuid.UUID
    region: str
    event_type: str
    aggregate_id: uuid.UUID
    envelope: dict[str, Any]

    def headers(self) -> dict[str, str]:
        """Message headers; `Nats-Msg-Id` is what JetStream dedupes on."""
        return {MSG_ID_HEADER: str(self.id), EVENT_TYPE_HEADER: self.event_type,
                AGGREGATE_ID_HEADER: str(self.aggregate_id), REGION_HEADER: self.region}

    def body(self) -> bytes:
        """The message body: the outbox envelope as compact JSON."""
        return json.dumps(self.envelope, separators=(",", ":"), sort_keys=True).encode()

    @classmethod
    def from_msg(cls, msg: Msg) -> BusEvent:
        """Decode a delivered message; raises MalformedEvent if it is not one of ours."""
        headers = msg.headers or {}
        try:
            envelope = json.loads(msg.data)
            if not isinstance(envelope, dict):
                raise MalformedEvent("event body is not a JSON object")
            return cls(
                id=uuid.UUID(str(envelope.get("id") or headers[MSG_ID_HEADER])),
                region=str(envelope.get("region") or headers[REGION_HEADER]),
                event_type=str(envelope.get("type") or headers[EVENT_TYPE_HEADER]),
                aggregate_id=uuid.UUID(headers[AGGREGATE_ID_HEADER]),
                envelope=envelope)
        except MalformedEvent:
            raise
        except (KeyError, ValueError, TypeError) as exc:
            raise MalformedEvent(f"undecodable event on {msg.subject}: {exc!r}") from exc


def event_subject(prefix: str, region: str, event_type: str) -> str:
    """`<prefix>.<region>.<event_type>`; event types are dotted (`payment.succeeded`)."""
    return f"{prefix}.{region}.{event_type}"


class EventBus:
    """A reconnecting NATS connection plus the events stream it publishes to.

    `connect()` is cheap when already connected, so workers call it before every batch:
    it returns False (without raising) while the server is unreachable, and the client
    keeps reconnecting in the background once a first connection was made.
    """

    def __init__(self, settings: RegionSettings, *, connect_timeout: float = 2.0,
                 request_timeout: float = 5.0, reconnect_wait: float = 0.5,
                 duplicate_window: float = DUPLICATE_WINDOW_SECONDS) -> None:
        self.settings = settings
        self.connect_timeout = connect_timeout
        self.request_timeout = request_timeout
        self.reconnect_wait = reconnect_wait
        self.duplicate_window = duplicate_window
        self._nc: NATS | None = None
        self._js: JetStreamContext | None = None
        self._stream_ready = False
        self._lock = asyncio.Lock()
        self._last_error_log = 0.0

    # ------------------------------------------------------------------ connection

    @property
    def is_connected(self) -> bool:
        """True while the NATS connection is up (not while it is reconnecting)."""
        return self._nc is not None and self._nc.is_connected

    @property
    def stream_subjects(self) -> str:
        """Wildcard of every subject the events stream captures."""
        return f"{self.settings.events_subject_prefix}.>"

    def subject(self, region: str, event_type: str) -> str:
        """Subject of an event of `event_type` from `region`."""
        return event_subject(self.settings.events_subject_prefix, region, event_type)

    @property
    def jetstream(self) -> JetStreamContext:
        """The JetStream context; raises BusUnavailable before the first connection."""
        if self._js is None:
            raise BusUnavailable("not connected to NATS")
        return self._js

    async def connect(self) -> bool:
        """Make sure there is a connection and the stream exists; False if not possible now.

        While the client is reconnecting by itself this returns False at once instead of
        opening a second connection.
        """
        async with self._lock:
            nc = self._nc
            if nc is None or nc.is_closed:
                nc = await self._open()
                if nc is None:
                    return False
            if not nc.is_connected:
                return False
            if not self._stream_ready:
                try:
                    await self.ensure_stream()
                except Exception as exc:  # the server is up but JetStream is not (yet)
                    self._log_outage("cannot ensure the events stream", exc)
                    return False
            return True

    async def _open(self) -> NATS | None:
        nc = NATS()
        try:
            # With unlimited reconnects nats-py would retry the *first* connect forever,
            # so that one attempt is bounded here; later outages are handled by the
            # client's own reconnect loop.
            await asyncio.wait_for(nc.connect(
                servers=[self.settings.nats_url], name=f"paycluster-{self.settings.region}",
                allow_reconnect=True, max_reconnect_attempts=-1,
                reconnect_time_wait=self.reconnect_wait,  # type: ignore[arg-type]
                connect_timeout=max(1, int(self.connect_timeout)),
                error_cb=self._on_error, disconnected_cb=self._on_disconnected,
                reconnected_cb=self._on_reconnected),
                timeout=self.connect_timeout)
        except Exception as exc:  # includes the TimeoutError of wait_for
            self._log_outage(f"NATS at {self.settings.nats_url} unreachable", exc)
            with contextlib.suppress(Exception):
                await nc.close()
            return None
        self._nc = nc
        self._js = nc.jetstream(timeout=self.request_timeout)
        self._stream_ready = False
        log.info("connected to NATS at %s", self.settings.nats_url)
        return nc

    async def ensure_stream(self) -> None:
        """Create the events stream, or widen an existing one to what we need.

        Creating with an identical config is idempotent on the server, so several nodes
        may race here safely.
        """
        js = self.jetstream
        name = self.settings.events_stream
        try:
            info = await js.stream_info(name)
        except nats.js.errors.NotFoundError:
            await js.add_stream(StreamConfig(
                name=name, subjects=[self.stream_subjects], storage=StorageType.FILE,
                duplicate_window=self.duplicate_window))
            log.info("created JetStream stream %s (%s)", name, self.stream_subjects)
        else:
            config = info.config
            subjects = list(config.subjects or [])
            if self.stream_subjects not in subjects or (
                    config.duplicate_window or 0) < self.duplicate_window:
                if self.stream_subjects not in subjects:
                    subjects.append(self.stream_subjects)
                config.subjects = subjects
                config.duplicate_window = max(config.duplicate_window or 0,
                                              self.duplicate_window)
                await js.update_stream(config)
                log.warning("updated JetStream stream %s to subjects=%s duplicate_window=%ss",
                            name, subjects, config.duplicate_window)
        self._stream_ready = True

    def recheck_stream(self) -> None:
        """Make the next `connect()` verify (and if needed recreate) the stream."""
        self._stream_ready = False

    async def close(self) -> None:
        """Flush and close the connection (idempotent)."""
        nc, self._nc, self._js = self._nc, None, None
        self._stream_ready = False
        if nc is not None and not nc.is_closed:
            with contextlib.suppress(Exception):
                await nc.close()

    # ------------------------------------------------------------------ publishing

    async def publish(self, event: BusEvent) -> PubAck:
        """Publish one event and wait for JetStream's ack (the message is then stored).

        A re-publish of an id already stored within the duplicate window is acked with
        `duplicate=True` and stores nothing. Raises BusUnavailable when the bus cannot
        take the message now; in that case it may or may not have been stored, which is
        fine because the retry carries the same `Nats-Msg-Id`.
        """
        if not self.is_connected:
            raise BusUnavailable("NATS is disconnected")
        subject = self.subject(event.region, event.event_type)
        for attempt in (1, 2):
            try:
                # `stream=` makes the server refuse the message if some other stream
                # captured the subject, instead of silently storing it elsewhere.
                return await self.jetstream.publish(
                    subject, event.body(), timeout=self.request_timeout,
                    stream=self.settings.events_stream, headers=event.headers())
            except nats.js.errors.NoStreamResponseError as exc:
                # No stream listens: the server lost its state (new data dir). Recreate
                # the stream once and retry; the outbox still has the row either way.
                if attempt == 2:
                    raise BusUnavailable("no JetStream stream answered") from exc
                self._stream_ready = False
                try:
                    await self.ensure_stream()
                except Exception as inner:
                    raise BusUnavailable("cannot recreate the events stream") from inner
            except (nats.errors.TimeoutError, nats.errors.ConnectionClosedError,
                    nats.errors.ConnectionReconnectingError, nats.errors.ConnectionDrainingError,
                    nats.errors.OutboundBufferLimitError, nats.errors.StaleConnectionError,
                    nats.js.errors.ServiceUnavailableError, TimeoutError, OSError) as exc:
                # ServiceUnavailable: JetStream is still starting after a server restart.
                raise BusUnavailable(f"publish to {subject} failed: {exc!r}") from exc
        raise AssertionError("unreachable")

    # ------------------------------------------------------------------ callbacks

    def _log_outage(self, what: str, exc: BaseException) -> None:
        # An outage makes every poll fail; one line per 10 s is enough to see it.
        now = time.monotonic()
        if now - self._last_error_log >= 10.0:
            self._last_error_log = now
            log.warning("%s: %r", what, exc)

    async def _on_error(self, exc: Exception) -> None:
        self._log_outage("NATS client error", exc)

    async def _on_disconnected(self) -> None:
        # Also called by our own close() and by a failed first connect; only a live
        # connection that dropped is worth a warning.
        if self._nc is not None and not self._nc.is_closed:
            log.warning("disconnected from NATS at %s; reconnecting", self.settings.nats_url)

    async def _on_reconnected(self) -> None:
        # The server may have restarted without its store: check the stream again.
        self._stream_ready = False
        log.info("reconnected to NATS at %s", self.settings.nats_url)
