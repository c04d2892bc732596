"""A real, throw-away PostgreSQL server for tests: initdb + pg_ctl in a temp dir on a free 127.0.0.1 port.

    from postgres import postgres_url
    @pytest.fixture(scope="module")
    def pg_url():
        yield from postgres_url()

Runs the server as the ``postgres`` OS user (``runuser``) when the tests run as root, since PostgreSQL
refuses to run as root; its directory is a fresh one under the system temp dir (pytest's own temp dirs are
private to root). Skips with the cause only when no server can be started here.
"""
from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator

import pytest


def _binary(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def postgres_url(database: str = "allocopt") -> Iterator[str]:
    """Start a server in a temp dir, create ``database``, yield its SQLAlchemy URL, then stop and remove it."""
    initdb, pg_ctl, createdb = _binary("initdb"), _binary("pg_ctl"), _binary("createdb")
    if not (initdb and pg_ctl and createdb):
        pytest.skip("PostgreSQL is not installed (no initdb/pg_ctl on PATH or in /usr/lib/postgresql/*/bin); "
                    "install the postgresql package")
    as_user: list[str] = []
    if os.geteuid() == 0:
        if not shutil.which("runuser"):
            pytest.skip("running as root without runuser, and PostgreSQL refuses to run as root")
        as_user = ["runuser", "-u", "postgres", "--"]
    directory = Path(tempfile.mkdtemp(prefix="allocopt-pg-"))
    data, sockets = directory / "data", directory / "sock"
    sockets.mkdir(parents=True, exist_ok=True)
    if as_user:
        shutil.chown(directory, "postgres")
        shutil.chown(sockets, "postgres")
    port = _free_port()

    def call(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*as_user, *args], capture_output=True, text=True, timeout=120)

    out = call(initdb, "-D", str(data), "-U", "postgres", "-A", "trust", "--no-sync", "-E", "UTF8")
    if out.returncode != 0:
        pytest.skip(f"initdb failed: {out.stderr.strip().splitlines()[-1:] or out.returncode}")
    out = call(pg_ctl, "-D", str(data), "-l", str(directory / "server.log"), "-w", "-t", "60", "start",
               "-o", f"-h 127.0.0.1 -p {port} -k {sockets} -c fsync=off -c max_connections=100")
    if out.returncode != 0:
        log = (directory / "server.log").read_text(errors="replace") if (directory / "server.log").exists() else ""
        pytest.skip(f"PostgreSQL did not start: {(log or out.stderr).strip().splitlines()[-1:]}")
    try:
        out = call(createdb, "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", database)
        assert out.returncode == 0, out.stderr
        yield f"postgresql://postgres@127.0.0.1:{port}/{database}"   # the documented form; the [postgres] extra provides its driver
    finally:
        call(pg_ctl, "-D", str(data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(directory, ignore_errors=True)
