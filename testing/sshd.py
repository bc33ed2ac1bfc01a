"""A real OpenSSH server and client for end-to-end tests.

This is a plain helper module (not a conftest): a test imports it with
``from testing import sshd`` (pyproject.toml puts the checkout on pytest's ``sys.path``).

    key, pub = generate_user_key(tmp_path, "alice")
    (tmp_path / "authorized_keys").write_text(f'command="...",restrict {pub.read_text()}')
    with SshServer(authorized_keys_file=tmp_path / "authorized_keys") as server:
        client = SshClient(server, key)
        result = client.run("info")
        subprocess.run(["git", "clone", client.url("/srv/git/x.git")], env=client.git_env())

The server runs ``sshd -D -e -f CONFIG`` on 127.0.0.1 on a free port with a throwaway host key.
It works as root (the normal CI case: privilege separation, ``/run/sshd``) and as an unprivileged
user (sshd then runs without privilege separation and only that user can log in).

AuthorizedKeysCommand: OpenSSH runs the command only if the binary and every directory above its
real path are owned by root and not group- or world-writable, which pytest's temporary directories
under /tmp are not. ``make_keys_command_wrapper()`` writes the script into a root-owned 0755
directory (removed at interpreter exit). As a normal user no such directory can be made, so
``SshServer`` then runs an unsafe command through the interpreter named on its ``#!`` line
(``/bin/sh WRAPPER ...``): sshd checks only the first word, the root-owned interpreter.
"""

from __future__ import annotations

import atexit
import getpass
import os
import re
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

import pytest

from testing.net import free_port

HOST = "127.0.0.1"
WRAPPER_DIR_PREFIX = "gatekeeper-test-wrappers."
DEFAULT_TIMEOUT = 30.0

# Options that exist only in newer OpenSSH releases: probed once per sshd binary.
_OPTIONAL_OPTIONS = {
    # OpenSSH >= 9.8 penalises sources that fail authentication; tests fail it on purpose.
    "PerSourcePenalties": "PerSourcePenalties no",
}
_option_support: dict[tuple[str, str], bool] = {}


# --------------------------------------------------------------------------------------------
# Locating the binaries


def find_sshd() -> str | None:
    """Absolute path of the OpenSSH server (sshd re-executes itself and needs one), or None."""
    for candidate in ("/usr/sbin/sshd", "/usr/local/sbin/sshd"):
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which("sshd")
    return os.path.abspath(found) if found else None


def require_sshd() -> str:
    """sshd's path; otherwise fail the test when ``CI=true``, else skip it."""
    sshd = find_sshd()
    missing = [] if sshd else ["sshd (openssh-server)"]
    missing += [tool for tool in ("ssh", "ssh-keygen", "git") if shutil.which(tool) is None]
    if missing:
        message = "needs " + ", ".join(missing) + "; run scripts/test.sh to install them"
        if os.environ.get("CI") == "true":
            pytest.fail(message + " (CI=true: not skipping)")
        pytest.skip(message)
    assert sshd is not None
    return sshd


def is_root() -> bool:
    return os.geteuid() == 0


def current_user() -> str:
    try:
        import pwd

        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return getpass.getuser()


# --------------------------------------------------------------------------------------------
# Keys


