"""A real PgBouncer in transaction pooling mode, started as a subprocess (tests, benchmarks).

Transaction pooling is what Supabase's pooler, RDS Proxy and Neon's pooler do too:
each transaction runs on whichever server connection is free, so anything kept in a
server session (prepared statements, LISTEN, session ``SET``) does not follow the
client. :class:`PgBouncer` starts Debian's ``pgbouncer`` binary (``apt-get install
pgbouncer``) on a free local port in front of a PostgreSQL server given by URL, a TCP
host or a Unix socket directory alike (the embedded PostgreSQL listens on a socket),
with ``auth_type = trust`` for the URL's user, and stops it on exit.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from urllib.parse import quote

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

#: Why a PgBouncer cannot be started here, for skip messages.
MISSING = "pgbouncer is not installed (Debian/Ubuntu: apt-get install pgbouncer)"


def pgbouncer_binary() -> str | None:
    """The ``pgbouncer`` executable, or None (Debian installs it in /usr/sbin)."""
    found = shutil.which("pgbouncer")
    if found:
        return found
    debian = Path("/usr/sbin/pgbouncer")
    return str(debian) if debian.exists() else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PgBouncer:
    """PgBouncer in ``pool_mode = transaction`` in front of the server of ``server_url``.

    ``pool_size`` server connections per database and user are shared by every
    client, so with more clients than that, consecutive transactions of one client
    land on different server connections (what breaks prepared statements).
    Use as a context manager; :meth:`url` gives a database's URL through it.
    """

    def __init__(self, server_url: str, *, pool_size: int = 4, max_clients: int = 400) -> None:
        binary = pgbouncer_binary()
        if binary is None:
            raise RuntimeError(MISSING)
        self.binary = binary
        info = conninfo_to_dict(server_url)
        self.user = str(info.get("user") or "postgres")
        self.server_host = str(info.get("host") or "127.0.0.1")
        self.server_port = int(info.get("port") or 5432)
        self.pool_size = pool_size
        self.max_clients = max_clients
        self.port = 0
        self._dir: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None

    def url(self, database_url: str) -> str:
        """``database_url``'s database and user, through this PgBouncer (a URL)."""
        info = conninfo_to_dict(database_url)
        user = quote(str(info.get("user") or self.user), safe="")
        dbname = quote(str(info.get("dbname") or "postgres"), safe="")
        return f"postgresql://{user}@127.0.0.1:{self.port}/{dbname}"

    @property
    def log(self) -> str:
        """What PgBouncer logged so far."""
        if self._dir is None:
            return ""
        path = self._dir / "pgbouncer.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start(self) -> PgBouncer:
        """Start PgBouncer and wait until it answers (at most 20 s)."""
        self._dir = Path(tempfile.mkdtemp(prefix="outbox-pgbouncer-"))
        self.port = _free_port()
        users = self._dir / "users.txt"
        users.write_text(f'"{self.user}" ""\n')
        config = self._dir / "pgbouncer.ini"
        config.write_text(
            "[databases]\n"
            f"* = host={self.server_host} port={self.server_port}\n"
            "[pgbouncer]\n"
            "listen_addr = 127.0.0.1\n"
            f"listen_port = {self.port}\n"
            "unix_socket_dir =\n"
            "auth_type = trust\n"
            f"auth_file = {users}\n"
            "pool_mode = transaction\n"
            f"default_pool_size = {self.pool_size}\n"
            f"max_client_conn = {self.max_clients}\n"
            "ignore_startup_parameters = extra_float_digits,options\n"
            f"logfile = {self._dir / 'pgbouncer.log'}\n"
            f"pidfile = {self._dir / 'pgbouncer.pid'}\n"
        )
        command = [self.binary]
        if os.geteuid() == 0:  # PgBouncer refuses to run as root
            command += ["-u", self._unprivileged_user()]
            self._dir.chmod(0o777)
            for path in (users, config):
                path.chmod(0o644)
        command.append(str(config))
        self._process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
        )
        deadline = time.monotonic() + 20
        while True:
            if self._process.poll() is not None:
                err = (
                    self._process.stderr.read().decode(errors="replace")
                    if self._process.stderr
                    else ""
                )
                raise RuntimeError(f"pgbouncer exited at start: {err.strip()} {self.log.strip()}")
            try:
                with psycopg.connect(
                    make_conninfo(
                        host="127.0.0.1", port=str(self.port), user=self.user, dbname="postgres"
                    ),
                    connect_timeout=2,
                ):
                    return self
            except psycopg.OperationalError as exc:
                if time.monotonic() > deadline:
                    log = self.log.strip().splitlines()[-5:]
                    self.stop()
                    raise RuntimeError(
                        f"pgbouncer did not answer on port {self.port} within 20 s "
                        f"({exc}); its log ends: {' | '.join(log) or '(empty)'}"
                    ) from exc
                time.sleep(0.05)

    def _unprivileged_user(self) -> str:
        """Whom PgBouncer runs as when started by root: the owner of the server's Unix
        socket directory (the embedded PostgreSQL keeps its socket in a directory only
        its own user may enter), else ``nobody``."""
        if self.server_host.startswith("/"):
            with contextlib.suppress(OSError, KeyError):
                owner = os.stat(self.server_host).st_uid
                if owner != 0:
                    return pwd.getpwuid(owner).pw_name
        return "nobody"

    def stop(self) -> None:
        """Stop PgBouncer (SIGTERM, then SIGKILL after 10 s) and remove its files."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if process is not None and process.stderr is not None:
            process.stderr.close()
        if self._dir is not None:
            with contextlib.suppress(OSError):
                shutil.rmtree(self._dir)
            self._dir = None

    def __enter__(self) -> PgBouncer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"PgBouncer(port={self.port}, server={self.server_host}:{self.server_port})"
