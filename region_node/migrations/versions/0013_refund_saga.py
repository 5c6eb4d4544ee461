"""Refunds as objects with a status; cross-region refunds as a saga (refund_results).

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-02
"""

from __future__ import annotations

from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None

# A refund row is inserted and updated only by the region serving the payee's home (the
# merchant refunds from its own account), ids stamped with that home. For a cross-region
# payment the payment row lives in the payer's home, so that region may not have it yet:
# the foreign key to payments goes (as payments.payee_id never had one, migration 0002).
# The row is also the refund's transfer message: the payer's region scans pending refunds
# for the homes it serves and answers in `refund_results` (its inbox, keyed by refund id,
# inserted only by the region serving the payer's home). Rows written before this
# revision are same-region refunds that succeeded at once: the new columns stay null.
DDL = """
ALTER TABLE refunds DROP CONSTRAINT IF EXISTS refunds_payment_id_fkey;
ALTER TABLE refunds ADD COLUMN payee_id UUID;
ALTER TABLE refunds ADD COLUMN payer_id UUID;
ALTER TABLE refunds ADD COLUMN home_region TEXT;
ALTER TABLE refunds ADD COLUMN payer_home TEXT;
ALTER TABLE refunds ADD COLUMN reason TEXT;
ALTER TABLE refunds ADD COLUMN journal_id UUID;
ALTER TABLE refunds ADD COLUMN updated_at TIMESTAMP WITH TIME ZONE DEFAULT now() NOT NULL;
ALTER TABLE refunds ADD CONSTRAINT ck_refund_status
    CHECK (status in ('pending', 'succeeded', 'failed'));
CREATE INDEX ix_refunds_pending ON refunds (payer_home) WHERE status = 'pending';
CREATE INDEX ix_refunds_payee_pending ON refunds (payee_id) WHERE status = 'pending';

CREATE TABLE refund_results (
    refund_id UUID NOT NULL,
    payment_id UUID NOT NULL,
    from_home TEXT NOT NULL,
    outcome TEXT NOT NULL,
    reason TEXT,
    payer_id UUID,
    journal_id UUID,
    created_at TIMESTAMP WITH TIME ZONE DEFAULT now() NOT NULL,
    PRIMARY KEY (refund_id),
    CONSTRAINT ck_refund_outcome CHECK (outcome in ('credited', 'rejected'))
);
CREATE INDEX ix_refund_results_payment ON refund_results (payment_id);
CREATE INDEX ix_transfer_results_payment ON transfer_results (payment_id);
"""


def upgrade() -> None:
    op.execute(DDL)


def downgrade() -> None:
    op.execute("""
DROP INDEX IF EXISTS ix_transfer_results_payment;
DROP TABLE IF EXISTS refund_results;
DROP INDEX IF EXISTS ix_refunds_payee_pending;
DROP INDEX IF EXISTS ix_refunds_pending;
ALTER TABLE refunds DROP CONSTRAINT IF EXISTS ck_refund_status;
ALTER TABLE refunds DROP COLUMN IF EXISTS updated_at, DROP COLUMN IF EXISTS journal_id,
    DROP COLUMN IF EXISTS reason, DROP COLUMN IF EXISTS payer_home,
    DROP COLUMN IF EXISTS home_region, DROP COLUMN IF EXISTS payer_id,
    DROP COLUMN IF EXISTS payee_id;
""")