def generate_user_key(
    directory: Path | str, name: str, key_type: str = "ed25519"
) -> tuple[Path, Path]:
    """Create a key pair without a passphrase; returns (private key, public key) paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    private = directory / name
    public = directory / f"{name}.pub"
    for path in (private, public):
        path.unlink(missing_ok=True)
    argv = ["ssh-keygen", "-q", "-t", key_type, "-N", "", "-C", name, "-f", str(private)]
    if key_type == "rsa":
        argv[4:4] = ["-b", "3072"]
    subprocess.run(argv, check=True, capture_output=True, timeout=DEFAULT_TIMEOUT)
    return private, public


def public_key_line(public: Path | str) -> str:
    """``TYPE BASE64`` of a public key file (the comment dropped)."""
    kind, blob = Path(public).read_text().split()[:2]
    return f"{kind} {blob}"


# --------------------------------------------------------------------------------------------
# AuthorizedKeysCommand wrappers in a directory that sshd accepts


def unsafe_path_reason(path: Path | str) -> str | None:
    """Why sshd would refuse to run ``path`` as AuthorizedKeysCommand, or None if it would not.

    Mirrors OpenSSH's safe_path(): the file (after following links) and every directory above
    its real path must be owned by root and not writable by group or others.
    """
    try:
        st = os.stat(path)
    except OSError as exc:
        return f"{path}: {exc.strerror}"
    if not stat.S_ISREG(st.st_mode):
        return f"{path} is not a regular file"
    if st.st_uid != 0 or st.st_mode & 0o022:
        return f"bad ownership or modes for file {path}"
    return _unsafe_dir_reason(Path(os.path.realpath(path)).parent)


def _unsafe_dir_reason(directory: Path) -> str | None:
    for part in (directory, *directory.parents):
        try:
            st = os.stat(part)
        except OSError as exc:
            return f"{part}: {exc.strerror}"
        if st.st_uid != 0 or st.st_mode & 0o022:
            return f"bad ownership or modes for directory {part}"
    return None


def _wrapper_parent_candidates() -> list[Path]:
    candidates = []
    if sys.prefix != sys.base_prefix:  # a virtual environment: the project's .venv
        candidates.append(Path(sys.prefix))
    candidates += [Path("/run"), Path("/var/lib"), Path("/opt"), Path("/usr/local/lib")]
    return candidates


def _usable_wrapper_parent(directory: Path) -> bool:
    if not directory.is_dir() or not os.access(directory, os.W_OK | os.X_OK):
        return False
    if _unsafe_dir_reason(Path(os.path.realpath(directory))) is not None:
        return False
    try:
        return not os.statvfs(directory).f_flag & os.ST_NOEXEC
    except (OSError, AttributeError):
        return True


def _remove_stale_wrapper_dirs(parent: Path) -> None:
    """Remove wrapper directories left behind by test processes that no longer exist."""
    for entry in parent.glob(WRAPPER_DIR_PREFIX + "*"):
        match = re.fullmatch(re.escape(WRAPPER_DIR_PREFIX) + r"(\d+)\..+", entry.name)
        if not match or not entry.is_dir() or entry.stat().st_uid != os.geteuid():
            continue
        try:
            os.kill(int(match.group(1)), 0)
        except ProcessLookupError:
            shutil.rmtree(entry, ignore_errors=True)
        except OSError:
            pass


_wrapper_dir: Path | None = None
_wrapper_counter = 0


def _cleanup_wrapper_dir() -> None:
    global _wrapper_dir
    if _wrapper_dir is not None:
        shutil.rmtree(_wrapper_dir, ignore_errors=True)
        _wrapper_dir = None


def wrapper_dir() -> Path:
    """This process's directory for AuthorizedKeysCommand wrappers (made on first use).

    As root: a root-owned 0755 directory whose every parent is root-owned and not group/world
    writable (the virtual environment, /run, /var/lib, ...). As a normal user: a private
    temporary directory (see ``SshServer`` for how sshd is then made to run it).
    The directory is removed at interpreter exit (and by the next run if this one crashed).
    """
    global _wrapper_dir
    if _wrapper_dir is not None and _wrapper_dir.is_dir():
        return _wrapper_dir
    prefix = f"{WRAPPER_DIR_PREFIX}{os.getpid()}."
    parent: Path | None = None
    if is_root():
        parent = next((p for p in _wrapper_parent_candidates() if _usable_wrapper_parent(p)), None)
        if parent is None:
            raise RuntimeError(
                "no root-owned, non-writable-by-others, exec-mounted directory for an "
                "AuthorizedKeysCommand wrapper among "
                + ", ".join(str(p) for p in _wrapper_parent_candidates())
            )
        _remove_stale_wrapper_dirs(parent)
    created = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    created.chmod(0o755)
    if _wrapper_dir is None:
        atexit.register(_cleanup_wrapper_dir)
    _wrapper_dir = created
    return created


def make_keys_command_wrapper(script_text: str, name: str = "keys-command") -> Path:
    """Write an executable AuthorizedKeysCommand script (0755) that sshd will run.

    A script without a ``#!`` line gets ``#!/bin/sh``. As root the result passes sshd's
    ownership checks as it is; as a normal user ``SshServer`` runs it through its interpreter.
    """
    global _wrapper_counter
    if not re.fullmatch(r"[A-Za-z0-9._-]+", name):
        raise ValueError(f"wrapper name {name!r}: letters, digits, '.', '_', '-' only")
    if not script_text.startswith("#!"):
        script_text = "#!/bin/sh\n" + script_text
    _wrapper_counter += 1
    path = wrapper_dir() / f"{_wrapper_counter:03d}-{name}"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(script_text)
    tmp.chmod(0o755)
    tmp.replace(path)
    return path


def _through_interpreter(argv: Sequence[str]) -> list[str]:
    """``[interpreter, *args, script, ...]`` from the script's ``#!`` line."""
    with open(argv[0], "rb") as handle:
        first = handle.readline(256).decode("utf-8", "replace")
    if not first.startswith("#!"):
        raise ValueError(f"{argv[0]} has no #! line to run it through its interpreter")
    interpreter = first[2:].split()
    if not interpreter:
        raise ValueError(f"{argv[0]}: empty #! line")
    reason = unsafe_path_reason(interpreter[0])
    if reason:
        raise ValueError(f"interpreter of {argv[0]} is not one sshd would run: {reason}")
    return [*interpreter, *argv]


