"""Secrets and card data never leak: not in logs, error messages or stored free text.

Unit tests of the masking (region_node/redact.py) and of the log filter, then workloads
whose descriptions, idempotency keys, query strings, bad requests and Authorization
headers carry Luhn-valid card numbers (13 to 19 digits, in several spellings) and API
keys. Afterwards every log line, every row of every table (cast to text) and every Redis
value is scanned: zero full card numbers or keys, and descriptions hold the masked form.
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import random
import re
import string
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest
from redis import Redis

from cluster.lab import Cluster, read_cluster, start_cluster
from cluster.servers import RegionServers
from region_node import logs
from region_node.idempotency import storage_key
from region_node.redact import luhn_valid, mask_card_numbers, redact_secrets, scrub
from tests.helpers import wait_for

_rng = random.SystemRandom()
KEY_PATTERN = re.compile(r"pck_[a-z0-9]{12}_[A-Za-z0-9]{40}")
"""The shape of an API key (region_node/principals.py)."""


def luhn_number(length: int) -> str:
    """A random card-like number of `length` digits that passes the Luhn check."""
    body = str(_rng.randint(1, 9)) + "".join(str(_rng.randint(0, 9)) for _ in range(length - 2))
    for check in "0123456789":
        if luhn_valid(body + check):
            return body + check
    raise AssertionError("unreachable: one check digit always fits")


def fake_key() -> str:
    """Something shaped exactly like an API key (pck_<12>_<40>)."""
    prefix = "".join(_rng.choice(string.ascii_lowercase + string.digits) for _ in range(12))
    secret = "".join(_rng.choice(string.ascii_letters + string.digits) for _ in range(40))
    return f"pck_{prefix}_{secret}"


def masked(digits: str) -> str:
    """The stored form of a card number: first six, stars, last four."""
    return digits[:6] + "*" * (len(digits) - 10) + digits[-4:]


def spellings(digits: str) -> list[str]:
    """How people write a card number: compact, in groups of four with spaces or dashes."""
    groups = [digits[i:i + 4] for i in range(0, len(digits), 4)]
    return [digits, " ".join(groups), "-".join(groups)]


def leaks(text: str, cards: list[str], secrets: list[str]) -> list[str]:
    """Every card number (in any spelling, separators ignored) or secret found in `text`."""
    flat = text.replace(" ", "").replace("-", "")
    return ([c for c in cards if c in flat] + [s for s in secrets if s in text])


# ---------------------------------------------------------------------------- unit tests

def test_card_numbers_of_every_length_and_spelling_are_masked() -> None:
    for length in range(13, 20):
        card = luhn_number(length)
        for spelled in spellings(card):
            out = mask_card_numbers(f"paid with {spelled}, thanks")
            assert out == f"paid with {masked(card)}, thanks", (spelled, out)
            assert card not in out.replace(" ", "").replace("-", "")
            # Next to other numbers (an idempotency key "pay-<card>-0", a count after it).
            for around in (f"pay-{spelled}-0", f"{spelled} 3 items", f"1 2 {spelled}"):
                assert card not in mask_card_numbers(around).replace(" ", "").replace("-", "")


def test_what_is_not_a_card_is_left_alone() -> None:
    card = luhn_number(16)
    not_luhn = card[:-1] + str((int(card[-1]) + 1) % 10)
    samples = [
        f"order {not_luhn}",  # fails the Luhn check
        "amount 123456789012",  # 12 digits
        "ref " + luhn_number(20),  # 20 digits: too long to be a card
        "payment 01930000-1234-5678-9012-3456789abcde",  # a UUID's digit groups
        "id 0193a1b2-1234-5678-9012-345678abcdef",
        "phone 555 1234",
    ]
    for text in samples:
        assert mask_card_numbers(text) == text


def test_labelled_epochs_and_fences_are_kept_cards_beside_them_are_not() -> None:
    # An epoch / fencing token is a microsecond clock reading (lock_service.quorum): the
    # first Luhn-valid one from now on, 16 digits, which the masker alone would hide.
    epoch = next(str(n) for n in itertools.count(time.time_ns() // 1000) if luhn_valid(str(n)))
    assert mask_card_numbers(f"epoch {epoch}") == f"epoch {masked(epoch)}"
    # Written as our log lines write them (region_node/leases.py, lock_service), kept whole
    # in log messages; text that is stored or echoed never gets the exemption (a client
    # could write its card that way in a description).
    for text in (f"ownership lease eu-west: taken under epoch={epoch} (forced)",
                 f"lock 'ownership:eu-west' lost (fence={epoch}): no renewal",
                 f"lease running out (fence={epoch}): ended 2 write transaction(s)"):
        assert mask_card_numbers(text, keep_labelled_ids=True) == text
        assert scrub(text, keep_labelled_ids=True) == text
        assert epoch not in scrub(text) and masked(epoch) in scrub(text)
    card = luhn_number(16)
    grouped = " ".join(card[i:i + 4] for i in range(0, 16, 4))
    # A card in any other form next to those words is masked: only the exact glued label
    # exempts, and only the one unbroken run right after it.
    for text in (f"token {card}", f"token={card}", f"epoch {card}", f"Epoch={card}",
                 f"fence: {card}", f"reepoch={card}", f"epoch={grouped}",
                 f"lease token {card} refused", f"epoch={epoch} {card}", f"fence={epoch}-{card}"):
        out = mask_card_numbers(text, keep_labelled_ids=True)
        assert card not in out.replace(" ", "").replace("-", ""), (text, out)
        assert masked(card) in out, (text, out)
    assert mask_card_numbers(f"epoch={epoch} {card}", keep_labelled_ids=True) == \
        f"epoch={epoch} {masked(card)}"


def test_keys_secrets_and_bearer_tokens_are_hidden() -> None:
    key = fake_key()
    prefix = key.split("_")[1]
    secret = "whsec_" + "".join(_rng.choice(string.ascii_letters) for _ in range(40))
    text = f"key={key} secret={secret} Authorization: Bearer abc.def-123456 bearer of news"
    out = redact_secrets(text)
    assert key not in out and secret not in out and "abc.def-123456" not in out
    assert f"pck_{prefix}_****" in out and "whsec_****" in out
    assert out.endswith("Authorization: Bearer **** bearer of news")
    # A key's secret may hold a Luhn-valid run: secrets go first, nothing of it is left.
    tricky = f"pck_{prefix}_{luhn_number(16)}{'A' * 24}"
    assert scrub(tricky) == f"pck_{prefix}_****"
    assert scrub(scrub(text)) == scrub(text)


def test_idempotency_keys_with_card_numbers_are_stored_hashed() -> None:
    card = luhn_number(16)
    stored = storage_key(f"order-{card}")
    assert card not in stored and stored == storage_key(f"order-{card}")
    assert storage_key("order-42") == "order-42"


def test_log_filter_scrubs_message_args_traceback_and_extra_fields() -> None:
    card, key = luhn_number(15), fake_key()
    stream = io.StringIO()
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        logs.setup("us-east", "DEBUG", stream=stream)
        log = logging.getLogger("region_node.test_leaks")
        log.info("card %s key %s", card, key)
        log.warning("fields", extra={"path": f"/v1/payments?card={card}", "event": [key]})
        try:
            raise ValueError(f"bad card {card} for {key}")
        except ValueError:
            log.exception("failed")
        # uvicorn's access log line (its args: client, method, path with query, version,
        # status) if someone turns access logs on.
        logging.getLogger("uvicorn.error").error(
            '%s - "%s %s HTTP/%s" %d', "127.0.0.1:5000", "GET",
            f"/v1/payments?pan={'-'.join(spellings(card)[1].split())}", "1.1", 200)
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
    out = stream.getvalue()
    lines = [json.loads(line) for line in out.splitlines()]
    assert len(lines) == 4
    assert leaks(out, [card], [key]) == []
    assert masked(card) in lines[0]["msg"] and "Traceback" in lines[2]["exc"]
    assert masked(card) in lines[2]["exc"]


# ----------------------------------------------------------------- in-process workload

@pytest.fixture
def node_log(tmp_path: Path) -> Iterator[Path]:
    """The node's logging as in production (logs.setup) into a file, at DEBUG."""
    path = tmp_path / "node.log"
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    with open(path, "w", encoding="utf-8") as fh:
        logs.setup("us-east", "DEBUG", stream=fh)
        try:
            yield path
        finally:
            root.handlers[:], level = saved
            root.setLevel(level)


