"""`make demo`, the first command the README gives: from the repository, it starts a lab
with a geo router, runs the demo workload, prints the summary and stops everything. Run as
a user would (a subprocess), with its temp dir inside the test's."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.integration, pytest.mark.multiregion, pytest.mark.slow,
              pytest.mark.lab, pytest.mark.timeout(900)]


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A temp dir with a short path (PostgreSQL's socket path must fit in 107 bytes, and
    pytest's tmp_path does not leave room for the demo's own dirs); removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="pcdemo-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_make_demo_runs_the_workload_and_stops_everything(short_tmp: Path) -> None:
    tmp_path = short_tmp
    # 200 payments, not the demo's 600: every phase and check still runs, in a third of
    # the CPU (the suite's heaviest single test otherwise).
    env = {**os.environ, "TMPDIR": str(tmp_path), "NO_COLOR": "1", "COLUMNS": "160",
           "PAYCLUSTER_DEMO_PAYMENTS": "200"}
    proc = subprocess.Popen(["make", "--no-print-directory", "demo"], cwd=REPO_ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=840)
    finally:
        if proc.poll() is None:  # SIGTERM: the CLI stops its lab on the way out
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    print(output[-4000:])
    if proc.returncode != 0:  # the demo kept its run dir: show why before it is removed
        for log in sorted(tmp_path.glob("paycluster-demo-*/*/node/node.log")):
            print(f"--- last lines of {log}")
            print("\n".join(log.read_text(errors="replace").splitlines()[-40:]))
    assert proc.returncode == 0, output[-4000:]
    assert "demo OK" in output
    # Everything it started is gone, and so is its run directory (a temp dir of its own).
    assert not list(tmp_path.glob("paycluster-demo-*")), list(tmp_path.iterdir())
    leftovers = [p.info for p in psutil.process_iter(["pid", "cmdline"])
                 if str(tmp_path) in " ".join(p.info["cmdline"] or [])]
    assert leftovers == [], leftovers
