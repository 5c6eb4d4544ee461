"""Room on the accounts' pages for their balance updates (issue 13).

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-04
"""

from __future__ import annotations

from alembic import op

revision = "0017"
down_revision = "0016"
branch_labels = None
depends_on = None

# Every payment updates two account rows (the balances), a hot merchant's row hundreds of
# times a second. Each update is a new row version; it stays on the row's page (a HOT
# update: no index entry) while the page has room, and PostgreSQL prunes a page's dead
# versions only once its free space falls below what the fillfactor reserves (10% at
# the default 100). A hot row's versions then filled its page between prunes, and
# lookups walked ever longer chains: one hot pair on one region (`paycluster bench
# --hot`, four 10 s rounds) went 766 -> 570 payments/s with PostgreSQL's CPU per payment
# 0.77 -> 1.19 ms. With half of each page reserved, pruning runs early: 826-1,064
# payments/s, 0.54-0.81 ms. The accounts table is small next to the journal, so doubling
# its pages costs little.
FILLFACTOR = 50


def upgrade() -> None:
    # Takes effect at once for pruning (a page is pruned when its free space falls below
    # what the fillfactor reserves) and for the pages written from now on.
    op.execute(f"ALTER TABLE accounts SET (fillfactor = {FILLFACTOR})")


def downgrade() -> None:
    op.execute("ALTER TABLE accounts RESET (fillfactor)")
