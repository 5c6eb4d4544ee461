"""Regenerate the reference parts of the docs from the code: `python docs/gen_reference.py`.

It rewrites, between `<!-- BEGIN GENERATED: name -->` and `<!-- END GENERATED: name -->`
markers, the generated sections of

- docs/api.md: every route of the region node (from `create_app(...).openapi()`), of the
  channel (its FastAPI decorators) and of the geo router (its Starlette routes);
- docs/errors.md: every error `code` the region node, the geo router and the channel can
  answer with, its HTTP status and type, where it is raised and what a client should do;
- docs/configuration.md: every field of every pydantic-settings class: env var, type,
  default, description (the Field description, else the comment block above the field).

Prose outside the markers is left alone. `--check` exits 1 (and rewrites nothing) when a
file would change; tests/test_docs.py runs it, so the reference cannot go stale.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import inspect
import json
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic_settings import BaseSettings

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SETTINGS_CLASSES = (
    "region_node.config:RegionSettings",
    "geo_router.config:RouterSettings",
    "lock_service.config:LockSettings",
    "channel.config:ChannelSettings",
    "region_node.channel_config:ChannelLinkSettings",
)
"""Every pydantic-settings class; test_docs fails if a BaseSettings subclass is missing."""

ERROR_PACKAGES = ("region_node", "geo_router", "channel", "lock_service", "replication")

# ---------------------------------------------------------------------------------------
# What a client should do, per code. A code without an entry gets the advice of its status.
ADVICE: dict[str, str] = {
    "internal_error": "A bug or an unexpected failure; nothing is known to have happened. "
                      "Retry with the same Idempotency-Key; report it with the request id.",
    "invalid_request": "Fix the request (the message and `param` say what); do not retry "
                       "unchanged.",
    "invalid_json": "Send a JSON object body with `Content-Type: application/json`.",
    "unknown_parameter": "Remove the parameter named in `param` (bodies are strict).",
    "parameter_missing": "Add the parameter named in `param`.",
    "invalid_integer": "Send a JSON integer (minor units: 1050 for 10.50), not a string "
                       "or a float.",
    "invalid_amount": "Amounts are positive integers in minor units.",
    "invalid_value": "Use one of the allowed values (the message lists them).",
    "invalid_string": "Remove NUL characters and unpaired surrogates from the field named "
                      "in `param`.",
    "amount_too_large": "Send at most the maximum (the configured `max_amount`, or what is "
                        "left to capture or refund).",
    "currency_mismatch": "Pay in the currency of both accounts; an account holds one "
                         "currency.",
    "account_closed": "The account is closed for good; use another account.",
    "account_not_empty": "Move the balance out (withdraw) and wait for payments in transit, "
                         "then close.",
    "overdraft_requires_admin": "Only an admin key may open an account with overdraft.",
    "unknown_region": "Use a region the cluster knows (`GET /v1/cluster/ownership`).",
    "invalid_idempotency_key": "Send a key of 1-255 printable characters (a UUID is best).",
    "idempotency_not_supported": "Send this request without `Idempotency-Key` (its answer "
                                 "holds a secret that must not be stored).",
    "payload_too_large": "Send a smaller body (limit: `PAYCLUSTER_MAX_BODY_BYTES`).",
    "missing_api_key": "Send `Authorization: Bearer <key>`.",
    "invalid_api_key": "Check the key; a key made in another region a moment ago may need "
                       "well under a second to replicate.",
    "api_key_revoked": "Use a current key (ask the admin for a new one).",
    "forbidden": "The resource is not the caller's; use a key of its principal.",
    "admin_required": "This route needs an admin key.",
    "rate_limited": "Wait `Retry-After` seconds, then retry with the same Idempotency-Key.",
    "insufficient_funds": "The payer's available balance is too low: fund it or pay less. "
                          "Nothing moved.",
    "resource_missing": "Check the id. A resource created a moment ago in another region may "
                        "need replication: retry with `?consistency=strong`.",
    "state_conflict": "Read the resource and act on its current status.",
    "idempotency_key_in_use": "The first request with this key is still running: retry the "
                              "same request (same key) after a short wait.",
    "idempotency_key_reused": "Same key, different body: use a new key for a new request, or "
                              "resend the original body.",
    "region_unavailable": "Retry with the same Idempotency-Key after a short backoff; "
                          "another region may take the request.",
    "lease_lost": "The owning region is failing over; retry with the same Idempotency-Key "
                  "after ~1 s (a takeover takes 3-4 s).",
    "lease_unavailable": "Ownership lease not held yet; retry with the same key shortly.",
    "lock_unavailable": "Stock could not be moved between regions now; retry with the same "
                        "key.",
    "misrouted": "Ownership changed while forwarding; retry with the same key.",
    "not_owner": "This region does not own the data (internal route); ask the owner.",
    "ownership_handover": "A planned handover is in progress; retry with the same key in a "
                          "moment.",
    "not_banned": "Failover guard step out of order (operators only).",
    "stale_epoch": "Failover guard: another takeover won (operators only); re-read "
                   "ownership.",
    "hold_expired": "The hold ran out and was released; create a new payment.",
    "payment_unexpected_state": "Read the payment and act on its current status.",
    "charge_already_refunded": "Nothing is left to refund.",
    "channel_not_configured": "Channel only: this region takes no callbacks; point the "
                              "channel at a region that has it configured.",
    "tcc_confirm_after_cancel": "The hold was canceled; create a new payment.",
    "tcc_cancel_after_confirm": "The payment was captured; refund it instead.",
    "sku_exists": "Use another SKU name, or read the existing one.",
    "out_of_stock": "Not enough units left anywhere; nothing was charged.",
    "not_resolvable": "The reconciliation item cannot take this resolution (operators).",
    "not_parked": "The item's amount is not parked in suspense (operators).",
    "resolution_not_allowed": "Use a resolution allowed for this item kind (operators).",
    "wrong_region": "Ask the region named in the message (operators).",
    "already_resolved": "The item was settled already; nothing to do.",
    "http_error": "A framework-level refusal (e.g. 405 method not allowed): fix the method "
                  "or URL.",
    "method_not_allowed": "Use the method the message names.",
    "no_healthy_region": "No region is healthy for this client: retry with backoff; page "
                         "an operator if it lasts.",
    "upstream_unavailable": "The router could not reach a region; retry with an "
                            "Idempotency-Key (the router only retries safe requests).",
    "upstream_timeout": "The region did not answer in time; the request may have run: retry "
                        "with the same Idempotency-Key to learn the outcome.",
    "bad_gateway": "The region answered garbage; retry with the same Idempotency-Key.",
    "upstream_broken": "The region broke off its answer and the request was not safe to "
                       "send elsewhere; it may have run: retry with an Idempotency-Key.",
    "invalid_geo": "Send `X-Client-Geo: <lat>,<lon>` in degrees.",
    "invalid_id": "Send an account or payment id.",
    "invalid_weight": "A weight is an integer 0..100, or null.",
    "invalid_catalog": "Fix the catalog file, then reload.",
    "unauthorized": "Send the channel's Bearer key.",
    "channel_down": "The acquirer is down: retry after `Retry-After` with the same reference.",
    "not_found": "No operation with that reference.",
    "not_a_payment": "Only a card payment can be captured.",
    "not_authorized": "Capture only an authorized payment.",
    "not_captured": "Refund only a captured payment.",
    "reference_reused": "A reference names one operation; use a new one.",
    "incorrect_number": "Send a valid card number (Luhn).",
    "amount_required": "Send `amount`.",
    "status_required": "Send `status`.",
}
BY_STATUS = {
    400: "Fix the request; do not retry unchanged.",
    401: "Send a valid key.",
    403: "Use a key allowed to do this.",
    404: "Check the identifier.",
    409: "Read the resource's current state, then decide.",
    422: "Use a new Idempotency-Key or the original body.",
    429: "Back off (`Retry-After`), then retry.",
    500: "Retry with the same Idempotency-Key; report it with the request id.",
    502: "Retry with the same Idempotency-Key.",
    503: "Retry with the same Idempotency-Key after a backoff.",
    504: "Retry with the same Idempotency-Key.",
}


# ---------------------------------------------------------------------------------------
# Settings

# Descriptions for fields whose source has none (or whose comment block covers other
# fields): env var -> text. Better still: give the field a `Field(description=...)`.
DESCRIPTIONS: dict[str, str] = {
    "PAYCLUSTER_REGION": "this node's region name (one of `PAYCLUSTER_REGION_CODES`)",
    "PAYCLUSTER_DATABASE_URL": "this region's PostgreSQL 18 (SQLAlchemy URL, psycopg 3)",
    "PAYCLUSTER_REDIS_URL": "this region's Redis: idempotency fast path, rate limits",
    "PAYCLUSTER_NATS_URL": "this region's NATS JetStream (the outbox relay publishes here)",
    "PAYCLUSTER_API_HOST": "REST API listen address (`python -m region_node`)",
    "PAYCLUSTER_API_PORT": "REST API listen port",
    "PAYCLUSTER_DB_POOL_SIZE": "SQLAlchemy pool size per node process",
    "PAYCLUSTER_DB_MAX_OVERFLOW": "connections beyond the pool size under load",
    "PAYCLUSTER_DB_RETRY_ATTEMPTS": "attempts of a transaction on serialization failures "
                                    "(SQLSTATE 40001) and deadlocks, with backoff",
    "PAYCLUSTER_MAX_BODY_BYTES": "larger request bodies are refused (413)",
    "PAYCLUSTER_IDEMPOTENCY_TTL_SECONDS": "how long an Idempotency-Key and its stored "
                                          "response are kept",
    "PAYCLUSTER_OUTBOX_POLL_SECONDS": "how often the relay looks for unpublished outbox rows",
    "PAYCLUSTER_OUTBOX_BATCH": "outbox rows published per relay round",
    "PAYCLUSTER_HOLD_EXPIRY_POLL_SECONDS": "how often expired holds are looked for and "
                                          "canceled",
    "PAYCLUSTER_WEBHOOK_POLL_SECONDS": "how often the webhook worker looks for work",
    "PAYCLUSTER_WEBHOOK_BATCH": "events fanned out per round",
    "PAYCLUSTER_WEBHOOK_CONCURRENCY": "deliveries in flight per node",
    "PAYCLUSTER_WEBHOOK_TIMEOUT_SECONDS": "a receiver must answer within this",
    "PAYCLUSTER_WEBHOOK_RETRY_BASE_SECONDS": "first retry delay (doubling, jittered)",
    "PAYCLUSTER_WEBHOOK_RETRY_MAX_INTERVAL_SECONDS": "cap of the retry delay",
    "PAYCLUSTER_WEBHOOK_MAX_AGE_SECONDS": "an event older than this is not retried: the "
                                          "delivery is marked failed",
    "PAYCLUSTER_EVENTS_STREAM": "JetStream stream of the outbox events",
    "PAYCLUSTER_EVENTS_SUBJECT_PREFIX": "subjects are `<prefix>.<region>.<event type>`",
    "PAYCLUSTER_RUN_WORKERS": "run the background workers (outbox relay, transfers, hold "
                              "expiry, webhooks, monitor) in this process",
    "PAYCLUSTER_LOG_LEVEL": "Python log level",
    "PAYCLUSTER_PEERS": "other region -> gRPC address that reaches it from here (JSON)",
    "PAYCLUSTER_REGION_CODES": "region -> numeric code stamped into ids (JSON); the same "
                               "on every node of the cluster",
    "PAYCLUSTER_GRPC_DEADLINE_SECONDS": "deadline of every gRPC call to a peer",
    "PAYCLUSTER_TLS_CERT_FILE": "this region's certificate (PEM)",
    "PAYCLUSTER_TLS_KEY_FILE": "this region's private key (PEM)",
    "PAYCLUSTER_TLS_PEER_NAMES": "peer region -> name its certificate must carry (JSON)",
    "PAYCLUSTER_OWNERSHIP_REFRESH_SECONDS": "how often the ownership cache is re-read",
    "PAYCLUSTER_TRANSFER_POLL_SECONDS": "how often the transfer worker scans replicated "
                                        "transfer messages and acknowledgements",
    "PAYCLUSTER_SAGA_MAX_PUSHES_IN_FLIGHT": "count of gRPC pushes of transfers (and, "
                                            "separately, refunds) running at once; beyond "
                                            "it the periodic scan delivers the message",
    "PAYCLUSTER_REPLICATION_SLO_SECONDS": "lag above this is an SLO breach (readiness "
                                          "`degraded`, metric, log)",
    "PAYCLUSTER_HEARTBEAT_SECONDS": "how often this region writes its heartbeat row",
    "PAYCLUSTER_LOCK_TTL_SECONDS": "lease of a SKU's stock lock",
    "PAYCLUSTER_OWNERSHIP_LEASE_TTL_SECONDS": "ownership lease length",
    "PAYCLUSTER_OWNERSHIP_LEASE_RENEW_SECONDS": "renewal interval of the ownership lease",
    "PAYCLUSTER_OWNERSHIP_LEASE_MARGIN_SECONDS": "writes stop this long before the lease "
                                                 "would end",
    "PAYCLUSTER_OWNERSHIP_LEASE_OP_TIMEOUT_SECONDS": "bound on one lease call to one Redis",
    "PAYCLUSTER_RATE_LIMIT_BURST": "default bucket size per API key",
    "PAYCLUSTER_ROUTER_ACCESS_LOG": "log one line per proxied request",
    "PAYCLUSTER_ROUTER_LOG_LEVEL": "Python log level",
    "PAYCLUSTER_LOCK_KEY_PREFIX": "Redis key prefix of every lock (the same in every "
                                  "process)",
    "PAYCLUSTER_LOCK_DRIFT_FIXED_SECONDS": "fixed clock-drift allowance",
    "PAYCLUSTER_CHANNEL_LOG_LEVEL": "Python log level",
}


def _comment_above(lines: list[str], lineno: int) -> str:
    """The `#` comment block right above line `lineno` (1-based), joined."""
    out: list[str] = []
    i = lineno - 2
    while i >= 0 and lines[i].strip().startswith("#"):
        out.insert(0, lines[i].strip().lstrip("#").strip())
        i -= 1
    return " ".join(out)


def _field_comments(cls: type) -> dict[str, str]:
    source = Path(inspect.getfile(cls)).read_text()
    lines = source.splitlines()
    tree = ast.parse(source)
    found: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == cls.__name__:
            block_head = ""
            for stmt in node.body:
                if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                    name = stmt.target.id
                    comment = _comment_above(lines, stmt.lineno)
                    if comment:
                        block_head = name
                    elif lines[stmt.lineno - 2].strip() == "":
                        block_head = ""
                    found[name] = comment or (f"see `{{prefix}}{block_head.upper()}`"
                                              if block_head else "")
    return found


def _type_name(annotation: Any) -> str:
    text = annotation.__name__ if isinstance(annotation, type) else str(annotation)
    return text.replace("typing.", "").replace("pathlib.", "")


def _default(info: Any) -> str:
    from pydantic_core import PydanticUndefined

    if info.default_factory is not None:
        value = info.default_factory()
    elif info.default is PydanticUndefined:
        return "(required)"
    else:
        value = info.default
    if isinstance(value, Path):
        value = str(value)
    if isinstance(value, float) and value.is_integer() and value >= 60:
        return f"`{value:g}`"
    if isinstance(value, (dict, list)):
        return f"`{json.dumps(value)}`" if value else "`" + json.dumps(value) + "`"
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    if isinstance(value, str):
        return f'`"{value}"`' if value else '`""`'
    return f"`{value!r}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ").strip()


def settings_classes() -> list[type[BaseSettings]]:
    """The settings classes named in SETTINGS_CLASSES."""
    out: list[type[BaseSettings]] = []
    for spec in SETTINGS_CLASSES:
        module, name = spec.split(":")
        out.append(getattr(importlib.import_module(module), name))
    return out


def render_settings() -> str:
    """Markdown: one table per settings class."""
    parts: list[str] = []
    for cls in settings_classes():
        prefix = cls.model_config.get("env_prefix", "")
        comments = _field_comments(cls)
        doc = inspect.getdoc(cls) or ""
        parts.append(f"### `{cls.__module__}.{cls.__name__}` (`{prefix}*`)\n")
        parts.append(_cell(doc.split("\n\n")[0]) + "\n")
        parts.append("| env var | type | default | description |")
        parts.append("|---|---|---|---|")
        for name, info in cls.model_fields.items():
            env = f"{prefix}{name.upper()}"
            desc = (DESCRIPTIONS.get(env) or info.description or comments.get(name, "")
                    ).replace("{prefix}", prefix)
            constraints = [f"{op} {getattr(m, attr)}" for m in info.metadata
                           for attr, op in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))
                           if getattr(m, attr, None) is not None]
            if constraints:
                desc = (desc + " " if desc else "") + "(" + ", ".join(constraints) + ")"
            parts.append(f"| `{env}` | `{_cell(_type_name(info.annotation))}` "
                         f"| {_cell(_default(info))} | {_cell(desc)} |")
        parts.append("")
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------
# Error codes


@dataclass
class ErrorCode:
    code: str
    status: int | str
    type: str
    where: set[str] = field(default_factory=set)


def _py_files(package: str) -> Iterator[Path]:
    for path in sorted((ROOT / package).rglob("*.py")):
        if "_pb2" not in path.name and "migrations" not in path.parts:
            yield path


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts)


def _str(node: ast.AST | None) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) \
        else None


def _int(node: ast.AST | None) -> int | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, int) \
        else None


def _callee(node: ast.Call) -> str:
    f = node.func
    parts: list[str] = []
    while isinstance(f, ast.Attribute):
        parts.insert(0, f.attr)
        f = f.value
    if isinstance(f, ast.Name):
        parts.insert(0, f.id)
    return ".".join(parts)


def _arg(node: ast.Call, index: int, name: str) -> ast.AST | None:
    for kw in node.keywords:
        if kw.arg == name:
            return kw.value
    return node.args[index] if len(node.args) > index else None


def _resolve(module: str, dotted: str) -> Any:
    obj: Any = importlib.import_module(module)
    for part in dotted.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


# Error constructors that are not PaymentError subclasses: callee -> (status index or
# fixed status, type index or fixed type, code index, code keyword).
FIXED_STATUS: dict[str, tuple[int, str, int]] = {
    "invalid": (400, "invalid_request_error", 1),
    "unavailable": (503, "api_error", 1),
    "not_found": (404, "invalid_request_error", 1),
    "LocationError": (400, "invalid_request_error", 2),
}
STATUS_FIRST = {"RouterError": (0, 1, 2), "ChannelError": (0, None, 1), "_error": (0, None, 1)}


def collect_errors() -> dict[tuple[str, str], ErrorCode]:
    """Every (component, code) the code can answer with, by reading the source."""
    from region_node.errors import PaymentError

    found: dict[tuple[str, str], ErrorCode] = {}

    def add(component: str, code: str, status: int | str, type_: str, where: str) -> None:
        entry = found.setdefault((component, code), ErrorCode(code, status, type_))
        if entry.status != status:
            entry.status = f"{entry.status}, {status}" if str(status) not in str(
                entry.status) else entry.status
        entry.where.add(where)

    def add_class(component: str, cls: type, where: str) -> None:
        add(component, cls.code, cls.http_status, cls.type, where)  # type: ignore[attr-defined]

    for package in ERROR_PACKAGES:
        component = {"region_node": "node", "lock_service": "node", "replication": "node",
                     "geo_router": "router", "channel": "channel"}[package]
        for path in _py_files(package):
            module = _module_name(path)
            rel = str(path.relative_to(ROOT))
            tree = ast.parse(path.read_text())
            loaded: Any = None
            for node in ast.walk(tree):
                if isinstance(node, ast.ClassDef):
                    for stmt in node.body:
                        if (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1
                                and isinstance(stmt.targets[0], ast.Name)
                                and stmt.targets[0].id == "code" and _str(stmt.value)):
                            loaded = loaded or importlib.import_module(module)
                            cls = getattr(loaded, node.name)
                            if isinstance(cls, type) and issubclass(cls, PaymentError):
                                add_class(component, cls, rel)
                elif isinstance(node, ast.Assign) and any(
                        isinstance(t, ast.Name) and t.id == "_CODES" for t in node.targets):
                    assert isinstance(node.value, ast.Dict)
                    for v in node.value.values:
                        code = _str(v)
                        if code:
                            add(component, code, 400, "invalid_request_error", rel)
                elif isinstance(node, ast.Call):
                    name = _callee(node)
                    short = name.rsplit(".", 1)[-1]
                    code_kw = next((kw.value for kw in node.keywords if kw.arg == "code"), None)
                    if short in STATUS_FIRST:
                        s_i, t_i, c_i = STATUS_FIRST[short]
                        code = _str(_arg(node, c_i, "code"))
                        status = _int(_arg(node, s_i, "status"))
                        if code is None:
                            continue
                        type_ = (_str(node.args[t_i]) if t_i is not None else None) or (
                            "api_error" if (status or 0) >= 500 else "invalid_request_error")
                        add(component, code, status if status is not None else "varies",
                            type_, rel)
                    elif short in FIXED_STATUS and component != "node":
                        status, type_, c_i = FIXED_STATUS[short]
                        code = _str(_arg(node, c_i, "code"))
                        if code is None and short == "not_found":
                            code = "resource_missing"
                        if code:
                            add(component, code, status, type_, rel)
                    elif code_kw is not None and _str(code_kw):
                        code = _str(code_kw)
                        assert code is not None
                        cls = _resolve(module, name)
                        if isinstance(cls, type) and issubclass(cls, PaymentError):
                            status_: int | str = cls.http_status
                            if name == "PaymentError" and code == "http_error":
                                status_ = "405 and other framework statuses"
                                add(component, code, status_, "invalid_request_error", rel)
                                continue
                            add(component, code, status_, cls.type, rel)
                        else:
                            raise SystemExit(f"{rel}:{node.lineno}: code={code!r} raised by "
                                             f"{name!r}, whose HTTP status gen_reference.py "
                                             "does not know; teach it (FIXED_STATUS)")
            # A dict literal mapping statuses to codes (the router's framework errors).
            for node in ast.walk(tree):
                if isinstance(node, ast.Dict) and node.keys and all(
                        _int(k) is not None for k in node.keys) and all(
                        _str(v) for v in node.values):
                    for k, v in zip(node.keys, node.values, strict=True):
                        add(component, _str(v) or "", _int(k) or 0, "invalid_request_error",
                            rel)
    # Every PaymentError subclass, wherever defined, with its default code.
    stack = [PaymentError]
    while stack:
        cls = stack.pop()
        stack.extend(cls.__subclasses__())
        if cls.__module__.split(".")[0] in ERROR_PACKAGES:
            add_class("node", cls, cls.__module__.replace(".", "/") + ".py")
    return found


COMPONENTS = (("node", "Region node (`/v1/...` on every region, and through the geo router)"),
              ("router", "Geo router (answered by the router itself)"),
              ("channel", "Channel (the acquirer simulator; seen by the region nodes, "
                          "not by API clients)"))


def render_errors() -> str:
    """Markdown: one table per component, sorted by status then code."""
    found = collect_errors()
    parts: list[str] = []
    for component, title in COMPONENTS:
        rows = sorted((e for (c, _), e in found.items() if c == component),
                      key=lambda e: (str(e.status), e.code))
        parts.append(f"### {title}\n")
        parts.append("| code | HTTP status | type | what the client should do | raised in |")
        parts.append("|---|---|---|---|---|")
        for e in rows:
            first = int(str(e.status)[:3]) if str(e.status)[:3].isdigit() else 0
            advice = ADVICE.get(e.code) or BY_STATUS.get(first, "")
            where = ", ".join(f"`{w}`" for w in sorted(e.where))
            parts.append(f"| `{e.code}` | {e.status} | `{e.type}` | {_cell(advice)} | {where} |")
        parts.append("")
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------
# Routes


def node_app() -> Any:
    """The region node's app, built, never started (no database needed: connections open
    in the lifespan, which is not run)."""
    from region_node.app import create_app
    from region_node.config import RegionSettings

    return create_app(RegionSettings(region="us-east"))


def node_openapi() -> dict[str, Any]:
    """The region node's OpenAPI document."""
    return dict(node_app().openapi())


