"""scripts/install.sh for real: into a staging root, as root, with a real system user.

Each heavy test installs gatekeeper into its own staging root (``--root``): a fresh virtualenv
with the package, the policy, the state directory, the git user's home, and a complete sshd
configuration with the gatekeeper drop-in. It then starts that sshd on a loopback port and
clones and pushes through it with the real git client as an enrolled user, and is refused as a
user who has not enrolled and as a key nobody registered, in both modes (authorized_keys and
AuthorizedKeysCommand). Around that: a dry run changes nothing, a second run changes nothing
and says so, a drop-in sshd rejects is rolled back, and --uninstall --purge leaves the staging
root as it was before the install.

Where things live: sshd accepts an authorized_keys file (StrictModes) and an
AuthorizedKeysCommand only if every directory above them is root-owned and not writable by
group or others, which pytest's temporary directories under /tmp are not. The staging root is
therefore a root-owned 0755 directory under /var/lib (or /opt, /srv, the virtualenv), removed
afterwards. The git account is a throwaway system user (useradd, removed afterwards), whose
home lies inside the staging root.

The tests need root (useradd, chown, sshd with privilege separation): they skip as a normal
user, and fail instead when CI=true.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import pwd
import random
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest

from gatekeeper import totp
from testing import sshd
from testing.pgserver import PostgresServer, pid_alive

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = REPO_ROOT / "scripts" / "install.sh"
ROOT_DIR_PREFIX = "gatekeeper-install-test."
USER_COMMENT = "gatekeeper install.sh test"
CI = os.environ.get("CI") == "true"
INSTALL_TIMEOUT = 600

TEST_POLICY = """\
teams:
  dev:
    members: [alice, bob]
    require_2fa: enrolled
repositories:
  - match: project
    read: [dev]
    write: [dev]
