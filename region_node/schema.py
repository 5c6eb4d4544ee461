"""Table definitions (SQLAlchemy Core). The migrations create exactly these tables.

Every primary key is an application-generated UUIDv7 or a key that only one region can
insert, because these tables replicate between regions (see docs/architecture.md, "Data
ownership: one writer per row").
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, UUID

metadata = sa.MetaData()

TS = sa.DateTime(timezone=True)


def _now() -> sa.TextClause:
    return sa.text("now()")


accounts = sa.Table(
    "accounts", metadata,
    sa.Column("id", UUID(as_uuid=True), primary_key=True),
    sa.Column("currency", sa.CHAR(3), nullable=False),
    sa.Column("kind", sa.Text, nullable=False),
    sa.Column("home_region", sa.Text, nullable=False),
    sa.Column("balance", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("held", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("allow_overdraft", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("status", sa.Text, nullable=False, server_default="open"),
    sa.Column("created_at", TS, nullable=False, server_default=_now()),
    sa.Column("updated_at", TS, nullable=False, server_default=_now()),
    # The principal the account belongs to (migration 0005); None for system accounts.
    sa.Column("principal_id", UUID(as_uuid=True), nullable=True),
    # suspense (migration 0010): where a region parks a credit whose debit was lost in
    # another region's unreplicated tail, until an operator settles it.
    # channel, payout, fees (migration 0020): money through the acquirer (region_node/
    # channel_ops.py).
    sa.CheckConstraint("kind in ('customer','merchant','funding','clearing','suspense',"
                       "'channel','payout','fees')", name="ck_account_kind"),
    sa.CheckConstraint("status in ('open','closed')", name="ck_account_status"),
    sa.CheckConstraint("held >= 0", name="ck_account_held"),
    # The last line of defence for invariant 3: no negative available balance.
    sa.CheckConstraint("allow_overdraft or balance - held >= 0", name="ck_account_available"),
)
sa.Index("uq_system_account", accounts.c.home_region, accounts.c.kind, accounts.c.currency,
         unique=True,
         postgresql_where=sa.text("kind in ('funding','clearing','suspense','channel',"
                                  "'payout','fees')"))

journal_entries = sa.Table(
    "journal_entries", metadata,
    sa.Column("id", UUID(as_uuid=True), primary_key=True),
    sa.Column("journal_id", UUID(as_uuid=True), nullable=False),
    sa.Column("account_id", UUID(as_uuid=True), sa.ForeignKey("accounts.id"), nullable=False),
    sa.Column("amount", sa.BigInteger, nullable=False),
    sa.Column("currency", sa.CHAR(3), nullable=False),
    sa.Column("entry_type", sa.Text, nullable=False),
    sa.Column("payment_id", UUID(as_uuid=True), nullable=True),
    sa.Column("region", sa.Text, nullable=True),
    sa.Column("created_at", TS, nullable=False, server_default=_now()),
    sa.CheckConstraint("amount <> 0", name="ck_entry_nonzero"),
)
sa.Index("ix_entries_account", journal_entries.c.account_id, journal_entries.c.id.desc())
sa.Index("ix_entries_journal", journal_entries.c.journal_id)
sa.Index("ix_entries_payment", journal_entries.c.payment_id)

payments = sa.Table(
    "payments", metadata,
    sa.Column("id", UUID(as_uuid=True), primary_key=True),
    sa.Column("payer_id", UUID(as_uuid=True), sa.ForeignKey("accounts.id"), nullable=False),
    # No foreign key: a cross-region payee lives in another region (see migration 0002).
    sa.Column("payee_id", UUID(as_uuid=True), nullable=False),
    sa.Column("amount", sa.BigInteger, nullable=False),
    sa.Column("currency", sa.CHAR(3), nullable=False),
    sa.Column("capture_method", sa.Text, nullable=False),
    sa.Column("status", sa.Text, nullable=False),
    sa.Column("amount_held", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("amount_captured", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("amount_refunded", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("hold_expires_at", TS, nullable=True),
    sa.Column("description", sa.Text, nullable=True),
    sa.Column("failure_code", sa.Text, nullable=True),
    sa.Column("home_region", sa.Text, nullable=False),
    sa.Column("payee_home", sa.Text, nullable=True),
    sa.Column("epoch", sa.BigInteger, nullable=True),
    sa.Column("created_at", TS, nullable=False, server_default=_now()),
    sa.Column("updated_at", TS, nullable=False, server_default=_now()),
    sa.CheckConstraint("amount > 0", name="ck_payment_amount"),
    sa.CheckConstraint("capture_method in ('automatic','manual')", name="ck_payment_capture"),
    sa.CheckConstraint(
        "status in ('requires_capture','processing','succeeded','canceled','failed')",
        name="ck_payment_status"),
    sa.CheckConstraint("amount_captured <= amount", name="ck_payment_captured"),
    sa.CheckConstraint("amount_refunded <= amount_captured", name="ck_payment_refunded"),
    sa.CheckConstraint("amount_held >= 0", name="ck_payment_held"),
)
sa.Index("ix_payments_expiring", payments.c.hold_expires_at,
         postgresql_where=sa.text("status = 'requires_capture'"))
sa.Index("ix_payments_in_transit", payments.c.payer_id,
         postgresql_where=sa.text("status = 'processing'"))

# Written only by the region serving the payee's home (region_node/refunds.py). No foreign
# key to payments (migration 0013): a cross-region payment's row lives in the payer's home
# and may not have replicated to the payee's region yet. A pending cross-region refund is
# also the transfer message the payer's region scans.
refunds = sa.Table(
    "refunds", metadata,
    sa.Column("id", UUID(as_uuid=True), primary_key=True),
    sa.Column("payment_id", UUID(as_uuid=True), nullable=False),
    sa.Column("amount", sa.BigInteger, nullable=False),
    sa.Column("currency", sa.CHAR(3), nullable=False),
    sa.Column("status", sa.Text, nullable=False, server_default="succeeded"),
    sa.Column("created_at", TS, nullable=False, server_default=_now()),
    # Migration 0013 (null on rows written before it: same-region refunds).
    sa.Column("payee_id", UUID(as_uuid=True), nullable=True),
    sa.Column("payer_id", UUID(as_uuid=True), nullable=True),
    sa.Column("home_region", sa.Text, nullable=True),   # the payee's home: who executes
    sa.Column("payer_home", sa.Text, nullable=True),    # who credits the payer
    sa.Column("reason", sa.Text, nullable=True),        # why a refund failed
    sa.Column("journal_id", UUID(as_uuid=True), nullable=True),
    sa.Column("updated_at", TS, nullable=False, server_default=_now()),
    sa.CheckConstraint("amount > 0", name="ck_refund_amount"),
    sa.CheckConstraint("status in ('pending', 'succeeded', 'failed')", name="ck_refund_status"),
)
sa.Index("ix_refunds_payment", refunds.c.payment_id)
sa.Index("ix_refunds_pending", refunds.c.payer_home,
         postgresql_where=sa.text("status = 'pending'"))
sa.Index("ix_refunds_payee_pending", refunds.c.payee_id,
         postgresql_where=sa.text("status = 'pending'"))

# The payer region's inbox and acknowledgement of a cross-region refund in one row: keyed
# by the refund id, so the payer is credited (or the refund rejected) exactly once however
# often the refund arrives. Inserted only by the region serving the payer's home.
refund_results = sa.Table(
    "refund_results", metadata,
    sa.Column("refund_id", UUID(as_uuid=True), primary_key=True),
    sa.Column("payment_id", UUID(as_uuid=True), nullable=False),
    sa.Column("from_home", sa.Text, nullable=False),
    sa.Column("outcome", sa.Text, nullable=False),
    sa.Column("reason", sa.Text, nullable=True),
    sa.Column("payer_id", UUID(as_uuid=True), nullable=True),
    sa.Column("journal_id", UUID(as_uuid=True), nullable=True),
    sa.Column("created_at", TS, nullable=False, server_default=_now()),
    sa.CheckConstraint("outcome in ('credited', 'rejected')", name="ck_refund_outcome"),
)
sa.Index("ix_refund_results_payment", refund_results.c.payment_id)

# TCC sub-transaction barrier: one row per (global transaction, branch, phase).
tcc_barrier = sa.Table(
    "tcc_barrier", metadata,
    sa.Column("gid", UUID(as_uuid=True), primary_key=True),
    sa.Column("branch_id", sa.Text, primary_key=True),
    sa.Column("op", sa.Text, primary_key=True),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("created_at", TS, nullable=False, server_default=_now()),
    sa.CheckConstraint("op in ('try','confirm','cancel')", name="ck_barrier_op"),
)

idempotency_keys = sa.Table(
    "idempotency_keys", metadata,
    sa.Column("scope", sa.Text, primary_key=True),
    sa.Column("key", sa.Text, primary_key=True),
    sa.Column("request_hash", sa.Text, nullable=False),
    sa.Column("state", sa.Text, nullable=False),
    sa.Column("locked_at", TS, nullable=True),
    sa.Column("response_status", sa.Integer, nullable=True),
    sa.Column("response_body", JSONB, nullable=True),
    sa.Column("created_at", TS, nullable=False, server_default=_now()),
    sa.Column("expires_at", TS, nullable=False),
    # Ownership epoch of the claim (migration 0004): a `started` claim of an earlier epoch
    # is dead (that epoch's writes ended with its ban), so a retry may take it over.
    sa.Column("epoch", sa.BigInteger, nullable=True),
    # The claim's token (migration 0012): only the executor holding it may finish the key.
    sa.Column("token", UUID(as_uuid=True), nullable=True),
    sa.CheckConstraint("state in ('started','finished')", name="ck_idem_state"),
)
sa.Index("ix_idem_expires", idempotency_keys.c.expires_at)

outbox = sa.Table(
    "outbox", metadata,
    sa.Column("id", UUID(as_uuid=True), primary_key=True),
    sa.Column("region", sa.Text, nullable=False),
    sa.Column("event_type", sa.Text, nullable=False),
    sa.Column("aggregate_id", UUID(as_uuid=True), nullable=False),
    sa.Column("payload", JSONB, nullable=False),
    sa.Column("created_at", TS, nullable=False, server_default=_now()),
    sa.Column("published_at", TS, nullable=True),
)
sa.Index("ix_outbox_unpublished", outbox.c.region, outbox.c.id,
         postgresql_where=sa.text("published_at is null"))

# The idempotent consumer's effect: one row per event, however often it is delivered.
notifications = sa.Table(
    "notifications", metadata,
    sa.Column("event_id", UUID(as_uuid=True), primary_key=True),
    sa.Column("event_type", sa.Text, nullable=False),
    sa.Column("aggregate_id", UUID(as_uuid=True), nullable=False),
    sa.Column("payload", JSONB, nullable=False),
    sa.Column("deliveries", sa.Integer, nullable=False, server_default="1"),
    sa.Column("received_at", TS, nullable=False, server_default=_now()),
)
sa.Index("ix_notifications_aggregate", notifications.c.aggregate_id)


# --------------------------------------------------------------------------- multi-region

region_ownership = sa.Table(
    "region_ownership", metadata,
    sa.Column("home_region", sa.Text, primary_key=True),
    sa.Column("serving_region", sa.Text, nullable=False),
    sa.Column("epoch", sa.BigInteger, nullable=False, server_default="1"),
    sa.Column("updated_at", TS, nullable=False, server_default=_now()),
)

# Ownership as an append-only log (migration 0004): the owner of a home region is its row
# with the highest epoch; a ban row stops writes under that epoch (planned handover).
# `region_ownership` above is no longer written.
ownership_epochs = sa.Table(
    "ownership_epochs", metadata,
    sa.Column("home_region", sa.Text, primary_key=True),
    sa.Column("epoch", sa.BigInteger, primary_key=True),
    sa.Column("serving_region", sa.Text, nullable=False),
    sa.Column("created_at", TS, nullable=False, server_default=_now()),
)

ownership_bans = sa.Table(
    "ownership_bans", metadata,
    sa.Column("home_region", sa.Text, primary_key=True),
    sa.Column("epoch", sa.BigInteger, primary_key=True),
    sa.Column("banned_by", sa.Text, nullable=False),
    sa.Column("created_at", TS, nullable=False, server_default=_now()),
)

heartbeats = sa.Table(
    "heartbeats", metadata,
    sa.Column("region", sa.Text, primary_key=True),
    sa.Column("seq", sa.BigInteger, nullable=False),
    sa.Column("sent_at", TS, nullable=False),
)

# The transfer message of a cross-region payment, written by the payer's region in the
# same transaction that moves the money into its in-transit clearing account.
transfers = sa.Table(
    "transfers", metadata,
    sa.Column("id", UUID(as_uuid=True), primary_key=True),
    sa.Column("payment_id", UUID(as_uuid=True), nullable=False),
    sa.Column("payer_id", UUID(as_uuid=True), nullable=False),
    sa.Column("payee_id", UUID(as_uuid=True), nullable=False),
    sa.Column("from_home", sa.Text, nullable=False),
    sa.Column("to_home", sa.Text, nullable=False),
    sa.Column("amount", sa.BigInteger, nullable=False),
    sa.Column("currency", sa.CHAR(3), nullable=False),
    sa.Column("created_at", TS, nullable=False, server_default=_now()),
)

# The payee region's inbox and acknowledgement in one row: keyed by the message id, so a
# message is credited (or rejected) exactly once however often it arrives.
transfer_results = sa.Table(
    "transfer_results", metadata,
    sa.Column("transfer_id", UUID(as_uuid=True), primary_key=True),
    sa.Column("payment_id", UUID(as_uuid=True), nullable=False),
    sa.Column("from_home", sa.Text, nullable=False),
    sa.Column("outcome", sa.Text, nullable=False),
    sa.Column("reason", sa.Text, nullable=True),
    sa.Column("journal_id", UUID(as_uuid=True), nullable=True),
    sa.Column("created_at", TS, nullable=False, server_default=_now()),
)
sa.Index("ix_transfer_results_payment", transfer_results.c.payment_id)

# --------------------------------------------------------------------------- global stock

skus = sa.Table(
    "skus", metadata,
    sa.Column("sku", sa.Text, primary_key=True),
    sa.Column("home_region", sa.Text, nullable=False),
    sa.Column("stock", sa.BigInteger, nullable=False),
    sa.Column("mode", sa.Text, nullable=False),
    sa.Column("initial_split", JSONB, nullable=False),
    sa.Column("created_at", TS, nullable=False, server_default=_now()),
)

# A region's escrow of a SKU: it may sell `allotted - sold - reserved` without asking
# anyone. Grants move units between regions' allotments under the quorum lock.
sku_allotments = sa.Table(
    "sku_allotments", metadata,
    sa.Column("sku", sa.Text, primary_key=True),
    sa.Column("region", sa.Text, primary_key=True),
    sa.Column("allotted", sa.BigInteger, nullable=False),
    sa.Column("reserved", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("sold", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("fence", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("updated_at", TS, nullable=False, server_default=_now()),
)

stock_grants = sa.Table(
    "stock_grants", metadata,
    sa.Column("id", UUID(as_uuid=True), primary_key=True),
    sa.Column("sku", sa.Text, nullable=False),
    sa.Column("from_region", sa.Text, nullable=False),
    sa.Column("to_region", sa.Text, nullable=False),
    sa.Column("units", sa.BigInteger, nullable=False),
    sa.Column("fence", sa.BigInteger, nullable=False),
    sa.Column("created_at", TS, nullable=False, server_default=_now()),
)

stock_grant_receipts = sa.Table(
    "stock_grant_receipts", metadata,
    sa.Column("grant_id", UUID(as_uuid=True), primary_key=True),
    sa.Column("sku", sa.Text, nullable=False),
    sa.Column("to_region", sa.Text, nullable=False),
    sa.Column("units", sa.BigInteger, nullable=False),
    sa.Column("created_at", TS, nullable=False, server_default=_now()),
)

orders = sa.Table(
    "orders", metadata,
    sa.Column("id", UUID(as_uuid=True), primary_key=True),
    sa.Column("sku", sa.Text, nullable=False),
    sa.Column("quantity", sa.BigInteger, nullable=False),
    sa.Column("region", sa.Text, nullable=False),
    sa.Column("home_region", sa.Text, nullable=False),
    sa.Column("payment_id", UUID(as_uuid=True), nullable=True),
    sa.Column("status", sa.Text, nullable=False),
    sa.Column("created_at", TS, nullable=False, server_default=_now()),
    sa.Column("updated_at", TS, nullable=False, server_default=_now()),
)

# --------------------------------------------------------------------------- webhooks
# Insert-only (migration 0006): deletions and secret rotations are rows of their own, and
# a delivery and its attempts are written only by the region whose outbox held the event.

webhook_endpoints = sa.Table(
    "webhook_endpoints", metadata,
    sa.Column("id", UUID(as_uuid=True), primary_key=True),
    sa.Column("principal_id", UUID(as_uuid=True), nullable=False),
    sa.Column("url", sa.Text, nullable=False),
    sa.Column("event_types", ARRAY(sa.Text), nullable=False),
    # Endpoints registered by an admin receive every event of the cluster.
    sa.Column("receives_all", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("home_region", sa.Text, nullable=False),
    sa.Column("created_at", TS, nullable=False, server_default=_now()),
)
sa.Index("ix_webhook_endpoints_principal", webhook_endpoints.c.principal_id)

# A secret is active until its own `expires_at`, or until a later secret of the endpoint
# (a rotation) retires it at that secret's `previous_expire_at`.
webhook_secrets = sa.Table(
    "webhook_secrets", metadata,
    sa.Column("id", UUID(as_uuid=True), primary_key=True),
    sa.Column("endpoint_id", UUID(as_uuid=True), nullable=False),
    sa.Column("secret", sa.Text, nullable=False),
    sa.Column("created_at", TS, nullable=False, server_default=_now()),
    sa.Column("expires_at", TS, nullable=True),
    sa.Column("previous_expire_at", TS, nullable=True),
)
sa.Index("ix_webhook_secrets_endpoint", webhook_secrets.c.endpoint_id, webhook_secrets.c.id)

webhook_endpoint_deletions = sa.Table(
    "webhook_endpoint_deletions", metadata,
    sa.Column("id", UUID(as_uuid=True), primary_key=True),
    sa.Column("endpoint_id", UUID(as_uuid=True), nullable=False),
    sa.Column("deleted_by", UUID(as_uuid=True), nullable=True),
    sa.Column("created_at", TS, nullable=False, server_default=_now()),
)
sa.Index("ix_webhook_deletions_endpoint", webhook_endpoint_deletions.c.endpoint_id)

webhook_deliveries = sa.Table(
    "webhook_deliveries", metadata,
    sa.Column("id", UUID(as_uuid=True), primary_key=True),
    sa.Column("endpoint_id", UUID(as_uuid=True), nullable=False),
    sa.Column("event_id", UUID(as_uuid=True), nullable=False),
    sa.Column("event_type", sa.Text, nullable=False),
    sa.Column("region", sa.Text, nullable=False),
    sa.Column("created_at", TS, nullable=False, server_default=_now()),
    sa.UniqueConstraint("endpoint_id", "event_id", name="uq_webhook_delivery"),
)

webhook_attempts = sa.Table(
    "webhook_attempts", metadata,
    sa.Column("id", UUID(as_uuid=True), primary_key=True),
    sa.Column("delivery_id", UUID(as_uuid=True), nullable=False),
    sa.Column("endpoint_id", UUID(as_uuid=True), nullable=False),
    sa.Column("attempt", sa.Integer, nullable=False),
    sa.Column("attempted_at", TS, nullable=False, server_default=_now()),
    sa.Column("status_code", sa.Integer, nullable=True),
    sa.Column("error", sa.Text, nullable=True),
    sa.Column("duration_ms", sa.Integer, nullable=False),
    sa.Column("outcome", sa.Text, nullable=False),
    sa.Column("next_attempt_at", TS, nullable=True),
    sa.Column("region", sa.Text, nullable=False),
    sa.UniqueConstraint("delivery_id", "attempt", name="uq_webhook_attempt"),
)
sa.Index("ix_webhook_attempts_endpoint", webhook_attempts.c.endpoint_id,
         webhook_attempts.c.delivery_id)

# Local (not replicated): the retry schedule of this region's pending deliveries. A row
# leaves the queue when its delivery succeeded or finally failed.
webhook_queue = sa.Table(
    "webhook_queue", metadata,
    sa.Column("delivery_id", UUID(as_uuid=True), primary_key=True),
    sa.Column("endpoint_id", UUID(as_uuid=True), nullable=False),
    sa.Column("event_id", UUID(as_uuid=True), nullable=False),
    sa.Column("body", sa.Text, nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("due_at", TS, nullable=False, server_default=_now()),
    sa.Column("lease_until", TS, nullable=True),
    sa.Column("created_at", TS, nullable=False, server_default=_now()),
)
sa.Index("ix_webhook_queue_due", webhook_queue.c.due_at)

# Local: outbox events not fanned out yet (a trigger on `outbox` inserts them in the
# event's own transaction; the fan-out deletes them).
webhook_pending_events = sa.Table(
    "webhook_pending_events", metadata,
    sa.Column("event_id", UUID(as_uuid=True), primary_key=True),
    sa.Column("region", sa.Text, nullable=False),
    sa.Column("created_at", TS, nullable=False, server_default=_now()),
)

# --------------------------------------------------------------------------- security

# Who may call the API (migration 0005). All insert-only: a key is revoked by a row in
# api_key_revocations, never by an update; see region_node/principals.py.
principals = sa.Table(
    "principals", metadata,
    sa.Column("id", UUID(as_uuid=True), primary_key=True),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("role", sa.Text, nullable=False),
    sa.Column("rate_per_second", sa.Float, nullable=True),
    sa.Column("rate_burst", sa.Integer, nullable=True),
    sa.Column("home_region", sa.Text, nullable=False),
    sa.Column("created_at", TS, nullable=False, server_default=_now()),
    sa.CheckConstraint("role in ('admin','merchant','customer')", name="ck_principal_role"),
)

api_keys = sa.Table(
    "api_keys", metadata,
    sa.Column("id", UUID(as_uuid=True), primary_key=True),
    sa.Column("principal_id", UUID(as_uuid=True), nullable=False),
    # Random, so only the region that created the key ever inserts this prefix.
    sa.Column("prefix", sa.Text, nullable=False, unique=True),
    sa.Column("hash", sa.Text, nullable=False),
    sa.Column("home_region", sa.Text, nullable=False),
    sa.Column("created_at", TS, nullable=False, server_default=_now()),
)

api_key_revocations = sa.Table(
    "api_key_revocations", metadata,
    sa.Column("id", UUID(as_uuid=True), primary_key=True),
    sa.Column("key_id", UUID(as_uuid=True), nullable=False),
    sa.Column("region", sa.Text, nullable=False),
    sa.Column("revoked_at", TS, nullable=False, server_default=_now()),
)

audit_log = sa.Table(
    "audit_log", metadata,
    sa.Column("id", UUID(as_uuid=True), primary_key=True),
    sa.Column("at", TS, nullable=False, server_default=_now()),
    sa.Column("region", sa.Text, nullable=False),
    sa.Column("key_id", UUID(as_uuid=True), nullable=True),
    sa.Column("principal_id", UUID(as_uuid=True), nullable=True),
    sa.Column("action", sa.Text, nullable=False),
    sa.Column("resource", sa.Text, nullable=True),
    sa.Column("request_id", sa.Text, nullable=True),
    sa.Column("status", sa.Integer, nullable=False),
)

# How an operator settled a reconciliation item (migration 0011). Insert-only; the key
# is the item's, inserted by the one region allowed to settle it (region_node/
# reconciliation.py), so an item is settled once cluster-wide.
reconciliation_resolutions = sa.Table(
    "reconciliation_resolutions", metadata,
    sa.Column("home_region", sa.Text, primary_key=True),
    sa.Column("takeover_epoch", sa.BigInteger, primary_key=True),
    sa.Column("item_id", UUID(as_uuid=True), primary_key=True),
    sa.Column("resolution", sa.Text, nullable=False),
    sa.Column("note", sa.Text, nullable=False),
    sa.Column("resolved_by", UUID(as_uuid=True), nullable=True),
    sa.Column("region", sa.Text, nullable=False),
    sa.Column("journal_id", UUID(as_uuid=True), nullable=True),
    sa.Column("amount", sa.BigInteger, nullable=True),
    sa.Column("currency", sa.Text, nullable=True),
    sa.Column("created_at", TS, nullable=False, server_default=_now()),
    sa.CheckConstraint("resolution in ('acknowledge','claw_back','write_off')",
                       name="ck_resolution"),
)

# Pay-ins and payouts through the acquirer (migration 0020, region_node/channel_ops.py),
# and the inbox of its callbacks keyed by the channel's event id. Written only by the
# region serving the account's home region.
channel_operations = sa.Table(
    "channel_operations", metadata,
    sa.Column("id", UUID(as_uuid=True), primary_key=True),
    sa.Column("kind", sa.Text, nullable=False),
    sa.Column("account_id", UUID(as_uuid=True), sa.ForeignKey("accounts.id"), nullable=False),
    sa.Column("home_region", sa.Text, nullable=False),
    sa.Column("amount", sa.BigInteger, nullable=False),
    sa.Column("currency", sa.CHAR(3), nullable=False),
    sa.Column("status", sa.Text, nullable=False),
    sa.Column("failure_code", sa.Text, nullable=True),
    sa.Column("channel_status", sa.Text, nullable=True),
    sa.Column("channel_version", sa.Integer, nullable=False, server_default="0"),
    sa.Column("card_last4", sa.Text, nullable=True),
    sa.Column("card_brand", sa.Text, nullable=True),
    sa.Column("bank_account", sa.Text, nullable=True),
    sa.Column("holder_name", sa.Text, nullable=True),
    sa.Column("fee", sa.BigInteger, nullable=True),
    sa.Column("sync_attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("next_check_at", TS, nullable=True),
    sa.Column("settled_by", sa.Text, nullable=True),
    sa.Column("settled_at", TS, nullable=True),
    sa.Column("epoch", sa.BigInteger, nullable=True),
    sa.Column("created_at", TS, nullable=False, server_default=_now()),
    sa.Column("updated_at", TS, nullable=False, server_default=_now()),
    sa.CheckConstraint("kind in ('payin','payout')", name="ck_chop_kind"),
    sa.CheckConstraint("amount > 0", name="ck_chop_amount"),
    sa.CheckConstraint("status in ('queued','pending','succeeded','paid','returned','failed')",
                       name="ck_chop_status"),
)
sa.Index("ix_chop_waiting", channel_operations.c.home_region,
         channel_operations.c.next_check_at,
         postgresql_where=sa.text("status in ('queued','pending')"))
sa.Index("ix_chop_account", channel_operations.c.account_id, channel_operations.c.id.desc())

channel_callbacks = sa.Table(
    "channel_callbacks", metadata,
    sa.Column("event_id", sa.Text, primary_key=True),
    sa.Column("operation_id", UUID(as_uuid=True), nullable=True),
    sa.Column("reference", sa.Text, nullable=False),
    sa.Column("event_type", sa.Text, nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("outcome", sa.Text, nullable=False),
    sa.Column("region", sa.Text, nullable=False),
    sa.Column("received_at", TS, nullable=False, server_default=_now()),
)
sa.Index("ix_chcb_operation", channel_callbacks.c.operation_id)

REPLICATED_TABLES: tuple[str, ...] = (
    "accounts", "journal_entries", "payments", "refunds", "tcc_barrier", "idempotency_keys",
    "region_ownership", "ownership_epochs", "ownership_bans", "heartbeats", "transfers",
    "transfer_results", "refund_results", "ownership_takeovers", "reconciliation_items",
    "reconciliation_resolutions",
    "skus", "sku_allotments", "stock_grants", "stock_grant_receipts", "orders",
    "webhook_endpoints", "webhook_secrets", "webhook_endpoint_deletions", "webhook_deliveries",
    "webhook_attempts",
    # Security (migration 0005): who may call the API, and who did what.
    "principals", "api_keys", "api_key_revocations", "audit_log",
    # External channels (migration 0020).
    "channel_operations", "channel_callbacks",
)
"""Tables every region publishes (its own changes) and subscribes to (everyone else's).
The outbox and the consumer's notifications stay local: each region relays its own."""