def _calls_run_mutation(fn: Callable[..., Any], depth: int = 2) -> bool:
    """Whether `fn`, or a function of its module it calls (`depth` levels), calls
    run_mutation (which handles Idempotency-Key)."""
    try:
        source = inspect.getsource(fn)
    except (OSError, TypeError):
        return False
    if "run_mutation(" in source:
        return True
    if depth == 0:
        return False
    module = sys.modules.get(fn.__module__)
    # `name(` is a function of the module; `alias.name(` one of a module it imported.
    for alias, name in set(re.findall(r"(?:\b([A-Za-z_]\w*)\.)?\b([A-Za-z_]\w*)\(", source)):
        owner = getattr(module, alias, None) if alias else module
        other = getattr(owner, name, None) if inspect.ismodule(owner) else None
        if inspect.isfunction(other) and other is not fn and _calls_run_mutation(
                other, depth - 1):
            return True
    return False


def idempotency_support(app: Any) -> dict[tuple[str, str], str]:
    """(METHOD, path) -> "accepts" (a retry with the same key replays the stored answer),
    "refuses" (400 idempotency_not_supported: the answer holds a secret) or "ignores"."""
    out: dict[tuple[str, str], str] = {}

    def walk(routes: list[Any], prefix: str) -> Iterator[tuple[Any, str]]:
        for route in routes:
            inner = getattr(route, "original_router", None)  # FastAPI's included routers
            if inner is not None:
                context = getattr(route, "include_context", None)
                yield from walk(inner.routes, prefix + getattr(context, "prefix", ""))
            else:
                yield route, prefix + getattr(route, "path", "")

    for route, path in walk(list(app.routes), ""):
        endpoint = getattr(route, "endpoint", None)
        if endpoint is None:
            continue
        try:
            source = inspect.getsource(endpoint)
        except (OSError, TypeError):
            source = ""
        kind = ("refuses" if "_no_idempotency_key(" in source
                else "accepts" if _calls_run_mutation(endpoint) else "ignores")
        for method in getattr(route, "methods", None) or set():
            out[(method, path)] = kind
    return out


