"""keys-command as a least-privilege AuthorizedKeysCommandUser, and what it says in a fault.

The threat model recommends an AuthorizedKeysCommandUser that can read and nothing
more. An outside attack found that it could not even do that: the lookup opened the
database for writing and printed nothing. Here sshd runs `keys-command` as a real
unprivileged system user that is given only what docs/install.md says (search permission
on the state directory, the key index's group), with the git account's own files
(database, server key) unreadable to it; then with the database readable too and the
index gone, with and without a WAL file, on SQLite and PostgreSQL.

And the faults: a truncated database or an invalid policy used to leave a user of
AuthorizedKeysCommand mode with "Permission denied (publickey)". A key the index knows
now reaches the forced command, which says the server is at fault; an unknown key is
still denied, and nothing is ever granted.
"""

from __future__ import annotations

import grp
import itertools
import os
import shutil
import sqlite3
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_install import _root_parent, need_root

from testing import sshd
from testing.installation import GATEKEEPER_SHELL, Installation, password_file_url

pytestmark = pytest.mark.sshd

SOURCE = Path(__file__).resolve().parent.parent
SYSTEM_PYTHON = "/usr/bin/python3"
POLICY = """\
teams:
  dev:
    members: [alice]
repositories:
  - match: app
    read: [dev]
    write: [dev]
"""
_counter = itertools.count(1)


class Box:
    """An installation under a root-owned directory an unprivileged user can traverse,
    a system user for sshd's AuthorizedKeysCommandUser, and the sshd."""

    def __init__(self, base: Path, store_url: str = "") -> None:
        self.base = base
        self.keys_user = f"gkk{os.getpid()}x{next(_counter)}"
        subprocess.run(
            [
                *("useradd", "--system", "--user-group", "--no-create-home"),
                *("--home-dir", "/", "--shell", "/usr/sbin/nologin", self.keys_user),
            ],
            check=True,
            capture_output=True,
        )
        self.group = grp.getgrnam(self.keys_user).gr_gid
        self.inst = Installation(base / "gk", POLICY, user=sshd.current_user(), store_url=store_url)
        for path in (base / "gk", self.inst.repos, self.inst.keys):
            path.chmod(0o755)
        self.inst.init()
        self.alice, _ = self.inst.add_user("alice")
        self.inst.repo("app")
        self.server: sshd.SshServer | None = None

    def grant_index(self) -> None:
        """What docs/install.md tells an admin to give the AuthorizedKeysCommandUser."""
        state = self.inst.state
        os.chown(state, -1, self.group)
        state.chmod(0o710)
        index = state / "keyindex"
        os.chown(index, -1, self.group)
        for entry in index.iterdir():
            os.chown(entry, -1, self.group)

    def wrapper(self) -> Path:
        """keys-command under the system Python (the test virtualenv's interpreter sits
        in a directory only root can enter), from this checkout; the lines it prints
        run the test virtualenv's forced command."""
        bin_dir = self.base / "bin"
        bin_dir.mkdir(mode=0o755)
        (bin_dir / "python3").symlink_to(SYSTEM_PYTHON)
        shell = bin_dir / "gatekeeper-shell"
        shell.write_text(f'#!/bin/sh\nexec {GATEKEEPER_SHELL} "$@"\n')
        shell.chmod(0o755)
        code = (
            f"import sys; sys.path.insert(0, {str(SOURCE)!r}); sys.argv[0] = 'gatekeeper'; "
            "from gatekeeper.entry import run_script; run_script()"
        )
        return sshd.make_keys_command_wrapper(
            f'#!/bin/sh\nexec {bin_dir / "python3"} -I -c "{code}" '
            f'--config {self.inst.config} keys-command "$@"\n'
        )

    def start(self) -> None:
        self.server = sshd.SshServer(
            keys_command=[str(self.wrapper()), "%u", "%t", "%k"],
            keys_command_user=self.keys_user,
            tmp_dir=self.base,
        )
        self.server.start()
        self.inst.write_policy(
            POLICY, host="127.0.0.1", port=self.server.port, user=self.server.user
        )

    def ls_remote(self, key: Path) -> subprocess.CompletedProcess[str]:
        assert self.server is not None
        client = self.server.client(key)
        return client.git("ls-remote", client.url("app"))

    def can_read(self, path: Path) -> bool:
        probe = subprocess.run(
            ["runuser", "-u", self.keys_user, "--", "head", "-c1", str(path)],
            capture_output=True,
            check=False,
        )
        return probe.returncode == 0

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()
        subprocess.run(["userdel", self.keys_user], capture_output=True, check=False)


