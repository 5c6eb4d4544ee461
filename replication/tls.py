"""Who may open a replication connection between regions, and how.

A subscriber connects to a publisher as the dedicated role `paycluster_repl` (LOGIN
REPLICATION, SELECT on the published tables), never as a superuser. Between regions the
connection is carried by TLS gateways with mutual authentication (cluster.pg_tls: the
lab's PostgreSQL build has no SSL of its own): the publisher's gateway takes only peers
with a certificate of the cluster CA and then reaches PostgreSQL over its unix socket,
whose folder only the server's user may enter. pg_hba.conf admits the replication role
only on that socket and rejects it on every TCP connection, so the role cannot log in
around the gateway. Everyone else (the nodes, operators, tests) keeps loopback access.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg import sql

REPLICATION_ROLE = "paycluster_repl"
"""The role subscriptions log in as on their publishers."""


def hba_conf() -> str:
    """pg_hba.conf: the replication role only through the TLS gateway (the unix socket),
    refused on any TCP connection; everyone else as `initdb --auth=trust` left it."""
    role = REPLICATION_ROLE
    return f"""\
# Written by paycluster (replication/tls.py) on every start: edits here are lost.
# TYPE  DATABASE     USER             ADDRESS       METHOD
# The replication role: only from the TLS gateway, on the socket only it may reach.
local   all          {role}                 trust
local   replication  {role}                 trust
host    all          {role}  all            reject
host    replication  {role}  all            reject
# Everyone else: local operators, the region's nodes and tools.
local   all          all                            trust
host    all          all              127.0.0.1/32  trust
host    all          all              ::1/128       trust
local   replication  all                            trust
host    replication  all              127.0.0.1/32  trust
host    replication  all              ::1/128       trust
"""


def ensure_replication_role(conn: psycopg.Connection[Any], tables: Sequence[str],
                            password: str | None = None) -> None:
    """Create the replication role if missing and let it read `tables` (what the
    publication sends; table sync reads them). Idempotent; `conn` in autocommit.

    Without `password` (the lab) the role has none: pg_hba.conf lets it in only through
    the gateway's socket. With one (a managed PostgreSQL, reached over TCP and TLS) it is
    set, and where the operator is not a superuser (Amazon RDS) the replication right is
    granted through the provider's role `rds_replication` instead of the attribute."""
    exists = conn.execute("select 1 from pg_roles where rolname = %s",
                          (REPLICATION_ROLE,)).fetchone()
    role = sql.Identifier(REPLICATION_ROLE)
    if not exists:
        try:
            with conn.transaction():
                conn.execute(sql.SQL("create role {} with login replication").format(role))
        except psycopg.errors.InsufficientPrivilege:
            conn.execute(sql.SQL("create role {} with login").format(role))
            if conn.execute("select 1 from pg_roles where rolname = 'rds_replication'"
                            ).fetchone():
                conn.execute(sql.SQL("grant rds_replication to {}").format(role))
    if password is not None:
        conn.execute(sql.SQL("alter role {} with password {}").format(
            role, sql.Literal(password)))
    if tables:
        conn.execute(sql.SQL("grant select on {} to {}").format(
            sql.SQL(", ").join(sql.Identifier(t) for t in tables), role))
