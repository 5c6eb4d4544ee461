"""Initial ledger schema: accounts, journal, payments, refunds, TCC barrier, idempotency, outbox.

Revision ID: 0001
Revises:
Create Date: 2026-11-26
"""

from __future__ import annotations

from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

# Frozen DDL of this revision (region_node/schema.py describes the current shape for queries;
# later revisions change the schema with explicit operations, never by re-reading schema.py).
TABLES = """
CREATE TABLE accounts (
    id UUID NOT NULL,
    currency CHAR(3) NOT NULL,
    kind TEXT NOT NULL,
    home_region TEXT NOT NULL,
    balance BIGINT DEFAULT '0' NOT NULL,
    held BIGINT DEFAULT '0' NOT NULL,
    allow_overdraft BOOLEAN DEFAULT false NOT NULL,
    status TEXT DEFAULT 'open' NOT NULL,
    created_at TIMESTAMP WITH TIME ZONE DEFAULT now() NOT NULL,
    updated_at TIMESTAMP WITH TIME ZONE DEFAULT now() NOT NULL,
    PRIMARY KEY (id),
    CONSTRAINT ck_account_kind CHECK (kind in ('customer','merchant','funding','clearing')),
    CONSTRAINT ck_account_status CHECK (status in ('open','closed')),
    CONSTRAINT ck_account_held CHECK (held >= 0),
    CONSTRAINT ck_account_available CHECK (allow_overdraft or balance - held >= 0)
);

CREATE UNIQUE INDEX uq_system_account ON accounts (home_region, kind, currency) WHERE kind in ('funding','clearing');

CREATE TABLE idempotency_keys (
    scope TEXT NOT NULL,
    key TEXT NOT NULL,
    request_hash TEXT NOT NULL,
    state TEXT NOT NULL,
    locked_at TIMESTAMP WITH TIME ZONE,
    response_status INTEGER,
    response_body JSONB,
    created_at TIMESTAMP WITH TIME ZONE DEFAULT now() NOT NULL,
    expires_at TIMESTAMP WITH TIME ZONE NOT NULL,
    PRIMARY KEY (scope, key),
    CONSTRAINT ck_idem_state CHECK (state in ('started','finished'))
);

CREATE INDEX ix_idem_expires ON idempotency_keys (expires_at);

CREATE TABLE notifications (
    event_id UUID NOT NULL,
    event_type TEXT NOT NULL,
    aggregate_id UUID NOT NULL,
    payload JSONB NOT NULL,
    deliveries INTEGER DEFAULT '1' NOT NULL,
    received_at TIMESTAMP WITH TIME ZONE DEFAULT now() NOT NULL,
    PRIMARY KEY (event_id)
);

CREATE INDEX ix_notifications_aggregate ON notifications (aggregate_id);

CREATE TABLE outbox (
    id UUID NOT NULL,
    region TEXT NOT NULL,
    event_type TEXT NOT NULL,
    aggregate_id UUID NOT NULL,
    payload JSONB NOT NULL,
    created_at TIMESTAMP WITH TIME ZONE DEFAULT now() NOT NULL,
    published_at TIMESTAMP WITH TIME ZONE,
    PRIMARY KEY (id)
);

CREATE INDEX ix_outbox_unpublished ON outbox (region, id) WHERE published_at is null;

CREATE TABLE tcc_barrier (
    gid UUID NOT NULL,
    branch_id TEXT NOT NULL,
    op TEXT NOT NULL,
    reason TEXT NOT NULL,
    created_at TIMESTAMP WITH TIME ZONE DEFAULT now() NOT NULL,
    PRIMARY KEY (gid, branch_id, op),
    CONSTRAINT ck_barrier_op CHECK (op in ('try','confirm','cancel'))
);

CREATE TABLE journal_entries (
    id UUID NOT NULL,
    journal_id UUID NOT NULL,
    account_id UUID NOT NULL,
    amount BIGINT NOT NULL,
    currency CHAR(3) NOT NULL,
    entry_type TEXT NOT NULL,
    payment_id UUID,
    created_at TIMESTAMP WITH TIME ZONE DEFAULT now() NOT NULL,
    PRIMARY KEY (id),
    CONSTRAINT ck_entry_nonzero CHECK (amount <> 0),
    FOREIGN KEY(account_id) REFERENCES accounts (id)
);

CREATE INDEX ix_entries_account ON journal_entries (account_id, id DESC);

CREATE INDEX ix_entries_journal ON journal_entries (journal_id);

CREATE INDEX ix_entries_payment ON journal_entries (payment_id);

CREATE TABLE payments (
    id UUID NOT NULL,
    payer_id UUID NOT NULL,
    payee_id UUID NOT NULL,
    amount BIGINT NOT NULL,
    currency CHAR(3) NOT NULL,
    capture_method TEXT NOT NULL,
    status TEXT NOT NULL,
    amount_held BIGINT DEFAULT '0' NOT NULL,
    amount_captured BIGINT DEFAULT '0' NOT NULL,
    amount_refunded BIGINT DEFAULT '0' NOT NULL,
    hold_expires_at TIMESTAMP WITH TIME ZONE,
    description TEXT,
    failure_code TEXT,
    home_region TEXT NOT NULL,
    created_at TIMESTAMP WITH TIME ZONE DEFAULT now() NOT NULL,
    updated_at TIMESTAMP WITH TIME ZONE DEFAULT now() NOT NULL,
    PRIMARY KEY (id),
    CONSTRAINT ck_payment_amount CHECK (amount > 0),
    CONSTRAINT ck_payment_capture CHECK (capture_method in ('automatic','manual')),
    CONSTRAINT ck_payment_status CHECK (status in ('requires_capture','processing','succeeded','canceled','failed')),
    CONSTRAINT ck_payment_captured CHECK (amount_captured <= amount),
    CONSTRAINT ck_payment_refunded CHECK (amount_refunded <= amount_captured),
    CONSTRAINT ck_payment_held CHECK (amount_held >= 0),
    FOREIGN KEY(payer_id) REFERENCES accounts (id),
    FOREIGN KEY(payee_id) REFERENCES accounts (id)
);

CREATE INDEX ix_payments_expiring ON payments (hold_expires_at) WHERE status = 'requires_capture';

CREATE TABLE refunds (
    id UUID NOT NULL,
    payment_id UUID NOT NULL,
    amount BIGINT NOT NULL,
    currency CHAR(3) NOT NULL,
    status TEXT DEFAULT 'succeeded' NOT NULL,
    created_at TIMESTAMP WITH TIME ZONE DEFAULT now() NOT NULL,
    PRIMARY KEY (id),
    CONSTRAINT ck_refund_amount CHECK (amount > 0),
    FOREIGN KEY(payment_id) REFERENCES payments (id)
);

CREATE INDEX ix_refunds_payment ON refunds (payment_id);
"""

