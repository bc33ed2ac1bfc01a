"""Admins run the CLI as root; the state stays the git account's (docs/design.md: "Files keep
their owner"). One `gatekeeper user add` run as root once left `audit.head` root's, and
every git access of every user was refused from then on (issue 20).

Each test makes a throwaway system user to play the git account (useradd, removed
afterwards) and a directory it can reach under /var/tmp. gatekeeper runs from this
checkout, with an interpreter that account may run (the test's own may live where it
cannot, in root's home directory). The commands run as root, as an admin runs them;
afterwards every file in the state directory is the account's with its usual mode, the
forced command run as the account still lets a member fetch, and `log verify` says
intact.

They need root (useradd, runuser): they skip as a normal user, and fail instead when
CI=true."""

from __future__ import annotations

import itertools
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from gatekeeper import totp
from gatekeeper.server import HOST_KEY_NAME
from testing.installation import DEFAULT_POLICY, make_bare_repo
from testing.pgserver import pid_alive

ROOT = Path(__file__).resolve().parent.parent
CI = os.environ.get("CI") == "true"
COMMENT = "gatekeeper runas test"
PREFIX = "gatekeeper-runas."
FETCH = "git-upload-pack 'platform/api'"
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_counter = itertools.count(1)


def need(condition: bool, message: str) -> None:
    if not condition:
        if CI:
            pytest.fail(message + " (CI=true: not skipping)")
        pytest.skip(message)


def _site_packages() -> str:
    return next(p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir())


def _interpreter(user: str, pythonpath: str) -> str | None:
    """A Python of this version that `user` may run and that finds gatekeeper and its
    dependencies on `pythonpath`."""
    version = f"python{sys.version_info[0]}.{sys.version_info[1]}"
    candidates = [
        os.path.realpath(sys.executable),
        f"/usr/bin/{version}",
        f"/usr/local/bin/{version}",
    ]
    probe = "import gatekeeper.cli.main, click, yaml, cryptography, pyotp, paramiko, segno"
    for python in candidates:
        if not os.path.exists(python):
            continue
        result = subprocess.run(
            ["runuser", "-u", user, "--", python, "-c", probe],
            env={"PATH": PATH, "PYTHONPATH": pythonpath},
            capture_output=True,
            cwd="/",
            check=False,
        )
        if result.returncode == 0:
            return python
    return None


def _remove_stale_leftovers() -> None:
    """Users and directories of test runs that died without cleaning up."""
    for entry in pwd.getpwall():
        match = re.fullmatch(r"gkr(\d+)x\d+", entry.pw_name)
        if match and entry.pw_gecos == COMMENT and not pid_alive(int(match.group(1))):
            subprocess.run(["userdel", entry.pw_name], capture_output=True, check=False)
    for entry in Path("/var/tmp").glob(PREFIX + "*"):
        match = re.fullmatch(re.escape(PREFIX) + r"(\d+)\..+", entry.name)
        if match and not pid_alive(int(match.group(1))):
            shutil.rmtree(entry, ignore_errors=True)


