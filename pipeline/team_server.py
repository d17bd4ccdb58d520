"""A team's MLflow tracking server on one machine, to try the team setup: `python -m pipeline team-server`.

    python -m pipeline team-server [--folder team-server] [--host 127.0.0.1] [--port 5000]

Starts PostgreSQL (its own data directory under the folder, a free loopback port, password
authentication) and MLflow's own `mlflow server` on it with proxied artifacts (`--serve-artifacts`,
stored under the folder): clients upload through the server and never write there themselves.
Ctrl-C stops both. Point the pipeline at it with `export MLFLOW_TRACKING_URI=http://HOST:PORT`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import UserError

DATABASE = "mlflow"
DB_USER = "mlflow"
_DEBIAN_POSTGRES = Path("/usr/lib/postgresql")


def postgres_bin() -> Path | None:
    """Folder of PostgreSQL's server programs (initdb, pg_ctl): `$PG_BIN`, else Debian's newest
    `/usr/lib/postgresql/<version>/bin`, else the folder of `pg_ctl` on PATH; None if there is none."""
    candidates = [Path(os.environ["PG_BIN"])] if os.environ.get("PG_BIN") else []
    if _DEBIAN_POSTGRES.is_dir():
        versions = [p for p in _DEBIAN_POSTGRES.iterdir() if p.name.isdigit()]
        candidates += [p / "bin" for p in sorted(versions, key=lambda p: int(p.name), reverse=True)]
    pg_ctl = shutil.which("pg_ctl")
    if pg_ctl:
        candidates.append(Path(pg_ctl).parent)
    return next((c for c in candidates if (c / "initdb").is_file() and (c / "pg_ctl").is_file()), None)


def postgres_user() -> pwd.struct_passwd:
    """Who runs PostgreSQL: the invoking user, or `postgres` when that is root (PostgreSQL refuses root)."""
    if os.geteuid() != 0:
        return pwd.getpwuid(os.geteuid())
    try:
        return pwd.getpwnam("postgres")
    except KeyError:
        raise UserError(
            "PostgreSQL refuses to run as root and there is no `postgres` user: "
            "create one (useradd -r postgres) or run as another user"
        ) from None


def _check_reachable(folder: Path, user: pwd.struct_passwd) -> None:
    """PostgreSQL, run as `user`, must be able to pass through every folder above its data."""
    for each in (folder, *folder.parents):
        mode = each.stat()
        if (
            mode.st_uid != user.pw_uid
            and not mode.st_mode & 0o001
            and not (mode.st_gid == user.pw_gid and mode.st_mode & 0o010)
        ):
            raise UserError(
                f"PostgreSQL runs as the user {user.pw_name}, who cannot enter {each}: "
                f"use a folder it can reach (--folder) or `chmod o+x {each}`"
            )


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@dataclass
class Postgres:
    """A PostgreSQL cluster in `folder/postgres/data`, reachable only on 127.0.0.1:`port`.

    The password of the database user is generated once and kept in `folder/pgpass` (mode 0600),
    which libpq (and so MLflow's driver) reads through `PGPASSFILE`: it never appears on a
    command line."""

    folder: Path
    bin: Path
    port: int = 0

    @property
    def data(self) -> Path:
        return self.folder / "postgres" / "data"

    @property
    def passfile(self) -> Path:
        return self.folder / "pgpass"

    @property
    def uri(self) -> str:
        # The driver named: SQLAlchemy 2.0 would pick psycopg2 for a bare postgresql://, 2.1 psycopg 3.
        return f"postgresql+psycopg://{DB_USER}@127.0.0.1:{self.port}/{DATABASE}"

    def client_env(self) -> dict[str, str]:
        return {**os.environ, "PGPASSFILE": str(self.passfile)}

    def _as_owner(self, command: list, check: bool = True) -> subprocess.CompletedProcess:
        """Run a PostgreSQL server program as the user that owns the cluster."""
        user = postgres_user()
        as_other = user.pw_uid != os.geteuid()
        result = subprocess.run(
            [str(c) for c in command], cwd=self.data.parent, capture_output=True, text=True, timeout=120,
            user=user.pw_uid if as_other else None, group=user.pw_gid if as_other else None,
            extra_groups=[] if as_other else None,
        )  # fmt: skip
        if check and result.returncode != 0:
            raise UserError(
                f"{Path(str(command[0])).name} failed: {(result.stderr or result.stdout).strip()[-800:]}"
            )
        return result

    def init(self) -> None:
        """Create the cluster and its password on first use; later starts reuse both."""
        if (self.data / "PG_VERSION").is_file():
            return
        user = postgres_user()
        owner_dir = self.data.parent
        _check_reachable(owner_dir.parent, user)
        owner_dir.mkdir(parents=True, exist_ok=True)
        os.chown(owner_dir, user.pw_uid, user.pw_gid)
        owner_dir.chmod(0o700)
        password = secrets.token_urlsafe(24)
        pwfile = owner_dir / "initdb-password"
        pwfile.write_text(password + "\n")
        os.chown(pwfile, user.pw_uid, user.pw_gid)
        pwfile.chmod(0o600)
        try:
            self._as_owner(
                [
                    self.bin / "initdb",
                    "-D",
                    self.data,
                    "-U",
                    DB_USER,
                    f"--pwfile={pwfile}",
                    "--auth=scram-sha-256",
                    "-E",
                    "UTF8",
                    "--no-instructions",
                ]
            )
        finally:
            pwfile.unlink(missing_ok=True)
        self.passfile.touch(mode=0o600)
        self.passfile.write_text(f"127.0.0.1:*:*:{DB_USER}:{password}\n")

    def start(self) -> None:
        self.port = self.port or free_port()
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories=''"
        log = self.data.parent / "server.log"
        self._as_owner(
            [self.bin / "pg_ctl", "-D", self.data, "-l", log, "-w", "-t", "60", "-o", options, "start"]
        )
        exists = subprocess.run(
            [self.bin / "psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", DB_USER, "-d", "postgres",
             "-tAc", f"SELECT 1 FROM pg_database WHERE datname = '{DATABASE}'"],
            env=self.client_env(), capture_output=True, text=True, timeout=60, check=True,
        ).stdout.strip()  # fmt: skip
        if exists != "1":
            subprocess.run(
                [self.bin / "createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", DB_USER, DATABASE],
                env=self.client_env(), capture_output=True, text=True, timeout=60, check=True,
            )  # fmt: skip

    def stop(self) -> None:
        stopped = self._as_owner(
            [self.bin / "pg_ctl", "-D", self.data, "-m", "fast", "-w", "-t", "60", "stop"], check=False
        )
        # pg_ctl status exits 3 when no server runs: a Ctrl-C in the terminal may have stopped it first.
        if (
            stopped.returncode != 0
            and self._as_owner([self.bin / "pg_ctl", "-D", self.data, "status"], check=False).returncode != 3
        ):
            raise UserError(f"pg_ctl stop failed: {(stopped.stderr or stopped.stdout).strip()[-800:]}")


def mlflow_server_command(host: str, port: int, artifacts: Path, workers: int) -> list[str]:
    """MLflow's own server; the backend store URI comes from the environment (MLFLOW_BACKEND_STORE_URI)."""
    return [
        sys.executable, "-m", "mlflow", "server",
        "--serve-artifacts", "--artifacts-destination", str(artifacts),
        "--host", host, "--port", str(port), "--workers", str(workers),
    ]  # fmt: skip


@dataclass
class MlflowServer:
    """`mlflow server` as a child process group, output in `log`."""

    backend_uri: str
    env: dict[str, str]
    artifacts: Path
    log: Path
    host: str = "127.0.0.1"
    port: int = 5000
    workers: int = 2
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 300) -> None:
        self.artifacts.mkdir(parents=True, exist_ok=True)
        env = {**self.env, "MLFLOW_BACKEND_STORE_URI": self.backend_uri, "MLFLOW_DISABLE_TELEMETRY": "true"}
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                mlflow_server_command(self.host, self.port, self.artifacts, self.workers),
                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        self.wait_until_up(timeout)

    def wait_until_up(self, timeout: float) -> None:
        assert self.process is not None, "start() first"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise UserError(
                    f"mlflow server exited with code {self.process.returncode}; "
                    f"its log {self.log} ends:\n{self.log.read_text()[-2000:]}"
                )
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(f"{self.url}/health", timeout=2) as response,
            ):
                if response.status == 200:
                    return
            time.sleep(0.5)
        self.stop()
        raise UserError(
            f"mlflow server did not answer {self.url}/health within {timeout:.0f} s (log: {self.log})"
        )

    def stop(self) -> None:
        """SIGTERM the server's process group (uvicorn and its workers), SIGKILL if it lingers."""
        if self.process is None or self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)