def scan_database(dsn: str, cards: list[str], secrets: list[str]) -> dict[str, list[str]]:
    """Every row of every table outside the system schemas, cast to text: what leaked."""
    found: dict[str, list[str]] = {}
    with psycopg.connect(dsn) as conn:
        tables = conn.execute(
            "select table_schema, table_name from information_schema.tables "
            "where table_type = 'BASE TABLE' and table_schema not in "
            "('pg_catalog', 'information_schema')").fetchall()
        assert len(tables) > 10, tables
        for schema, table in tables:
            rows = conn.execute(f'select t::text from "{schema}"."{table}" t').fetchall()
            # The offending rows themselves, so a failure shows where the value sits.
            hits = [r[0][:300] for r in rows if leaks(r[0], cards, secrets)]
            if hits:
                found[f"{schema}.{table}"] = hits
    return found


def scan_redis(url: str, cards: list[str], secrets: list[str]) -> list[str]:
    """Every key name and string value in Redis: what leaked."""
    client = Redis.from_url(url, decode_responses=True, encoding_errors="replace")
    try:
        texts: list[str] = []
        for name in client.scan_iter(count=1000):
            texts.append(str(name))
            if client.type(name) == "string":
                texts.append(str(client.get(name) or ""))
    finally:
        client.close()
    return leaks("\n".join(texts), cards, secrets)


