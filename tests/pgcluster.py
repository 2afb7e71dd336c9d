"""A throwaway PostgreSQL cluster for tests and benchmarks: initdb in a temp folder, a free
loopback port, trust authentication, gone when stopped.

Binaries are looked up on PATH (`initdb`), then in Debian's `/usr/lib/postgresql/<v>/bin`
(where `apt-get install postgresql` puts them; only wrappers go on PATH). initdb refuses
to run as root, so under root the cluster runs as the `postgres` user (Debian's package
creates it) or `nobody`.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def find_bindir() -> Path | None:
    """The folder with initdb, pg_ctl and postgres, or None."""
    on_path = shutil.which("initdb")
    if on_path and shutil.which("pg_ctl"):
        return Path(on_path).resolve().parent
    versions = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    return versions[-1].parent if versions else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run_as() -> pwd.struct_passwd | None:
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    raise RuntimeError("running as root and no 'postgres' or 'nobody' user for initdb")


class Cluster:
    """`Cluster(bindir).start()`; `.url` to connect; `.restart()`, `.stop()`."""

    def __init__(self, bindir: Path, port: int | None = None, fsync: bool = False) -> None:
        self.bindir = bindir
        self.port = port or free_port()
        self.fsync = fsync
        self.user = _run_as()
        self.root = Path(tempfile.mkdtemp(prefix="courier-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        if self.user is not None:
            os.chown(self.root, self.user.pw_uid, self.user.pw_gid)
        self._watchdog: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str, timeout: float = 60.0) -> None:
        kwargs: dict[str, object] = {}
        if self.user is not None:
            kwargs = {"user": self.user.pw_uid, "group": self.user.pw_gid, "extra_groups": []}
        subprocess.run(
            args, check=True, timeout=timeout, cwd=self.root, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, **kwargs,  # type: ignore[arg-type]
        )

    def start(self) -> Cluster:
        if not self.data.exists():
            self._run(str(self.bindir / "initdb"), "-D", str(self.data), "-U", "postgres",
                      "--auth=trust", "-E", "UTF8", "--no-sync", "--locale=C")
        options = (f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1"
                   " -c max_connections=200")
        if not self.fsync:
            options += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.log),
                  "-o", options, "-w", "-t", "60", "start")
        if self._watchdog is None:
            self._watchdog = self._start_watchdog()
        return self

    def _start_watchdog(self) -> subprocess.Popen[bytes]:
        """A process that stops the server and removes its folder once this one ends, however
        it ends (its stdin closes): a killed test run leaves no server behind."""
        stop = [str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop"]
        code = (
            "import shutil, subprocess, sys\n"
            "sys.stdin.buffer.read()\n"
            f"subprocess.run({stop!r}, user={self.user.pw_uid if self.user else None!r},"
            " stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
            f"shutil.rmtree({str(self.root)!r}, ignore_errors=True)\n"
        )
        return subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                                start_new_session=True)

    def stop(self, mode: str = "fast") -> None:
        with contextlib.suppress(subprocess.SubprocessError):
            self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w",
                      "stop")

    def restart(self, down_for: float = 0.0) -> None:
        """Stop (every connection is cut), stay down `down_for` seconds, start again."""
        self.stop("fast")
        time.sleep(down_for)
        self.start()

    def remove(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)
        if self._watchdog is not None:
            self._watchdog.communicate(timeout=30)