@dataclass
class Site:
    """A git account, and a gatekeeper whose state directory is (or will be) its."""

    user: str
    uid: int
    gid: int
    base: Path
    python: str
    pythonpath: str

    @property
    def config(self) -> Path:
        return self.base / "config.yaml"

    @property
    def state(self) -> Path:
        return self.base / "state"

    @property
    def repos(self) -> Path:
        return self.base / "repositories"

    @property
    def home(self) -> Path:
        return self.base / "home"

    def env(self) -> dict[str, str]:
        return {
            "PATH": PATH,
            "PYTHONPATH": self.pythonpath,
            "GATEKEEPER_CONFIG": str(self.config),
            "HOME": pwd.getpwuid(0).pw_dir,
            "USER": "root",
            "LOGNAME": "root",
        }

    def gk(
        self, *args: str, check: bool = True, input: str | None = None, prefix: tuple[str, ...] = ()
    ) -> subprocess.CompletedProcess[str]:
        """The admin CLI, as root (or under `prefix`)."""
        launcher = str(ROOT / "gatekeeper" / "launcher" / "gatekeeper")
        result = subprocess.run(
            [*prefix, self.python, launcher, "--config", str(self.config), *args],
            input=input,
            capture_output=True,
            text=True,
            env=self.env(),
            cwd="/",
            timeout=60,
            check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"gatekeeper {args}: {result.returncode}\n{result.stdout}{result.stderr}"
            )
        return result

    def as_user(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """The admin CLI run as the git account itself."""
        return self.gk(*args, check=check, prefix=("runuser", "-u", self.user, "--"))

    def fetch_as_user(self, key_id: int) -> subprocess.CompletedProcess[str]:
        """The forced command as sshd runs it: as the git account, for a key."""
        launcher = str(ROOT / "gatekeeper" / "launcher" / "gatekeeper-shell")
        env = {
            **self.env(),
            "HOME": str(self.home),
            "USER": self.user,
            "LOGNAME": self.user,
            "SSH_CONNECTION": "127.0.0.1 50000 127.0.0.1 22",
            "SSH_ORIGINAL_COMMAND": FETCH,
        }
        return subprocess.run(
            [
                "runuser",
                "-u",
                self.user,
                "--",
                self.python,
                launcher,
                "--config",
                str(self.config),
                str(key_id),
            ],
            input="0000",
            capture_output=True,
            text=True,
            env=env,
            cwd="/",
            timeout=60,
            check=False,
        )

    def state_files(self) -> dict[str, tuple[int, int, int]]:
        """name -> (uid, gid, mode) of everything in the state directory."""
        out = {}
        for entry in sorted(self.state.iterdir()):
            st = entry.lstat()
            out[entry.name] = (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode))
        return out

    def assert_state_is_the_accounts(self) -> None:
        st = self.state.stat()
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (self.uid, 0o700)
        files = self.state_files()
        assert {"gatekeeper.db", "audit.head", "server.key"} <= set(files), files
        for name, (uid, _gid, mode) in files.items():
            assert uid == self.uid, f"{name} belongs to uid {uid}, not {self.user}"
            usual = 0o644 if name.endswith(".pub") else 0o600  # serve's public host key
            if name == "keyindex":  # its group may be a least-privilege keys-command user
                usual = 0o2750
                for entry in (self.state / name).iterdir():
                    est = entry.lstat()
                    assert (est.st_uid, stat.S_IMODE(est.st_mode)) == (self.uid, 0o640), entry
            assert mode == usual, f"{name} has mode {mode:04o}"
        assert not [n for n in files if n.startswith(".")], files


@pytest.fixture
def site() -> Iterator[Site]:
    need(os.geteuid() == 0, "needs root (useradd, runuser, chown); the CI runs it as root")
    missing = [t for t in ("useradd", "userdel", "runuser") if shutil.which(t) is None]
    need(not missing, "needs " + ", ".join(missing))
    _remove_stale_leftovers()
    user = f"gkr{os.getpid()}x{next(_counter)}"
    base = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}.", dir="/var/tmp"))
    base.chmod(0o755)
    subprocess.run(
        [
            *("useradd", "--system", "--user-group", "--no-create-home"),
            *("--home-dir", str(base / "home"), "--shell", "/bin/sh", "--password", "*"),
            *("--comment", COMMENT, user),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    try:
        entry = pwd.getpwnam(user)
        pythonpath = f"{ROOT}:{_site_packages()}"
        python = _interpreter(user, pythonpath)
        need(
            python is not None,
            f"no Python {sys.version_info[0]}.{sys.version_info[1]} that {user} may run",
        )
        assert python is not None
        made = Site(user, entry.pw_uid, entry.pw_gid, base, python, pythonpath)
        for directory in (made.repos, made.home):
            directory.mkdir()
            os.chown(directory, entry.pw_uid, entry.pw_gid)
        server = textwrap.dedent(f"""\
            server:
              host: git.example.com
              user: {user}
              repositories: {made.repos}
              state_dir: {made.state}
            """)
        made.config.write_text(server + "two_factor:\n  max_failures: 3\n" + DEFAULT_POLICY)
        made.config.chmod(0o644)
        repo = make_bare_repo(made.repos, "platform/api")
        subprocess.run(["chown", "-R", f"{user}:{user}", str(made.repos)], check=True)
        assert repo.exists()
        yield made
    finally:
        subprocess.run(["userdel", user], capture_output=True, check=False)
        shutil.rmtree(base, ignore_errors=True)


def enroll(site: Site, name: str) -> None:
    """`2fa enroll` then `2fa confirm` as root, the code computed from the URI it shows."""
    shown = site.gk("2fa", "enroll", name, "--no-qr").stdout
    secret = re.search(r"secret=([A-Z2-7]+)", shown)
    assert secret, shown
    site.gk("2fa", "confirm", name, totp.current_code(secret[1], time.time()))


def add_key(site: Site, name: str) -> int:
    private = site.base / f"key-{name}"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(private)], check=True)
    Path(f"{private}.pub").chmod(0o600)  # root's alone: read before the switch
    site.gk("key", "add", name, f"{private}.pub")
    rows = site.gk("key", "list", name, "--json").stdout
    return int(re.findall(r'"id": (\d+)', rows)[-1])