"""


def need_root() -> None:
    if os.geteuid() != 0:
        message = "install.sh needs root (useradd, chown, sshd); the CI runs it as root"
        if CI:
            pytest.fail(message + " (CI=true: not skipping)")
        pytest.skip(message)
    missing = [tool for tool in ("useradd", "userdel", "runuser") if shutil.which(tool) is None]
    if missing:
        message = "needs " + ", ".join(missing)
        if CI:
            pytest.fail(message)
        pytest.skip(message)


# --------------------------------------------------------------------------------------------
# A staging root sshd will accept, and a throwaway git user


def _safe_dir(path: Path) -> bool:
    """Root-owned and not group/world-writable, all the way up; writable; not noexec."""
    real = Path(os.path.realpath(path))
    if not real.is_dir() or not os.access(real, os.W_OK | os.X_OK):
        return False
    for part in (real, *real.parents):
        st = os.stat(part)
        if st.st_uid != 0 or st.st_mode & 0o022:
            return False
    try:
        return not os.statvfs(real).f_flag & os.ST_NOEXEC
    except (OSError, AttributeError):
        return True


def _root_parent() -> Path:
    candidates = [Path("/var/lib"), Path("/opt"), Path("/srv"), Path(sys.prefix)]
    for candidate in candidates:
        if _safe_dir(candidate):
            return candidate
    raise RuntimeError(
        "no root-owned, not group/world-writable, exec-mounted directory for a staging root "
        "among " + ", ".join(map(str, candidates))
    )


def _remove_stale_leftovers(parent: Path) -> None:
    """Staging roots and users of test processes that died without cleaning up."""
    for entry in parent.glob(ROOT_DIR_PREFIX + "*"):
        match = re.fullmatch(re.escape(ROOT_DIR_PREFIX) + r"(\d+)\..+", entry.name)
        if match and entry.is_dir() and not pid_alive(int(match.group(1))):
            shutil.rmtree(entry, ignore_errors=True)
    for user in pwd.getpwall():
        match = re.fullmatch(r"gkt(\d+)x\d+", user.pw_name)
        if match and user.pw_gecos == USER_COMMENT and not pid_alive(int(match.group(1))):
            subprocess.run(["userdel", user.pw_name], capture_output=True, check=False)


_user_counter = itertools.count(1)


@dataclass
class Box:
    """A staging root with a git user, and the options every install.sh run here gets."""

    root: Path
    user: str
    source: Path
    port: int
    tmp: Path
    sshd_bin: str

    @property
    def home(self) -> Path:
        return self.root / "home" / self.user

    @property
    def prefix(self) -> Path:
        return self.root / "opt" / "gatekeeper"

    @property
    def config(self) -> Path:
        return self.root / "etc" / "gatekeeper" / "config.yaml"

    @property
    def state(self) -> Path:
        return self.root / "var" / "lib" / "gatekeeper"

    @property
    def repos(self) -> Path:
        return self.root / "srv" / "git"

    @property
    def dropin(self) -> Path:
        return self.root / "etc" / "ssh" / "sshd_config.d" / "10-gatekeeper.conf"

    @property
    def sshd_config(self) -> Path:
        return self.root / "etc" / "ssh" / "sshd_config"

    @property
    def authorized_keys(self) -> Path:
        return self.home / ".ssh" / "authorized_keys"

    def install(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        argv = [
            "bash",
            str(SCRIPT),
            "--root",
            str(self.root),
            "--user",
            self.user,
            "--source",
            str(self.source),
            "--ssh-port",
            str(self.port),
            *args,
        ]
        started = time.monotonic()
        result = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            timeout=INSTALL_TIMEOUT,
            check=False,
        )
        took = time.monotonic() - started
        print(f"$ install.sh {' '.join(args)}  ({took:.1f} s, exit {result.returncode})")
        print(result.stdout + result.stderr)
        if check and result.returncode != 0:
            raise AssertionError(
                f"install.sh {' '.join(args)} failed ({result.returncode}):\n"
                f"{result.stdout}\n{result.stderr}"
            )
        return result

    def gk(self, *args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
        """The installed gatekeeper CLI, as the git user (as an admin runs it)."""
        result = subprocess.run(
            [
                "runuser",
                "-u",
                self.user,
                "--",
                str(self.prefix / "bin" / "gatekeeper"),
                "--config",
                str(self.config),
                *args,
            ],
            input=input,
            stdin=subprocess.DEVNULL if input is None else None,
            capture_output=True,
            text=True,
            cwd="/",
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, f"gatekeeper {args}: {result.stdout}\n{result.stderr}"
        return result


def _free_port() -> int:
    """A free loopback port outside the ephemeral range other tests' servers draw from."""
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20000, 32000)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((sshd.HOST, port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 20000-32000")


@pytest.fixture(scope="module")
def source_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A snapshot of the checkout to install from: others may edit the tree meanwhile."""
    target = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md", "gatekeeper", "hooks", "config"):
        src = REPO_ROOT / name
        if src.is_dir():
            shutil.copytree(src, target / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, target / name)
    return target


@contextmanager
def staging_box(tmp: Path, source: Path) -> Iterator[Box]:
    """A fresh staging root with its own throwaway git user, both removed afterwards."""
    need_root()
    sshd_bin = sshd.require_sshd()
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege separation dir
    parent = _root_parent()
    _remove_stale_leftovers(parent)
    root = Path(tempfile.mkdtemp(prefix=f"{ROOT_DIR_PREFIX}{os.getpid()}.", dir=parent))
    root.chmod(0o755)
    user = f"gkt{os.getpid()}x{next(_user_counter)}"
    subprocess.run(
        [
            "useradd",
            "--system",
            "--user-group",
            "--no-create-home",
            "--home-dir",
            str(root / "home" / user),
            "--shell",
            "/bin/sh",
            "--password",
            "*",
            "--comment",
            USER_COMMENT,
            user,
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        yield Box(root, user, source, _free_port(), tmp, sshd_bin)
    finally:
        subprocess.run(["userdel", user], capture_output=True, check=False)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def box(tmp_path: Path, source_copy: Path) -> Iterator[Box]:
    with staging_box(tmp_path, source_copy) as made:
        yield made


# --------------------------------------------------------------------------------------------
# Snapshots of a tree: what changed?


def snapshot(top: Path, *, dir_mtimes: bool = True) -> dict[str, tuple[object, ...]]:
    """path -> (kind, mode, uid, gid, mtime, content digest or link target)."""
    result: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in [*dirnames, *filenames]:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            rel = os.path.relpath(path, top)
            if stat.S_ISLNK(st.st_mode):
                result[rel] = ("link", os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                mtime = st.st_mtime_ns if dir_mtimes else None
                # Reading the SQLite store creates and removes its -wal file beside it, and
                # install.sh reads the keys on every run (authorized_keys mode).
                if os.path.exists(os.path.join(path, "gatekeeper.db")):
                    mtime = None
                result[rel] = ("dir", st.st_mode, st.st_uid, st.st_gid, mtime)
            else:
                digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
                result[rel] = ("file", st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns, digest)
    return result


def no_dir_mtimes(snap: dict[str, tuple[object, ...]]) -> dict[str, tuple[object, ...]]:
    return {p: (v if v[0] != "dir" else (*v[:4], None)) for p, v in snap.items()}


def differences(before: dict[str, tuple[object, ...]], after: dict[str, tuple[object, ...]]) -> str:
    lines = [f"+ {p}" for p in sorted(after.keys() - before.keys())]
    lines += [f"- {p}" for p in sorted(before.keys() - after.keys())]
    lines += [
        f"~ {p}: {before[p]} -> {after[p]}"
        for p in sorted(before.keys() & after.keys())
        if before[p] != after[p]
    ]
    return "\n".join(lines)


def without_repository_data(snap: dict[str, tuple[object, ...]]) -> dict[str, tuple[object, ...]]:
    """Leave out what a push changes in a bare repository (objects, refs, logs)."""
    data = re.compile(r"srv/git/[^/]+\.git/(objects|refs|logs|packed-refs|info|FETCH_HEAD)")
    return {p: v for p, v in snap.items() if not data.match(p)}


# --------------------------------------------------------------------------------------------
# The staged sshd and git through it


class StagedSshd:
    """The sshd that install.sh configured under the staging root, started on its port."""

    def __init__(self, box: Box) -> None:
        self.box = box
        self.port = box.port
        self.user = box.user
        self.log_path = box.tmp / "staged-sshd.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.clients = 0

    def __enter__(self) -> StagedSshd:
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [self.box.sshd_bin, "-D", "-e", "-f", str(self.box.sshd_config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 15
        listening = f"Server listening on {sshd.HOST} port {self.port}"
        while listening not in self.log():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.__exit__()
                raise AssertionError(f"the staged sshd did not start:\n{self.log()}")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def client(self, key: Path) -> sshd.SshClient:
        self.clients += 1
        home = Path(tempfile.mkdtemp(prefix=f"client-{self.clients}-", dir=self.box.tmp))
        return sshd.SshClient(self, key, self.user, home=home)  # type: ignore[arg-type]


def make_project(box: Box) -> Path:
    """A bare repository `project.git` with one commit, owned by the git user."""
    bare = box.repos / "project.git"
    seed = box.tmp / "seed"
    env = {
        **os.environ,
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_CONFIG_GLOBAL": "/dev/null",
        "GIT_AUTHOR_NAME": "Seed",
        "GIT_AUTHOR_EMAIL": "seed@example.invalid",
        "GIT_COMMITTER_NAME": "Seed",
        "GIT_COMMITTER_EMAIL": "seed@example.invalid",
    }

    def git(*args: str) -> None:
        subprocess.run(["git", *args], check=True, capture_output=True, env=env, timeout=60)

    git("init", "-q", "--bare", "-b", "main", str(bare))
    git("init", "-q", "-b", "main", str(seed))
    (seed / "README.md").write_text("# project\n")
    git("-C", str(seed), "add", "README.md")
    git("-C", str(seed), "commit", "-qm", "initial")
    git("-C", str(seed), "push", "-q", str(bare), "main")
    subprocess.run(["chown", "-R", f"{box.user}:{box.user}", str(box.repos)], check=True)
    return bare


def secret_from(text: str) -> str:
    uri = re.search(r"otpauth://\S+", text)
    assert uri, text
    return parse_qs(urlparse(uri.group(0)).query)["secret"][0]


def enroll_users_and_use_git(box: Box) -> None:
    """Admin: users alice (enrolled) and bob (not); then git through the staged sshd."""
    keys = box.tmp / "keys"
    alice, alice_pub = sshd.generate_user_key(keys, "alice")
    bob, bob_pub = sshd.generate_user_key(keys, "bob")
    mallory, _ = sshd.generate_user_key(keys, "mallory")
    # No --authorized-keys: in authorized_keys mode the CLI rewrites the file install.sh
    # recorded, so the keys work at once in either mode.
    for name, pub in (("alice", alice_pub), ("bob", bob_pub)):
        box.gk("user", "add", name)
        added = box.gk("key", "add", name, "-", input=pub.read_text())
        assert added.stderr == "", added.stderr
    enrolled = box.gk("2fa", "enroll", "alice", "--no-qr")
    box.gk("2fa", "confirm", "alice", totp.current_code(secret_from(enrolled.stdout), time.time()))

    with StagedSshd(box) as server:
        work = box.tmp / "work"
        a = server.client(alice)
        clone = a.git("clone", a.url("project"), str(work))
        assert clone.returncode == 0, f"{clone.stderr}\nsshd log:\n{server.log()}"
        assert (work / "README.md").read_text() == "# project\n"
        (work / "change.txt").write_text("pushed through the installed gatekeeper\n")
        assert a.git("add", "change.txt", cwd=work).returncode == 0
        assert a.git("commit", "-qm", "change", cwd=work).returncode == 0
        push = a.git("push", "origin", "main", cwd=work)
        assert push.returncode == 0, f"{push.stderr}\nsshd log:\n{server.log()}"
        remote = a.git("ls-remote", a.url("project"))
        head = a.git("rev-parse", "HEAD", cwd=work).stdout.strip()
        assert f"{head}\trefs/heads/main" in remote.stdout, remote.stderr

        b = server.client(bob)
        refused = b.git("clone", b.url("project"), str(box.tmp / "bob-work"))
        assert refused.returncode != 0
        assert "read 'project' refused" in refused.stderr, refused.stderr
        assert "have not enrolled" in refused.stderr
        assert f"ssh -p {box.port} {box.user}@127.0.0.1 2fa enroll" in refused.stderr
        push_b = b.git("push", a.url("project"), "main", cwd=work)
        assert push_b.returncode != 0 and "refused" in push_b.stderr, push_b.stderr

        m = server.client(mallory)
        denied = m.git("clone", m.url("project"), str(box.tmp / "mallory-work"))
        assert denied.returncode != 0
        assert "Permission denied" in denied.stderr, denied.stderr
        assert "gatekeeper" not in denied.stderr


def write_test_policy(box: Box) -> None:
    """The admin keeps the server section install.sh wrote and puts in their own teams."""
    text = box.config.read_text()
    start = re.search(r"^teams:", text, re.M)
    assert start, text
    box.config.write_text(text[: start.start()] + TEST_POLICY)


def hooks_available(box: Box) -> bool:
    gatekeeper = box.prefix / "bin" / "gatekeeper"
    result = subprocess.run([str(gatekeeper), "hooks", "--help"], capture_output=True, check=False)
    return result.returncode == 0


def effective_sshd(box: Box, user: str) -> str:
    result = subprocess.run(
        [
            box.sshd_bin,
            "-T",
            "-f",
            str(box.sshd_config),
            "-C",
            f"user={user},host=localhost,addr=127.0.0.1",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    return result.stdout


def dropin_directives(box: Box) -> list[str]:
    lines = box.dropin.read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


# --------------------------------------------------------------------------------------------
# The tests


@pytest.mark.sshd
def test_authorized_keys_mode_install_twice_rollback_use_and_uninstall(box: Box) -> None:
    box.repos.mkdir(parents=True)
    make_project(box)
    before = snapshot(box.root)

    # A dry run lists the changes and makes none.
    dry = box.install("--dry-run")
    assert "would    create virtualenv" in dry.stdout
    assert "would    write sshd drop-in" in dry.stdout and "Match User " + box.user in dry.stdout
    assert "nothing was changed" in dry.stdout
    assert differences(before, snapshot(box.root)) == ""

    first = box.install("--issuer", "Box Git")
    assert "change(s) made" in first.stdout
    # The drop-in: the git user's block, no ForceCommand; sshd applies it to that user only.
    assert dropin_directives(box) == [
        "MaxStartups 100:30:200",
        f"Match User {box.user}",
        f"AuthorizedKeysFile {box.authorized_keys}",
        "AcceptEnv GIT_PROTOCOL",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "PermitTTY no",
        "DisableForwarding yes",
    ]
    effective = effective_sshd(box, box.user)
    assert f"authorizedkeysfile {box.authorized_keys}" in effective.splitlines()
    assert "forcecommand none" in effective.splitlines()
    assert f"authorizedkeysfile {box.authorized_keys}" not in effective_sshd(box, "nobody")
    # The state directory and the store are the git user's alone.
    git_uid = pwd.getpwnam(box.user).pw_uid
    st = box.state.stat()
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (git_uid, 0o700)
    for name in ("gatekeeper.db", "server.key"):
        file_st = (box.state / name).stat()
        assert file_st.st_uid == git_uid and not file_st.st_mode & 0o077, name
    # The policy: the example with this box's user, paths, host and port; readable by git only.
    config = box.config.read_text()
    assert f"  user: {box.user}" in config
    assert f"  repositories: {box.repos}" in config
    assert f"  state_dir: {box.state}" in config
    assert f"  port: {box.port}" in config
    assert "  issuer: 'Box Git'" in config  # what authenticator apps show, not the example's
    assert stat.S_IMODE(box.config.stat().st_mode) == 0o640
    # A real (non-editable) install in the prefix, root-owned.
    (site,) = box.prefix.glob("lib/python3*/site-packages")
    assert (site / "gatekeeper" / "shell.py").is_file()
    assert not list(site.glob("__editable__*"))
    assert box.prefix.stat().st_uid == 0 and (box.prefix / "bin" / "gatekeeper").stat().st_uid == 0
    # gatekeeper-shell is the plain launcher (script-files), not pip's console-script
    # wrapper, which imports `re`; pip pointed its #! at the prefix's interpreter.
    launcher = (box.prefix / "bin" / "gatekeeper-shell").read_text()
    assert launcher.startswith(f"#!{box.prefix}/bin/python"), launcher.splitlines()[0]
    assert "import re" not in launcher and "from gatekeeper.shell import main" in launcher
    # The hooks, when this gatekeeper has them.
    if hooks_available(box):
        assert (box.repos / "project.git" / "hooks" / "pre-receive").is_file()
        assert "installed the git hooks" in first.stdout
    else:
        assert "skip     git hooks" in first.stdout

    # Twice: nothing to change, and nothing changed (contents, modes, owners, mtimes).
    installed = snapshot(box.root)
    again = box.install()
    assert "nothing to change" in again.stdout
    assert "change   " not in again.stdout
    assert differences(installed, snapshot(box.root)) == ""
    assert "nothing to change" in box.install("--dry-run").stdout
    assert differences(installed, snapshot(box.root)) == ""

    # The admin edits the policy: install.sh never overwrites it. (The admin's next command
    # records the policy change in the audit log, as any gatekeeper command would.)
    write_test_policy(box)
    box.gk("user", "list")
    edited = snapshot(box.root)
    assert "nothing to change" in box.install().stdout
    assert box.config.read_text().endswith(TEST_POLICY)
    assert differences(edited, snapshot(box.root)) == ""

    # A drop-in sshd rejects is rolled back: the old one stays, byte for byte.
    broken = box.install("--extra-sshd-option", "NoSuchKeyword yes", check=False)
    assert broken.returncode != 0
    assert "NoSuchKeyword" in broken.stderr and "rolled back" in broken.stderr
    assert "restored the previous" in broken.stderr
    # (the directory's own mtime moves: the old file went aside and came back)
    assert differences(no_dir_mtimes(edited), snapshot(box.root, dir_mtimes=False)) == ""

    enroll_users_and_use_git(box)

    # 10,000 keys: sshd parses authorized_keys up to the key twice per connection, so a run
    # warns and recommends keys-command mode.
    fill_store_with_keys(box, 10_000 - 2)
    big = box.install()
    (warning,) = [line for line in big.stderr.splitlines() if "holds 10000 keys" in line]
    assert "twice per connection" in warning and "--mode keys-command" in warning
    assert len(authorized_keys_block(box)) == 10_000

    # Uninstall: the drop-in, the virtualenv, authorized_keys go; the state and the edited
    # policy stay (they are the admin's data) until --purge. Its dry run says exactly that,
    # and changes nothing.
    used = snapshot(box.root)
    planned = box.install("--uninstall", "--dry-run")
    assert differences(used, snapshot(box.root)) == ""
    removed = box.install("--uninstall")

    def steps(out: str, word: str) -> list[str]:
        return [line.split(word, 1)[1] for line in out.splitlines() if line.startswith(word)]

    assert steps(planned.stdout, "  would    ") == steps(removed.stdout, "  change   ") != []
    assert steps(planned.stdout, "  ok       ") == steps(removed.stdout, "  ok       ")
    assert not box.dropin.exists()
    assert not (box.prefix / "bin").exists()
    assert not box.authorized_keys.exists()
    assert (box.state / "gatekeeper.db").exists()
    assert box.config.read_text().endswith(TEST_POLICY)
    assert "kept the state directory" in removed.stdout
    assert "changed since the install" in removed.stdout
    assert not (box.repos / "project.git" / "hooks" / "pre-receive").exists()

    box.install("--uninstall", "--purge")
    # Nothing of it is left: the staging root is as before the install (the repository
    # got a push, and directories' mtimes moved).
    assert (
        differences(
            without_repository_data(no_dir_mtimes(before)),
            without_repository_data(snapshot(box.root, dir_mtimes=False)),
        )
        == ""
    )
    assert "nothing to uninstall" in box.install("--uninstall").stdout


# --------------------------------------------------------------------------------------------
# Fast checks: no virtualenv is made


def run_script(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=120,
        check=False,
    )


@pytest.fixture
def empty_root() -> Iterator[Path]:
    need_root()
    sshd.require_sshd()
    parent = _root_parent()
    root = Path(tempfile.mkdtemp(prefix=f"{ROOT_DIR_PREFIX}{os.getpid()}.", dir=parent))
    root.chmod(0o755)
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("mode", ["authorized-keys", "keys-command"])
def test_dry_run_on_a_fresh_root_prints_every_change_and_makes_none(
    empty_root: Path, mode: str
) -> None:
    result = run_script("--root", str(empty_root), "--user", "root", "--mode", mode, "--dry-run")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for expected in (
        f"would    create virtualenv {empty_root}/opt/gatekeeper",
        f"would    create policy file {empty_root}/etc/gatekeeper/config.yaml",
        f"would    create state directory {empty_root}/var/lib/gatekeeper (root:root 0700)",
        "would    run gatekeeper init as root",
        f"would    write {empty_root}/etc/ssh/sshd_config",
        f"would    write sshd drop-in {empty_root}/etc/ssh/sshd_config.d/10-gatekeeper.conf",
        "| MaxStartups 100:30:200",
        "| Match User root",
        "|     AcceptEnv GIT_PROTOCOL",
        "|     PasswordAuthentication no",
        "dry run: ",
    ):
        assert expected in out, out
    if mode == "keys-command":
        assert "|     AuthorizedKeysCommand " in out
        assert "|     AuthorizedKeysCommandUser root" in out
    else:
        assert f"|     AuthorizedKeysFile {empty_root}/root/.ssh/authorized_keys" in out
    assert "ForceCommand" not in out.replace("Never add ForceCommand", "")
    assert list(empty_root.iterdir()) == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--mode", "forced"], "--mode must be authorized-keys or keys-command"),
        (["--user", "Bad User"], "--user"),
        (["--prefix", "/opt/gate keeper"], "letters, digits and ./_+- only"),
        (["--repos", "/srv/../etc"], "no '.' or '..' components"),
        (["--extra-sshd-option", "ForceCommand /bin/sh"], "ForceCommand would override"),
        (["--extra-sshd-option", "Match User root"], "Match and Include"),
        (["--ssh-port", "70000"], "not a port number"),
        (["--purge"], "--purge goes with --uninstall"),
        (["--user", "no-such-user-here"], "with --root no system user is created"),
        (["--store", "mysql://gatekeeper@db/gk"], "unknown scheme"),
        (["--store", "postgresql://gatekeeper@db/gk?password=x"], "a password parameter"),
        (["--store", "postgresql://gk@db/gk", "--password-file", "/no/such/file"], "no such file"),
        (["--password-file", "/etc/hostname"], "--password-file goes with --store"),
        (["--server-key", "/no/such/server.key"], "--server-key '/no/such/server.key': no such"),
        (["--server-key", "/etc/hostname"], "not a server key"),
    ],
)
def test_bad_options_are_refused_before_anything_changes(
    empty_root: Path, args: list[str], message: str
) -> None:
    result = run_script("--root", str(empty_root), "--user", "root", *args)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr
    assert list(empty_root.iterdir()) == []


@pytest.mark.parametrize(
    ("host", "reason"),
    [
        ("vm", "it resolves only to a loopback address"),
        ("127.0.0.1", "it resolves only to a loopback address (127.0.0.1)"),
        ("localhost.localdomain", "localhost is every machine's own name for itself"),
        ("gatekeeper-no-such-host-here", "has no domain, and other machines rarely resolve"),
        ("git.example.com", None),
        ("192.0.2.10", None),
    ],
)
def test_a_host_users_cannot_reach_is_warned_about(
    empty_root: Path, host: str, reason: str | None
) -> None:
    if (
        host == "vm"
        and "vm"
        not in subprocess.run(
            ["getent", "ahosts", "vm"], capture_output=True, text=True, check=False
        ).stdout.split()
    ):
        reason = "has no domain"
    result = run_script(
        "--root",
        str(empty_root),
        "--user",
        "root",
        "--host",
        host,
        "--issuer",
        "ACME Git",
        "--dry-run",
    )
    assert result.returncode == 0, result.stderr
    assert f"host {host}, port 2222, issuer 'ACME Git')" in result.stdout
    warnings = [line for line in result.stderr.splitlines() if "WARNING  host " in line]
    if reason is None:
        assert warnings == []
    else:
        (warning,) = warnings
        assert f'users will be told to run "ssh root@{host} 2fa enroll"' in warning
        assert reason in warning and "pass --host with the name users clone from" in warning
    assert list(empty_root.iterdir()) == []


def test_the_issuer_defaults_to_the_host_and_is_checked(empty_root: Path) -> None:
    result = run_script(
        "--root", str(empty_root), "--user", "root", "--host", "git.example.org", "--dry-run"
    )
    assert "issuer 'git.example.org')" in result.stdout, result.stdout
    refused = run_script("--root", str(empty_root), "--user", "root", "--issuer", "Evil: Inc'")
    assert refused.returncode != 0 and "--issuer" in refused.stderr
    assert list(empty_root.iterdir()) == []


def test_a_password_in_the_store_url_is_refused_up_front_and_not_shown(empty_root: Path) -> None:
    for extra in ([], ["--dry-run"]):
        result = run_script(
            "--root",
            str(empty_root),
            "--user",
            "root",
            "--store",
            "postgresql://gatekeeper:s3cret-pw@db.example.com/gk",
            *extra,
        )
        assert result.returncode != 0
        assert "a password in the URL" in result.stderr, result.stderr
        assert "s3cret-pw" not in result.stdout + result.stderr
        assert list(empty_root.iterdir()) == []


def test_keys_command_under_a_world_writable_directory_is_refused_up_front(
    tmp_path: Path,
) -> None:
    need_root()
    sshd.require_sshd()
    # pytest's tmp_path is under /tmp (world-writable): sshd would never run the command.
    result = run_script("--root", str(tmp_path), "--user", "root", "--mode", "keys-command")
    assert result.returncode != 0
    assert "sshd would refuse AuthorizedKeysCommand" in result.stderr, result.stderr
    assert list(tmp_path.iterdir()) == []


def test_uninstall_without_an_install_changes_nothing(empty_root: Path) -> None:
    result = run_script("--root", str(empty_root), "--user", "root", "--uninstall")
    assert result.returncode == 0, result.stderr
    assert "nothing to uninstall" in result.stdout
    assert list(empty_root.iterdir()) == []


def test_help_lists_the_options() -> None:
    result = run_script("--help")
    assert result.returncode == 0
    for option in ("--mode", "--user", "--prefix", "--config", "--repos", "--root", "--dry-run"):
        assert option in result.stdout
    for option in ("--store URL", "--password-file FILE", "--server-key FILE", "--issuer NAME"):
        assert option in result.stdout
    assert "--uninstall" in result.stdout and "--purge" in result.stdout


def test_install_sh_is_shellcheck_clean() -> None:
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        if CI:
            pytest.fail("shellcheck is missing (scripts/test.sh installs it); CI=true")
        pytest.skip("shellcheck is not installed (scripts/test.sh installs it as root)")
    result = subprocess.run(
        [shellcheck, "--severity=style", str(SCRIPT)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.sshd
def test_keys_command_mode_rollback_then_install_use_and_purge(box: Box) -> None:
    box.repos.mkdir(parents=True)
    make_project(box)
    before = snapshot(box.root)

    # An sshd that rejects every configuration: the new drop-in is removed again, nothing is
    # reloaded, and the rest of the install stays for the next run.
    fake = box.tmp / "fake-sshd"
    fake.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = -t ]; then echo "fake sshd: rejecting the configuration" >&2; exit 255; fi\n'
        f'exec {box.sshd_bin} "$@"\n'
    )
    fake.chmod(0o755)
    failed = box.install("--mode", "keys-command", "--sshd", str(fake), check=False)
    assert failed.returncode != 0
    assert "fake sshd: rejecting the configuration" in failed.stderr
    assert "rolled back (removed " in failed.stderr
    assert not box.dropin.exists()
    assert not list(box.dropin.parent.iterdir())  # no backup or temporary file left either
    assert (box.prefix / "bin" / "gatekeeper").exists()

    fixed = box.install("--mode", "keys-command")
    assert "ok       virtualenv" in fixed.stdout  # installed by the failed run, kept
    # The shell AuthorizedKeysCommand (`gatekeeper keys-script`): root's, like sshd wants.
    command = f"{box.prefix}/bin/gatekeeper-keys %u %f"
    script = box.prefix / "bin" / "gatekeeper-keys"
    assert script.stat().st_uid == 0 and "gatekeeper-keys-script: 1" in script.read_text()
    assert dropin_directives(box) == [
        "MaxStartups 100:30:200",
        f"Match User {box.user}",
        "AuthorizedKeysFile none",
        f"AuthorizedKeysCommand {command}",
        f"AuthorizedKeysCommandUser {box.user}",
        "AcceptEnv GIT_PROTOCOL",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "PermitTTY no",
        "DisableForwarding yes",
    ]
    assert sshd.unsafe_path_reason(box.prefix / "bin" / "gatekeeper") is None
    assert sshd.unsafe_path_reason(script) is None
    assert not box.authorized_keys.exists()
    effective = effective_sshd(box, box.user).splitlines()
    assert f"authorizedkeyscommand {command}" in effective
    assert "forcecommand none" in effective
    assert "nothing to change" in box.install("--mode", "keys-command").stdout

    write_test_policy(box)
    enroll_users_and_use_git(box)

    # A plain run, as after a `git pull`, keeps the mode it recorded: no authorized_keys
    # block appears, the drop-in still runs keys-command.
    conf = box.prefix / "install.conf"
    assert "mode=keys-command" in conf.read_text().splitlines()
    kept = box.install()
    assert "mode keys-command (kept from the last run; --mode switches)" in kept.stdout
    assert "nothing to change" in kept.stdout and "change   " not in kept.stdout
    assert not box.authorized_keys.exists()
    assert f"AuthorizedKeysCommand {command}" in dropin_directives(box)

    # carol's key, added in keys-command mode, is in the block when the mode switches.
    _, carol_pub = sshd.generate_user_key(box.tmp / "keys", "carol")
    box.gk("user", "add", "carol")
    box.gk("key", "add", "carol", "-", input=carol_pub.read_text())
    switched = box.install("--mode", "authorized-keys")
    assert mode_switch_lines(switched) == [
        "switch from keys-command to authorized-keys mode: gatekeeper's block goes into "
        f"{box.authorized_keys}, and sshd will read it"
    ]
    assert f"AuthorizedKeysFile {box.authorized_keys}" in dropin_directives(box)
    assert len(authorized_keys_block(box)) == 3
    assert f"authorized_keys={box.authorized_keys}" in conf.read_text().splitlines()
    assert_users_reach_the_server(box, ["alice", "carol"])

    back = box.install("--mode", "keys-command")
    assert mode_switch_lines(back) == [
        "switch from authorized-keys to keys-command mode: sshd will run keys-command for "
        "each key, and gatekeeper's block leaves the authorized_keys file"
    ]
    assert f"remove authorized_keys {box.authorized_keys}" in back.stdout
    assert not box.authorized_keys.exists()  # install.sh made it, for the block alone
    assert "mode=keys-command" in conf.read_text().splitlines()
    assert_users_reach_the_server(box, ["alice", "carol"])

    # Uninstall removes this installation's compiled policies from the git account's cache,
    # not another installation's.
    cache = box.home / ".cache" / "gatekeeper"
    ours = sorted(cache.glob("policy-*"))
    assert ours, "the forced command caches the compiled policy"
    other = foreign_compiled_policy(box, cache)
    box.install("--uninstall", "--purge")
    assert other.exists() and not any(path.exists() for path in ours)
    # Nothing else is left but that file, the directories that hold it, and the manifest that
    # lists them for a later --uninstall --purge.
    left = differences(
        without_repository_data(no_dir_mtimes(before)),
        without_repository_data(snapshot(box.root, dir_mtimes=False)),
    )
    home = box.home.relative_to(box.root)
    kept = ("home", home, home / ".cache", home / ".cache" / "gatekeeper")
    manifest = ("opt", "opt/gatekeeper", "opt/gatekeeper/install-manifest")
    assert sorted(left.splitlines()) == sorted(
        f"+ {path}" for path in (*kept, other.relative_to(box.root), *manifest)
    )
    other.unlink()
    box.install("--uninstall", "--purge")
    assert (
        differences(
            without_repository_data(no_dir_mtimes(before)),
            without_repository_data(snapshot(box.root, dir_mtimes=False)),
        )
        == ""
    )


def fill_store_with_keys(box: Box, n: int) -> None:
    """`n` made-up keys of one user, straight into the store, as the git account."""
    script = """
import base64, hashlib, sqlite3, sys, time
db, n = sys.argv[1], int(sys.argv[2])
conn = sqlite3.connect(db, isolation_level=None, timeout=30)
now = int(time.time())
conn.execute("BEGIN IMMEDIATE")
user = conn.execute("INSERT INTO users (name, created_at) VALUES ('many', ?)", (now,)).lastrowid
rows = []
for i in range(n):
    raw = hashlib.sha256(b"install-test-key-%d" % i).digest()
    blob = b"\\0\\0\\0\\x0bssh-ed25519\\0\\0\\0\\x20" + raw
    fp = "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
    rows.append((user, fp, "ssh-ed25519", base64.b64encode(blob).decode(), 256, "", now))
conn.executemany(
    "INSERT INTO keys (user_id, fingerprint, key_type, blob, bits, comment, added_at)"
    " VALUES (?,?,?,?,?,?,?)",
    rows,
)
conn.execute("COMMIT")
"""
    subprocess.run(
        [
            "runuser",
            "-u",
            box.user,
            "--",
            str(box.prefix / "bin" / "python"),
            "-c",
            script,
            str(box.state / "gatekeeper.db"),
            str(n),
        ],
        check=True,
        capture_output=True,
        cwd="/",
        timeout=120,
    )


def mode_switch_lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    word = "  change   "
    return [
        line[len(word) :] for line in result.stdout.splitlines() if line.startswith(word + "switch")
    ]


def authorized_keys_block(box: Box) -> list[str]:
    text = box.authorized_keys.read_text()
    return [line for line in text.splitlines() if "gatekeeper-shell" in line]


def assert_users_reach_the_server(box: Box, names: list[str]) -> None:
    """Each user's key reaches gatekeeper through the staged sshd (`ssh git@HOST info`)."""
    with StagedSshd(box) as server:
        for name in names:
            result = server.client(box.tmp / "keys" / name).run("info")
            assert result.returncode == 0, f"{name}: {result.stderr}\nsshd log:\n{server.log()}"
            assert name in result.stdout, result.stdout


def foreign_compiled_policy(box: Box, cache: Path) -> Path:
    """Another installation's compiled policy in the git account's cache directory."""
    from gatekeeper.policy import load_policy

    other_config = box.tmp / "other-installation" / "config.yaml"
    other_config.parent.mkdir(parents=True)
    other_config.write_text(box.config.read_text() + "# another installation's policy\n")
    before = set(cache.iterdir())
    load_policy(other_config, cache_dir=cache)
    (made,) = set(cache.iterdir()) - before
    uid = pwd.getpwnam(box.user).pw_uid
    os.chown(made, uid, pwd.getpwnam(box.user).pw_gid)
    return made


# --------------------------------------------------------------------------------------------
# Two front-ends on one PostgreSQL store


@pytest.mark.sshd
def test_second_front_end_on_a_shared_postgresql_store(
    tmp_path: Path,
    source_copy: Path,
    postgres_server: PostgresServer,
    postgres_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Only the password file install.sh puts in place: no PGPASSFILE from the fixture.
    monkeypatch.delenv("PGPASSFILE", raising=False)
    password = postgres_server.password_file
    pg = ["--store", postgres_url, "--password-file", str(password)]
    with (
        staging_box(tmp_path / "first", source_copy) as first,
        staging_box(tmp_path / "second", source_copy) as second,
    ):
        installed = first.install(*pg)
        assert "install gatekeeper[postgres]" in installed.stdout
        assert "created store: postgresql://" in installed.stdout
        # authorized_keys mode on a shared store: a key added on another front-end would be
        # refused here until this host's file is rewritten; install.sh says so.
        (warning,) = [line for line in installed.stderr.splitlines() if "shared PostgreSQL" in line]
        assert "--mode keys-command finds such a key in the shared database" in warning
        # The policy points at the store, with the password file install.sh put in place:
        # the git user's alone, and listed for --uninstall.
        password_dest = first.root / "etc" / "gatekeeper" / "db.password"
        store_line = f"  store: '{postgres_url}?password_file={password_dest}'"
        assert store_line in first.config.read_text().splitlines()
        st = password_dest.stat()
        git_uid = pwd.getpwnam(first.user).pw_uid
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (git_uid, 0o600)
        assert password_dest.read_bytes() == password.read_bytes()
        assert f"file {password_dest} " in (first.prefix / "install-manifest").read_text()
        assert not (first.state / "gatekeeper.db").exists()
        # alice is added and starts enrolling on the first front-end.
        first.gk("user", "add", "alice")
        secret = secret_from(first.gk("2fa", "enroll", "alice", "--no-qr").stdout)

        # The second front-end: same store, the first one's server key. A dry run lists it all.
        key = ["--server-key", str(first.state / "server.key")]
        before = snapshot(second.root)
        dry = second.install(*pg, *key, "--mode", "keys-command", "--dry-run")
        for expected in (
            "would    create virtualenv",
            "install gatekeeper[postgres]",
            f"would    install store password file {second.root}/etc/gatekeeper/db.password",
            f"would    install server key {second.state}/server.key",
            "would    run gatekeeper init",
        ):
            assert expected in dry.stdout, dry.stdout
        assert differences(before, snapshot(second.root)) == ""
        joined = second.install(*pg, *key, "--mode", "keys-command")
        assert "store is up to date: postgresql://" in joined.stdout
        assert "shared PostgreSQL" not in joined.stderr
        assert (second.state / "server.key").read_bytes() == (
            first.state / "server.key"
        ).read_bytes()
        # Again: nothing to change (the store is ready, the key and password file in place).
        ready = snapshot(second.root)
        again = second.install(*pg, *key)
        assert "nothing to change" in again.stdout and "change   " not in again.stdout
        assert "is at this gatekeeper's schema" in again.stdout
        assert differences(ready, snapshot(second.root)) == ""

        # They agree: the second decrypts the secret the first encrypted (same server key)
        # and confirms alice; both see her enrolled.
        code = totp.current_code(secret, time.time())
        second.gk("2fa", "confirm", "alice", code)
        for front_end in (first, second):
            status = json.loads(front_end.gk("2fa", "status", "--json").stdout)
            assert [(row["user"], row["state"]) for row in status] == [("alice", "enrolled")]

        # A key added on the first front-end works on the second at once: in keys-command
        # mode the second's key index misses it and the lookup falls back to the database.
        _, alice_pub = sshd.generate_user_key(second.tmp / "keys", "alice")
        first.gk("key", "add", "alice", "-", input=alice_pub.read_text())
        assert_users_reach_the_server(second, ["alice"])

        # A different server key is refused before anything changes.
        other = tmp_path / "other.key"
        other.write_bytes(os.urandom(32))
        used = snapshot(second.root)
        refused = second.install(*pg, "--server-key", str(other), check=False)
        assert refused.returncode != 0
        assert "differs from --server-key" in refused.stderr and "not replaced" in refused.stderr
        assert differences(used, snapshot(second.root)) == ""

        # --uninstall removes the password file it installed; the shared store stays.
        removed = second.install("--uninstall")
        assert f"remove file {second.root}/etc/gatekeeper/db.password" in removed.stdout
        assert not (second.root / "etc" / "gatekeeper" / "db.password").exists()
        status = json.loads(first.gk("2fa", "status", "--json").stdout)
        assert [(row["user"], row["state"]) for row in status] == [("alice", "enrolled")]


@pytest.mark.parametrize(
    ("version", "said"),
    [
        ("OpenSSH_9.2p1 Debian-2+deb12u3, OpenSSL 3.0.15", None),
        ("OpenSSH_8.2p1 Ubuntu-4ubuntu0.11, OpenSSL 1.1.1f", "security keys need 8.4"),
        ("OpenSSH_7.1p2, OpenSSL 1.0.2", "is too old: gatekeeper's key lines need 7.2"),
    ],
)
def test_the_sshd_version_is_checked(
    empty_root: Path, tmp_path: Path, version: str, said: str | None
) -> None:
    """Security keys need OpenSSH 8.4 (verify-required); the lines need 7.2 (restrict)."""
    fake = tmp_path / "sshd"
    fake.write_text(f"#!/bin/sh\necho '{version}' >&2\nexit 1\n")
    fake.chmod(0o755)
    result = run_script(
        "--root", str(empty_root), "--user", "root", "--sshd", str(fake), "--dry-run"
    )
    output = result.stdout + result.stderr
    if said is None:
        assert "security keys need" not in output and "too old" not in output
    else:
        assert said in output, output
    if "too old" in (said or ""):
        assert result.returncode != 0
