"""A throwaway PostgreSQL cluster from the machine's own packages (Debian's `postgresql`).

For tests, benchmarks and `grym-stream cluster`: `initdb` into a fresh folder, a server on
127.0.0.1 and a free port with its socket in that folder (so clusters never meet), one database
`grym` with a user `grym` trusted on loopback. PostgreSQL refuses to run as root, so as root the
cluster runs as the `postgres` user and its folder belongs to it.

    with Postgres() as pg:
        pg.url  # postgresql://grym@127.0.0.1:PORT/grym
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType

from grym.cluster import free_port

USER = "grym"
DATABASE = "grym"


def binaries() -> Path:
    """The folder of initdb and pg_ctl: the newest /usr/lib/postgresql/N/bin, else PATH."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), key=lambda p: int(p.parts[-3]))
    if found:
        return found[-1].parent
    on_path = shutil.which("pg_ctl")
    if on_path:
        return Path(on_path).parent
    raise FileNotFoundError(
        "PostgreSQL's server is not installed (Debian: apt-get install postgresql)"
    )


class Postgres:
    def __init__(self, folder: Path | None = None, port: int | None = None) -> None:
        self.bin = binaries()
        self.folder = Path(folder or tempfile.mkdtemp(prefix="grym-pg-"))
        self.port = port or free_port()
        self.data = self.folder / "data"
        self.log = self.folder / "postgres.log"
        self._as_root = os.geteuid() == 0

    @property
    def url(self) -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{DATABASE}"

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        command = [str(self.bin / args[0]), *args[1:]]
        if self._as_root:  # PostgreSQL will not run as root
            command = ["runuser", "-u", "postgres", "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
        if check and done.returncode != 0:
            raise RuntimeError(
                f"{args[0]} failed ({done.returncode}): {done.stderr.strip() or done.stdout}"
                + (" (can the postgres user reach the folder?)" if self._as_root else "")
            )
        return done

    def init(self) -> None:
        """A new cluster with the `grym` database (once: a folder that has one is reused)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        if self._as_root:
            shutil.chown(self.folder, "postgres", "postgres")
        self.folder.chmod(0o700)
        if (self.data / "PG_VERSION").exists():
            return
        self._run(
            "initdb", "-D", str(self.data), "-U", USER, "--auth=trust", "-E", "UTF8",
            "--no-sync", "--no-instructions",
        )  # fmt: skip

    def start(self) -> Postgres:
        self.init()
        options = (
            f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 -c max_connections=200"
        )
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w", "start")
        exists = self._psql("postgres", f"SELECT 1 FROM pg_database WHERE datname = '{DATABASE}'")
        if not exists.strip():
            self._psql("postgres", f"CREATE DATABASE {DATABASE}")
        return self

    def _psql(self, database: str, sql: str) -> str:
        psql = self.bin / "psql"
        command = [str(psql), "-h", "127.0.0.1", "-p", str(self.port), "-U", USER, "-d", database]
        done = subprocess.run(
            [*command, "-tAc", sql], check=True, capture_output=True, text=True, timeout=60
        )
        return done.stdout

    def stop(self, mode: str = "fast") -> None:
        """`mode`: smart, fast (the default: sessions are cut) or immediate (a crash)."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop", check=False)

    def restart(self) -> None:
        self.stop()
        self.start()

    def remove(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> Postgres:
        return self.start()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.remove()
