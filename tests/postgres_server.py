"""A private PostgreSQL for the test session: initdb + pg_ctl on a free port in a temp dir.

Found through ``pg_config --bindir`` (or ``AFTERTUNE_TEST_PG_BINDIR``). PostgreSQL refuses
to run as root; as root the server runs as the ``postgres`` user (runuser), which owns
its data directory. Tests that need it are skipped, saying why, where no PostgreSQL is
installed.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

from aftertune.daemon.embedded_redis import free_port

USER = "aftertune"


def bindir() -> Path | None:
    """Where initdb and pg_ctl are, or None when PostgreSQL is not installed."""
    configured = os.environ.get("AFTERTUNE_TEST_PG_BINDIR")
    if configured:
        return Path(configured)
    pg_config = shutil.which("pg_config")
    if pg_config is None:
        return None
    found = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=False)
    path = Path(found.stdout.strip())
    return path if (path / "initdb").exists() and (path / "pg_ctl").exists() else None


class PostgresServer:
    """One throwaway cluster: trust auth on 127.0.0.1, fsync off (tests, not durability)."""

    def __init__(self, bin_dir: Path) -> None:
        # Its own temp dir: as root, pytest's (mode 0700, owned by root) is closed to postgres.
        self.root = Path(tempfile.mkdtemp(prefix="aftertune-pg-"))
        root = self.root
        self.data = root / "data"
        self.bin = bin_dir
        self.port = free_port()
        self.url = f"postgresql://{USER}@127.0.0.1:{self.port}/postgres"
        self._as: list[str] = []
        if os.geteuid() == 0:
            owner = pwd.getpwnam("postgres")
            os.chown(root, owner.pw_uid, owner.pw_gid)
            self._as = ["runuser", "-u", "postgres", "--"]

    def _run(self, *args: str) -> None:
        done = subprocess.run(
            [*self._as, *args], capture_output=True, text=True, timeout=120, check=False
        )
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(args[:2])} failed: {done.stdout}{done.stderr}")

    def start(self) -> None:
        self._run(
            str(self.bin / "initdb"),
            "-D",
            str(self.data),
            "-U",
            USER,
            "--auth=trust",
            "--locale=C",
            "--encoding=UTF8",
            "--no-sync",
        )
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run(
            str(self.bin / "pg_ctl"),
            "-D",
            str(self.data),
            "-o",
            options,
            "-l",
            str(self.root / "server.log"),
            "-w",
            "start",
        )

    def stop(self) -> None:
        try:
            self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
