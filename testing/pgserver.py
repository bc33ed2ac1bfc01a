"""A real, throwaway PostgreSQL server for tests.

This is a plain helper module (no psycopg needed: administration goes through ``psql``). The
pytest fixtures that use it live in ``pgfixtures.py``.

    with PostgresServer() as server:
        url = server.create_database("t1")   # postgresql://gatekeeper@127.0.0.1:PORT/t1
        subprocess.run([...], env=server.client_env())   # PGPASSFILE=server.passfile
        server.psql("SELECT count(*) FROM pg_stat_activity", db="t1")
        server.kill()                         # an outage: pg_ctl stop -m immediate
        server.start()                        # back on the same port, data kept

The cluster is made by ``initdb`` in a fresh directory under /tmp and started with
``pg_ctl -w start``. It listens on 127.0.0.1 on a free port (``scram-sha-256`` password
authentication for the login role ``gatekeeper``) and on a unix socket in its own directory
(``trust`` for the superuser ``postgres``; only the cluster's OS user and root can reach that
directory). Durability is traded for speed (``fsync=off``; an immediate stop keeps committed data,
a machine crash would not).

PostgreSQL refuses to run as root. When the tests run as root the server processes run as the
``postgres`` user (Debian's ``postgresql`` package creates it; ``nobody`` otherwise), which owns the
cluster directory. The password files stay owned by the test process (mode 0600).

Clusters left running by a test process that was killed are stopped and removed by the next
``PostgresServer`` start (their directory names carry the owning process id).
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.parse
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from testing.net import free_port

HOST = "127.0.0.1"
ROLE = "gatekeeper"
SUPERUSER = "postgres"
DIR_PREFIX = "gatekeeper-pg."
TIMEOUT = 60.0
LOG_TAIL_LINES = 40

SERVER_SETTINGS = {
    "listen_addresses": "'127.0.0.1'",
    "max_connections": "200",
    "superuser_reserved_connections": "3",
    "shared_buffers": "16MB",
    "fsync": "off",
    "full_page_writes": "off",
    "dynamic_shared_memory_type": "posix",
    "max_wal_size": "256MB",
    "logging_collector": "off",
    "log_min_messages": "warning",
    "log_line_prefix": "'%m [%p] %q%u@%d '",
    "timezone": "'UTC'",
    "password_encryption": "'scram-sha-256'",
}

_DB_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")


class PostgresError(RuntimeError):
    """The throwaway server could not be found, made, started or administered."""


# --------------------------------------------------------------------------------------------
# Locating the binaries


@dataclass(frozen=True)
class Binaries:
    bindir: Path
    initdb: Path
    pg_ctl: Path
    postgres: Path
    psql: Path


def _version_key(path: str) -> tuple[int, ...]:
    version = Path(path).parent.name  # /usr/lib/postgresql/<version>/bin/initdb
    return tuple(int(part) for part in re.findall(r"\d+", version)) or (0,)


def _bindir_candidates() -> list[Path]:
    candidates = []
    found = shutil.which("initdb")
    if found:
        candidates.append(Path(os.path.realpath(found)).parent)
    debian = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=_version_key, reverse=True)
    candidates += [Path(path).parent for path in debian]
    return candidates


def find_binaries() -> Binaries | None:
    """initdb, pg_ctl, postgres and psql from one installation, or None.

    initdb on PATH first (its real directory, so a symbolic link in /usr/local/bin leads to the
    rest), then the newest /usr/lib/postgresql/<version>/bin. psql is taken from the same
    directory when it is there (Debian's /usr/bin/psql is a wrapper that picks a cluster).
    """
    for bindir in _bindir_candidates():
        tools = {name: bindir / name for name in ("initdb", "pg_ctl", "postgres")}
        if not all(os.access(path, os.X_OK) for path in tools.values()):
            continue
        psql = bindir / "psql"
        if not os.access(psql, os.X_OK):
            other = shutil.which("psql")
            if other is None:
                continue
            psql = Path(other)
        return Binaries(bindir=bindir, psql=psql, **tools)
    return None


def missing_reason() -> str:
    return (
        "PostgreSQL server binaries (initdb, pg_ctl, postgres, psql) not found on PATH or in "
        "/usr/lib/postgresql/*/bin; run scripts/test.sh to install Debian's postgresql package"
    )


# --------------------------------------------------------------------------------------------
# Helpers


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def quote_literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _server_account() -> pwd.struct_passwd | None:
    """The OS account the server runs as when we are root (None: run as ourselves)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise PostgresError("running as root and there is no 'postgres' or 'nobody' user to run as")


def _clean_env() -> dict[str, str]:
    """The environment without libpq's PG* variables (PGPASSWORD etc. must not leak in)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"
    env["LANG"] = "C"
    return env


# Also used by tests/test_install.py to sweep up what killed test processes left behind.
def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


_live: weakref.WeakSet[PostgresServer] = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    for server in list(_live):
        with contextlib.suppress(Exception):
            server.close()


# --------------------------------------------------------------------------------------------
# The server


class PostgresServer:
    """A throwaway PostgreSQL cluster; see the module docstring."""

    def __init__(
        self,
        *,
        binaries: Binaries | None = None,
        settings: dict[str, str] | None = None,
        start: bool = True,
    ) -> None:
        found = binaries or find_binaries()
        if found is None:
            raise PostgresError(missing_reason())
        self.bin = found
        self.host = HOST
        self.role = ROLE
        self.superuser = SUPERUSER
        self.password = secrets.token_urlsafe(24)
        self.settings = {**SERVER_SETTINGS, **(settings or {})}
        self.port = 0
        self.running = False
        self._closed = False
        self._version_num: int | None = None
        self._account = _server_account()

        _remove_stale_clusters()
        tmp = "/tmp" if self._account is not None and os.path.isdir("/tmp") else None
        self.base = Path(tempfile.mkdtemp(prefix=f"{DIR_PREFIX}{os.getpid()}.", dir=tmp))
        # base (ours, 0711) holds the password files; base/pg (the server account's, 0700) holds
        # the data directory, the socket directory and the server log.
        self.base.chmod(0o711)
        self.pgdir = self.base / "pg"
        self.datadir = self.pgdir / "data"
        self.sockdir = self.pgdir / "sock"
        self.logfile = self.pgdir / "server.log"
        self.passfile = self.base / "pgpass"
        self.password_file = self.base / "password"
        _live.add(self)
        try:
            self._make_dirs()
            self._write_password_files()
            self._initdb()
            if start:
                self._first_start()
        except BaseException:
            self.close()
            raise

    # -- context manager ---------------------------------------------------------------------

    def __enter__(self) -> PostgresServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<PostgresServer {self.host}:{self.port} {state} {self.base}>"

    # -- URLs ----------------------------------------------------------------------------------

    def url(self, name: str) -> str:
        """``postgresql://gatekeeper@127.0.0.1:PORT/NAME``: no password (see ``passfile``)."""
        return f"postgresql://{self.role}@{self.host}:{self.port}/{name}"

    def url_with_passfile(self, name: str) -> str:
        """``url(name)`` plus libpq's ``?passfile=PATH`` (a file, not the password)."""
        return f"{self.url(name)}?passfile={urllib.parse.quote(str(self.passfile), safe='/')}"

    def url_with_password_file(self, name: str) -> str:
        """``url(name)`` plus gatekeeper's ``?password_file=PATH`` (a file holding only it)."""
        path = urllib.parse.quote(str(self.password_file), safe="/")
        return f"{self.url(name)}?password_file={path}"

    def client_env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """An environment for client processes: PGPASSFILE set, PGPASSWORD and PGHOST etc. out."""
        env = {
            k: v
            for k, v in (os.environ if base is None else base).items()
            if not k.startswith("PG")
        }
        env["PGPASSFILE"] = str(self.passfile)
        return env

    # -- databases -----------------------------------------------------------------------------

    def create_database(self, name: str) -> str:
        """CREATE DATABASE name OWNER gatekeeper; returns ``url(name)``."""
        self._check_name(name)
        self.psql(f"CREATE DATABASE {quote_ident(name)} OWNER {quote_ident(self.role)}")
        return self.url(name)

    def drop_database(self, name: str) -> None:
        """Drop the database if it exists, ending any sessions still connected to it."""
        self._check_name(name)
        if self.server_version_num >= 130000:
            self.psql(f"DROP DATABASE IF EXISTS {quote_ident(name)} WITH (FORCE)")
            return
        # The name was checked above (and is quoted as a literal).
        self.psql(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "  # noqa: S608
            f"WHERE datname = {quote_literal(name)} AND pid <> pg_backend_pid()"
        )
        self.psql(f"DROP DATABASE IF EXISTS {quote_ident(name)}")

    def psql(self, sql: str, db: str = "postgres", *, timeout: float = TIMEOUT) -> str:
        """Run SQL (on stdin) as the superuser through the unix socket; return psql's output.

        Output is unaligned and without headers (``-At``): one row a line, ``|`` between
        columns. Several statements run one by one, outside a transaction, unless the SQL
        says BEGIN/COMMIT; the first error stops psql and raises PostgresError.
        """
        if not self.running:
            raise PostgresError(f"psql: the server is not running ({self})")
        argv = [
            str(self.bin.psql),
            "-X",
            "-q",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            str(self.sockdir),
            "-p",
            str(self.port),
            "-U",
            self.superuser,
            "-d",
            db,
        ]
        result = self._run(argv, input=sql, timeout=timeout, as_server=False, what="psql")
        return result.stdout

    @property
    def server_version_num(self) -> int:
        if self._version_num is None:
            self._version_num = int(self.psql("SHOW server_version_num").strip())
        return self._version_num

    # -- life cycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Start the (stopped or killed) server again, on the same port."""
        if self._closed:
            raise PostgresError("start: this server was closed")
        if self.running:
            return
        self._pg_ctl("start", "-w", "-t", str(int(TIMEOUT)), "-l", str(self.logfile))
        self.running = True

    def stop(self) -> None:
        """A clean shutdown (pg_ctl stop -m fast): sessions end, a checkpoint is written."""
        if self.running:
            self._pg_ctl("stop", "-w", "-t", str(int(TIMEOUT)), "-m", "fast")
            self.running = False

    def kill(self) -> None:
        """Simulate an outage: pg_ctl stop -m immediate (no checkpoint, crash recovery on
        the next start; committed data survives because the machine does not crash)."""
        if self.running:
            self._stop_immediate()

    def ensure_running(self) -> None:
        if not self.running:
            self.start()

    def close(self) -> None:
        """Stop the server (immediately) and remove its directory. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        _live.discard(self)
        try:
            if self.running or (self.datadir / "postmaster.pid").exists():
                self._stop_immediate()
        finally:
            shutil.rmtree(self.base, ignore_errors=True)

    # -- internals -----------------------------------------------------------------------------

    def _check_name(self, name: str) -> None:
        if not _DB_NAME.fullmatch(name):
            raise ValueError(f"database name {name!r}: use [a-z_][a-z0-9_]*, at most 63 long")

    def _make_dirs(self) -> None:
        for directory in (self.pgdir, self.datadir, self.sockdir):
            self._make_dir(directory)

    def _make_dir(self, directory: Path) -> None:
        directory.mkdir(mode=0o700)
        if self._account is not None:
            os.chown(directory, self._account.pw_uid, self._account.pw_gid)

    def _write_password_files(self) -> None:
        # libpq: host:port:database:username:password; the port is filled in after it is known.
        for path in (self.passfile, self.password_file):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.close(fd)
        self.password_file.write_text(self.password + "\n")

    def _update_passfile(self) -> None:
        lines = [
            f"{host}:{self.port}:*:{self.role}:{self.password}\n"
            for host in (self.host, "localhost")
        ]
        self.passfile.write_text("".join(lines))
        self.passfile.chmod(0o600)

    def _initdb(self) -> None:
        argv = [
            str(self.bin.initdb),
            "-D",
            str(self.datadir),
            "-U",
            self.superuser,
            "-E",
            "UTF8",
            "--locale=C",
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            "--no-sync",
            "--no-instructions",
        ]
        result = self._run(argv, timeout=120, as_server=True, what="initdb", check=False)
        if result.returncode != 0 and "--no-instructions" in (result.stderr + result.stdout):
            argv.remove("--no-instructions")  # PostgreSQL < 14
            shutil.rmtree(self.datadir, ignore_errors=True)
            self._make_dir(self.datadir)
            result = self._run(argv, timeout=120, as_server=True, what="initdb", check=False)
        if result.returncode != 0:
            raise PostgresError(self._failure("initdb", argv, result))
        # Only these two ways in: the superuser through the socket directory (0700), the
        # gatekeeper role (or any role with a password) over TCP with SCRAM.
        hba = "local all all trust\nhost all all 127.0.0.1/32 scram-sha-256\n"
        self._write_as_server(self.datadir / "pg_hba.conf", hba)

    def _write_config(self) -> None:
        settings = {
            **self.settings,
            "port": str(self.port),
            "unix_socket_directories": quote_literal(str(self.sockdir)),
        }
        text = "".join(f"{key} = {value}\n" for key, value in settings.items())
        self._write_as_server(self.datadir / "postgresql.auto.conf", text)

    def _write_as_server(self, path: Path, text: str) -> None:
        path.write_text(text)
        path.chmod(0o600)
        if self._account is not None:
            os.chown(path, self._account.pw_uid, self._account.pw_gid)

    def _first_start(self) -> None:
        """Pick a free port and start; another process may take the port first, so retry."""
        last: PostgresError | None = None
        for _attempt in range(5):
            self.port = free_port(self.host)
            self._write_config()
            try:
                self.start()
                break
            except PostgresError as exc:
                last = exc
                tail = self._log_tail()
                if "could not bind" not in tail and "already in use" not in tail:
                    raise
        else:
            assert last is not None
            raise last
        self._update_passfile()
        self.psql(
            f"CREATE ROLE {quote_ident(self.role)} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE "
            f"PASSWORD {quote_literal(self.password)}"
        )

    def _pg_ctl(self, *args: str) -> None:
        argv = [str(self.bin.pg_ctl), "-D", str(self.datadir), *args]
        self._run(argv, timeout=TIMEOUT + 30, as_server=True, what="pg_ctl " + args[0])

    def _stop_immediate(self) -> None:
        try:
            self._pg_ctl("stop", "-w", "-t", "30", "-m", "immediate")
        except (PostgresError, subprocess.TimeoutExpired):
            pid = _postmaster_pid(self.datadir)
            if pid is not None and pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
                _wait_gone(pid, 10)
        finally:
            self.running = False

    def _run(
        self,
        argv: Sequence[str],
        *,
        timeout: float,
        as_server: bool,
        what: str,
        input: str | None = None,
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        account = self._account if as_server else None
        env = _clean_env()
        if account is not None:
            env.update(HOME=str(self.pgdir), USER=account.pw_name, LOGNAME=account.pw_name)
        try:
            result = subprocess.run(
                list(argv),
                input=input,
                capture_output=True,
                text=True,
                timeout=timeout,
                cwd=self.pgdir if self.pgdir.is_dir() else "/",
                env=env,
                check=False,
                stdin=None if input is not None else subprocess.DEVNULL,
                user=account.pw_uid if account else None,
                group=account.pw_gid if account else None,
                extra_groups=[] if account else None,
            )
        except subprocess.TimeoutExpired as exc:
            raise PostgresError(
                f"{what} took more than {timeout:.0f} s: {' '.join(argv)}\n"
                f"--- server log ({self.logfile}), last lines:\n{self._log_tail()}"
            ) from exc
        if check and result.returncode != 0:
            raise PostgresError(self._failure(what, argv, result))
        return result

    def _failure(
        self, what: str, argv: Sequence[str], result: subprocess.CompletedProcess[str]
    ) -> str:
        return (
            f"{what} failed (exit status {result.returncode}): {' '.join(argv)}\n"
            f"--- stdout:\n{result.stdout.strip()}\n--- stderr:\n{result.stderr.strip()}\n"
            f"--- server log ({self.logfile}), last lines:\n{self._log_tail()}"
        )

    def _log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            text = self.logfile.read_text(errors="replace")
        except OSError as exc:
            return f"(no server log: {exc.strerror})"
        return "\n".join(text.splitlines()[-lines:]) or "(empty)"


# --------------------------------------------------------------------------------------------
# Clusters left behind by killed test processes


def _postmaster_pid(datadir: Path) -> int | None:
    try:
        first = (datadir / "postmaster.pid").read_text().splitlines()[0]
        return int(first)
    except (OSError, IndexError, ValueError):
        return None


def _wait_gone(pid: int, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)


def _is_postmaster_of(pid: int, datadir: Path) -> bool:
    """Whether `pid` is still the postmaster of `datadir` (not a recycled process id)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False
    return "postgres" in cmdline and str(datadir) in cmdline


def _remove_stale_clusters() -> None:
    """Stop and remove clusters whose test process (the pid in the directory name) is gone."""
    parents = {Path(tempfile.gettempdir()), Path("/tmp")}
    for parent in parents:
        for entry in parent.glob(DIR_PREFIX + "*"):
            match = re.fullmatch(re.escape(DIR_PREFIX) + r"(\d+)\..+", entry.name)
            try:
                if not match or not entry.is_dir() or entry.stat().st_uid != os.geteuid():
                    continue
            except OSError:
                continue
            if pid_alive(int(match.group(1))):
                continue
            datadir = entry / "pg" / "data"
            pid = _postmaster_pid(datadir)
            if pid is not None and _is_postmaster_of(pid, datadir):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGQUIT)  # what pg_ctl stop -m immediate sends
                _wait_gone(pid, 10)
                if pid_alive(pid):
                    with contextlib.suppress(OSError):
                        os.kill(pid, signal.SIGKILL)
                    _wait_gone(pid, 5)
            elif _socket_answers(entry / "pg" / "sock"):
                continue  # a server we cannot see: another PID namespace sharing /tmp
            shutil.rmtree(entry, ignore_errors=True)


def _socket_answers(sockdir: Path) -> bool:
    for path in sockdir.glob(".s.PGSQL.*"):
        if path.name.endswith(".lock"):
            continue
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(2)
            try:
                sock.connect(str(path))
            except OSError:
                continue
            return True
    return False
