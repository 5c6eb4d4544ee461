"""Security: principals, API keys (stored hashed), key revocations, the audit log, and the
principal that owns each account.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-26
"""

from __future__ import annotations

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

# Every table here replicates and is insert-only, so no row is ever written by two
# regions (zero update_origin_differs conflicts) and no unique value is inserted twice:
# - ids are UUIDv7 stamped with the inserting region (node.new_id);
# - a key prefix is 12 random characters from [a-z0-9] (62 bits): only the region that
#   created the key ever inserts that prefix;
# - a key is revoked by appending a row to api_key_revocations, never by updating
#   api_keys (a key is revoked if any revocation row names it);
# - no foreign keys between these tables: rows from different origins arrive through
#   different subscriptions, in no guaranteed order, and a failed check would stop one.
# `hash` is SHA-256 of the whole key. A fast hash is right here (not bcrypt/argon2): the
# secret part is 40 characters from a 62-letter alphabet (~238 bits) drawn from `secrets`,
# so nobody can brute-force it from the hash, slow or fast; a slow hash would only cost
# the hot path (every request authenticates) for no security gain. Password hashing
# exists to stretch low-entropy human secrets, which these are not.
DDL = """
CREATE TABLE principals (
    id UUID PRIMARY KEY,
    name TEXT NOT NULL,
    role TEXT NOT NULL,
    rate_per_second DOUBLE PRECISION,
    rate_burst INTEGER,
    home_region TEXT NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT ck_principal_role CHECK (role IN ('admin', 'merchant', 'customer')),
    CONSTRAINT ck_principal_rate CHECK (rate_per_second IS NULL OR rate_per_second > 0),
    CONSTRAINT ck_principal_burst CHECK (rate_burst IS NULL OR rate_burst >= 1)
);

CREATE TABLE api_keys (
    id UUID PRIMARY KEY,
    principal_id UUID NOT NULL,
    prefix TEXT NOT NULL,
    hash TEXT NOT NULL,
    home_region TEXT NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT uq_api_key_prefix UNIQUE (prefix),
    CONSTRAINT ck_api_key_prefix CHECK (prefix ~ '^[a-z0-9]{12}$')
);
CREATE INDEX ix_api_keys_principal ON api_keys (principal_id);

CREATE TABLE api_key_revocations (
    id UUID PRIMARY KEY,
    key_id UUID NOT NULL,
    region TEXT NOT NULL,
    revoked_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX ix_api_key_revocations_key ON api_key_revocations (key_id);

CREATE TABLE audit_log (
    id UUID PRIMARY KEY,
    at TIMESTAMPTZ NOT NULL DEFAULT now(),
    region TEXT NOT NULL,
    key_id UUID,
    principal_id UUID,
    action TEXT NOT NULL,
    resource TEXT,
    request_id TEXT,
    status INTEGER NOT NULL
);
CREATE INDEX ix_audit_log_principal ON audit_log (principal_id, id DESC);

-- The principal an account belongs to; system accounts (funding, clearing) have none.
ALTER TABLE accounts ADD COLUMN principal_id UUID;
CREATE INDEX ix_accounts_principal ON accounts (principal_id);
"""


def upgrade() -> None:
    op.execute(DDL)


def downgrade() -> None:
    op.execute("DROP INDEX IF EXISTS ix_accounts_principal")
    op.execute("ALTER TABLE accounts DROP COLUMN IF EXISTS principal_id")
    op.execute("DROP TABLE IF EXISTS audit_log, api_key_revocations, api_keys, principals")
