"""Group commit for the payment hot path: `pay_batch` (issue 13).

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-02
"""

from __future__ import annotations

from alembic import op

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None

# `pay_batch` runs several payments (the ones that reached a node while its previous
# batch was in flight, region_node/hot_path.py) in ONE transaction with one commit: one
# WAL flush for all of them instead of one each. Every payment is one `pay_local` call
# (migration 0013) with its own answer, inside its own subtransaction (a PL/pgSQL
# exception block): a payment that fails unexpectedly (a row lock not granted within
# lock_timeout, a deadlock, a constraint) rolls back alone and is answered 'fallback'
# (its request then runs on the general path); its batch-mates commit. A domain refusal
# (402, 404...) is an answer, not a failure: it writes nothing but its key's claim.
#
# Locks are taken in the order every other writer uses, for the whole batch before any
# payment runs: first the ownership fence of each home region in the batch (shared,
# ownership.assert_serving; a ban queued meanwhile waits for the batch, and the batch
# never waits for a ban while holding account rows a fenced writer needs), then every
# account of the batch in the global order of ledger.lock_accounts (user accounts by id,
# then system accounts). Two concurrent batches that share accounts therefore queue on
# each other and never deadlock, and the payments of one batch never wait for each
# other: a hot account is locked once per batch, not once per payment.
#
# The transaction is bounded like every write by the shortest lease budget of its homes
# (`transaction_timeout`, set before the first lock wait).
FUNCTIONS = r"""
CREATE FUNCTION pay_batch(
    p_region text, p_lock_class integer, p_budget_ms integer,
    p_homes text[], p_lease_epochs bigint[], p_principals uuid[], p_admins boolean[],
    p_keys text[], p_hashes text[], p_ttl_s double precision, p_lock_s double precision,
    p_payment_ids uuid[], p_payers uuid[], p_payees uuid[], p_amounts bigint[],
    p_currencies text[], p_descriptions text[],
    p_journal_ids uuid[], p_debit_ids uuid[], p_credit_ids uuid[], p_event_ids uuid[],
    p_audit_ids uuid[], p_audit_key_ids uuid[], p_audit_actions text[],
    p_audit_resources text[], p_request_ids text[])
RETURNS TABLE (idx integer, kind text, status integer, body json, token uuid, code text,
               message text, param text)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    r record;
    h text;
BEGIN
    IF p_budget_ms IS NOT NULL THEN
        PERFORM set_config('transaction_timeout', p_budget_ms::text, true);
    END IF;
    FOR h IN SELECT DISTINCT u FROM unnest(p_homes) u ORDER BY u LOOP
        PERFORM pg_advisory_xact_lock_shared(p_lock_class, hashtext(h));
    END LOOP;
    BEGIN
        PERFORM 1 FROM accounts a
         WHERE a.id = ANY (p_payers || p_payees)
         ORDER BY (a.kind IN ('funding', 'clearing', 'suspense'))::int, a.id
           FOR UPDATE;
    EXCEPTION WHEN lock_not_available THEN
        -- An account is held elsewhere past lock_timeout: every payment locks its own
        -- (pay_local), and the blocked ones answer 'busy' with their claims kept.
        NULL;
    END;
    FOR i IN 1 .. cardinality(p_payment_ids) LOOP
        idx := i;
        BEGIN
            SELECT * INTO r FROM pay_local(
                p_region, p_homes[i], p_lock_class, NULL, p_lease_epochs[i],
                p_principals[i], p_admins[i],
                p_homes[i], p_keys[i], p_hashes[i], p_ttl_s, p_lock_s,
                p_payment_ids[i], p_payers[i], p_payees[i], p_amounts[i], p_currencies[i],
                p_descriptions[i],
                p_journal_ids[i], ARRAY[p_debit_ids[i], p_credit_ids[i]], p_event_ids[i],
                p_audit_ids[i], p_audit_key_ids[i], p_audit_actions[i],
                p_audit_resources[i], p_request_ids[i]);
            kind := r.kind; status := r.status; body := r.body; token := r.token;
            code := r.code; message := r.message; param := r.param;
        EXCEPTION WHEN OTHERS THEN
            kind := 'fallback'; status := NULL; body := NULL; token := NULL;
            code := SQLSTATE; message := SQLERRM; param := NULL;
        END;
        RETURN NEXT;
    END LOOP;
END $$;
"""


def upgrade() -> None:
    op.execute(FUNCTIONS)


def downgrade() -> None:
    op.execute("DROP FUNCTION IF EXISTS pay_batch(text, integer, integer, text[], bigint[], "
               "uuid[], boolean[], text[], text[], double precision, double precision, uuid[], "
               "uuid[], uuid[], bigint[], text[], text[], uuid[], uuid[], uuid[], uuid[], "
               "uuid[], uuid[], text[], text[], text[])")
