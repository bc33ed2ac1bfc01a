"""scripts/install.sh as a sysadmin runs it on a Debian box: real paths, no --root.

The other install tests stage everything under `--root`, where install.sh never reloads
sshd, never creates a user and never meets a box's own sshd_config. Here it runs without
`--root`, at the real paths, in a throwaway copy of the box: a private mount namespace
(`unshare --mount`, private propagation) in which

- /etc, /var and /opt are overlays of the host's: everything the box has is there (the
  init scripts, PAM, pip's local indexes), and every write lands in a throwaway upper
  directory, the git account's /etc/passwd line included;
- /etc/ssh, /home, /srv and /run are fresh tmpfs: /etc/ssh gets Debian's stock
  sshd_config on a free loopback port (the network is the host's) and a new host key,
  /run has no sshd pid file and no privilege separation directory, as after a boot
  without systemd;
- /usr stays the host's, with the real sshd.

The box is driven from outside with `nsenter`; files are read and written through
/proc/PID/root. It installs in authorized_keys mode, starts sshd with the very command
install.sh prints, clones and pushes as users, switches to keys-command mode and back
(sshd reloaded each time, with its pid), runs again with nothing to change, sends 50
clients at once, uninstalls and reinstalls. The host's /etc/ssh, users and /opt are
checked to be untouched. Needs root, `unshare` and `nsenter` (util-linux): it skips
without them, and fails instead under CI=true.
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_install import CI, TEST_POLICY, need_root, secret_from, source_copy

from gatekeeper import totp
from testing import sshd
from testing.net import free_port

pytestmark = [pytest.mark.sshd, pytest.mark.slow]

__all__ = ["source_copy"]  # the module's fixture: a snapshot of the checkout to install

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = REPO_ROOT / "scripts" / "install.sh"
GK = "/opt/gatekeeper/bin/gatekeeper"
CONFIG = "/etc/gatekeeper/config.yaml"
AUTHORIZED_KEYS = "/home/git/.ssh/authorized_keys"
DROPIN = "/etc/ssh/sshd_config.d/10-gatekeeper.conf"
OVERLAID = ("etc", "var", "opt")
FRESH = ("/etc/ssh", "/home", "/srv", "/run")
# Debian's stock sshd_config (openssh-server), on a test port.
STOCK_SSHD_CONFIG = """\
Include /etc/ssh/sshd_config.d/*.conf
Port {port}
ListenAddress 127.0.0.1
HostKey /etc/ssh/ssh_host_ed25519_key
KbdInteractiveAuthentication no
UsePAM yes
X11Forwarding yes
PrintMotd no
AcceptEnv LANG LC_*
Subsystem\tsftp\t/usr/lib/openssh/sftp-server
"""


def need_tools() -> None:
    missing = [tool for tool in ("unshare", "nsenter", "findmnt") if shutil.which(tool) is None]
    if missing:
        message = "needs " + ", ".join(missing) + " (util-linux)"
        if CI:
            pytest.fail(message + " (CI=true: not skipping)")
        pytest.skip(message)


def tree_digest(top: str) -> dict[str, tuple[object, ...]]:
    """path -> (mode, uid, gid, mtime, content digest) of everything under `top`."""
    result: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in [*dirnames, *filenames]:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            digest = ""
            if os.path.isfile(path) and not os.path.islink(path):
                digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
            result[path] = (st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns, digest)
    return result


@dataclass
class Endpoint:
    """What sshd.SshClient needs of a server."""

    port: int
    user: str = "git"


class Box:
    """A private mount namespace holding a throwaway copy of this machine (see above)."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.upper = tmp / "namespace"
        self.upper.mkdir()
        self.port = free_port()
        self.holder: subprocess.Popen[str] | None = None
        self.clients = 0

    def __enter__(self) -> Box:
        hide = " ".join(  # a gatekeeper installed on the host itself stays out of sight
            path
            for path in ("/etc/gatekeeper", "/var/lib/gatekeeper", "/opt/gatekeeper")
            if os.path.exists(path)
        )
        script = f"""
set -eu
mount -t tmpfs -o mode=0700 gatekeeper-box {self.upper}
for d in {" ".join(OVERLAID)}; do
    mkdir -p {self.upper}/$d/upper {self.upper}/$d/work
    mount -t overlay gatekeeper-box \\
        -o lowerdir=/$d,upperdir={self.upper}/$d/upper,workdir={self.upper}/$d/work /$d
    [ "$(findmnt -n -o FSTYPE /$d)" = overlay ]
done
for d in {" ".join(FRESH)} {hide}; do
    mount -t tmpfs -o mode=0755 gatekeeper-box $d
done
echo ready
exec sleep 3600
"""
        self.holder = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd="/",
        )
        assert self.holder.stdout is not None
        if self.holder.stdout.readline().strip() != "ready":
            self.holder.wait(timeout=10)
            assert self.holder.stderr is not None
            message = f"cannot set up the mount namespace: {self.holder.stderr.read().strip()}"
            if CI:
                pytest.fail(message)
            pytest.skip(message)
        self.path("/etc/ssh/sshd_config.d").mkdir()
        self.path("/etc/ssh/sshd_config").write_text(STOCK_SSHD_CONFIG.format(port=self.port))
        self.run(
            "ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", "/etc/ssh/ssh_host_ed25519_key"
        )
        # OpenSSH 9.8+ penalises a source that fails to log in: not on loopback. (sshd -t
        # cannot tell: it checks nothing without /run/sshd, which install.sh is to make.)
        version = self.run(sshd.require_sshd(), "-V", check=False).stderr
        found = re.search(r"OpenSSH_(\d+)\.(\d+)", version)
        if found and (int(found.group(1)), int(found.group(2))) >= (9, 8):
            with self.path("/etc/ssh/sshd_config").open("a") as fh:
                fh.write("PerSourcePenalties no\n")
        return self

    def __exit__(self, *exc: object) -> None:
        """Stop every process in the namespace (the holder, the sshd it started); the
        mounts go with the last of them."""
        if self.holder is None:
            return
        namespace = os.readlink(f"/proc/{self.holder.pid}/ns/mnt")
        for sig in (15, 9):
            for pid in self.processes(namespace):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + 5
            while self.processes(namespace) and time.monotonic() < deadline:
                self.holder.poll()
                time.sleep(0.05)
        self.holder.wait(timeout=10)
        self.holder = None

    @staticmethod
    def processes(namespace: str) -> list[int]:
        found = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    if os.readlink(f"/proc/{entry}/ns/mnt") == namespace:
                        found.append(int(entry))
                except OSError:
                    continue
        return [pid for pid in found if pid != os.getpid()]

    def path(self, inside: str) -> Path:
        """A path of the box, seen from outside."""
        assert self.holder is not None
        return Path(f"/proc/{self.holder.pid}/root{inside}")

    def run(
        self, *argv: str, input: str | None = None, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        assert self.holder is not None
        result = subprocess.run(
            ["nsenter", "--target", str(self.holder.pid), "--mount", "--wd", "--", *argv],
            input=input,
            stdin=subprocess.DEVNULL if input is None else None,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"{shlex.join(argv)}: {result.returncode}\n{result.stderr}")
        return result

    def install(self, source: Path, *args: str) -> subprocess.CompletedProcess[str]:
        started = time.monotonic()
        result = self.run("bash", str(SCRIPT), "--source", str(source), *args, timeout=600)
        print(f"$ install.sh {shlex.join(args)}  ({time.monotonic() - started:.1f} s)")
        print(result.stdout + result.stderr)
        return result

    def gk(self, *args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
        """The installed CLI as the git account, as the README says to run it."""
        return self.run("runuser", "-u", "git", "--", GK, *args, input=input)

    def sshd_pid(self) -> int:
        return int(self.path("/run/sshd.pid").read_text())

    def wait_for_sshd(self) -> None:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex((sshd.HOST, self.port)) == 0:
                    return
            time.sleep(0.05)
        raise AssertionError(f"nothing listens on {sshd.HOST}:{self.port}")

    def client(self, key: Path) -> sshd.SshClient:
        self.clients += 1
        home = self.tmp / f"client-{self.clients}"
        home.mkdir()
        return sshd.SshClient(Endpoint(self.port), key, "git", home=home)  # type: ignore[arg-type]


@pytest.fixture
def box(tmp_path: Path) -> Iterator[Box]:
    need_root()
    sshd.require_sshd()
    need_tools()
    host_ssh = tree_digest("/etc/ssh")
    host_git = git_account()
    host_paths = {p: os.path.exists(p) for p in ("/opt/gatekeeper", "/etc/gatekeeper", "/srv/git")}
    with Box(tmp_path) as made:
        yield made
    # The host is as it was: its sshd configuration, its users, its /opt and /etc.
    assert tree_digest("/etc/ssh") == host_ssh
    assert git_account() == host_git
    assert {p: os.path.exists(p) for p in host_paths} == host_paths


def git_account() -> str:
    """The host's `git` account, if any (other tests add and remove their own meanwhile)."""
    return subprocess.run(["getent", "passwd", "git"], capture_output=True, text=True).stdout


def readme_admin_commands() -> list[str]:
    """The commands README's "Install on a git box" gives the admin to run as the git
    account, in its order."""
    text = (REPO_ROOT / "README.md").read_text()
    section = text.split("\n## Install on a git box\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"^```\n(.*?)^```$", section, re.M | re.S)
    return [
        line
        for block in blocks
        for line in block.splitlines()
        if line.startswith(("runuser ", "sudo "))
    ]


def changes(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [line[11:] for line in result.stdout.splitlines() if line.startswith("  change   ")]


def warnings(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [line[11:] for line in result.stderr.splitlines() if line.startswith("  WARNING  ")]


def reloaded_pid(result: subprocess.CompletedProcess[str]) -> int:
    """The pid install.sh says it sent SIGHUP to; never an empty one, never cat's error."""
    assert "No such file" not in result.stderr, result.stderr
    (pid,) = re.findall(r"change   reloaded sshd \(SIGHUP to (\d+)\)", result.stdout)
    return int(pid)


def test_install_on_a_box_without_systemd_use_switch_uninstall_reinstall(
    box: Box, source_copy: Path
) -> None:
    keys = box.tmp / "keys"
    alice_key, _ = sshd.generate_user_key(keys, "alice")  # alice.pub, for the README
    bob_key, bob_pub = sshd.generate_user_key(keys, "bob")
    carol_key, carol_pub = sshd.generate_user_key(keys, "carol")

    # 1. The first run, as root, with sshd installed but not running (no systemd).
    first = box.install(source_copy, "--issuer", "Box Git")
    assert first.returncode == 0
    assert "create system user git (home /home/git, shell /bin/sh, no password)" in changes(first)
    assert (
        "create sshd's privilege separation directory /run/sshd (root 0755), which sshd -t needs"
        in changes(first)
    )
    (not_running,) = [w for w in warnings(first) if "sshd is not running" in w]
    start = not_running.split("start it with: ", 1)[1]
    # The command it names starts sshd, pasted as it is.
    box.run(*shlex.split(start))
    box.wait_for_sshd()

    # 2. The admin, as the README says, pasted (with alice.pub at hand, NAME a repository's
    #    name): a user, a key (no --authorized-keys: the CLI rewrites the file install.sh
    #    recorded), a repository with its hook. Then bob, and the teams.
    commands = readme_admin_commands()
    assert [c.split(" -- ", 1)[0] for c in commands] == ["runuser -u git"] * len(commands)
    assert any("git init --bare" in c for c in commands), commands
    for command in commands:
        pasted = box.run("sh", "-c", f"cd {keys} && {command.replace('NAME', 'project')}")
        assert "sshd may not see" not in pasted.stderr, pasted.stderr
    assert box.path("/srv/git/project.git/hooks/pre-receive").is_file()
    box.gk("user", "add", "bob")
    box.gk("key", "add", "bob", "-", input=bob_pub.read_text())
    enrolled = box.gk("2fa", "enroll", "alice", "--no-qr")
    assert "issuer=Box%20Git" in enrolled.stdout
    box.gk("2fa", "confirm", "alice", totp.current_code(secret_from(enrolled.stdout), time.time()))
    config = box.path(CONFIG)
    text = config.read_text()
    config.write_text(text[: text.index("\nteams:") + 1] + TEST_POLICY)

    # 3. alice pushes the first commit and clones it; bob, not enrolled, is refused.
    alice = box.client(alice_key)
    work = box.tmp / "work"
    alice.git("init", "-q", "-b", "main", str(work))
    (work / "README.md").write_text("# project\n")
    assert alice.git("add", "README.md", cwd=work).returncode == 0
    assert alice.git("commit", "-qm", "initial", cwd=work).returncode == 0
    pushed = alice.git("push", alice.url("project"), "main", cwd=work)
    assert pushed.returncode == 0, pushed.stderr
    clone = alice.git("clone", "-q", alice.url("project"), str(box.tmp / "clone"))
    assert clone.returncode == 0, clone.stderr
    assert (box.tmp / "clone" / "README.md").read_text() == "# project\n"
    bob = box.client(bob_key)
    refused = bob.git("ls-remote", bob.url("project"))
    assert refused.returncode != 0 and "have not enrolled" in refused.stderr, refused.stderr

    # 4. Again, as after a `git pull`: nothing to change.
    again = box.install(source_copy)
    assert "nothing to change" in again.stdout and changes(again) == []

    # 5. keys-command mode: one line says so; sshd is reloaded (its pid, never an empty
    #    one); gatekeeper's block leaves authorized_keys, which install.sh made for it.
    switched = box.install(source_copy, "--mode", "keys-command")
    assert [c for c in changes(switched) if c.startswith("switch")] == [
        "switch from authorized-keys to keys-command mode: sshd will run keys-command for "
        "each key, and gatekeeper's block leaves the authorized_keys file"
    ]
    assert reloaded_pid(switched) == box.sshd_pid()
    assert not box.path(AUTHORIZED_KEYS).exists()
    assert "AuthorizedKeysCommand " in box.path(DROPIN).read_text()
    assert alice.git("ls-remote", alice.url("project")).returncode == 0
    # A key added now works at once (the key index), without another install.sh run.
    box.gk("user", "add", "carol")
    box.gk("key", "add", "carol", "-", input=carol_pub.read_text())
    carol = box.client(carol_key)
    assert "carol" in carol.run("info").stdout
    # 50 clients at once, as a CI farm sends them: every one gets in (MaxStartups).
    with ThreadPoolExecutor(max_workers=50) as pool:
        results = list(
            pool.map(lambda _: alice.git("ls-remote", alice.url("project"), timeout=120), range(50))
        )
    failed = [r.stderr for r in results if r.returncode != 0]
    assert failed == [], f"{len(failed)} of 50 failed, e.g.: {failed[0]}"
    # A plain run keeps keys-command mode.
    kept = box.install(source_copy)
    assert "mode keys-command (kept from the last run; --mode switches)" in kept.stdout
    assert "nothing to change" in kept.stdout

    # 6. Back to authorized_keys mode: the block holds every key, carol's too.
    back = box.install(source_copy, "--mode", "authorized-keys")
    assert reloaded_pid(back) == box.sshd_pid()
    block = box.path(AUTHORIZED_KEYS).read_text()
    assert block.count("gatekeeper-shell") == 3
    assert "carol" in carol.run("info").stdout

    # 7. Uninstall: sshd no longer sends the git account to gatekeeper; the store stays.
    removed = box.install(source_copy, "--uninstall")
    assert reloaded_pid(removed) == box.sshd_pid()
    assert not box.path(DROPIN).exists() and not box.path("/opt/gatekeeper/bin").exists()
    assert box.path("/var/lib/gatekeeper/gatekeeper.db").exists()
    denied = alice.git("ls-remote", alice.url("project"))
    assert denied.returncode != 0 and "Permission denied" in denied.stderr, denied.stderr

    # 8. Reinstall: the users and keys the store kept work again.
    reinstalled = box.install(source_copy)
    assert reinstalled.returncode == 0
    assert "run gatekeeper migrate as git (new gatekeeper, existing store)" in changes(reinstalled)
    assert alice.git("ls-remote", alice.url("project")).returncode == 0

    # 9. Purge: the git account goes too (from the box's /etc/passwd).
    purged = box.install(source_copy, "--uninstall", "--purge")
    assert "delete user git" in changes(purged)
    assert "\ngit:" not in "\n" + box.path("/etc/passwd").read_text()
    assert not box.path(CONFIG).exists()