def read_text(path: Path) -> str:
    """A file as text, undecodable bytes replaced (data files are binary)."""
    return path.read_bytes().decode("utf-8", "replace")


def scan_files(paths: list[Path], cards: list[str], secrets: list[str]) -> dict[str, list[str]]:
    """Every file's bytes (as text, undecodable bytes replaced): what leaked, by file."""
    found = {}
    for path in paths:
        hits = leaks(read_text(path), cards, secrets)
        if hits:
            found[str(path)] = hits
    return found


async def run_workload(client: httpx.AsyncClient, cards: list[str],
                       keys: list[str]) -> tuple[list[str], list[httpx.Response]]:
    """Payments whose descriptions and idempotency keys carry the cards and keys, reads
    and bad requests that carry them; returns the payment ids and every response. keys[0]
    is replaced by a real merchant key made through the admin API."""
    responses: list[httpx.Response] = []
    bogus_token = keys[-1]

    async def call(method: str, url: str, **kw: object) -> httpx.Response:
        resp = await client.request(method, url, **kw)  # type: ignore[arg-type]
        responses.append(resp)
        return resp

    # A real merchant, made through the admin API (its name carries a card number too);
    # its key replaces the first fake one, and it opens the payee account itself.
    made = await call("POST", "/v1/admin/principals", json={
        "name": f"Shop of {spellings(cards[0])[1]}", "role": "merchant"})
    assert made.status_code == 201, made.text
    keys[0] = made.json()["api_key"]["key"]
    # The one response that shows the key (once, by design); the name in it is masked.
    responses.remove(made)
    assert leaks(made.text, cards, []) == []
    merchant = {"Authorization": f"Bearer {keys[0]}"}
    payer = (await call("POST", "/v1/accounts", json={"currency": "USD"})).json()["id"]
    payee = (await call("POST", "/v1/accounts", json={"currency": "USD", "kind": "merchant"},
                        headers=merchant)).json()["id"]
    dep = await call("POST", f"/v1/accounts/{payer}/deposits", json={"amount": 10**8})
    assert dep.status_code == 201, dep.text
    ids = []
    for i, card in enumerate(cards):
        spelled = spellings(card)[i % 3]
        key = keys[i % 3]
        resp = await call("POST", "/v1/payments", json={
            "payer": payer, "payee": payee, "amount": 100 + i, "currency": "USD",
            "description": f"order {i} card {spelled} api {key}"},
            headers={"Idempotency-Key": f"pay-{spelled}-{i}", "X-Request-Id": f"rq-{spelled}"})
        assert resp.status_code == 201, resp.text
        ids.append(resp.json()["id"])
        # The replay of that key answers from the stored response.
        replay = await call("POST", "/v1/payments", json={
            "payer": payer, "payee": payee, "amount": 100 + i, "currency": "USD",
            "description": f"order {i} card {spelled} api {key}"},
            headers={"Idempotency-Key": f"pay-{spelled}-{i}"})
        assert replay.status_code == 201 and replay.json()["id"] == ids[-1], replay.text
        # Reads and bad requests echoing the number and the key.
        await call("GET", f"/v1/payments/{ids[-1]}", params={"note": spelled, "k": key})
        seen = await call("GET", f"/v1/payments/{ids[-1]}", params={"pan": card},
                          headers=merchant)
        assert seen.status_code == 200, seen.text
        await call("GET", f"/v1/payments/{card}", headers={"X-Request-Id": key})
        await call("GET", f"/v1/accounts/{key}/entries", params={"cursor": card})
        await call("POST", "/v1/accounts", json={"currency": "USD", "home_region": spelled})
        await call("POST", "/v1/accounts", json={"currency": card})
        await call("POST", "/v1/accounts", json={"currency": "USD", card: key})
        await call("POST", "/v1/payments", content=f'{{"payer": "{card}", "amount": {key}',
                   headers={"content-type": "application/json"})
        await call("POST", "/v1/payments", json={
            "payer": payer, "payee": payee, "amount": 1, "currency": "USD",
            "description": f"{card} " * 60}, headers={"Idempotency-Key": f"long-{card}"})
        await call("GET", "/v1/accounts/" + payer,
                   headers={"Authorization": f"Bearer {key}"})
        await call("GET", "/v1/accounts/" + payer,
                   headers={"Authorization": f"Bearer {card}"})
        await call("GET", "/v1/accounts/" + payer, headers={"Authorization": spelled})
        await call("GET", "/v1/accounts/" + payer,
                   headers={"Authorization": f"Bearer {bogus_token}"})
        # Refused calls are audited too, with the id in the path as their resource.
        await call("GET", f"/v1/accounts/{card}", headers={"Authorization": f"Bearer {key}"})
        await call("POST", f"/v1/payments/{spelled}/capture", json={},
                   headers={"Authorization": "Bearer x"})
    return ids, responses


