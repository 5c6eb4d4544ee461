"""Suspense accounts: where a region parks a credit whose debit was lost.

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-26
"""

from __future__ import annotations

from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

# A local-mode crash can lose a cross-region payment's debit (in the crashed region's
# unreplicated tail) after its transfer already credited the payee elsewhere. That
# region's clearing account is then short by the amount; the credit is moved to its
# suspense account (one per region and currency, like funding and clearing) so the
# ledger balances and the exposure shows as a balance until an operator settles it.
DDL = """
ALTER TABLE accounts DROP CONSTRAINT ck_account_kind;
ALTER TABLE accounts ADD CONSTRAINT ck_account_kind
    CHECK (kind in ('customer','merchant','funding','clearing','suspense'));
DROP INDEX uq_system_account;
CREATE UNIQUE INDEX uq_system_account ON accounts (home_region, kind, currency)
    WHERE kind in ('funding','clearing','suspense');
"""

UNDO = """
DROP INDEX uq_system_account;
CREATE UNIQUE INDEX uq_system_account ON accounts (home_region, kind, currency)
    WHERE kind in ('funding','clearing');
ALTER TABLE accounts DROP CONSTRAINT ck_account_kind;
ALTER TABLE accounts ADD CONSTRAINT ck_account_kind
    CHECK (kind in ('customer','merchant','funding','clearing'));
"""


def upgrade() -> None:
    op.execute(DDL)


def downgrade() -> None:
    op.execute(UNDO)
