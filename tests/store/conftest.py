"""Store fixtures: `store_url` runs a test on SQLite and on PostgreSQL.

PostgreSQL is a throwaway cluster this module starts itself (`initdb` + `pg_ctl`, found on PATH or
in Debian's /usr/lib/postgresql/*/bin) in a temp dir, on a free 127.0.0.1 port, with fsync off; each
test gets a fresh database. As root, the cluster runs as the `postgres` (or `nobody`) user through
`runuser`, since PostgreSQL refuses to run as root. Without the binaries or psycopg the PostgreSQL
cases skip with the reason; SQLite always runs.
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import os
import pwd
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from tinkerd.local_server import free_port
from tinkerd.store.db import open_store

PG_USER = "tinkerd"


def _pg_binary(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"),
                        key=lambda path: [int(n) for n in re.findall(r"\d+", path)])
    return candidates[-1] if candidates else None


class PostgresCluster:
    def __init__(self, initdb: str, pg_ctl: str) -> None:
        self.pg_ctl = pg_ctl
        self.root = Path(tempfile.mkdtemp(prefix="tinkerd-pg-"))
        self.data = self.root / "data"
        self.run_as: list[str] = []
        self.admin = None  # a psycopg connection to the `postgres` database, for CREATE/DROP DATABASE
        if os.geteuid() == 0:
            user = next((u for u in ("postgres", "nobody") if _has_user(u)), None)
            runuser = shutil.which("runuser")
            if user is None or runuser is None:
                self.cleanup()
                pytest.skip("running as root, and no runuser or non-root user to run PostgreSQL as")
            entry = pwd.getpwnam(user)
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
            self.run_as = [runuser, "-u", user, "--"]
        self._run(initdb, "-D", str(self.data), "-U", PG_USER, "--auth=trust", "--no-sync", "-E", "UTF8",
                  "--locale=C")
        for _ in range(3):  # the free port may be taken before the server binds it
            self.port = free_port()
            options = (f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off "
                       "-c full_page_writes=off -c synchronous_commit=off")
            started = subprocess.run([*self.run_as, pg_ctl, "-D", str(self.data), "-l", str(self.root / "log"),
                                      "-o", options, "-w", "-t", "30", "start"], cwd=self.root, capture_output=True,
                                     text=True)
            if started.returncode == 0:
                return
        log = (self.root / "log").read_text() if (self.root / "log").exists() else ""
        self.cleanup()
        raise RuntimeError(f"PostgreSQL did not start: {started.stdout}{started.stderr}\n{log[-2000:]}")

    def _run(self, *cmd: str) -> None:
        done = subprocess.run([*self.run_as, *cmd], cwd=self.root, capture_output=True, text=True)
        if done.returncode != 0:
            self.cleanup()
            raise RuntimeError(f"{' '.join(cmd)} failed: {done.stdout}{done.stderr}")

    def url(self, database: str) -> str:
        return f"postgresql://{PG_USER}@127.0.0.1:{self.port}/{database}"

    def stop(self) -> None:
        subprocess.run([*self.run_as, self.pg_ctl, "-D", str(self.data), "-m", "immediate", "-w", "stop"],
                       cwd=self.root, capture_output=True)
        self.cleanup()

    def cleanup(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def _has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


@pytest.fixture(scope="session")
def pg_cluster():
    psycopg = pytest.importorskip("psycopg", reason="psycopg is not installed (pip install 'tinkerd[postgres]')")
    initdb, pg_ctl = _pg_binary("initdb"), _pg_binary("pg_ctl")
    if initdb is None or pg_ctl is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found on PATH")
    cluster = PostgresCluster(initdb, pg_ctl)
    try:
        with psycopg.connect(cluster.url("postgres"), autocommit=True) as admin:
            cluster.admin = admin
            yield cluster
    finally:
        cluster.stop()


_databases = itertools.count()


@pytest.fixture
def pg_url(pg_cluster):
    """A fresh, empty database in the session's cluster."""
    name = f"t{next(_databases)}"
    pg_cluster.admin.execute(f"CREATE DATABASE {name}")
    yield pg_cluster.url(name)
    with contextlib.suppress(Exception):  # WITH (FORCE) needs PostgreSQL 13; the cluster is thrown away anyway
        pg_cluster.admin.execute(f"DROP DATABASE {name} WITH (FORCE)")


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.sqlite3'}"  # an absolute path: four slashes
    return request.getfixturevalue("pg_url")


@pytest.fixture
def store(store_url, tmp_path):
    store = open_store(store_url, tmp_path)
    yield store
    store.close()