# -- the admin's day, as root ------------------------------------------------------------------


def test_admin_commands_as_root_leave_the_state_the_git_accounts(site: Site) -> None:
    assert not site.state.exists()
    init = site.gk("init")  # a new state directory, for the policy's server.user
    assert "created store" in init.stdout
    assert init.stderr == ""  # quietly
    site.assert_state_is_the_accounts()

    site.gk("user", "add", "bob")
    key = add_key(site, "bob")
    enroll(site, "bob")
    site.gk("2fa", "reset", "bob")
    enroll(site, "bob")
    site.gk("user", "add", "zed")
    site.gk("user", "remove", "zed")
    site.gk("log", "prune", "--before", "0s")
    site.gk("init")  # again, on the existing state
    site.gk("migrate")
    site.gk("hooks", "install", "--all")
    authorized_keys = site.home / ".ssh" / "authorized_keys"
    site.gk("authorized-keys", "--write", str(authorized_keys))
    site.gk("check", "bob", "platform/api", "read")
    site.gk("audit")
    site.gk("2fa", "status")
    site.gk("policy", "check")
    assert "audit log: intact" in site.gk("log", "verify").stdout
    site.assert_state_is_the_accounts()

    # Files written elsewhere are the account's too.
    hook = site.repos / "platform" / "api.git" / "hooks" / "pre-receive"
    assert (hook.stat().st_uid, stat.S_IMODE(hook.stat().st_mode)) == (site.uid, 0o755)
    for path, mode in ((authorized_keys.parent, 0o700), (authorized_keys, 0o600)):
        assert (path.stat().st_uid, stat.S_IMODE(path.stat().st_mode)) == (site.uid, mode), path

    # The git account's own view: access works, and the log is intact.
    fetched = site.fetch_as_user(key)
    assert fetched.returncode == 0, fetched.stderr
    assert "refs/heads/main" in fetched.stdout
    verified = site.as_user("log", "verify")
    assert "audit log: intact" in verified.stdout
    # Root's commands are recorded as root's, not as the account they ran as.
    assert '"actor": "root"' in site.as_user("log", "--event", "hooks-install", "--json").stdout
    site.assert_state_is_the_accounts()


def test_a_file_an_older_version_left_roots_is_given_back(site: Site) -> None:
    """The state issue 20 found: audit.head root's, mode 0600. The git account cannot
    read it (a permission problem, not tampering, says `log verify`); the next command
    root runs gives it back."""
    site.gk("init")
    site.gk("user", "add", "bob")
    key = add_key(site, "bob")
    enroll(site, "bob")
    head = site.state / "audit.head"
    os.chown(head, 0, 0)
    head.chmod(0o600)

    refused = site.fetch_as_user(key)
    assert refused.returncode != 0 and "refs/heads" not in refused.stdout
    result = site.as_user("log", "verify", check=False)
    assert result.returncode == 5, result.stdout + result.stderr
    assert "NOT intact" not in result.stdout + result.stderr
    assert f"cannot read the audit head file {head}: Permission denied" in result.stderr
    assert "a permission problem" in result.stderr and "not tampering" in result.stderr
    assert f"chown {site.user}: {head}" in result.stderr
    as_json = site.as_user("log", "verify", "--json", check=False)
    assert as_json.returncode == 5 and '"error": "permission"' in as_json.stdout

    listed = site.gk("user", "list")  # root, any command
    assert f"{head} belonged to another account; it is {site.user}'s again" in listed.stderr
    site.assert_state_is_the_accounts()
    assert site.fetch_as_user(key).returncode == 0
    assert "audit log: intact" in site.as_user("log", "verify").stdout


