"""Reconciliation resolutions: how an operator settled a listed item.

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-26
"""

from __future__ import annotations

from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

# Insert-only and replicated. The key is the item's own key, so an item is settled once
# cluster-wide; it is inserted by ONE region only (region_node.reconciliation.resolver):
# for an orphan credit the region whose clearing and suspense accounts it concerns, for
# every other item the region serving the item's home region. The money a resolution
# moves (a claw-back, a write-off) is journal `journal_id`, posted in the same
# transaction.
DDL = """
CREATE TABLE reconciliation_resolutions (
    home_region TEXT NOT NULL,
    takeover_epoch BIGINT NOT NULL,
    item_id UUID NOT NULL,
    resolution TEXT NOT NULL,
    note TEXT NOT NULL,
    resolved_by UUID,
    region TEXT NOT NULL,
    journal_id UUID,
    amount BIGINT,
    currency TEXT,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (home_region, takeover_epoch, item_id),
    CONSTRAINT ck_resolution CHECK (resolution in ('acknowledge','claw_back','write_off'))
);
"""


def upgrade() -> None:
    op.execute(DDL)


def downgrade() -> None:
    op.execute("DROP TABLE IF EXISTS reconciliation_resolutions")
