"""The return of a region that lost its ownership in a forced takeover (crash or
partition): list its lost tail for reconciliation, then bring it back consistently.

**Lost tail** (`lost_tail`). At the takeover every survivor cut the old owner's stream
off at one aligned position (`replication.align`, ``ownership_takeovers.positions``).
Whatever the returning region committed itself and no survivor has is its tail: in
``local`` durability mode, payments it acknowledged in the last moments before the crash
(or, in a partition, before its lease ran out). They are found by content, not by LSN:
rows of the returning region's store whose last change was local (replication origin
0) and that no survivor has (by primary key). Payments are listed with their journal
entries and amounts per currency; journals without a lost payment (a deposit, a
withdrawal) are listed on their own. A lost cross-region payment whose transfer had
already been pushed to the payee's region and credited there (the push leaves right after
the payer's commit, before replication) is an **orphan credit**: the survivors hold the
credit but not the debit that fed it. It is listed too, with the clearing account that
paid it, and that account's region parks the amount in its suspense account
(`region_node.suspense`) so the ledger balances while the item is open. Refunds go the
other way: a refund the returning region (serving the payee's home) started and no
survivor has is listed as a ``refund`` item with the merchant's debit; if the payer's
region had already credited the payer (push before replication), that credit is an
``orphan_refund_credit``, parked the same way by the region whose clearing account paid
it. The items are written to ``reconciliation_items``
in the current owner's store (it replicates to every region; readable through
``GET /v1/admin/reconciliation``), keyed by (home, takeover epoch, item) so a rerun
adds nothing. They are never applied: an operator settles them with the customers.

**Rebuild** (`rebuild_region`; the lab's `cluster.rejoin.rejoin_region` stops the
node, starts the region's PostgreSQL if it is down, rebuilds, and starts the node). The
returning store holds a tail the others never saw, and its rows carry origins that no
longer match (the survivors restamped the home's rows for the new owner), so it cannot
simply resume streaming. The simplest correct way back is
a rebuild: the region's database is dropped and re-created, and it joins the cluster
again like a new region (`replication.join.add_region`: one copy from a donor
snapshot, then streams from everyone). A region in ``regional`` durability mode is made
``local`` first (its synchronous standby, the buddy's cut-off subscription, would never
confirm a commit, the rebuild's own included) and ``regional`` again once it streams.

**Commits waiting for the cut-off buddy** (`end_sync_waiters`). A region in ``regional``
mode that was cut off by a partition keeps the writers that were committing when the
cut came waiting in ``SyncRep``: committed in its own WAL, not yet visible, never
acknowledged. Clearing ``synchronous_standby_names`` would release them, and a node still
holding their sessions would then acknowledge payments that no survivor has (RPO > 0).
So before anything else touches such a store (the tail is listed, the mode changed) those
backends are terminated: the client sees its connection fail (never an
acknowledgement), the backend's commit completes locally, and the rows land in the lost
tail, where they are listed and never applied. (``pg_cancel_backend`` would not do: a
cancelled wait returns COMMIT as a success with a warning, an acknowledgement.)
Its node then sees that the new owner serves its home and never tries to take the
lease; ownership fails back the planned way (`replication.failover.planned_handover`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from region_node import suspense
from region_node.schema import REPLICATED_TABLES
from replication.align import primary_key
from replication.errors import ReplicationError
from replication.failover import RegionHandle, restamp
from replication.join import AddRegionReport, add_region
from replication.libpq import libpq_url
from replication.wiring import RegionDb, set_enabled, slot_name, unsubscribe


class ReconcileError(ReplicationError):
    """The tail could not be listed or the region not brought back."""


@dataclass
class LostTail:
    """What the returning region committed that no survivor has (see module docstring)."""

    home: str
    returning: str
    owner: str | None
    takeover_epoch: int | None
    aligned_at: str | None
    payments: list[dict[str, Any]] = field(default_factory=list)
    journals: list[dict[str, Any]] = field(default_factory=list)
    journal_entries: int = 0
    amount_by_currency: dict[str, int] = field(default_factory=dict)
    other_rows: dict[str, int] = field(default_factory=dict)
    orphan_credits: list[dict[str, Any]] = field(default_factory=list)
    # Refunds the returning region (serving a payee's home) started and no survivor has,
    # with their journal entries; and those of them the payer's region already credited
    # (pushed before replication): the survivors hold that credit without its debit.
    refunds: list[dict[str, Any]] = field(default_factory=list)
    orphan_refund_credits: list[dict[str, Any]] = field(default_factory=list)
    recorded: int = 0
    sync_waiters_ended: int = 0
    """Commits that were waiting for a cut-off synchronous standby, ended before the
    tail was read (`end_sync_waiters`)."""

    @property
    def count(self) -> int:
        """Number of lost payments."""
        return len(self.payments)

    @property
    def orphan_amount_by_currency(self) -> dict[str, int]:
        """Orphan credits' amounts per currency (what the suspense accounts take)."""
        out: dict[str, int] = {}
        for c in self.orphan_credits:
            out[c["currency"]] = out.get(c["currency"], 0) + int(c["amount"])
        return out

    @property
    def ledger_rows(self) -> int:
        """Lost ledger rows (payments, journal entries): 0 means only non-ledger rows
        (heartbeats, ...) are in the tail."""
        return len(self.payments) + len(self.refunds) + self.journal_entries

    def to_json(self) -> dict[str, Any]:
        """JSON-able form."""
        return {**asdict(self), "count": self.count,
                "orphan_amount_by_currency": self.orphan_amount_by_currency}