# --------------------------------------------------------------------------------------------
# The server


def _config_word(word: str) -> str:
    """One argument for an sshd_config line (double-quoted when it needs to be)."""
    if "\n" in word or "\0" in word:
        raise ValueError(f"sshd_config argument {word!r} contains a newline or NUL")
    if word and re.fullmatch(r"[A-Za-z0-9_@%+=:,./-]+", word):
        return word
    return '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'


class SshServerError(RuntimeError):
    pass


class SshServer:
    """A throwaway OpenSSH server on 127.0.0.1 (a context manager).

    Exactly one of ``authorized_keys_file`` (``AuthorizedKeysFile PATH``) or ``keys_command``
    (``AuthorizedKeysCommand ARGV`` + ``AuthorizedKeysCommandUser``, with
    ``AuthorizedKeysFile none``) must be given. ``keys_command`` arguments may use sshd's
    tokens (``%u``, ``%f``, ``%k``, ``%t``...). ``keys_command_user`` defaults to the current
    user; as a normal user it must be the current user. ``extra_config`` is appended as is.
    """

    def __init__(
        self,
        *,
        authorized_keys_file: Path | str | None = None,
        keys_command: Sequence[str] | None = None,
        keys_command_user: str | None = None,
        extra_config: str = "",
        user: str | None = None,
        tmp_dir: Path | str | None = None,
        start_timeout: float = 15.0,
    ) -> None:
        if (authorized_keys_file is None) == (keys_command is None):
            raise ValueError("give exactly one of authorized_keys_file and keys_command")
        self.sshd = require_sshd()
        self.user = user or current_user()
        self.authorized_keys_file = (
            Path(authorized_keys_file) if authorized_keys_file is not None else None
        )
        if self.authorized_keys_file is not None and re.search(
            r"\s", str(self.authorized_keys_file)
        ):
            raise ValueError("AuthorizedKeysFile paths cannot contain white space")
        self.keys_command = list(keys_command) if keys_command is not None else None
        self.keys_command_user = keys_command_user or current_user()
        if self.keys_command is not None:
            self.keys_command = self._checked_keys_command(self.keys_command)
        self.extra_config = extra_config
        self.start_timeout = start_timeout
        self.tmpdir = Path(tempfile.mkdtemp(prefix="sshd-", dir=tmp_dir))
        self.tmpdir.chmod(0o755)  # an AuthorizedKeysCommandUser may need to read below it
        self.host_key = self.tmpdir / "ssh_host_ed25519_key"
        self.config_path = self.tmpdir / "sshd_config"
        self.pid_file = self.tmpdir / "sshd.pid"
        self.log_path = self.tmpdir / "sshd.log"
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_text: str | None = None
        self._clients = 0

    # -- configuration -----------------------------------------------------------------------

    def _checked_keys_command(self, argv: list[str]) -> list[str]:
        if not argv or not os.path.isabs(argv[0]):
            raise ValueError("AuthorizedKeysCommand needs an absolute path as its first word")
        if not is_root() and self.keys_command_user != current_user():
            raise ValueError(
                "sshd running as a normal user can only run AuthorizedKeysCommand as that user"
            )
        reason = unsafe_path_reason(argv[0])
        if reason is None:
            return argv
        if is_root():
            raise ValueError(
                f"sshd would refuse AuthorizedKeysCommand {argv[0]}: {reason}; "
                "write it with make_keys_command_wrapper()"
            )
        return _through_interpreter(argv)

    def config_text(self) -> str:
        lines = [
            f"ListenAddress {HOST}:{self.port}",
            "AddressFamily inet",
            f"HostKey {self.host_key}",
            f"PidFile {self.pid_file}",
            "LogLevel VERBOSE",
            "UsePAM no",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "HostbasedAuthentication no",
            "PubkeyAuthentication yes",
            "PermitRootLogin prohibit-password",
            f"AllowUsers {self.user}",
            "StrictModes no",
            "AcceptEnv GIT_PROTOCOL",
            "MaxStartups 100:30:200",
            "MaxSessions 50",
            "UseDNS no",
            "PrintMotd no",
            "PrintLastLog no",
            "X11Forwarding no",
            "PermitUserEnvironment no",
            "LoginGraceTime 30",
        ]
        for option, line in _OPTIONAL_OPTIONS.items():
            if _option_support.get((self.sshd, option), True):
                lines.append(line)
        if self.authorized_keys_file is not None:
            lines.append(f"AuthorizedKeysFile {self.authorized_keys_file}")
        else:
            assert self.keys_command is not None
            lines += [
                "AuthorizedKeysFile none",
                "AuthorizedKeysCommand " + " ".join(_config_word(w) for w in self.keys_command),
                f"AuthorizedKeysCommandUser {self.keys_command_user}",
            ]
        text = "\n".join(lines) + "\n"
        if self.extra_config:
            text += self.extra_config.rstrip("\n") + "\n"
        return text

    def _write_config(self) -> None:
        self.config_path.write_text(self.config_text())

    def _validate_config(self) -> None:
        """``sshd -t``; drops options this sshd does not know (probed once per binary)."""
        while True:
            self._write_config()
            result = subprocess.run(
                [self.sshd, "-t", "-f", str(self.config_path)],
                capture_output=True,
                text=True,
                timeout=DEFAULT_TIMEOUT,
            )
            if result.returncode == 0:
                for option in _OPTIONAL_OPTIONS:
                    _option_support.setdefault((self.sshd, option), True)
                return
            unknown = [
                option
                for option in _OPTIONAL_OPTIONS
                if option in result.stderr and _option_support.get((self.sshd, option), True)
            ]
            if not unknown:
                raise SshServerError(
                    f"sshd -t refused the configuration:\n{result.stderr}\n{self.config_text()}"
                )
            for option in unknown:
                _option_support[(self.sshd, option)] = False

    # -- life cycle --------------------------------------------------------------------------

    def __enter__(self) -> SshServer:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        if is_root():
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # privilege separation dir
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.host_key)],
            check=True,
            capture_output=True,
            timeout=DEFAULT_TIMEOUT,
        )
        last_error = ""
        for _attempt in range(5):
            self.port = free_port()
            self._validate_config()
            if self._launch():
                return
            last_error = self.log_text()
            if "Address already in use" not in last_error:
                break
        raise SshServerError(f"sshd did not start; its log:\n{last_error}")

    def _launch(self) -> bool:
        """Start sshd and wait until it listens; False if it exited (log kept)."""
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [self.sshd, "-D", "-e", "-f", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        listening = f"Server listening on {HOST} port {self.port}"
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.proc = None
                return False
            if listening in self.log_text() and self._banner_ok():
                return True
            time.sleep(0.02)
        self._terminate()
        raise SshServerError(
            f"sshd not ready after {self.start_timeout}s; its log:\n{self.log_text()}"
        )

    def _banner_ok(self) -> bool:
        try:
            with socket.create_connection((HOST, self.port), timeout=2) as sock:
                return sock.recv(64).startswith(b"SSH-2.0-")
        except OSError:
            return False

    def _terminate(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)

    def stop(self) -> None:
        """Stop sshd, keep its log text (``log_text()``) and remove the temporary directory."""
        self._terminate()
        if self.tmpdir.exists():
            self._log_text = self._read_log()
            shutil.rmtree(self.tmpdir, ignore_errors=True)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _read_log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_text(self) -> str:
        """sshd's log so far (also after ``stop()``): use it in assertion messages."""
        if self._log_text is not None and not self.tmpdir.exists():
            return self._log_text
        return self._read_log()

    def wait_for_log(self, text: str, timeout: float = 5.0) -> bool:
        """Wait until ``text`` appears in the log (sshd logs a session's end asynchronously)."""
        deadline = time.monotonic() + timeout
        while text not in self.log_text():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    def client(self, private_key: Path | str, user: str | None = None) -> SshClient:
        return SshClient(self, private_key, user)

    def _client_home(self) -> Path:
        self._clients += 1
        home = self.tmpdir / f"client-{self._clients}"
        home.mkdir(mode=0o700)
        return home


# --------------------------------------------------------------------------------------------
# The client


class SshClient:
    """Runs ``ssh`` and ``git`` against an ``SshServer`` with one private key as one user."""

    def __init__(
        self,
        server: SshServer,
        private_key: Path | str,
        user: str | None = None,
        home: Path | str | None = None,
    ) -> None:
        self.server = server
        self.private_key = Path(private_key)
        self.user = user or server.user
        self.home = Path(home) if home is not None else server._client_home()
        self.gitconfig = self.home / ".gitconfig"
        if not self.gitconfig.exists():
            self.gitconfig.write_text(
                "[user]\n"
                "\tname = Gatekeeper Test\n"
                "\temail = test@example.invalid\n"
                "[protocol]\n"
                "\tversion = 2\n"
                "[init]\n"
                "\tdefaultBranch = main\n"
                "[advice]\n"
                "\tdetachedHead = false\n"
            )

    def ssh_options(self, options: Sequence[str] = ()) -> list[str]:
        """``ssh`` and its options, with the port but without the destination."""
        argv = [
            "ssh",
            "-F",
            "/dev/null",
            "-i",
            str(self.private_key),
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "IdentityAgent=none",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "LogLevel=ERROR",
            "-o",
            "BatchMode=yes",
            "-o",
            "ConnectTimeout=10",
        ]
        for option in options:
            argv += ["-o", option]
        return [*argv, "-p", str(self.server.port)]

    @property
    def destination(self) -> str:
        return f"{self.user}@{HOST}"

    def ssh_argv(
        self, command: str | Sequence[str] | None = None, options: Sequence[str] = ()
    ) -> list[str]:
        """The full ``ssh`` argv; a command given as a list is shell-quoted into one string."""
        argv = [*self.ssh_options(options), self.destination]
        if command is not None:
            argv.append(command if isinstance(command, str) else shlex.join(command))
        return argv

    def run(
        self,
        command: str | Sequence[str] | None = None,
        input: str | None = None,
        env: Mapping[str, str] | None = None,
        *,
        options: Sequence[str] = (),
        timeout: float = DEFAULT_TIMEOUT,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``ssh ... COMMAND`` (never raises on a non-zero exit; 255 is ssh's own failure).

        ``env`` is the whole environment of ssh (default: this process's); to send a variable
        to the server add e.g. ``options=["SendEnv=GIT_PROTOCOL"]``.
        """
        return subprocess.run(
            self.ssh_argv(command, options),
            input=input,
            stdin=subprocess.DEVNULL if input is None else None,
            env=dict(env) if env is not None else None,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def git_env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """Environment for ``git`` talking to the server with this key, isolated from the host.

        No GIT_* variable of the caller survives; HOME and the global config are the client's
        own (user name/email set, ``protocol.version=2``); the system config is ignored.
        """
        env = {
            k: v
            for k, v in (os.environ if base is None else base).items()
            if not k.startswith("GIT_")
        }
        env.update(
            {
                "HOME": str(self.home),
                "XDG_CONFIG_HOME": str(self.home / ".config"),
                "GIT_CONFIG_GLOBAL": str(self.gitconfig),
                "GIT_CONFIG_NOSYSTEM": "1",
                "GIT_SSH_COMMAND": shlex.join(self.ssh_options()),
                "GIT_SSH_VARIANT": "ssh",
                "GIT_TERMINAL_PROMPT": "0",
                "LC_ALL": "C",
            }
        )
        env.pop("SSH_AUTH_SOCK", None)
        return env

    def git(
        self,
        *args: str,
        cwd: Path | str | None = None,
        input: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``git ARGS`` with ``git_env()`` (never raises on a non-zero exit)."""
        return subprocess.run(
            ["git", *args],
            cwd=cwd,
            input=input,
            stdin=subprocess.DEVNULL if input is None else None,
            env=self.git_env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    @staticmethod
    def _repo_path(repo: str | Path) -> str:
        path = str(repo).strip("/")
        return path if path.endswith(".git") else path + ".git"

    def url(self, repo: str | Path) -> str:
        """``ssh://USER@127.0.0.1:PORT/REPO.git``; the server sees the path ``/REPO.git``."""
        return f"ssh://{self.destination}:{self.server.port}/{self._repo_path(repo)}"

    def scp_url(self, repo: str | Path) -> str:
        """``USER@127.0.0.1:REPO.git`` (the port comes from GIT_SSH_COMMAND); the server sees
        the path as written, without a leading ``/`` for a relative one."""
        path = str(repo)
        path = path if path.endswith(".git") else path + ".git"
        return f"{self.destination}:{path}"