@contextlib.contextmanager
def team_server(
    folder: Path, host: str = "127.0.0.1", port: int = 5000, workers: int = 2
) -> Iterator[MlflowServer]:
    """PostgreSQL and `mlflow server` on it, both stopped on the way out (even after an error)."""
    bin_dir = postgres_bin()
    if bin_dir is None:
        raise UserError(
            "PostgreSQL is not installed (no initdb/pg_ctl): "
            "`apt-get install postgresql`, or set PG_BIN to its bin folder"
        )
    if importlib.util.find_spec("psycopg") is None:
        raise UserError("MLflow needs the PostgreSQL driver psycopg: pip install -e '.[team]'")
    folder = folder.resolve()
    folder.mkdir(parents=True, exist_ok=True)
    postgres = Postgres(folder, bin_dir)
    postgres.init()
    postgres.start()
    try:
        server = MlflowServer(
            postgres.uri,
            postgres.client_env(),
            folder / "artifacts",
            folder / "mlflow-server.log",
            host,
            port,
            workers,
        )
        server.start()
        try:
            yield server
        finally:
            server.stop()
    finally:
        postgres.stop()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM stops both servers the way Ctrl-C does


def run_team_server(folder: Path, host: str, port: int, workers: int) -> None:
    """The command: start both, say how to use them, wait for Ctrl-C (or SIGTERM, or the server's end)."""
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        with team_server(folder, host, port, workers) as server:
            print(
                f"MLflow tracking server on {server.url} "
                f"(PostgreSQL store and artifacts under {folder.resolve()}; log {server.log})"
            )
            print(
                f"in another shell: export MLFLOW_TRACKING_URI={server.url}   "
                "then dvc repro, dvc queue start, ...; Ctrl-C stops it",
                flush=True,
            )
            assert server.process is not None  # started by team_server()
            server.process.wait()
            raise UserError(f"mlflow server exited with code {server.process.returncode}: see {server.log}")
    except KeyboardInterrupt:
        print("stopping the MLflow server and PostgreSQL", file=sys.stderr)
    finally:
        signal.signal(signal.SIGTERM, previous)