async def test_workload_leaves_no_card_or_key_in_logs_errors_or_database(
        client: httpx.AsyncClient, node_log: Path, db_url: str,
        servers: RegionServers) -> None:
    cards = [luhn_number(n) for n in range(13, 20)] + [luhn_number(16) for _ in range(5)]
    # The last "key" is a bogus bearer token of no known shape: it must not be logged either.
    keys = [fake_key() for _ in range(3)] + ["tok_" + uuid.uuid4().hex]
    ids, responses = await run_workload(client, cards, keys)
    logging.getLogger("region_node.test_leaks").debug("workload done: %d calls",
                                                      len(responses))

    # Error messages and every other response body: no echo.
    assert sum(r.status_code >= 400 for r in responses) >= 8 * len(cards)
    echoed = [(r.request.url.path, hits) for r in responses
              if (hits := leaks(r.text, cards, keys))]
    assert echoed == []

    # Stored free text holds the masked form.
    with psycopg.connect(db_url) as conn:
        stored: dict[str, str] = dict(conn.execute("select id::text, description from payments "
                                   "where id = any(%s::uuid[])", (ids,)).fetchall())
    for i, (pid, card) in enumerate(zip(ids, cards, strict=True)):
        prefix = keys[i % 3].split("_")[1]
        assert stored[pid] == f"order {i} card {masked(card)} api pck_{prefix}_****"

    assert scan_database(db_url, cards, keys) == {}
    assert scan_redis(servers.redis.url, cards, keys) == []
    assert scan_files([node_log], cards, keys) == {}
    assert "workload done" in read_text(node_log)  # the log did capture the run



# ----------------------------------------------------------------------- lab cluster run

def _find_keys(doc: object) -> list[str]:
    """Every string shaped like an API key anywhere in a JSON document."""
    if isinstance(doc, str):
        return [doc] if KEY_PATTERN.fullmatch(doc) else []
    if isinstance(doc, dict):
        return [k for v in doc.values() for k in _find_keys(v)]
    if isinstance(doc, list):
        return [k for v in doc for k in _find_keys(v)]
    return []