def _connect(dsn: str) -> psycopg.Connection[Any]:
    conn = psycopg.connect(libpq_url(dsn), autocommit=True, connect_timeout=5)
    conn.execute("set timezone = 'UTC'")
    return conn


_LOCAL = "(pg_xact_commit_timestamp_origin(t.xmin)).roident = 0"

_LOCAL_PAYMENTS = f"""
select t.id::text, t.home_region, t.status, t.amount, t.currency, t.epoch,
       t.payer_id::text, t.payee_id::text, pg_xact_commit_timestamp(t.xmin)
  from payments t where {_LOCAL}
"""

_LOCAL_ENTRIES = f"""
select t.id::text, t.journal_id::text, t.payment_id::text, t.account_id::text, t.amount,
       t.currency, t.entry_type, pg_xact_commit_timestamp(t.xmin)
  from journal_entries t where {_LOCAL}
"""

_LOCAL_REFUNDS = f"""
select t.id::text, t.payment_id::text, t.amount, t.currency, t.status, t.payee_id::text,
       t.payer_home, t.home_region, t.journal_id::text, pg_xact_commit_timestamp(t.xmin)
  from refunds t where {_LOCAL}
"""

# Every other replicated table is checked for local rows no survivor has (by primary
# key): an idempotency claim whose effect was refused, an account opened in the tail...
_LEDGER_TABLES = ("payments", "journal_entries", "refunds")


def _present(dsns: list[str], table: str, ids: list[str]) -> set[str]:
    """Which of `ids` (primary key `id`) any of the stores at `dsns` has."""
    found: set[str] = set()
    if not ids:
        return found
    for dsn in dsns:
        with _connect(dsn) as conn:
            found |= {str(r[0]) for r in conn.execute(
                f"select id::text from {table} where id = any(%s::uuid[])", (ids,))}
    return found


def _takeover(dsn: str, home: str, returning: str) -> tuple[int, str | None] | None:
    with _connect(dsn) as conn:
        row = conn.execute(
            "select epoch, positions->>'aligned_at' from ownership_takeovers "
            "where home_region = %s and from_region = %s order by epoch desc limit 1",
            (home, returning)).fetchone()
    return None if row is None else (int(row[0]), row[1])


def _owner(dsn: str, home: str) -> str | None:
    with _connect(dsn) as conn:
        row = conn.execute("select serving_region from ownership_epochs where home_region = %s "
                           "order by epoch desc limit 1", (home,)).fetchone()
    return None if row is None else str(row[0])