def _schema_type(schema: dict[str, Any], spec: dict[str, Any]) -> str:
    if "$ref" in schema:
        return schema["$ref"].rsplit("/", 1)[-1]
    if "anyOf" in schema:
        return " \\| ".join(_schema_type(s, spec) for s in schema["anyOf"])
    if "enum" in schema:
        return " \\| ".join(f"`{v}`" for v in schema["enum"])
    if "const" in schema:
        return f"`{schema['const']}`"
    if schema.get("type") == "array":
        return f"array of {_schema_type(schema.get('items', {}), spec)}"
    return str(schema.get("type", "any"))


def _body_fields(op: dict[str, Any], spec: dict[str, Any]) -> list[str]:
    content = op.get("requestBody", {}).get("content", {}).get("application/json")
    if not content:
        return []
    schema = content["schema"]
    # An optional body (`Body | None`) is anyOf [the model, null].
    schema = next((s for s in schema.get("anyOf", []) if "$ref" in s), schema)
    if "$ref" in schema:
        schema = spec["components"]["schemas"][schema["$ref"].rsplit("/", 1)[-1]]
    required = set(schema.get("required", []))
    rows = []
    for name, prop in schema.get("properties", {}).items():
        bits = []
        for key in ("minimum", "exclusiveMinimum", "maximum", "maxLength", "default"):
            if key in prop:
                bits.append(f"{key} {json.dumps(prop[key])}")
        desc = prop.get("description", "")
        rows.append(f"| `{name}` | body | {_schema_type(prop, spec)} | "
                    f"{'yes' if name in required else 'no'} | "
                    f"{_cell(' '.join([desc, '; '.join(bits)]).strip())} |")
    return rows


