"""The running parts of one region node, shared by the API routes and the workers."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import timedelta

from redis.asyncio import Redis

from region_node.config import RegionSettings
from region_node.db import Database
from region_node.hot_path import HotPath
from region_node.idempotency import IdempotencyStore
from region_node.ids import new_id
from region_node.metrics import NodeMetrics
from region_node.ownership import OwnershipMap
from region_node.regions import RegionCatalog
from region_node.rpc.client import PeerClients
from region_node.rpc.tls import RpcTls


@dataclass
class Node:
    """Connections and services of a region node; built once in the app's lifespan."""

    settings: RegionSettings
    db: Database
    redis: Redis
    idempotency: IdempotencyStore
    metrics: NodeMetrics
    catalog: RegionCatalog
    ownership: OwnershipMap
    peers: PeerClients
    # The payment hot path's own connections (None: disabled, every payment takes the
    # general path).
    hot_path: HotPath | None = None

    @property
    def region(self) -> str:
        """This node's region name."""
        return self.settings.region

    @property
    def hold_ttl(self) -> timedelta:
        """How long a manual-capture hold lives before the expiry worker releases it."""
        return timedelta(seconds=self.settings.hold_ttl_seconds)

    @classmethod
    def connect(cls, settings: RegionSettings) -> Node:
        """Create pools and clients (lazy: nothing is contacted until first use)."""
        db = Database(settings.database_url, pool_size=settings.db_pool_size,
                      max_overflow=settings.db_max_overflow,
                      retry_attempts=settings.db_retry_attempts, region=settings.region)
        redis = Redis.from_url(settings.redis_url, socket_timeout=0.5,
                               socket_connect_timeout=0.5)
        node = cls(settings=settings, db=db, redis=redis,
                   idempotency=IdempotencyStore(db, redis,
                                                ttl_seconds=settings.idempotency_ttl_seconds,
                                                lock_seconds=settings.idempotency_lock_seconds,
                                                region=settings.region),
                   metrics=NodeMetrics(settings.region),
                   catalog=RegionCatalog(settings.region_codes),
                   ownership=OwnershipMap(db, settings.region, settings.ownership_refresh_seconds),
                   peers=PeerClients(settings.region, settings.peers,
                                     settings.grpc_deadline_seconds,
                                     tls=RpcTls.from_settings(settings),
                                     insecure_loopback_only=(
                                         settings.grpc_insecure_loopback_only)),
                   hot_path=HotPath(settings.database_url, region=settings.region,
                                    executors=settings.hot_path_executors,
                                    batch_max=settings.hot_path_batch_max,
                                    lock_timeout_ms=settings.hot_path_lock_timeout_ms,
                                    ttl_seconds=settings.idempotency_ttl_seconds,
                                    lock_seconds=settings.idempotency_lock_seconds)
                   if settings.hot_path else None)
        if node.hot_path is not None:
            node.hot_path.wakeups = db.wakeups
        return node

    def new_id(self, home_region: str) -> uuid.UUID:
        """A UUIDv7 stamped with `home_region` (see region_node.regions)."""
        return self.catalog.stamp(new_id(), home_region)

    def home_of(self, value: uuid.UUID) -> str | None:
        """The home region an id was stamped with."""
        return self.catalog.home_of(value)

    async def close(self) -> None:
        """Close pools and clients."""
        await self.peers.close()
        if self.hot_path is not None:
            await self.hot_path.close()
        await self.redis.aclose()
        await self.db.dispose()
