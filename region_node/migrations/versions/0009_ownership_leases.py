"""Ownership leases: forced takeovers and the reconciliation list of a lost tail.

Revision ID: 0009
Revises: 0006
Create Date: 2026-11-26
"""

from __future__ import annotations

from alembic import op

revision = "0009"
down_revision = "0006"
branch_labels = None
depends_on = None

# Both insert-only, each key inserted by one region only:
# - ownership_takeovers(home, epoch): by the region that took `epoch` of `home` (the
#   holder of the lease whose token is the epoch), next to its ownership_epochs row. A
#   forced takeover (crash, partition) records where every survivor had applied the
#   old owner's stream when it was cut off (`positions`: region -> LSN), so that the old
#   owner's unreplicated tail can be listed when it returns.
# - reconciliation_items(home, takeover_epoch, item_id): by the owner under that
#   takeover epoch's successor chain that ran `replication.reconcile.lost_tail`; one row
#   per payment of the returning region that no survivor has. Listed, never applied.
DDL = """
CREATE TABLE ownership_takeovers (
    home_region TEXT NOT NULL,
    epoch BIGINT NOT NULL,
    serving_region TEXT NOT NULL,
    from_region TEXT,
    from_epoch BIGINT,
    forced BOOLEAN NOT NULL,
    positions JSONB NOT NULL DEFAULT '{}'::jsonb,
    detail TEXT,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (home_region, epoch)
);

CREATE TABLE reconciliation_items (
    home_region TEXT NOT NULL,
    takeover_epoch BIGINT NOT NULL,
    item_id UUID NOT NULL,
    item_kind TEXT NOT NULL,
    lost_region TEXT NOT NULL,
    listed_by TEXT NOT NULL,
    epoch BIGINT,
    status TEXT,
    currency TEXT,
    amount BIGINT,
    committed_at TIMESTAMPTZ,
    detail JSONB NOT NULL DEFAULT '{}'::jsonb,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (home_region, takeover_epoch, item_id)
);
"""


def upgrade() -> None:
    op.execute(DDL)


def downgrade() -> None:
    op.execute("DROP TABLE IF EXISTS reconciliation_items, ownership_takeovers")