_SYNC_WAITERS = """
select pid from pg_stat_activity
 where wait_event_type = 'IPC' and wait_event = 'SyncRep' and pid <> pg_backend_pid()
"""


def end_sync_waiters(dsn: str, timeout_seconds: float = 15.0) -> int:
    """Terminate every backend of the store at `dsn` that waits in ``SyncRep`` for a
    synchronous standby (see the module docstring: its commit completes locally and was
    never acknowledged), and wait until they are gone; returns how many there were.
    Never waits for a standby itself. ReconcileError if some outlive `timeout_seconds`."""
    deadline = time.monotonic() + timeout_seconds
    ended: set[int] = set()
    with _connect(dsn) as conn:
        conn.execute("set synchronous_commit = local")
        conn.execute(f"set statement_timeout = {int(timeout_seconds * 1000)}")
        while True:
            pids = [int(r[0]) for r in conn.execute(_SYNC_WAITERS).fetchall()]
            # A terminated backend's commit is visible once it has exited.
            alive = [int(r[0]) for r in conn.execute(
                "select pid from pg_stat_activity where pid = any(%s)", (sorted(ended),))]
            if not pids and not alive:
                return len(ended)
            if time.monotonic() > deadline:
                raise ReconcileError(f"backends {pids or alive} still wait for a synchronous "
                                     f"standby after {timeout_seconds:g} s")
            for pid in pids:
                conn.execute("select pg_terminate_backend(%s)", (pid,))
                ended.add(pid)
            time.sleep(0.05)


def lost_tail(returning: RegionHandle, survivors: Mapping[str, RegionHandle], home: str, *,
              record: bool = True) -> LostTail:
    """List the returning region's transactions that no survivor has (its lost tail),
    and with `record` write them to ``reconciliation_items`` in the current owner's
    store (never applied). The returning region's PostgreSQL must be up (its node need
    not be); every survivor's store must answer. Commits of the returning store still
    waiting for a cut-off synchronous standby are ended first (`end_sync_waiters`), so
    that they are listed too. Synchronous (psycopg)."""
    if not survivors:
        raise ReconcileError("no survivor given")
    waiters = end_sync_waiters(returning.dsn)
    dsns = [h.dsn for h in survivors.values()]
    first = next(iter(survivors.values()))
    owner = _owner(first.dsn, home)
    owner_handle = survivors.get(owner or "")
    taken = _takeover(owner_handle.dsn if owner_handle else first.dsn, home, returning.name)
    tail = LostTail(home, returning.name, owner, taken[0] if taken else None,
                    taken[1] if taken else None, sync_waiters_ended=waiters)
    with _connect(returning.dsn) as conn:
        payments = conn.execute(_LOCAL_PAYMENTS).fetchall()
        entries = conn.execute(_LOCAL_ENTRIES).fetchall()
        refunds = conn.execute(_LOCAL_REFUNDS).fetchall()
        others = {t: _local_keys(conn, t) for t in REPLICATED_TABLES if t not in _LEDGER_TABLES}
    have_pay = _present(dsns, "payments", [str(p[0]) for p in payments])
    have_entry = _present(dsns, "journal_entries", [str(e[0]) for e in entries])
    lost_entries = [e for e in entries if str(e[0]) not in have_entry]
    have_refund = _present(dsns, "refunds", [str(r[0]) for r in refunds])
    lost_refunds = [r for r in refunds if str(r[0]) not in have_refund]
    # A lost refund's own posting (the payee's debit) is listed with the refund.
    refund_journals: dict[str, list[dict[str, Any]]] = {
        str(r[8]): [] for r in lost_refunds if r[8] is not None}
    by_payment: dict[str, list[dict[str, Any]]] = {}
    by_journal: dict[str, list[dict[str, Any]]] = {}
    for e in lost_entries:
        item = {"id": e[0], "journal_id": e[1], "payment_id": e[2], "account_id": e[3],
                "amount": int(e[4]), "currency": e[5], "entry_type": e[6],
                "committed_at": e[7].isoformat() if e[7] else None}
        if str(e[1]) in refund_journals:
            refund_journals[str(e[1])].append(item)
        elif e[2] is not None:
            by_payment.setdefault(str(e[2]), []).append(item)
        else:
            by_journal.setdefault(str(e[1]), []).append(item)
    for p in payments:
        if str(p[0]) in have_pay:
            continue
        tail.payments.append({
            "id": p[0], "home_region": p[1], "status": p[2], "amount": int(p[3]),
            "currency": p[4], "epoch": None if p[5] is None else int(p[5]), "payer": p[6],
            "payee": p[7], "committed_at": p[8].isoformat() if p[8] else None,
            "entries": by_payment.pop(str(p[0]), [])})
        tail.amount_by_currency[p[4]] = tail.amount_by_currency.get(p[4], 0) + int(p[3])
    tail.orphan_credits = _orphan_credits(returning.dsn, dsns, tail.payments)
    for r in lost_refunds:
        tail.refunds.append({
            "id": r[0], "payment_id": r[1], "amount": int(r[2]), "currency": r[3],
            "status": r[4], "payee": r[5], "payer_home": r[6], "home_region": r[7],
            "journal_id": r[8], "committed_at": r[9].isoformat() if r[9] else None,
            "entries": refund_journals.get(str(r[8]), [])})
    tail.orphan_refund_credits = _orphan_refund_credits(dsns, tail.refunds)
    # Entries of payments the survivors have (e.g. a capture posted in the tail, or the
    # credit of a transfer from another region), and journals without a payment
    # (deposits, withdrawals). A lost credit the survivors made again (the new owner
    # applies the replicated transfer message that has no result) says so.
    redone = _credits_made(dsns, [k for k, items in by_payment.items()
                                  if any(i["entry_type"] == "transfer_in" for i in items)])
    for key, items in [*by_payment.items(), *by_journal.items()]:
        tail.journals.append({"journal_id": items[0]["journal_id"], "payment_id":
                              items[0]["payment_id"], "entries": items,
                              "amount": sum(i["amount"] for i in items if i["amount"] > 0),
                              "currency": items[0]["currency"],
                              "committed_at": items[0]["committed_at"], "key": key,
                              "redone_by_journal": redone.get(key)})
    tail.journal_entries = len(lost_entries)
    for table, (pk, keys) in others.items():
        missing = set(keys)
        for dsn in dsns:
            if missing:
                with _connect(dsn) as conn:
                    missing -= _keys_present(conn, table, pk, sorted(missing))
        if missing:
            tail.other_rows[table] = len(missing)
    if record and tail.takeover_epoch is not None and owner_handle is not None:
        tail.recorded = _record(owner_handle, tail)
    return tail