def _lab_workload(lab: Cluster, admin: dict[str, str], cards: list[str],
                  keys: list[str]) -> list[str]:
    """Accounts homed in two regions; payments entered at the payee's region (forwarded to
    the payer's over gRPC) with cards and keys in descriptions and idempotency keys; bad
    requests at both regions. Returns the payment ids."""
    a, b = lab.regions[0], lab.regions[1]
    with httpx.Client(timeout=30, headers=admin) as http:
        def post(url: str, body: object, **headers: str) -> httpx.Response:
            return http.post(url, json=body, headers=headers)

        payer = post(f"{a.api_url}/v1/accounts", {"currency": "USD"}).json()["id"]
        payee = post(f"{b.api_url}/v1/accounts", {"currency": "USD", "kind": "merchant",
                                                  "home_region": b.name}).json()["id"]
        assert post(f"{a.api_url}/v1/accounts/{payer}/deposits",
                    {"amount": 10**7}).status_code == 201
        ids = []
        for i, card in enumerate(cards):
            spelled, key = spellings(card)[i % 3], keys[i % len(keys)]
            # Entered at b, owned by a: forwarded (headers, body and all) over gRPC.
            resp = post(f"{b.api_url}/v1/payments", {
                "payer": payer, "payee": payee, "amount": 10 + i, "currency": "USD",
                "description": f"lab {i}: {spelled} {key}"},
                **{"Idempotency-Key": f"lab-{spelled}"})
            assert resp.status_code == 201, resp.text
            ids.append(resp.json()["id"])
            # Through the geo router too: it logs paths of what it proxies.
            router = lab.routers[0].url
            http.get(f"{router}/v1/payments/{ids[-1]}", params={"pan": spelled, "k": key})
            http.get(f"{router}/v1/accounts/{card}", headers={"Authorization": f"Bearer {key}"})
            for region in (a, b):
                http.get(f"{region.api_url}/v1/payments/{card}", params={"pan": spelled})
                post(f"{region.api_url}/v1/accounts", {"currency": "USD",
                                                       "home_region": spelled})
                post(f"{region.api_url}/v1/accounts", {"currency": card, key: 1})
                http.get(f"{region.api_url}/v1/accounts/{payer}",
                         headers={"Authorization": f"Bearer {key}"})
                http.get(f"{region.api_url}/v1/accounts/{payer}",
                         headers={"Authorization": spelled})
    return ids


@pytest.mark.multiregion
@pytest.mark.slow
@pytest.mark.lab
@pytest.mark.timeout(240)
def test_lab_cluster_logs_files_and_databases_hold_no_card_or_key(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    """Two regions and a geo router as `paycluster up` runs them (nodes logging to node.log,
    the router to router.log, each region's PostgreSQL, Redis and NATS): after the
    workload, no file under the data dir (logs and the servers' data files alike) and no
    row in either region's database holds a full card number or a key."""
    data_dir = tmp_path_factory.mktemp("leaklab")
    cards = [luhn_number(n) for n in range(13, 20)]
    keys = [fake_key(), fake_key()]
    lab = start_cluster(data_dir, regions=2, wan_scale=0, routers=1)
    try:
        admin_keys = _find_keys(read_cluster(data_dir))
        admin = {"Authorization": f"Bearer {admin_keys[0]}"} if admin_keys else {}
        ids = _lab_workload(lab, admin, cards, keys)
        a, b = lab.regions[0], lab.regions[1]

        def replicated() -> bool:
            with psycopg.connect(b.dsn) as conn:
                row = conn.execute("select count(*) from payments where id = any(%s::uuid[])",
                                   (ids,)).fetchone()
            return row is not None and row[0] == len(ids)
        wait_for(replicated, 60, "payments replicated to the second region")
        db_leaks = {r.name: scan_database(r.dsn, cards, keys + admin_keys) for r in (a, b)}
        with psycopg.connect(b.dsn) as conn:
            stored = [d for (d,) in conn.execute(
                "select description from payments where id = any(%s::uuid[])", (ids,))]
    finally:
        lab.stop()
    files = [p for p in data_dir.rglob("*") if p.is_file() and not p.is_symlink()]
    logs_seen = [p for p in files if p.name in ("node.log", "router.log")]
    assert len(logs_seen) == 3 and all(p.stat().st_size > 0 for p in logs_seen)
    # Every finding at once (tables by region, then files), so one run shows them all.
    found = {**{f"{name}:{table}": rows for name, tables in db_leaks.items()
                for table, rows in tables.items()},
             **scan_files(files, cards, keys),
             # The bootstrap admin key lives in cluster.json (mode 0600) and nowhere else.
             **scan_files([p for p in files if p.name != "cluster.json"], [], admin_keys)}
    assert found == {}
    assert sorted(stored) == sorted(f"lab {i}: {masked(c)} pck_{keys[i % 2].split('_')[1]}_****"
                                    for i, c in enumerate(cards))
