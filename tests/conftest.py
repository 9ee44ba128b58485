"""Shared fixtures."""

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest -n 2 on 2 cores: one thread per worker (and per process it starts) instead of two threads
    # each, which would oversubscribe the cores and slow both workers down
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")




@contextlib.contextmanager
def _isolated_store(folder: Path):
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{folder / 'mlflow.db'}")
        mp.setenv("FER_EXP_CACHE_DIR", str(folder / "cache"))
        # mlflow.set_experiment exports MLFLOW_EXPERIMENT_ID; leaving the block removes it again (set
        # first: monkeypatch undoes only what it changed, and deleting an absent variable changes nothing)
        for name in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
            mp.setenv(name, "")
            mp.delenv(name)
        yield mp


@pytest.fixture(scope="session")
def isolated_store():
    """``with isolated_store(folder) as mp:`` what :func:`store` does, for module-scoped fixtures that
    track several runs once for many tests."""
    return _isolated_store


@pytest.fixture
def store(tmp_path, isolated_store):
    """An isolated working directory with its own MLflow sqlite store and decode cache."""
    with isolated_store(tmp_path):
        yield tmp_path


@contextlib.contextmanager
def _local_server(cmd: list[str], health: str, **popen):
    """Start a server process, wait until ``health`` (a URL) answers, yield it, stop it."""
    import time
    import urllib.request

    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, **popen)
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(health, timeout=5).close()
                break
            except OSError:
                assert server.poll() is None, server.stderr.read()[-3000:]
                time.sleep(0.5)
        yield server
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()


@pytest.fixture(scope="session")
def local_server():
    """``with local_server(cmd, health_url, cwd=..., env=...):`` a real server (mlflow server, mlflow
    models serve) on localhost for the block, started and stopped by the test."""
    return _local_server


@pytest.fixture(scope="session")
def free_port():
    return _free_port


def _postgres_bin() -> Path | None:
    """The folder of initdb/pg_ctl: on PATH, or Debian's /usr/lib/postgresql/<version>/bin."""
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0)
    return versions[-1].parent if versions else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def postgres_url(tmp_path_factory):
    """A real PostgreSQL server on 127.0.0.1, started for the test session and stopped after it.

    Needs Debian's `postgresql` package (`.ci/run` installs it). Skipped where it is absent, unless
    FER_EXP_REQUIRE_POSTGRES=1 (set by .ci/run), where it fails instead."""
    bindir = _postgres_bin()
    if bindir is None:
        if os.environ.get("FER_EXP_REQUIRE_POSTGRES") == "1":
            pytest.fail("FER_EXP_REQUIRE_POSTGRES=1 but no PostgreSQL server binaries (apt-get install postgresql)")
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql)")
    root = Path(tempfile.mkdtemp(prefix="fer-exp-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root: run the server as the package's postgres user
        user = pwd.getpwnam("postgres")
        os.chown(root, user.pw_uid, user.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    data, port = root / "data", _free_port()

    def run(*cmd):
        return subprocess.run([*as_user, *cmd], check=True, capture_output=True, text=True, timeout=120)

    run(str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8")
    run(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(root / "server.log"), "-w", "-t", "60", "start",
        "-o", f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c max_connections=100")
    try:
        run(str(bindir / "psql"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-c",
            "CREATE ROLE fer LOGIN PASSWORD 'pg-secret-7f3a'")
        run(str(bindir / "psql"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-c",
            "CREATE DATABASE fer_test OWNER fer")
        yield f"postgresql://fer:pg-secret-7f3a@127.0.0.1:{port}/fer_test"
    finally:
        subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)
