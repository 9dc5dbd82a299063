"""A real PostgreSQL for tests: Debian's server binaries, a throw-away cluster on 127.0.0.1.

`start_postgres()` is a context manager yielding a `PgServer` (its `url(db)` gives a SQLAlchemy
URL with a password). The cluster lives in a fresh temp dir owned by the service user (initdb
refuses to run as root, so as root the server runs as `postgres`, or `nobody` if that user does
not exist), listens on 127.0.0.1:<free port> only, with no Unix socket, and is removed
afterwards. When the binaries are missing and the test runs as root, the Debian `postgresql`
package is installed with apt-get (CI runs these tests, it never skips them); otherwise the test
fails with the install command.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.harness.prometheus import free_port

INSTALL = "apt-get update && apt-get install -y postgresql"
USER = "canaryml"


def find_bindir() -> Path | None:
    """The newest `/usr/lib/postgresql/<major>/bin` with initdb and pg_ctl, or pg_config's."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                   key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit()
                   else 0)
    if found:
        return found[-1].parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def ensure_postgres() -> Path:
    """The PostgreSQL server's bin directory, installing Debian's package as root if needed."""
    bindir = find_bindir()
    if bindir is not None:
        return bindir
    is_root = getattr(os, "geteuid", lambda: -1)() == 0
    if is_root and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update"], check=False, env=env, capture_output=True,
                       timeout=300)
        res = subprocess.run(["apt-get", "install", "-y", "--no-install-recommends",
                              "postgresql"], check=False, env=env, capture_output=True,
                             text=True, timeout=600)
        bindir = find_bindir()
        if bindir is not None:
            return bindir
        pytest.fail(f"installing PostgreSQL failed (exit {res.returncode}): "
                    f"{res.stderr[-500:]}\nInstall it by hand: {INSTALL}")
    pytest.fail(f"the PostgreSQL server (initdb, pg_ctl) is not installed; run as root: {INSTALL}")
    raise AssertionError("unreachable")  # pytest.fail raises


def _service_user() -> str | None:
    """Who runs the server: None = this user; as root, `postgres` (or `nobody`)."""
    if getattr(os, "geteuid", lambda: -1)() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    pytest.fail("running as root with neither a `postgres` nor a `nobody` user to run "
                "PostgreSQL as (initdb refuses root)")
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class PgServer:
    port: int
    user: str
    password: str

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{self.user}:{self.password}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """CREATE DATABASE `name`; returns its URL."""
        import psycopg

        conn = psycopg.connect(host="127.0.0.1", port=self.port, user=self.user,
                                password=self.password, dbname="postgres", connect_timeout=10)
        try:
            conn.autocommit = True  # CREATE DATABASE cannot run inside a transaction
            with conn.cursor() as cur:
                cur.execute(f'CREATE DATABASE "{name}"')
        finally:
            conn.close()
        return self.url(name)


@contextlib.contextmanager
def start_postgres(timeout_s: float = 60.0) -> Iterator[PgServer]:
    """Run a fresh PostgreSQL cluster on 127.0.0.1:<free port>; yield it; stop and delete it."""
    bindir = ensure_postgres()
    runas = _service_user()
    prefix = ["runuser", "-u", runas, "--"] if runas else []
    root = Path(tempfile.mkdtemp(prefix="canaryml-pg-"))  # under /tmp: reachable by runas
    try:
        if runas:
            entry = pwd.getpwnam(runas)
            os.chown(root, entry.pw_uid, entry.pw_gid)
        password = secrets.token_hex(12)
        pwfile = root / "pw"
        pwfile.write_text(password + "\n")
        if runas:
            os.chown(pwfile, entry.pw_uid, entry.pw_gid)
        data = root / "data"
        res = subprocess.run([*prefix, str(bindir / "initdb"), "-D", str(data), "-U", USER,
                              f"--pwfile={pwfile}", "--auth=scram-sha-256", "-E", "UTF8",
                              "--no-locale", "--no-sync"],
                             capture_output=True, text=True, timeout=120, check=False)
        if res.returncode != 0:
            pytest.fail(f"initdb failed (exit {res.returncode}): {res.stderr[-1000:]}")
        port = free_port()
        with open(data / "postgresql.conf", "a") as conf:
            # loopback only, no Unix socket; durability is not what these tests measure
            conf.write(f"\nlisten_addresses = '127.0.0.1'\nport = {port}\n"
                       "unix_socket_directories = ''\nmax_connections = 60\n"
                       "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n")
        logfile = root / "server.log"
        res = subprocess.run([*prefix, str(bindir / "pg_ctl"), "-D", str(data), "-l",
                              str(logfile), "-w", "-t", str(int(timeout_s)), "start"],
                             capture_output=True, text=True, timeout=timeout_s + 30,
                             check=False)
        if res.returncode != 0:
            log = logfile.read_text()[-1500:] if logfile.exists() else ""
            pytest.fail(f"pg_ctl start failed (exit {res.returncode}): {res.stderr[-500:]}\n{log}")
        try:
            yield PgServer(port=port, user=USER, password=password)
        finally:
            subprocess.run([*prefix, str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast",
                            "-w", "-t", "30", "stop"], capture_output=True, timeout=60,
                           check=False)
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def postgres() -> Iterator[PgServer]:
    with start_postgres() as server:
        yield server