def test_log_verify_reports_an_unreadable_database_as_a_permission_problem(site: Site) -> None:
    site.gk("init")
    db = site.state / "gatekeeper.db"
    os.chown(db, 0, 0)
    result = site.as_user("log", "verify", check=False)
    assert result.returncode == 5, result.stdout + result.stderr
    assert f"state database is not readable: {db}" in result.stderr
    assert f"chown {site.user}: {db}" in result.stderr
    assert "intact" not in result.stdout


def test_root_refuses_with_the_command_that_works_when_it_cannot_switch(site: Site) -> None:
    """Root without CAP_SETUID and CAP_SETGID (a confined container, say) cannot become
    the account: it says how to run the command instead, and changes nothing."""
    setpriv = shutil.which("setpriv")
    need(setpriv is not None, "needs setpriv (util-linux)")
    site.gk("init")
    before = site.state_files()
    drop = ("setpriv", "--bounding-set=-setuid,-setgid", "--inh-caps=-setuid,-setgid", "--")
    result = site.gk("user", "add", "zed", check=False, prefix=drop)
    assert result.returncode == 4, result.stdout + result.stderr
    assert f"cannot run as {site.user}, the owner of the state directory" in result.stderr
    launcher = ROOT / "gatekeeper" / "launcher" / "gatekeeper"
    assert (
        f"runuser -u {site.user} -- {launcher} --config {site.config} user add zed" in result.stderr
    )
    assert site.state_files() == before
    assert "zed" not in site.as_user("user", "list").stdout


def test_serve_as_root_listens_then_runs_as_the_git_account(site: Site) -> None:
    """A port below 1024 needs root: `serve` listens first, then becomes the account
    before it opens the store or creates its host key."""
    site.gk("init")
    port = _free_low_port()
    launcher = str(ROOT / "gatekeeper" / "launcher" / "gatekeeper")
    server = subprocess.Popen(
        [site.python, launcher, "--config", str(site.config), "serve", "--port", str(port)],
        env=site.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd="/",
    )
    try:
        assert server.stdout is not None
        lines = [server.stdout.readline() for _ in range(2)]  # the host key, then this
        if f"listening on 127.0.0.1:{port}" not in lines[-1]:
            server.kill()
            pytest.fail("".join(lines) + server.stdout.read())
        assert "created host key" in lines[0]
        status = Path(f"/proc/{server.pid}/status").read_text()
        uids = re.search(r"^Uid:\s+(\d+)\s+(\d+)\s+(\d+)", status, re.M)
        assert uids and {int(u) for u in uids.groups()} == {site.uid}, status
        with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
            assert conn.recv(64).startswith(b"SSH-2.0-")
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
    host_key = site.state / HOST_KEY_NAME
    assert host_key.stat().st_uid == site.uid  # created after the switch
    site.assert_state_is_the_accounts()


def _free_low_port() -> int:
    for port in range(900, 1000):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    pytest.skip("no free port below 1024")


# -- files written outside the state directory -------------------------------------------------


def test_authorized_keys_written_by_root_keep_their_owner_and_mode(site: Site) -> None:
    """Without the switch (a state directory that is root's, say), root writing the git
    account's authorized_keys keeps the file the account's: sshd reads it as that
    account, and with StrictModes accepts only its or root's."""
    from gatekeeper import authkeys
    from gatekeeper.errors import GatekeeperError

    line = authkeys.render_block(["ssh-ed25519 AAAA one"])
    fresh = site.home / ".ssh" / "authorized_keys"
    assert authkeys.write_file(fresh, line)
    for path, mode in ((fresh.parent, 0o700), (fresh, 0o600)):
        assert (path.stat().st_uid, stat.S_IMODE(path.stat().st_mode)) == (site.uid, mode), path
    fresh.chmod(0o644)  # the admin's choice stays
    assert authkeys.write_file(fresh, authkeys.render_block(["ssh-ed25519 BBBB two"]))
    assert (fresh.stat().st_uid, stat.S_IMODE(fresh.stat().st_mode)) == (site.uid, 0o644)
    assert "BBBB" in fresh.read_text() and "AAAA" not in fresh.read_text()
    assert not [p for p in fresh.parent.iterdir() if p.name != "authorized_keys"]
    blocked = site.base / "not-a-directory"
    blocked.write_text("")
    with pytest.raises(GatekeeperError, match=r"cannot (read|write)"):
        authkeys.write_file(blocked / "authorized_keys", line)