IDEMPOTENCY_TEXT = {
    "accepts": " Accepts `Idempotency-Key` (a retry replays the stored answer).",
    "refuses": " Refuses `Idempotency-Key` (400 `idempotency_not_supported`: the answer "
               "shows a secret once).",
    "ignores": " Does not use `Idempotency-Key`.",
}


def render_node_routes(spec: dict[str, Any],
                       idempotency: dict[tuple[str, str], str] | None = None) -> str:
    """Markdown: a summary table, then one section per operation."""
    parts = ["| method | path | summary |", "|---|---|---|"]
    ops = [(p, m, op) for p, item in spec["paths"].items() for m, op in item.items()]
    for path, method, op in ops:
        parts.append(f"| `{method.upper()}` | `{path}` | {_cell(op.get('summary', ''))} |")
    parts.append("")
    for path, method, op in ops:
        parts.append(f"#### `{method.upper()} {path}`\n")
        desc = (op.get("description") or "").strip()
        if desc:
            parts.append(desc + "\n")
        rows = []
        for p in op.get("parameters", []):
            schema = p.get("schema", {})
            extra = f"default {json.dumps(schema['default'])}" if "default" in schema else ""
            rows.append(f"| `{p['name']}` | {p['in']} | {_schema_type(schema, spec)} | "
                        f"{'yes' if p.get('required') else 'no'} | "
                        f"{_cell(' '.join([p.get('description', ''), extra]).strip())} |")
        rows += _body_fields(op, spec)
        if rows:
            parts += ["| parameter | in | type | required | notes |", "|---|---|---|---|---|",
                      *rows, ""]
        ok = [c for c in op.get("responses", {}) if c.startswith("2")]
        mutation = method in ("post", "put", "patch", "delete")
        line = f"Success: {', '.join(ok) or '200'}."
        if path.startswith("/v1/"):
            line += (" Errors: 400 (validation), 401, 403, 429 and the route's own"
                     " (see [errors](errors.md)).")
        if mutation and path.startswith("/v1/") and idempotency is not None:
            line += IDEMPOTENCY_TEXT[idempotency.get((method.upper(), path), "ignores")]
        parts.append(line + "\n")
    return "\n".join(parts)


