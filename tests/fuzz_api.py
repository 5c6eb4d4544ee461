"""On-demand API fuzzing (`make fuzz`): schemathesis over the node's OpenAPI document on a
real two-region lab, once with an admin key and once with a customer key.

Every operation gets generated valid and invalid input. Checked: no answer is a 5xx
(`not_a_server_error`), and afterwards the ledger findings hold in both regions (money
conserved, journals balanced, nothing negative, zero replication conflicts). The
operator routes that pause writes by design (`/v1/admin/ownership/*`: a ban makes every
later write a 503 until it is lifted) are left out of the admin run.

    .venv/bin/python -m tests.fuzz_api [--max-time 120]

Not collected by pytest (no test_ prefix): it runs for minutes and is meant for a long,
on-demand run; `make test` runs the bounded, derandomized checks instead.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx

from cluster.invariants import ledger_findings
from cluster.lab import start_cluster

SCHEMATHESIS = Path(sys.executable).with_name("schemathesis")


def _customer_key(api_url: str, admin_key: str, all_urls: list[str]) -> str:
    made = httpx.post(f"{api_url}/v1/admin/principals", timeout=30,
                      headers={"Authorization": f"Bearer {admin_key}"},
                      json={"name": "fuzz-customer", "role": "customer"})
    made.raise_for_status()
    key: str = made.json()["api_key"]["key"]
    deadline = time.monotonic() + 30
    for url in all_urls:  # usable in every region before the run starts
        while httpx.get(f"{url}/v1/accounts/{uuid.uuid4()}", timeout=30,
                        headers={"Authorization": f"Bearer {key}"}).status_code == 401:
            if time.monotonic() > deadline:
                raise SystemExit("the customer key never replicated")
            time.sleep(0.1)
    return key


def _run(api_url: str, key: str, max_time: int, exclude_admin_ownership: bool) -> int:
    cmd = [str(SCHEMATHESIS), "run", f"{api_url}/openapi.json",
           "--header", f"Authorization: Bearer {key}",
           "--checks", "not_a_server_error", "--max-time", str(max_time),
           "--workers", "2", "--continue-on-failure",
           "--phases", "examples,coverage,fuzzing"]
    if exclude_admin_ownership:
        cmd += ["--exclude-path-regex", "^/v1/admin/ownership/"]
    return subprocess.run(cmd, check=False).returncode


def main() -> int:
    """Start a lab, fuzz it with both keys, check the books; 0 when all is clean."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-time", type=int, default=120,
                        help="seconds of schemathesis per key")
    args = parser.parse_args()
    data_dir = Path(tempfile.mkdtemp(prefix="paycluster-fuzz-"))
    lab = start_cluster(data_dir, regions=2, wan_scale=0)
    try:
        urls = [lab.region(n).api_url for n in lab.names]
        customer = _customer_key(urls[0], lab.admin_key, urls)
        results = {
            "admin": _run(urls[0], lab.admin_key, args.max_time, True),
            "customer": _run(urls[1], customer, args.max_time, False),
        }
        time.sleep(2)  # let replication settle before reading both copies
        failed = [f for n in lab.names for f in ledger_findings(n, lab.region(n).dsn)
                  if not f.ok]
        print(f"schemathesis exit codes: {results}; ledger findings failed: {failed}")
        return 0 if not failed and not any(results.values()) else 1
    finally:
        lab.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
