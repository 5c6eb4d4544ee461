"""Idempotency claim tokens; an index for the payments still in transit from an account.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-02
"""

from __future__ import annotations

from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

# A claim's token (region_node.idempotency): the executor that claimed a key finishes it
# only while the row still carries its token, so a retry that took over a stalled claim
# and the stalled original can never both commit an effect. Nullable: rows written before
# this revision (finished, or dead claims a retry takes over with a token of its own).
# The partial index serves the close-account check (ledger.close_account): payments from
# an account still in transit to another region.
DDL = """
ALTER TABLE idempotency_keys ADD COLUMN token UUID;
CREATE INDEX ix_payments_in_transit ON payments (payer_id) WHERE status = 'processing';
"""


def upgrade() -> None:
    op.execute(DDL)


def downgrade() -> None:
    op.execute("DROP INDEX IF EXISTS ix_payments_in_transit")
    op.execute("ALTER TABLE idempotency_keys DROP COLUMN IF EXISTS token")
