"""Global stock: SKUs, per-region allotments (escrow), stock grants between regions, orders.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26
"""

from __future__ import annotations

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

# One writer per row, as everywhere: a SKU row by the region that created it, an
# allotment row (sku, region) by that region, a grant by the giving region, a receipt by
# the receiving region, an order by the region that sold it.
DDL = """
CREATE TABLE skus (
    sku TEXT PRIMARY KEY,
    home_region TEXT NOT NULL,
    stock BIGINT NOT NULL CHECK (stock >= 0),
    mode TEXT NOT NULL CHECK (mode IN ('escrow', 'strict')),
    initial_split JSONB NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE sku_allotments (
    sku TEXT NOT NULL,
    region TEXT NOT NULL,
    allotted BIGINT NOT NULL,
    reserved BIGINT NOT NULL DEFAULT 0,
    sold BIGINT NOT NULL DEFAULT 0,
    fence BIGINT NOT NULL DEFAULT 0,
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (sku, region),
    CONSTRAINT ck_allotment_counts CHECK (reserved >= 0 AND sold >= 0),
    -- The escrow invariant, enforced by the store: never sell what this region was not
    -- allotted.
    CONSTRAINT ck_allotment_within CHECK (sold + reserved <= allotted)
);

CREATE TABLE stock_grants (
    id UUID PRIMARY KEY,
    sku TEXT NOT NULL,
    from_region TEXT NOT NULL,
    to_region TEXT NOT NULL,
    units BIGINT NOT NULL CHECK (units > 0),
    fence BIGINT NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX ix_stock_grants_to ON stock_grants (to_region, created_at);

CREATE TABLE stock_grant_receipts (
    grant_id UUID PRIMARY KEY,
    sku TEXT NOT NULL,
    to_region TEXT NOT NULL,
    units BIGINT NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE orders (
    id UUID PRIMARY KEY,
    sku TEXT NOT NULL,
    quantity BIGINT NOT NULL CHECK (quantity > 0),
    region TEXT NOT NULL,
    home_region TEXT NOT NULL,
    payment_id UUID,
    status TEXT NOT NULL CHECK (status IN ('reserved', 'confirmed', 'released')),
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX ix_orders_open ON orders (region) WHERE status = 'reserved';
CREATE INDEX ix_orders_sku ON orders (sku);
"""


def upgrade() -> None:
    op.execute(DDL)


def downgrade() -> None:
    op.execute("DROP TABLE IF EXISTS orders, stock_grant_receipts, stock_grants, "
               "sku_allotments, skus")
