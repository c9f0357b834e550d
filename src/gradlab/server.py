"""A shared tracking server: ``mlflow server`` on a PostgreSQL backend store, started by gradlab.

    python -m gradlab.server start [--dir .server] [--port 5000] [--pg-port 5433] [--artifacts DIR|s3://...]
    python -m gradlab.server stop  [--dir .server]
    make server / make server-stop

``start`` creates a PostgreSQL cluster under ``<dir>/pg`` with ``initdb`` (once), starts it with
``pg_ctl`` on 127.0.0.1, creates the databases ``mlflow`` (MLflow's backend store) and ``optuna``
(for ``pipelines/search.py --storage``), then starts ``mlflow server`` with that backend store and
an artifact location (a local directory, proxied by the server, or an S3-compatible URI), waits
until it answers, and prints the ``MLFLOW_TRACKING_URI`` to export. Every gradlab command then
logs to it unchanged. The cluster listens on the loopback address only and trusts its local
users: it is a lab's or a test's server, not an Internet-facing one (for that, give PostgreSQL
passwords and put MLflow behind an authenticating proxy).

PostgreSQL refuses to run as root; as root, its processes run as the system user ``gradlab-pg``
(created with ``useradd`` when missing). The tests start a throwaway pair in a temporary directory.
"""
from __future__ import annotations

import argparse
import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from .errors import StorageError

PG_USER = "gradlab-pg"  # the OS user PostgreSQL runs as when gradlab runs as root
DB_USER = "gradlab"  # the database superuser initdb creates
DATABASES = ("mlflow", "optuna")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pg_bin(name: str) -> str:
    """A PostgreSQL server program (initdb, pg_ctl): on PATH, else Debian's /usr/lib/postgresql/<v>/bin."""
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None)
    if found is None:
        raise StorageError(f"PostgreSQL's {name} is not installed (Debian: apt-get install postgresql)")
    return found


def _pg_user_exists() -> bool:
    if subprocess.run(["id", "-u", PG_USER], capture_output=True).returncode != 0:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", PG_USER],
                       check=True, capture_output=True)
    return True


def _as_pg_user(cmd: List[str]) -> List[str]:
    """``cmd`` run as an unprivileged user when we are root (initdb and postgres refuse root)."""
    if os.geteuid() != 0:
        return cmd
    _pg_user_exists()
    return ["runuser", "-u", PG_USER, "--", *cmd]


def _own(path: Path) -> None:
    if os.geteuid() == 0 and _pg_user_exists():
        shutil.chown(path, PG_USER)