def _source_routes(rel: str) -> list[tuple[str, str, str]]:
    """(method, path, first docstring line) from `@app.<method>("...")` decorators and
    Starlette `Route("...", fn, methods=[...])` calls in a source file."""
    tree = ast.parse((ROOT / rel).read_text())
    funcs = {n.name: n for n in ast.walk(tree)
             if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    out: list[tuple[str, str, str]] = []

    def doc(fn: ast.AST | None) -> str:
        text = ast.get_docstring(fn) if isinstance(
            fn, (ast.FunctionDef, ast.AsyncFunctionDef)) else None
        return (text or "").split("\n\n")[0].replace("\n", " ")

    for fn in funcs.values():
        for dec in fn.decorator_list:
            if (isinstance(dec, ast.Call) and isinstance(dec.func, ast.Attribute)
                    and dec.func.attr in ("get", "post", "put", "delete", "patch")
                    and _str(dec.args[0] if dec.args else None)):
                out.append((dec.func.attr.upper(), _str(dec.args[0]) or "", doc(fn)))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and _callee(node) == "Route" and _str(
                node.args[0] if node.args else None):
            target = node.args[1] if len(node.args) > 1 else None
            handler = funcs.get(target.id) if isinstance(target, ast.Name) else None
            methods = ["GET"]
            for kw in node.keywords:
                if kw.arg == "methods" and isinstance(kw.value, ast.List):
                    methods = [_str(e) or "" for e in kw.value.elts]
            for m in methods:
                out.append((m, _str(node.args[0]) or "", doc(handler)))
    return out


EXTRA_ROUTES: tuple[tuple[str, str, str], ...] = (
    ("geo_router/api.py", "Geo router, admin port (`PAYCLUSTER_ROUTER_ADMIN_PORT`)", ""),
    ("channel/api.py", "Channel (acquirer simulator): merchant and admin ports", ""),
)


def render_other_routes() -> str:
    """Markdown tables of the geo router's and the channel's own routes."""
    parts = []
    for rel, title, _ in EXTRA_ROUTES:
        parts += [f"### {title}\n", f"From `{rel}`.\n", "| method | path | what |",
                  "|---|---|---|"]
        for method, path, doc in _source_routes(rel):
            parts.append(f"| `{method}` | `{path}` | {_cell(doc)} |")
        parts.append("")
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------
# Files


def replace_section(text: str, name: str, body: str) -> str:
    """`text` with the block between the markers of `name` replaced by `body`."""
    pattern = re.compile(rf"(<!-- BEGIN GENERATED: {name} -->\n).*?(<!-- END GENERATED: "
                         rf"{name} -->)", re.S)
    if not pattern.search(text):
        raise SystemExit(f"no GENERATED markers for {name!r}")
    return pattern.sub(lambda m: m.group(1) + "\n" + body.rstrip() + "\n\n" + m.group(2), text)


def generated() -> dict[Path, dict[str, Callable[[], str]]]:
    """File -> section name -> renderer."""
    def node_routes() -> str:
        app = node_app()
        return render_node_routes(app.openapi(), idempotency_support(app))

    return {
        DOCS / "api.md": {"node-routes": node_routes, "other-routes": render_other_routes},
        DOCS / "errors.md": {"error-codes": render_errors},
        DOCS / "configuration.md": {"settings": render_settings},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="exit 1 if a generated file would change; write nothing")
    args = parser.parse_args(argv)
    stale = []
    for path, sections in generated().items():
        old = path.read_text()
        new = old
        for name, render in sections.items():
            new = replace_section(new, name, render())
        if new != old:
            stale.append(path)
            if not args.check:
                path.write_text(new)
    for path in stale:
        print(f"{'stale' if args.check else 'updated'}: {path.relative_to(ROOT)}")
    return 1 if (stale and args.check) else 0


if __name__ == "__main__":
    raise SystemExit(main())