# Journal rows are facts: they are never updated or deleted, only compensated by new rows.
# A deferred constraint trigger checks at commit that every journal (one posting) sums to
# zero, so no code path, and no crash between two statements, can leave the ledger unbalanced.
TRIGGERS = """
CREATE FUNCTION journal_immutable() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'journal entries are immutable' USING ERRCODE = 'P0001';
END $$;

CREATE TRIGGER journal_no_update BEFORE UPDATE OR DELETE ON journal_entries
    FOR EACH ROW EXECUTE FUNCTION journal_immutable();

CREATE FUNCTION journal_balanced() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    unbalanced int;
BEGIN
    SELECT count(*) INTO unbalanced FROM (
        SELECT currency FROM journal_entries WHERE journal_id = NEW.journal_id
        GROUP BY currency HAVING sum(amount) <> 0) s;
    IF unbalanced > 0 THEN
        RAISE EXCEPTION 'journal % does not balance', NEW.journal_id USING ERRCODE = 'P0002';
    END IF;
    RETURN NULL;
END $$;

CREATE CONSTRAINT TRIGGER journal_must_balance AFTER INSERT ON journal_entries
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION journal_balanced();
"""


def upgrade() -> None:
    op.execute(TABLES)
    op.execute(TRIGGERS)


def downgrade() -> None:
    for table in ("notifications", "outbox", "idempotency_keys", "tcc_barrier", "refunds",
                  "journal_entries", "payments", "accounts"):
        op.execute(f"DROP TABLE IF EXISTS {table} CASCADE")
    op.execute("DROP FUNCTION IF EXISTS journal_immutable() CASCADE")
    op.execute("DROP FUNCTION IF EXISTS journal_balanced() CASCADE")
