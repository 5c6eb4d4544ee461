"""The payment hot path as one SQL function: `pay_local` (issue 13).

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-02
"""

from __future__ import annotations

from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None

# `pay_local` does in one round trip what `POST /v1/payments` (automatic capture, payer
# and payee in the same home region) does in Python over several transactions and a
# dozen statements (region_node/hot_path.py calls it; api/mutation.run_mutation and
# payments.create_payment are the reference it mirrors, step for step):
#
#   1. the ownership fence of ownership.assert_serving: the home's advisory lock shared,
#      the transaction bounded by the lease (`transaction_timeout`), the current epoch
#      served by this region and not banned, and equal to the lease token the caller
#      checked in Python (guard.check) just before the call;
#   2. the Idempotency-Key claim of idempotency.IdempotencyStore (claim + hold): a new key
#      is inserted `started` with a fresh token; an existing one replays (finished, same
#      hash), is refused (422 other hash; 409 while a live claim holds it, or its effect
#      transaction has it locked), or is taken over (expired; stalled past lock_seconds;
#      claimed under an earlier epoch);
#   3. the payer's access check (access.require_account), the accounts locked in the
#      global order (ledger.lock_accounts) and the checks of create_payment, in its order
#      and with its error codes;
#   4. the balanced posting (ledger.post), the payment row with its epoch, the outbox
#      event (outbox.write_event; its trigger queues the webhook fan-out), the audit row
#      (api/audit_trail.record_in) and the stored response (IdempotencyStore.finish).
#
# It never raises for a domain outcome: it returns (kind, status, body, token, code,
# message, param). kind 'busy' (an account is locked elsewhere past lock_timeout: the
# claim, if any, commits and `token` names it; the caller runs the effect on the general
# path), 'ok' (body: the payment as payment_view.to_api shapes it, keys
# in that order, timestamps as Python's isoformat writes them), 'replay' (the stored
# response), 'error' (a domain error the caller raises; `token` is set when the key was
# claimed by this call and the claim committed: the caller records the error as the key's
# answer, as run_mutation does). A domain error writes nothing but that claim.
#
# Any other lock it cannot get within the caller's lock_timeout (a duplicate's
# uncommitted claim) raises 55P03 and rolls the whole call back: nothing was claimed,
# and the caller runs the request on the two-transaction path.
FUNCTIONS = r"""
CREATE FUNCTION paycluster_isoformat(ts timestamptz) RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    -- datetime.isoformat() of the value psycopg reads for `ts` in this session's time
    -- zone: microseconds only when not zero, offset as +HH:MM.
    SELECT to_char(ts, 'YYYY-MM-DD"T"HH24:MI:SS')
           || CASE WHEN to_char(ts, 'US') = '000000' THEN '' ELSE '.' || to_char(ts, 'US') END
           || to_char(ts, 'TZH:TZM')
$$;

CREATE FUNCTION pay_local(
    p_region text, p_home text, p_lock_class integer, p_budget_ms integer,
    p_lease_epoch bigint,
    p_principal uuid, p_admin boolean,
    p_scope text, p_key text, p_hash text, p_ttl_s double precision, p_lock_s double precision,
    p_payment_id uuid, p_payer uuid, p_payee uuid, p_amount bigint, p_currency text,
    p_description text,
    p_journal_id uuid, p_entry_ids uuid[], p_event_id uuid,
    p_audit_id uuid, p_audit_key_id uuid, p_audit_action text, p_audit_resource text,
    p_request_id text,
    OUT kind text, OUT status integer, OUT body json, OUT token uuid,
    OUT code text, OUT message text, OUT param text)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_now timestamptz := now();
    v_check timestamptz;     -- when an existing key is judged (see below)
    v_epoch bigint;          -- the current epoch row's (NULL: home not in the log yet)
    v_fence bigint;          -- what assert_serving returns: the epoch, 0 without a row
    v_serving text;
    v_banned boolean;
    v_key idempotency_keys%ROWTYPE;
    v_payer accounts%ROWTYPE;
    v_payee accounts%ROWTYPE;
    v_acc accounts%ROWTYPE;
    v_created timestamptz;
    v_body json;
BEGIN
    -- 1. Ownership fence (ownership._current / assert_serving). The lock is taken by its
    -- own statement before the epoch is read: under READ COMMITTED the read's snapshot
    -- then sees a ban committed while we waited for the lock.
    IF p_budget_ms IS NULL THEN
        PERFORM pg_advisory_xact_lock_shared(p_lock_class, hashtext(p_home));
    ELSE
        PERFORM pg_advisory_xact_lock_shared(p_lock_class, hashtext(p_home)),
                set_config('transaction_timeout', p_budget_ms::text, true);
    END IF;
    SELECT e.epoch, e.serving_region,
           EXISTS (SELECT 1 FROM ownership_bans b
                    WHERE b.home_region = e.home_region AND b.epoch = e.epoch)
      INTO v_epoch, v_serving, v_banned
      FROM ownership_epochs e WHERE e.home_region = p_home
     ORDER BY e.epoch DESC LIMIT 1;
    v_serving := coalesce(v_serving, p_home);
    IF v_serving <> p_region THEN
        kind := 'error'; status := 503; code := 'not_owner';
        message := format('Region %s does not serve home region %s (served by %s)',
                          p_region, p_home, v_serving);
        RETURN;
    END IF;
    v_fence := coalesce(v_epoch, 0);
    IF v_banned THEN
        kind := 'error'; status := 503; code := 'ownership_handover';
        message := format('Writes for home region %s are paused for a handover; retry shortly',
                          p_home);
        RETURN;
    END IF;
    IF p_lease_epoch IS NOT NULL AND p_lease_epoch <> v_fence THEN
        kind := 'error'; status := 503; code := 'lease_lost';
        message := format('Lease of %s is held here under epoch=%s, not epoch=%s; retry shortly',
                          p_home, p_lease_epoch, v_fence);
        RETURN;
    END IF;

    -- 2. The Idempotency-Key claim (IdempotencyStore._claim_sql, then hold).
    IF p_key IS NOT NULL THEN
        token := gen_random_uuid();
        INSERT INTO idempotency_keys (scope, key, request_hash, state, locked_at, created_at,
                                      expires_at, epoch, token)
        VALUES (p_scope, p_key, p_hash, 'started', v_now, v_now,
                v_now + make_interval(secs => p_ttl_s), v_fence, token)
        ON CONFLICT DO NOTHING;
        IF NOT FOUND THEN
            BEGIN
                -- Locked: the effect transaction of a claim made on the two-transaction
                -- path is running right now; that request is alive.
                SELECT * INTO v_key FROM idempotency_keys
                 WHERE scope = p_scope AND key = p_key FOR UPDATE NOWAIT;
            EXCEPTION WHEN lock_not_available THEN
                kind := 'error'; status := 409; code := 'idempotency_key_in_use';
                message := 'A request with this Idempotency-Key is still being processed; '
                           'retry later';
                token := NULL;
                RETURN;
            END;
            -- Judged at this moment, not at the call's start: the insert may have waited
            -- for a concurrent claim of the same key to commit.
            v_check := clock_timestamp();
            IF v_key.expires_at <= v_check THEN
                -- An expired key is forgotten: the same key starts a new request.
                UPDATE idempotency_keys
                   SET request_hash = p_hash, state = 'started', locked_at = v_check,
                       response_status = NULL, response_body = NULL, created_at = v_check,
                       expires_at = v_check + make_interval(secs => p_ttl_s), epoch = v_fence,
                       token = pay_local.token
                 WHERE scope = p_scope AND key = p_key;
            ELSIF v_key.request_hash <> p_hash THEN
                kind := 'error'; status := 422; code := 'idempotency_key_reused';
                message := 'Keys for idempotent requests can only be used with the same '
                           'parameters they were first used with';
                token := NULL;
                RETURN;
            ELSIF v_key.state = 'finished' THEN
                kind := 'replay'; status := v_key.response_status;
                body := v_key.response_body::json; token := NULL;
                RETURN;
            ELSIF v_key.locked_at IS NOT NULL
                  AND v_key.locked_at > v_check - make_interval(secs => p_lock_s)
                  AND NOT (v_key.epoch IS NOT NULL AND v_key.epoch <> v_fence) THEN
                kind := 'error'; status := 409; code := 'idempotency_key_in_use';
                message := 'A request with this Idempotency-Key is still being processed; '
                           'retry later';
                token := NULL;
                RETURN;
            ELSE
                -- Stalled past the lock time, or claimed under an earlier epoch: take it
                -- over; the original can no longer finish (its token is gone).
                UPDATE idempotency_keys SET locked_at = v_check, epoch = v_fence,
                                            token = pay_local.token
                 WHERE scope = p_scope AND key = p_key;
            END IF;
        END IF;
    END IF;

    -- 3. Accounts, locked in the global order (ledger.lock_accounts: customer and
    -- merchant accounts by id, then system accounts), and create_payment's checks.
    BEGIN
        FOR v_acc IN
            SELECT * FROM accounts WHERE id IN (p_payer, p_payee)
             ORDER BY (kind IN ('funding', 'clearing', 'suspense'))::int, id
               FOR UPDATE
        LOOP
            IF v_acc.id = p_payer THEN v_payer := v_acc; ELSE v_payee := v_acc; END IF;
        END LOOP;
    EXCEPTION WHEN lock_not_available THEN
        -- An account is held elsewhere longer than lock_timeout: answer 'busy' and keep
        -- the claim, which commits with this call as the general path's claim
        -- transaction does; the caller runs the effect on the general path under that
        -- token. A duplicate arriving meanwhile sees a committed claim: 409, never a
        -- takeover of a key whose first request is still running.
        -- The claim counts from now, when it becomes visible, not from the call's
        -- start: a retry must see it as fresh for lock_seconds (409), as it sees the
        -- general path's claim.
        IF p_key IS NOT NULL THEN
            UPDATE idempotency_keys SET locked_at = clock_timestamp()
             WHERE scope = p_scope AND key = p_key;
        END IF;
        kind := 'busy';
        RETURN;
    END;
    -- access.require_account ran before any lock in Python; the order of the answers is
    -- the same: 403 for a payer that exists and is not the caller's, then 404s.
    IF NOT p_admin AND v_payer.id IS NOT NULL
       AND v_payer.principal_id IS DISTINCT FROM p_principal THEN
        kind := 'error'; status := 403; code := 'forbidden';
        message := 'This API key may not access this payer account';
        RETURN;
    END IF;
    IF v_payer.id IS NULL THEN
        kind := 'error'; status := 404; code := 'resource_missing'; param := 'payer';
        message := format('No such account: ''%s''', p_payer);
        RETURN;
    END IF;
    IF v_payee.id IS NULL THEN
        kind := 'error'; status := 404; code := 'resource_missing'; param := 'payee';
        message := format('No such account: ''%s''', p_payee);
        RETURN;
    END IF;
    FOR i IN 1..2 LOOP
        IF i = 1 THEN v_acc := v_payer; param := 'payer'; ELSE v_acc := v_payee; param := 'payee'; END IF;
        IF v_acc.currency <> p_currency THEN
            kind := 'error'; status := 400; code := 'currency_mismatch';
            message := format('%s account holds %s, the payment is in %s',
                              param, v_acc.currency, p_currency);
            RETURN;
        END IF;
        IF v_acc.kind NOT IN ('customer', 'merchant') THEN
            kind := 'error'; status := 400; code := 'invalid_request';
            message := format('%s must be a customer or merchant account', param);
            RETURN;
        END IF;
    END LOOP;
    IF v_payee.status <> 'open' THEN
        kind := 'error'; status := 400; code := 'account_closed'; param := 'payee';
        message := format('Account %s is closed', v_payee.id);
        RETURN;
    END IF;
    param := 'payer';
    IF v_payer.status <> 'open' THEN
        kind := 'error'; status := 400; code := 'account_closed';
        message := format('Account %s is closed', v_payer.id);
        RETURN;
    END IF;
    IF NOT v_payer.allow_overdraft AND v_payer.balance - v_payer.held < p_amount THEN
        kind := 'error'; status := 402; code := 'insufficient_funds';
        message := format('Insufficient funds: available %s %s, needed %s',
                          v_payer.balance - v_payer.held, v_payer.currency, p_amount);
        RETURN;
    END IF;
    param := NULL;

    -- 4. The effect: posting, balances, payment, outbox event, audit row, response.
    INSERT INTO journal_entries (id, journal_id, account_id, amount, currency, entry_type,
                                 payment_id, region)
    VALUES (p_entry_ids[1], p_journal_id, p_payer, -p_amount, p_currency, 'payment',
            p_payment_id, p_region),
           (p_entry_ids[2], p_journal_id, p_payee, p_amount, p_currency, 'payment',
            p_payment_id, p_region);
    UPDATE accounts SET balance = balance - p_amount, updated_at = v_now WHERE id = p_payer;
    UPDATE accounts SET balance = balance + p_amount, updated_at = v_now WHERE id = p_payee;
    INSERT INTO payments (id, payer_id, payee_id, amount, currency, capture_method, status,
                          amount_captured, description, home_region, payee_home, epoch)
    VALUES (p_payment_id, p_payer, p_payee, p_amount, p_currency, 'automatic', 'succeeded',
            p_amount, p_description, p_home, p_home, v_epoch)
    RETURNING created_at INTO v_created;
    -- payment_view.to_api, key for key.
    v_body := json_build_object(
        'id', p_payment_id, 'object', 'payment', 'payer', p_payer, 'payee', p_payee,
        'amount', p_amount, 'currency', p_currency, 'capture_method', 'automatic',
        'status', 'succeeded', 'amount_capturable', 0, 'amount_captured', p_amount,
        'amount_refunded', 0, 'hold_expires_at', NULL, 'description', p_description,
        'failure_code', NULL, 'home_region', p_home,
        'created_at', paycluster_isoformat(v_created),
        'updated_at', paycluster_isoformat(v_created));
    INSERT INTO outbox (id, region, event_type, aggregate_id, payload)
    VALUES (p_event_id, p_region, 'payment.succeeded', p_payment_id,
            jsonb_build_object('id', p_event_id, 'type', 'payment.succeeded',
                               'region', p_region, 'data', v_body::jsonb));
    INSERT INTO audit_log (id, region, key_id, principal_id, action, resource, request_id,
                           status)
    VALUES (p_audit_id, p_region, p_audit_key_id, p_principal, p_audit_action,
            p_audit_resource, p_request_id, 201);
    IF p_key IS NOT NULL THEN
        UPDATE idempotency_keys
           SET state = 'finished', response_status = 201, response_body = v_body::jsonb,
               locked_at = NULL
         WHERE scope = p_scope AND key = p_key;
    END IF;
    kind := 'ok'; status := 201; body := v_body;
END $$;
"""


def upgrade() -> None:
    op.execute(FUNCTIONS)


def downgrade() -> None:
    op.execute("DROP FUNCTION IF EXISTS pay_local(text, text, integer, integer, bigint, uuid, boolean, "
               "text, text, text, double precision, double precision, uuid, uuid, uuid, bigint, "
               "text, text, uuid, uuid[], uuid, uuid, uuid, text, text, text)")
    op.execute("DROP FUNCTION IF EXISTS paycluster_isoformat(timestamptz)")
