"""External payment channels: pay-ins and payouts through the acquirer, their callback
inbox, and the system accounts they move money through.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-02
"""

from __future__ import annotations

from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None

# Three new system account kinds per region and currency (region_node.ledger):
# - channel: the acquirer's clearing account. A confirmed card pay-in is paid out of it
#   (it goes negative like `funding`: money that entered the cluster from outside), a
#   settled payout pays into it, and fees are charged through it.
# - payout: money on its way out to a bank, between the customer's debit and the
#   channel's answer (paid: to `channel`; returned or failed: back to the customer).
# - fees: the channel's fees, posted by statement reconciliation.
#
# channel_operations and channel_callbacks replicate; every row is inserted and updated
# only by the region that serves the account's home region (the operation id is a
# UUIDv7 stamped with that home, the inbox key is the channel's event id, which reaches
# that owner only: callbacks arriving elsewhere are forwarded to it).
DDL = """
ALTER TABLE accounts DROP CONSTRAINT ck_account_kind;
ALTER TABLE accounts ADD CONSTRAINT ck_account_kind
    CHECK (kind in ('customer','merchant','funding','clearing','suspense',
                    'channel','payout','fees'));
DROP INDEX uq_system_account;
CREATE UNIQUE INDEX uq_system_account ON accounts (home_region, kind, currency)
    WHERE kind in ('funding','clearing','suspense','channel','payout','fees');

CREATE TABLE channel_operations (
    id UUID PRIMARY KEY,
    kind TEXT NOT NULL,
    account_id UUID NOT NULL REFERENCES accounts(id),
    home_region TEXT NOT NULL,
    amount BIGINT NOT NULL,
    currency CHAR(3) NOT NULL,
    status TEXT NOT NULL,
    failure_code TEXT,
    channel_status TEXT,
    channel_version INTEGER NOT NULL DEFAULT 0,
    card_last4 TEXT,
    card_brand TEXT,
    bank_account TEXT,
    holder_name TEXT,
    fee BIGINT,
    sync_attempts INTEGER NOT NULL DEFAULT 0,
    next_check_at TIMESTAMPTZ,
    settled_by TEXT,
    settled_at TIMESTAMPTZ,
    epoch BIGINT,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT ck_chop_kind CHECK (kind in ('payin','payout')),
    CONSTRAINT ck_chop_amount CHECK (amount > 0),
    CONSTRAINT ck_chop_status CHECK (status in
        ('queued','pending','succeeded','paid','returned','failed'))
);
CREATE INDEX ix_chop_waiting ON channel_operations (home_region, next_check_at)
    WHERE status in ('queued','pending');
CREATE INDEX ix_chop_account ON channel_operations (account_id, id DESC);

CREATE TABLE channel_callbacks (
    event_id TEXT PRIMARY KEY,
    operation_id UUID,
    reference TEXT NOT NULL,
    event_type TEXT NOT NULL,
    version INTEGER NOT NULL,
    outcome TEXT NOT NULL,
    region TEXT NOT NULL,
    received_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX ix_chcb_operation ON channel_callbacks (operation_id);
"""

UNDO = """
DROP TABLE IF EXISTS channel_callbacks, channel_operations;
DROP INDEX uq_system_account;
CREATE UNIQUE INDEX uq_system_account ON accounts (home_region, kind, currency)
    WHERE kind in ('funding','clearing','suspense');
ALTER TABLE accounts DROP CONSTRAINT ck_account_kind;
ALTER TABLE accounts ADD CONSTRAINT ck_account_kind
    CHECK (kind in ('customer','merchant','funding','clearing','suspense'));
"""


def upgrade() -> None:
    op.execute(DDL)


def downgrade() -> None:
    op.execute(UNDO)
