"""Ownership as an append-only log: epochs and write bans.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-26
"""

from __future__ import annotations

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

# Insert-only, so no row is ever written by two regions (an update by a second region
# would be an `update_origin_differs` conflict). The owner of a home region is the row
# with the highest epoch. (home, epoch) is inserted by one region only: epoch 1 by the
# home region itself at its first start, every later epoch by the region that takes over
# (or hands back) under the quorum lock `ownership:<home>`, whose fencing token is the
# epoch; tokens only grow, so two regions never insert the same key. A ban on
# (home, epoch) is inserted by the owner of that epoch only.
DDL = """
CREATE TABLE ownership_epochs (
    home_region TEXT NOT NULL,
    epoch BIGINT NOT NULL CHECK (epoch > 0),
    serving_region TEXT NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (home_region, epoch)
);

CREATE TABLE ownership_bans (
    home_region TEXT NOT NULL,
    epoch BIGINT NOT NULL,
    banned_by TEXT NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (home_region, epoch)
);

CREATE INDEX ix_payments_epoch ON payments (home_region, epoch);

-- The ownership epoch a key was claimed under: a claim left `started` by an earlier
-- epoch's owner is dead (its writes ended with the ban) and a retry takes it over.
ALTER TABLE idempotency_keys ADD COLUMN epoch BIGINT;
"""


def upgrade() -> None:
    op.execute(DDL)


def downgrade() -> None:
    op.execute("ALTER TABLE idempotency_keys DROP COLUMN IF EXISTS epoch")
    op.execute("DROP INDEX IF EXISTS ix_payments_epoch")
    op.execute("DROP TABLE IF EXISTS ownership_bans, ownership_epochs")
