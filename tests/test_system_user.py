"""Creating PostgreSQL's system user is safe when several paycluster commands start at once.

Run as root, `cluster.servers` runs PostgreSQL as an unprivileged user it creates on first
use. Two commands started together on a fresh machine raced there (one failed in
useradd, or initdb ran as a uid that did not resolve: "could not look up effective user
ID ... user does not exist"). Here eight processes released at the same instant each do
what `start_postgres` does first (`_pg_user`), for a user that does not exist yet, then
run a program as that user that looks itself up as initdb does. Every one must succeed,
with the same uid. The user gets a fresh name (the machine's real one is not touched) and
is deleted afterwards.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("useradd") is None,
                       reason="creates an OS user: needs root and useradd"),
    pytest.mark.timeout(120),
]

PROCESSES = 8

# One contender: wait for the start signal, make the user the way start_postgres does,
# then run `id -un` as that user (getpwuid of its own euid, initdb's first look-up).
CHILD = """
import os, subprocess, sys, time
from pathlib import Path
import cluster.servers as servers

name, go = sys.argv[1], Path(sys.argv[2])
servers.PG_SYSTEM_USER = name  # a fresh name, so the machine's real user is untouched
while not go.exists():
    time.sleep(0.001)
user = servers._pg_user()
me = subprocess.run(["id", "-un"], capture_output=True, text=True, check=True,
                    **servers._as_user(user))
print(user, me.stdout.strip(), os.getpid())
"""


@pytest.fixture
def fresh_user() -> Iterator[str]:
    """A user name nobody has; deleted afterwards if a test made it."""
    name = f"pctest{uuid.uuid4().hex[:10]}"
    yield name
    subprocess.run(["userdel", name], capture_output=True, check=False)
    subprocess.run(["groupdel", name], capture_output=True, check=False)


# The race window is milliseconds wide: three rounds, each with a user of its own.
@pytest.mark.parametrize("round_", range(3))
def test_concurrent_first_starts_create_the_user_once(round_: int, fresh_user: str,
                                                      tmp_path: Path) -> None:
    with pytest.raises(KeyError):
        pwd.getpwnam(fresh_user)
    go = tmp_path / "go"
    root = Path(__file__).resolve().parent.parent
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, fresh_user, str(go)], cwd=root,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(PROCESSES)]
    try:
        time.sleep(2.0)  # every interpreter started and polling
        go.touch()
        outcomes = [(p.wait(60), *p.communicate()) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    failed = [(rc, err.strip().splitlines()[-1:]) for rc, _out, err in outcomes if rc != 0]
    assert not failed, f"{len(failed)} of {PROCESSES} failed: {failed}"
    # Each ran a program as the user, which resolved its own uid to the name.
    assert [out.split()[:2] for _rc, out, _err in outcomes] == [[fresh_user, fresh_user]] * \
        PROCESSES
    entry = pwd.getpwnam(fresh_user)
    assert entry.pw_uid != 0
    with open("/etc/passwd") as passwd:
        assert sum(line.startswith(f"{fresh_user}:") for line in passwd) == 1


def test_an_existing_user_is_success(fresh_user: str) -> None:
    from cluster.servers import ensure_system_user

    subprocess.run(["useradd", "--system", "--no-create-home", fresh_user], check=True,
                   capture_output=True)
    made = pwd.getpwnam(fresh_user)
    assert ensure_system_user(fresh_user).pw_uid == made.pw_uid