@pytest.fixture
def make_box(tmp_path: Path) -> Iterator[object]:
    need_root()
    if not Path(SYSTEM_PYTHON).exists():
        pytest.fail(f"{SYSTEM_PYTHON} is needed to run keys-command as another user")
    made: list[Box] = []
    parent = _root_parent()
    bases: list[Path] = []

    def make(store_url: str = "") -> Box:
        base = Path(tempfile.mkdtemp(prefix="gatekeeper-keys-test.", dir=parent))
        base.chmod(0o755)
        bases.append(base)
        box = Box(base, store_url)
        made.append(box)
        return box

    yield make
    for box in made:
        box.close()
    for base in bases:
        shutil.rmtree(base, ignore_errors=True)


def test_the_lookup_needs_only_the_key_index(make_box: object) -> None:
    box = make_box()  # type: ignore[operator]
    box.grant_index()
    box.start()
    db = box.inst.state / "gatekeeper.db"
    assert not box.can_read(db)
    assert not box.can_read(box.inst.state / "server.key")
    ok = box.ls_remote(box.alice)
    assert ok.returncode == 0, ok.stderr
    assert "refs/heads/main" in ok.stdout
    stranger, _ = sshd.generate_user_key(box.base, "stranger")
    denied = box.ls_remote(stranger)
    assert denied.returncode != 0 and "Permission denied" in denied.stderr


@pytest.mark.parametrize("wal", [False, True], ids=["no-wal", "wal"])
def test_without_the_index_a_readable_database_is_read_read_only(
    make_box: object, wal: bool
) -> None:
    box = make_box()  # type: ignore[operator]
    box.grant_index()
    shutil.rmtree(box.inst.state / "keyindex")
    state = box.inst.state
    state.chmod(0o2710)  # new files (the -wal and -shm) take the group
    db = state / "gatekeeper.db"
    os.chown(db, -1, box.group)
    db.chmod(0o640)
    box.start()
    holder = None
    if wal:
        holder = sqlite3.connect(db)
        holder.execute("PRAGMA journal_mode=WAL")
        holder.execute("CREATE TABLE IF NOT EXISTS probe (x)")
        holder.commit()
        assert (state / "gatekeeper.db-wal").exists()
        assert box.can_read(state / "gatekeeper.db-shm")
    else:
        assert not (state / "gatekeeper.db-wal").exists()
    try:
        ok = box.ls_remote(box.alice)
        assert ok.returncode == 0, ok.stderr
    finally:
        if holder is not None:
            holder.close()
    assert not box.can_read(state / "server.key")


def test_on_postgres_the_index_serves_and_a_readable_password_file_covers_a_miss(
    make_box: object, postgres_server: object, postgres_url: str
) -> None:
    url = password_file_url(postgres_server, postgres_url)
    box = make_box(store_url=url)  # type: ignore[operator]
    box.grant_index()
    box.start()
    ok = box.ls_remote(box.alice)
    assert ok.returncode == 0, ok.stderr
    # A key added on another front-end: in the shared database, not in this host's index.
    bob, _ = box.inst.add_user("bob")
    from gatekeeper import keyindex

    fingerprint = box.inst.audit(event="key-add", user="bob")[0]["key_fp"]
    entry = keyindex.entry_name(fingerprint)
    assert entry is not None
    (box.inst.state / "keyindex" / entry).unlink()
    missed = box.ls_remote(bob)
    assert missed.returncode != 0 and "Permission denied" in missed.stderr
    # Its group may read the password file: then a miss is looked up in the database.
    password = box.base / "db.password"
    shutil.copy(url.split("password_file=", 1)[1], password)
    os.chown(password, -1, box.group)
    password.chmod(0o640)
    box.inst.store_url = url.split("?", 1)[0] + f"?password_file={password}"
    assert box.server is not None
    box.inst.write_policy(POLICY, host="127.0.0.1", port=box.server.port, user=box.server.user)
    found = box.ls_remote(bob)  # reaches the forced command: bob is in no team
    assert "Permission denied" not in found.stderr
    assert "repository 'app.git' not found" in found.stderr


@pytest.mark.parametrize("fault", ["truncated-database", "tab-in-policy"])
def test_a_known_key_hears_the_server_is_at_fault(make_box: object, fault: str) -> None:
    box = make_box()  # type: ignore[operator]
    box.grant_index()
    box.start()
    if fault == "truncated-database":
        (box.inst.state / "gatekeeper.db").write_bytes(b"")
        said = "the server cannot read its 2FA state right now"
    else:
        text = box.inst.config.read_text()
        box.inst.config.write_text(text.replace("  dev:", "\tdev:"))
        said = "the server's policy file is invalid or unreadable"
    refused = box.ls_remote(box.alice)
    assert refused.returncode != 0
    assert said in refused.stderr, refused.stderr
    assert "refs/heads" not in refused.stdout
    stranger, _ = sshd.generate_user_key(box.base, "stranger")
    denied = box.ls_remote(stranger)
    assert "Permission denied" in denied.stderr and said not in denied.stderr