@dataclass
class Postgres:
    """A PostgreSQL cluster in ``data`` on 127.0.0.1:``port`` (unix socket in ``data`` too)."""

    data: Path
    port: int

    def url(self, database: str) -> str:
        return f"postgresql://{DB_USER}@127.0.0.1:{self.port}/{database}"

    def run(self, *args: str) -> subprocess.CompletedProcess:
        proc = subprocess.run(_as_pg_user(list(args)), capture_output=True, text=True)
        if proc.returncode != 0:
            raise StorageError(f"{Path(args[0]).name} failed: {(proc.stderr or proc.stdout).strip()[-500:]}")
        return proc

    def start(self) -> "Postgres":
        self.data.mkdir(parents=True, exist_ok=True)
        _own(self.data)
        os.chmod(self.data, 0o700)
        if not (self.data / "PG_VERSION").exists():
            self.run(pg_bin("initdb"), "-D", str(self.data), "-U", DB_USER, "--auth=trust", "--encoding=UTF8",
                     "--no-instructions")
        if not self.running():
            self.run(pg_bin("pg_ctl"), "-D", str(self.data), "-l", str(self.data / "server.log"), "-w", "-t", "60",
                     "-o", f"-p {self.port} -k {self.data} -c listen_addresses=127.0.0.1 -c max_connections=200",
                     "start")
        for name in DATABASES:
            self.create_database(name)
        return self

    def running(self) -> bool:
        return subprocess.run(_as_pg_user([pg_bin("pg_ctl"), "-D", str(self.data), "status"]),
                              capture_output=True).returncode == 0

    def stop(self, mode: str = "fast") -> None:
        if self.data.exists() and self.running():
            self.run(pg_bin("pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")

    def restart(self) -> None:
        """Stop and start again (a transient outage, as the tests make one)."""
        self.run(pg_bin("pg_ctl"), "-D", str(self.data), "-l", str(self.data / "server.log"), "-m", "fast", "-w",
                 "restart")

    def create_database(self, name: str) -> None:
        import psycopg  # SQLAlchemy 2's driver for postgresql:// URLs (MLflow's and Optuna's too)

        with psycopg.connect(self.url("postgres"), autocommit=True) as con:
            if con.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is None:
                con.execute(f'CREATE DATABASE "{name}"')


@dataclass
class MlflowServer:
    """``mlflow server`` on ``backend`` (a database URL), artifacts proxied to ``artifacts``."""

    backend: str
    artifacts: str
    port: int
    log: Path
    workers: int = 2
    process: Optional[subprocess.Popen] = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 180) -> "MlflowServer":
        cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", self.backend,
               "--artifacts-destination", self.artifacts, "--host", "127.0.0.1", "--port", str(self.port),
               "--workers", str(self.workers)]
        # no job runner: its ~8 worker processes serve MLflow's GenAI jobs, which gradlab does not use
        env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + timeout
        while not self.healthy():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise StorageError(f"mlflow server did not start on {self.uri}: see {self.log}")
            time.sleep(0.5)
        return self

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.uri + "/health", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def start_pair(root: Path, port: int, pg_port: int, artifacts: Optional[str] = None, workers: int = 2,
               pg_data: Optional[Path] = None):
    """PostgreSQL (in ``pg_data``, default ``<root>/pg``: as root, a folder the PostgreSQL user can
    reach), then mlflow server on it; returns (Postgres, MlflowServer)."""
    root = Path(root).resolve()
    pg = Postgres(Path(pg_data or root / "pg"), pg_port).start()
    art = artifacts or str(root / "artifacts")
    if "://" not in art:
        Path(art).mkdir(parents=True, exist_ok=True)
    server = MlflowServer(pg.url("mlflow"), art, port, root / "mlflow.log", workers).start()
    return pg, server


# ---------------------------------------------------------------- the command line
def _pid_file(root: Path) -> Path:
    return root / "mlflow.pid"


def cmd_start(a) -> None:
    root = Path(a.dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    pg, server = start_pair(root, a.port, a.pg_port, a.artifacts, a.workers)
    _pid_file(root).write_text(f"{server.process.pid}\n{a.pg_port}\n")
    print(f"mlflow server on {server.uri} (backend {pg.url('mlflow')}, artifacts {a.artifacts or root / 'artifacts'}); "
          f"log {server.log}")
    print(f"export MLFLOW_TRACKING_URI={server.uri}")
    print(f"optuna storage: --storage {pg.url('optuna')}")


def cmd_stop(a) -> None:
    root = Path(a.dir).resolve()
    pid_file = _pid_file(root)
    if pid_file.exists():
        pid, pg_port = (int(x) for x in pid_file.read_text().split())
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        pid_file.unlink()
        Postgres(root / "pg", pg_port).stop()
        print(f"stopped mlflow server (pid {pid}) and PostgreSQL in {root / 'pg'}")
    else:
        print(f"no server started from {root}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m gradlab.server", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("start", "stop"):
        s = sub.add_parser(name)
        s.add_argument("--dir", default=".server", help="where the cluster, artifacts and logs live (default .server)")
        if name == "start":
            s.add_argument("--port", type=int, default=5000, help="mlflow server port (default 5000)")
            s.add_argument("--pg-port", type=int, default=5433, help="PostgreSQL port (default 5433)")
            s.add_argument("--artifacts", help="artifact location: a directory or s3://... (default <dir>/artifacts)")
            s.add_argument("--workers", type=int, default=2, help="server worker processes (default 2)")
    a = p.parse_args(argv)
    {"start": cmd_start, "stop": cmd_stop}[a.command](a)


if __name__ == "__main__":
    from .cli import run_cli

    run_cli(main)
