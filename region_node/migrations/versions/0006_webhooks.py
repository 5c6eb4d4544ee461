"""Signed webhooks: endpoints, secrets, deletions, deliveries, attempts, local queues.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-26
"""

from __future__ import annotations

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

# Replicated tables are insert-only, and every key is a UUIDv7 stamped by the region that
# inserts it, so no two regions ever write the same row (zero replication conflicts):
# - an endpoint is never updated: a deletion is a row of its own (any region may insert
#   one, a second deletion is harmless);
# - a rotation inserts a new secret whose `previous_expire_at` retires every older secret
#   of the endpoint at that time (the old secrets' rows stay as they were);
# - only the region that produced an event (its outbox is local) fans it out and
#   delivers it: its `webhook_deliveries` and `webhook_attempts` rows have one writer.
# `webhook_queue` (the mutable retry schedule of this region's deliveries) and
# `webhook_pending_events` (events not fanned out yet) are local.
DDL = """
CREATE TABLE webhook_endpoints (
    id UUID PRIMARY KEY,
    principal_id UUID NOT NULL,
    url TEXT NOT NULL,
    event_types TEXT[] NOT NULL,
    receives_all BOOLEAN NOT NULL DEFAULT false,
    home_region TEXT NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT ck_webhook_event_types CHECK (cardinality(event_types) > 0)
);
CREATE INDEX ix_webhook_endpoints_principal ON webhook_endpoints (principal_id);

CREATE TABLE webhook_secrets (
    id UUID PRIMARY KEY,
    endpoint_id UUID NOT NULL,
    secret TEXT NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    expires_at TIMESTAMPTZ,
    previous_expire_at TIMESTAMPTZ
);
CREATE INDEX ix_webhook_secrets_endpoint ON webhook_secrets (endpoint_id, id);

CREATE TABLE webhook_endpoint_deletions (
    id UUID PRIMARY KEY,
    endpoint_id UUID NOT NULL,
    deleted_by UUID,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX ix_webhook_deletions_endpoint ON webhook_endpoint_deletions (endpoint_id);

CREATE TABLE webhook_deliveries (
    id UUID PRIMARY KEY,
    endpoint_id UUID NOT NULL,
    event_id UUID NOT NULL,
    event_type TEXT NOT NULL,
    region TEXT NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT uq_webhook_delivery UNIQUE (endpoint_id, event_id)
);

CREATE TABLE webhook_attempts (
    id UUID PRIMARY KEY,
    delivery_id UUID NOT NULL,
    endpoint_id UUID NOT NULL,
    attempt INTEGER NOT NULL CHECK (attempt > 0),
    attempted_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    status_code INTEGER,
    error TEXT,
    duration_ms INTEGER NOT NULL,
    outcome TEXT NOT NULL,
    next_attempt_at TIMESTAMPTZ,
    region TEXT NOT NULL,
    CONSTRAINT ck_webhook_attempt_outcome CHECK (outcome IN ('delivered','retrying','failed')),
    CONSTRAINT uq_webhook_attempt UNIQUE (delivery_id, attempt)
);
CREATE INDEX ix_webhook_attempts_endpoint ON webhook_attempts (endpoint_id, delivery_id);

CREATE TABLE webhook_queue (
    delivery_id UUID PRIMARY KEY,
    endpoint_id UUID NOT NULL,
    event_id UUID NOT NULL,
    body TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    due_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    lease_until TIMESTAMPTZ,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX ix_webhook_queue_due ON webhook_queue (due_at);

-- Local: the outbox events not fanned out yet, filled by a trigger in the transaction
-- that writes the event (so none is missed, whatever code path writes the outbox) and
-- emptied by the fan-out. A table of its own, not a column of the outbox: the relay
-- holds its outbox rows locked while it publishes a batch, and marking those rows would
-- wait for it (up to a second per batch of delivery latency).
CREATE TABLE webhook_pending_events (
    event_id UUID PRIMARY KEY,
    region TEXT NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE FUNCTION webhook_pending_from_outbox() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO webhook_pending_events (event_id, region) VALUES (NEW.id, NEW.region);
    RETURN NEW;
END $$;

CREATE TRIGGER outbox_webhook_pending AFTER INSERT ON outbox
    FOR EACH ROW EXECUTE FUNCTION webhook_pending_from_outbox();
"""


def upgrade() -> None:
    op.execute(DDL)


def downgrade() -> None:
    op.execute("DROP TRIGGER IF EXISTS outbox_webhook_pending ON outbox")
    op.execute("DROP FUNCTION IF EXISTS webhook_pending_from_outbox()")
    op.execute("DROP TABLE IF EXISTS webhook_pending_events, webhook_queue, webhook_attempts, "
               "webhook_deliveries, webhook_endpoint_deletions, webhook_secrets, "
               "webhook_endpoints")
