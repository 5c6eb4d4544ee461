"""The docs stay true to the code: every route, error code and setting is documented, the
generated reference is fresh, every relative link resolves, the pages build as a site
(MkDocs, strict), and the standalone webhook receiver verifies what the nodes sign. No
servers: the app is built, never started."""

from __future__ import annotations

import ast
import importlib.util
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import ThreadingHTTPServer
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from region_node.webhooks import signing

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def _load(rel: str, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, ROOT / rel)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


gen = _load("docs/gen_reference.py", "docs_gen_reference")


@pytest.fixture(scope="module")
def openapi() -> dict[str, Any]:
    return gen.node_openapi()


def test_every_route_of_the_node_is_in_the_api_reference(openapi: dict[str, Any]) -> None:
    text = (DOCS / "api.md").read_text()
    missing = [f"{m.upper()} {p}" for p, ops in openapi["paths"].items() for m in ops
               if f"`{m.upper()} {p}`" not in text]
    assert not missing, f"undocumented routes (run python docs/gen_reference.py): {missing}"
    assert len(openapi["paths"]) >= 30


def test_every_route_of_the_router_and_channel_is_in_the_api_reference() -> None:
    text = (DOCS / "api.md").read_text()
    for rel, _, _ in gen.EXTRA_ROUTES:
        routes = gen._source_routes(rel)
        assert routes, rel
        for method, path, _ in routes:
            assert f"| `{method}` | `{path}` |" in text, (rel, method, path)


def test_every_error_code_is_in_the_catalogue_with_its_status() -> None:
    text = (DOCS / "errors.md").read_text()
    found = gen.collect_errors()
    assert {"insufficient_funds", "lease_lost", "rate_limited", "internal_error",
            "idempotency_key_reused", "no_healthy_region", "channel_down"} <= {
        code for _, code in found}
    for (_, code), entry in found.items():
        statuses = [s.strip() for s in
                    re.findall(rf"^\| `{re.escape(code)}` \| ([^|]+) \|", text, re.M)]
        assert statuses, f"error code {code} missing from docs/errors.md"
        assert str(entry.status) in statuses, (code, entry.status, statuses)
    # Every literal `code="..."` in the three packages is caught by the scanner.
    literals = set()
    for package in ("region_node", "channel", "geo_router"):
        for path in (ROOT / package).rglob("*.py"):
            literals |= set(re.findall(r"\bcode=\"([a-z_]+)\"", path.read_text()))
    assert literals <= {code for _, code in found}, literals - {c for _, c in found}


def test_every_setting_is_in_the_configuration_reference() -> None:
    text = (DOCS / "configuration.md").read_text()
    for cls in gen.settings_classes():
        prefix = cls.model_config.get("env_prefix", "")
        for name in cls.model_fields:
            assert f"`{prefix}{name.upper()}`" in text, f"{prefix}{name.upper()} undocumented"


def test_every_settings_class_is_known_to_the_generator() -> None:
    known = {spec.split(":")[1] for spec in gen.SETTINGS_CLASSES}
    for package in ("region_node", "geo_router", "lock_service", "channel", "replication",
                    "cluster", "bench"):
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ClassDef) and any(
                        getattr(b, "id", getattr(b, "attr", "")) == "BaseSettings"
                        for b in node.bases):
                    assert node.name in known, f"{path}: add {node.name} to SETTINGS_CLASSES"


def test_generated_reference_is_fresh() -> None:
    assert gen.main(["--check"]) == 0, "run: python docs/gen_reference.py"


_LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def _slug(heading: str) -> str:
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    lines = path.read_text().splitlines()
    return {_slug(line.lstrip("#")) for line in lines if line.startswith("#")}


def test_every_relative_link_resolves() -> None:
    files = [*DOCS.rglob("*.md"), ROOT / "README.md", ROOT / "SECURITY.md",
             ROOT / "CHANGELOG.md"]
    broken = []
    for md in files:
        text = re.sub(r"```.*?```", "", md.read_text(), flags=re.S)
        for target in _LINK.findall(text):
            if re.match(r"[a-z]+:", target):
                continue
            file_part, _, anchor = target.partition("#")
            dest = (md.parent / file_part).resolve() if file_part else md
            if not dest.exists():
                broken.append(f"{md.relative_to(ROOT)}: {target}")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"{md.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, broken


def test_the_docs_build_as_a_site_in_strict_mode(tmp_path: Path) -> None:
    """`mkdocs build --strict` (mkdocs.yml): every page is in the nav, every link to a page
    and every anchor resolve by MkDocs' own rules; a warning fails the build."""
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"),
         "-d", str(tmp_path / "site")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "site" / "index.html").is_file()
    assert (tmp_path / "site" / "runbooks" / "region-crash" / "index.html").is_file()


# --- the standalone webhook receiver ---------------------------------------------------

receiver = _load("examples/webhook_receiver.py", "example_webhook_receiver")


def test_example_receiver_needs_only_the_standard_library() -> None:
    tree = ast.parse((ROOT / "examples/webhook_receiver.py").read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree)
                if isinstance(node, ast.Import) for alias in node.names}
    imported |= {(node.module or "").split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.level == 0}
    imported.discard("__future__")
    assert imported <= sys.stdlib_module_names, imported - sys.stdlib_module_names


def test_example_receiver_verifies_what_the_node_signs() -> None:
    body = b'{"id": "ev_1", "type": "payment.succeeded", "region": "us-east", "data": {}}'
    old, new = signing.new_secret(), signing.new_secret()
    header = signing.sign(body, [new, old])  # during a rotation: two v1 signatures
    receiver.verify(body, header, new)
    receiver.verify(body, header, old)
    with pytest.raises(receiver.SignatureError):
        receiver.verify(body + b" ", header, new)  # tampered
    with pytest.raises(receiver.SignatureError):
        receiver.verify(body, header, signing.new_secret())  # another secret
    stale = signing.sign(body, [new], timestamp=int(time.time()) - 301)
    with pytest.raises(receiver.SignatureError):
        receiver.verify(body, stale, new)  # a replay of an old delivery
    with pytest.raises(receiver.SignatureError):
        receiver.verify(body, "garbage", new)


def test_example_receiver_over_http() -> None:
    secret = signing.new_secret()
    receiver.Receiver.secret = secret
    server = ThreadingHTTPServer(("127.0.0.1", 0), receiver.Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/hooks"
    body = (b'{"id": "ev_2", "type": "payment.succeeded", "region": "eu-west", '
            b'"data": {"id": "pay_1"}}')
    try:
        for header, expected in ((signing.sign(body, [secret]), 204),
                                 (signing.sign(body, ["whsec_wrong"]), 400)):
            request = urllib.request.Request(url, data=body, method="POST", headers={
                signing.SIGNATURE_HEADER: header, "Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=5) as response:
                    status = response.status
            except urllib.error.HTTPError as exc:
                status = exc.code
            assert status == expected
    finally:
        server.shutdown()
        server.server_close()
