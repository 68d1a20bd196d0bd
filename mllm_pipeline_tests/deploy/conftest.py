"""Real servers for the deployment tests: a PostgreSQL server on loopback, started and stopped by the tests.

PostgreSQL comes from the Debian package (``scripts/setup.sh`` installs it); its binaries are found with
``pg_config --bindir``, under ``/usr/lib/postgresql/<version>/bin``, or in ``$MLLM_PG_BINDIR``. Under ``CI=true``
a missing PostgreSQL fails the test instead of skipping it, so CI always really runs it.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from mllm_pipeline_tests.helpers import unavailable  # noqa: F401 -- the deploy tests import it from here

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def postgres_bindir() -> str | None:
    if os.environ.get("MLLM_PG_BINDIR"):
        return os.environ["MLLM_PG_BINDIR"]
    pg_config = shutil.which("pg_config")
    if pg_config:
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True)
        if out.returncode == 0 and Path(out.stdout.strip(), "initdb").exists():
            return out.stdout.strip()
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    return str(Path(found[-1]).parent) if found else None


@dataclass
class PostgresServer:
    host: str
    port: int
    user: str
    password: str
    db: str
    pid: int

    def env(self) -> dict[str, str]:
        """The DAGSTER_PG_* variables that docker/dagster.yaml reads."""
        return {
            "DAGSTER_PG_HOST": self.host, "DAGSTER_PG_PORT": str(self.port), "DAGSTER_PG_DB": self.db,
            "DAGSTER_PG_USERNAME": self.user, "DAGSTER_PG_PASSWORD": self.password,
        }

    def connect(self):
        import psycopg2

        return psycopg2.connect(host=self.host, port=self.port, user=self.user, password=self.password, dbname=self.db)


@contextlib.contextmanager
def postgres_server() -> Iterator[PostgresServer]:
    """initdb a fresh cluster in a temp dir, start it on a free loopback port with password auth, yield, stop it."""
    bindir = postgres_bindir()
    if bindir is None:
        unavailable("PostgreSQL is not installed (no initdb; apt-get install postgresql)")
    # PostgreSQL refuses to run as root: as root, run it as the `postgres` user that the Debian package creates
    as_user: list[str] = []
    owner = None
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            unavailable("running as root and there is no `postgres` user to run PostgreSQL as")
        as_user = ["runuser", "-u", "postgres", "--"]
    base = Path(tempfile.mkdtemp(prefix="mllm-pg-"))  # not under pytest's tmp_path: its parents are root-only
    data, sock, pwfile, log = base / "data", base / "sock", base / "pw", base / "server.log"
    password = f"pw-{os.getpid()}-{time.monotonic_ns() % 10**6}"
    pwfile.write_text(password + "\n")
    sock.mkdir()
    if owner is not None:
        for p in (base, sock, pwfile):
            os.chown(p, owner.pw_uid, owner.pw_gid)
    port = free_port()
    pid = None
    try:
        subprocess.run([*as_user, f"{bindir}/initdb", "-D", str(data), "-U", "dagster", "--auth=scram-sha-256",
                        f"--pwfile={pwfile}", "-E", "UTF8", "--no-sync"],
                       check=True, capture_output=True, text=True)
        subprocess.run([*as_user, f"{bindir}/pg_ctl", "-D", str(data), "-l", str(log), "-w", "-t", "60", "-o",
                        f"-p {port} -k {sock} -c listen_addresses=127.0.0.1 -c fsync=off", "start"],
                       check=True, capture_output=True, text=True)
        pid = int((data / "postmaster.pid").read_text().splitlines()[0])
        server = PostgresServer("127.0.0.1", port, "dagster", password, "postgres", pid)
        import psycopg2

        conn = psycopg2.connect(host=server.host, port=port, user=server.user, password=password, dbname="postgres")
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("CREATE DATABASE dagster_test")
        conn.close()
        server.db = "dagster_test"
        yield server
    except subprocess.CalledProcessError as e:
        tail = log.read_text()[-2000:] if log.exists() else ""
        raise RuntimeError(f"PostgreSQL did not start: {e.cmd}\n{e.stdout}\n{e.stderr}\n{tail}") from None
    finally:
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGINT)  # "fast" shutdown
            deadline = time.time() + 30
            while time.time() < deadline:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.2)
            else:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    with postgres_server() as server:
        yield server