_TRANSFERS_OF = """
select id::text, payment_id::text, payee_id::text, to_home from transfers
 where payment_id = any(%s::uuid[])
"""

# The credit a transfer got at the payee's region, with the clearing account that paid it.
_CREDITS_OF = """
select r.transfer_id::text, r.journal_id::text, a.id::text, a.home_region, e.amount,
       e.currency, r.created_at
  from transfer_results r
  join journal_entries e on e.journal_id = r.journal_id
  join accounts a on a.id = e.account_id and a.kind = 'clearing'
 where r.outcome = 'credited' and r.transfer_id = any(%s::uuid[])
"""


def _orphan_credits(returning_dsn: str, dsns: list[str],
                    payments: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Credits the survivors hold for transfers of lost payments (see module docstring);
    each payment's item is annotated with its credit."""
    by_id = {str(p["id"]): p for p in payments}
    if not by_id:
        return []
    with _connect(returning_dsn) as conn:
        messages = {str(m[0]): m for m in conn.execute(_TRANSFERS_OF, (list(by_id),))}
    credits: dict[str, dict[str, Any]] = {}
    for dsn in dsns:
        if not messages or len(credits) == len(messages):
            break
        with _connect(dsn) as conn:
            for r in conn.execute(_CREDITS_OF, (list(messages),)):
                message = messages[str(r[0])]
                credits.setdefault(str(r[0]), {
                    "transfer_id": r[0], "payment_id": message[1], "payee": message[2],
                    "to_home": message[3], "journal_id": r[1], "clearing_account": r[2],
                    "credit_region": r[3], "amount": -int(r[4]), "currency": r[5],
                    "credited_at": r[6].isoformat() if r[6] else None})
    for credit in credits.values():
        by_id[credit["payment_id"]]["credited"] = {
            k: credit[k] for k in ("transfer_id", "journal_id", "credit_region")}
    return sorted(credits.values(), key=lambda c: str(c["credited_at"]))


# The payer region's credit of a refund, with the clearing account that paid it.
_REFUND_CREDITS_OF = """
select r.refund_id::text, r.journal_id::text, a.id::text, a.home_region, e.amount,
       e.currency, r.payer_id::text, r.created_at
  from refund_results r
  join journal_entries e on e.journal_id = r.journal_id
  join accounts a on a.id = e.account_id and a.kind = 'clearing'
 where r.outcome = 'credited' and r.refund_id = any(%s::uuid[])
"""


def _orphan_refund_credits(dsns: list[str],
                           refunds: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Credits the survivors hold for lost refunds (the payer was credited out of its
    region's clearing account, the merchant's debit that fed it is gone); each refund's
    item is annotated with its credit."""
    by_id = {str(r["id"]): r for r in refunds}
    credits: dict[str, dict[str, Any]] = {}
    for dsn in dsns:
        if not by_id or len(credits) == len(by_id):
            break
        with _connect(dsn) as conn:
            for c in conn.execute(_REFUND_CREDITS_OF, (list(by_id),)):
                refund = by_id[str(c[0])]
                credits.setdefault(str(c[0]), {
                    "refund_id": c[0], "payment_id": refund["payment_id"], "payer": c[6],
                    "journal_id": c[1], "clearing_account": c[2], "credit_region": c[3],
                    "amount": -int(c[4]), "currency": c[5],
                    "credited_at": c[7].isoformat() if c[7] else None})
    for credit in credits.values():
        by_id[str(credit["refund_id"])]["credited"] = {
            k: credit[k] for k in ("journal_id", "credit_region")}
    return sorted(credits.values(), key=lambda c: str(c["credited_at"]))


def _credits_made(dsns: list[str], payment_ids: list[str]) -> dict[str, str]:
    """payment id -> the journal that credited its transfer in a survivor's copy."""
    made: dict[str, str] = {}
    for dsn in dsns:
        if payment_ids:
            with _connect(dsn) as conn:
                made.update({str(r[0]): str(r[1]) for r in conn.execute(
                    "select payment_id::text, journal_id::text from journal_entries "
                    "where entry_type = 'transfer_in' and payment_id = any(%s::uuid[])",
                    (payment_ids,))})
    return made


def wait_parked(stores: Mapping[str, RegionHandle], tail: LostTail,
                timeout_seconds: float = 30.0) -> int:
    """Wait until every orphan credit of `tail` is parked in suspense by the region whose
    clearing account paid it (its node does it once the recorded item replicates there);
    returns how many there were. TimeoutError naming the ones still open."""
    deadline = time.monotonic() + timeout_seconds
    open_items = list(tail.orphan_credits)
    while open_items:
        still = []
        for credit in open_items:
            with _connect(stores[credit["credit_region"]].dsn) as conn:
                if conn.execute("select 1 from journal_entries where payment_id = %s "
                                "and entry_type = %s limit 1",
                                (credit["payment_id"], suspense.ENTRY_TYPE)).fetchone() is None:
                    still.append(credit)
        open_items = still
        if open_items and time.monotonic() > deadline:
            raise TimeoutError(f"orphan credits not parked within {timeout_seconds:g} s: "
                               f"{[c['payment_id'] for c in open_items]}")
        if open_items:
            time.sleep(0.1)
    return len(tail.orphan_credits)


def _pk_json(pk: list[str]) -> sql.Composable:
    return sql.SQL("json_build_array({})::jsonb").format(
        sql.SQL(", ").join(sql.Identifier("t", c) for c in pk))


def _local_keys(conn: psycopg.Connection[Any], table: str) -> tuple[list[str], list[str]]:
    """(primary key columns, keys as JSON) of `table`'s rows last changed locally."""
    pk = primary_key(conn, table)
    if not pk:
        return pk, []
    rows = conn.execute(sql.SQL("select {k}::text from {t} t where " + _LOCAL).format(
        k=_pk_json(pk), t=sql.Identifier(table))).fetchall()
    return pk, [str(r[0]) for r in rows]


def _keys_present(conn: psycopg.Connection[Any], table: str, pk: list[str],
                  keys: list[str]) -> set[str]:
    rows = conn.execute(sql.SQL("select {k}::text from {t} t where {k} = any(%s::jsonb[])")
                        .format(k=_pk_json(pk), t=sql.Identifier(table)), (keys,)).fetchall()
    return {str(r[0]) for r in rows}


def _record(owner: RegionHandle, tail: LostTail) -> int:
    """Insert the tail's items into ``reconciliation_items`` at the owner (only the
    owner inserts them: the keys are never written by two regions)."""
    rows: list[tuple[Any, ...]] = []
    for p in tail.payments:
        rows.append((tail.home, tail.takeover_epoch, p["id"], "payment", tail.returning,
                     owner.name, p["epoch"], p["status"], p["currency"], p["amount"],
                     p["committed_at"], json.dumps(p)))
    for j in tail.journals:
        rows.append((tail.home, tail.takeover_epoch, j["journal_id"], "journal",
                     tail.returning, owner.name, None, None, j["currency"], j["amount"],
                     j["committed_at"], json.dumps(j)))
    for c in tail.orphan_credits:
        rows.append((tail.home, tail.takeover_epoch, c["journal_id"], suspense.ITEM_KIND,
                     tail.returning, owner.name, None, "credited", c["currency"],
                     c["amount"], c["credited_at"], json.dumps(c)))
    for r in tail.refunds:
        rows.append((tail.home, tail.takeover_epoch, r["id"], "refund", tail.returning,
                     owner.name, None, r["status"], r["currency"], r["amount"],
                     r["committed_at"], json.dumps(r)))
    for c in tail.orphan_refund_credits:
        rows.append((tail.home, tail.takeover_epoch, c["journal_id"],
                     suspense.REFUND_ITEM_KIND, tail.returning, owner.name, None, "credited",
                     c["currency"], c["amount"], c["credited_at"], json.dumps(c)))
    inserted = 0
    with _connect(owner.dsn) as conn, conn.transaction():
        for row in rows:
            cur = conn.execute(
                "insert into reconciliation_items (home_region, takeover_epoch, item_id, "
                "item_kind, lost_region, listed_by, epoch, status, currency, amount, "
                "committed_at, detail) values (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, "
                "%s::jsonb) on conflict do nothing", row)
            inserted += max(cur.rowcount, 0)
    return inserted


def _drop_slots(dsn: str, database: str | None = None, name: str | None = None,
                timeout_seconds: float = 15.0) -> None:
    """Drop replication slots (of `database`, or the one called `name`) once inactive."""
    deadline = time.monotonic() + timeout_seconds
    with _connect(dsn) as conn:
        while True:
            rows = conn.execute(
                "select slot_name, active_pid from pg_replication_slots where "
                "(%s::text is null or database = %s) and (%s::text is null or slot_name = %s)",
                (database, database, name, name)).fetchall()
            if not rows:
                return
            for slot, pid in rows:
                if pid is not None:
                    conn.execute("select pg_terminate_backend(%s)", (pid,))
                else:
                    conn.execute("select pg_drop_replication_slot(%s)", (slot,))
            if time.monotonic() > deadline:
                raise ReconcileError(f"slots {[r[0] for r in rows]} stay active")
            time.sleep(0.1)


def reconnect_region(returning: RegionHandle, survivors: Mapping[str, RegionHandle],
                     home: str, *, tail: LostTail | None = None) -> LostTail:
    """Bring back a region isolated by a partition without a rebuild, when that is safe:
    its tail (`lost_tail`, recorded) holds no ledger row and no other row that no
    survivor has (only changes of rows the survivors also hold, e.g. its heartbeat).
    Then its copies of the home's rows are restamped for the new owner (so the new
    owner's updates are not conflicts there), its subscriptions to the survivors are
    enabled again (it receives the new epoch and everything written meanwhile), and the
    survivors' subscriptions to it resume from the positions they were cut off at.
    ReconcileError (nothing changed) otherwise: rebuild it with `rejoin_region`.
    Synchronous."""
    tail = tail or lost_tail(returning, survivors, home)
    if tail.ledger_rows or tail.other_rows:
        raise ReconcileError(
            f"{returning.name}'s tail holds {tail.count} payments, {tail.journal_entries} "
            f"journal entries and rows {tail.other_rows} no survivor has: rebuild it")
    if tail.owner is None or tail.owner not in survivors:
        raise ReconcileError(f"the new owner of {home} is not among the survivors")
    with _local_meanwhile(returning.dsn, returning.name,
                          {n: h.dsn for n, h in survivors.items()}):
        restamp(returning.dsn, home, tail.owner)
        for name in survivors:
            set_enabled(returning.dsn, name, True)
        for handle in survivors.values():
            set_enabled(handle.dsn, returning.name, True)
    return tail


@contextmanager
def _local_meanwhile(dsn: str, region: str, others: Mapping[str, str]) -> Iterator[None]:
    """Run the block with `region` in ``local`` durability mode, and put it back into
    ``regional`` with the same buddy (`others`: region -> DSN) if the block succeeds.

    A returning region's synchronous standby is its buddy's subscription to it, which the
    takeover cut off: until that streams again, every commit there would wait forever.
    After a failure it stays local, which never blocks."""
    from replication.durability import durability, set_durability

    was = durability(dsn, region, [region, *others])
    if was.mode != "local":
        # Going local releases whatever waits for the standby: end those commits first
        # (never acknowledged, see `end_sync_waiters`).
        end_sync_waiters(dsn)
        set_durability(dsn, region, "local")
    yield
    if was.mode != "local" and was.buddy is not None and was.buddy in others:
        set_durability(dsn, region, was.mode, was.buddy, others[was.buddy])


def rebuild_region(name: str, stores: Mapping[str, RegionDb], *, donor: str | None = None,
                   timeout_seconds: float = 120.0) -> AddRegionReport:
    """Rebuild region `name`'s database after it lost a forced takeover (see the module
    docstring): drop every subscription to and from it and its slots, drop and re-create
    its database, and join it again from `donor` (default: the first other region of
    `stores`) with `replication.join.add_region`. `stores` holds every region, `name`'s
    included, as the wiring sees it; every PostgreSQL must be up and `name`'s node stopped
    (the lab's `cluster.rejoin.rejoin_region` sees to both). List its lost tail with
    `lost_tail` first: the rebuild discards it. A region in ``regional`` mode is rebuilt
    in ``local`` mode and put back to ``regional`` with the same buddy once it streams
    again. Synchronous."""
    others = [r for r in stores if r != name]
    with _local_meanwhile(stores[name].dsn, name, {o: stores[o].dsn for o in others}):
        return _rebuild(name, others, stores, donor, timeout_seconds)


def _rebuild(name: str, others: list[str], dbs: Mapping[str, RegionDb], donor: str | None,
             timeout_seconds: float) -> AddRegionReport:
    """Drop region `name`'s database with every subscription and slot to and from it,
    and join it again from `donor`."""
    for other in others:
        unsubscribe(dbs[other].dsn, name, drop_slot=False)
        unsubscribe(dbs[name].dsn, other, drop_slot=False)
        _drop_slots(dbs[other].dsn, name=slot_name(other, name))
    dbname = dbs[name].dbname
    admin = dbs[name].dsn.rsplit("/", 1)[0] + "/postgres"
    _drop_slots(admin, database=dbname)
    with _connect(admin) as conn:
        conn.execute(f'drop database if exists "{dbname}" with (force)')
    return add_region([dbs[o] for o in others], dbs[name],
                             donor=donor or others[0], timeout_seconds=timeout_seconds)
