"""Multi-region: ownership, heartbeats, cross-region transfer messages and their results.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

# Every unique key below can only ever be inserted by one region: a region inserts its
# own ownership and heartbeat rows, the payer's region inserts the transfer message, the
# payee's region inserts the result. So logical replication never meets insert_exists.
DDL = """
CREATE TABLE region_ownership (
    home_region TEXT PRIMARY KEY,
    serving_region TEXT NOT NULL,
    epoch BIGINT NOT NULL DEFAULT 1,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE heartbeats (
    region TEXT PRIMARY KEY,
    seq BIGINT NOT NULL,
    sent_at TIMESTAMPTZ NOT NULL
);

CREATE TABLE transfers (
    id UUID PRIMARY KEY,
    payment_id UUID NOT NULL,
    payer_id UUID NOT NULL,
    payee_id UUID NOT NULL,
    from_home TEXT NOT NULL,
    to_home TEXT NOT NULL,
    amount BIGINT NOT NULL CHECK (amount > 0),
    currency CHAR(3) NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX ix_transfers_payment ON transfers (payment_id);
CREATE INDEX ix_transfers_to_home ON transfers (to_home, created_at);

CREATE TABLE transfer_results (
    transfer_id UUID PRIMARY KEY,
    payment_id UUID NOT NULL,
    from_home TEXT NOT NULL,
    outcome TEXT NOT NULL CHECK (outcome IN ('credited', 'rejected')),
    reason TEXT,
    journal_id UUID,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX ix_transfer_results_from ON transfer_results (from_home, created_at);

CREATE INDEX ix_payments_processing ON payments (home_region) WHERE status = 'processing';

ALTER TABLE journal_entries ADD COLUMN region TEXT;
-- A cross-region payment names a payee that lives (and may so far only exist) in
-- another region: the payee's region checks it, not a local foreign key.
ALTER TABLE payments DROP CONSTRAINT payments_payee_id_fkey;
ALTER TABLE payments ADD COLUMN payee_home TEXT;
ALTER TABLE payments ADD COLUMN epoch BIGINT;
"""


def upgrade() -> None:
    op.execute(DDL)


def downgrade() -> None:
    op.execute("DROP TABLE IF EXISTS transfer_results, transfers, heartbeats, region_ownership")
    op.execute("DROP INDEX IF EXISTS ix_payments_processing")
    op.execute("ALTER TABLE journal_entries DROP COLUMN IF EXISTS region")
    op.execute("ALTER TABLE payments DROP COLUMN IF EXISTS payee_home, DROP COLUMN IF EXISTS epoch")
