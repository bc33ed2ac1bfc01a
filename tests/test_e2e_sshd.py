"""End to end through a real OpenSSH sshd and the real git client.

Both ways of plugging gatekeeper into OpenSSH are exercised: an authorized_keys file
written by `gatekeeper authorized-keys`, and `AuthorizedKeysCommand` running
`gatekeeper keys-command`. Each test tells one user's story.
"""

from __future__ import annotations

import re
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest

from gatekeeper import totp
from testing import sshd
from testing.fronts import sshd_front
from testing.installation import DEFAULT_POLICY, Installation, password_file_url

pytestmark = pytest.mark.sshd


class Site:
    """A gatekeeper installation served by a real sshd, with users alice, bob, carol."""

    def __init__(self, inst: Installation, server: sshd.SshServer) -> None:
        self.inst = inst
        self.server = server
        self.keys: dict[str, Path] = {}

    def client(self, name: str) -> sshd.SshClient:
        return self.server.client(self.keys[name])

    def clone(self, name: str, repo: str, dest: Path) -> tuple[int, str]:
        result = self.client(name).git("clone", self.client(name).url(repo), str(dest))
        return result.returncode, result.stderr


def start_site(
    tmp_path: Path, mode: str, policy: str = DEFAULT_POLICY, store_url: str = ""
) -> Iterator[Site]:
    inst = Installation(
        tmp_path / "gk", policy, user=sshd.current_user(), store_url=store_url
    ).init()
    keys: dict[str, Path] = {}
    for name in ("alice", "bob", "carol"):
        keys[name], _ = inst.add_user(name)
    inst.repo("platform/api")
    inst.repo("platform/secrets")
    inst.repo("docs")
    server = sshd_front(inst, mode, tmp_path)
    with server:
        # Messages name the host and port users connect to: this sshd's.
        inst.write_policy(policy, host="127.0.0.1", port=server.port, user=server.user)
        site = Site(inst, server)
        site.keys = keys
        yield site


@pytest.fixture(params=["authorized-keys", "keys-command"])
def site(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Site]:
    yield from start_site(tmp_path, request.param)


@pytest.fixture
def ak_site(tmp_path: Path) -> Iterator[Site]:
    yield from start_site(tmp_path, "authorized-keys")


@pytest.fixture
def pg_site(tmp_path: Path, postgres_server: object, postgres_url: str) -> Iterator[Site]:
    url = password_file_url(postgres_server, postgres_url)
    yield from start_site(tmp_path, "keys-command", store_url=url)


def test_a_postgres_store_gates_clone_and_push_through_sshd(pg_site: Site, tmp_path: Path) -> None:
    """The same story with the state in PostgreSQL: sshd's keys-command and the forced
    command both read it, the pre-receive hook re-checks the push against it."""
    refused, err = pg_site.clone("bob", "platform/api", tmp_path / "no")
    assert refused != 0 and "2fa enroll" in err
    pg_site.inst.enroll("bob")
    bob = pg_site.client("bob")
    work = tmp_path / "work"
    rc, err = pg_site.clone("bob", "platform/api", work)
    assert rc == 0, err
    (work / "f.txt").write_text("x\n")
    assert bob.git("add", "f.txt", cwd=work).returncode == 0
    assert bob.git("commit", "-qm", "f", cwd=work).returncode == 0
    push = bob.git("push", "origin", "main", cwd=work)
    assert push.returncode == 0, push.stderr
    reasons = [r["reason"] for r in pg_site.inst.audit(event="access", user="bob")]
    assert reasons == ["2fa-not-enrolled", "allowed", "allowed"]
    assert pg_site.inst.gk("log", "verify").returncode == 0


# -- a busy store: the client learns that, the server log learns the rest ----------------------

BUSY = [
    "gatekeeper: access refused: the server's 2FA state is busy right now.",
    "gatekeeper: hint: try again in a moment; if it persists, tell an administrator.",
]


def gatekeeper_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("gatekeeper:")]


def busy_story(site: Site, tmp_path: Path, hold: Any) -> tuple[list[str], list[str], str]:
    """bob clones and verifies while another connection holds the store's write lock:
    what git and ssh showed him, and the server log afterwards."""
    site.inst.enroll("bob")
    code = site.inst.code("bob")
    with hold():
        rc, clone_err = site.clone("bob", "platform/api", tmp_path / "w")
        verify = site.client("bob").run(f"2fa verify {code}")
    assert rc != 0 and verify.returncode != 0
    assert "Traceback" not in clone_err + verify.stderr
    log = (site.inst.state / "gatekeeper.log").read_text()
    return gatekeeper_lines(clone_err), gatekeeper_lines(verify.stderr), log


def test_a_locked_sqlite_store_is_busy_to_the_client_and_detailed_in_the_log(
    ak_site: Site, tmp_path: Path
) -> None:
    db = ak_site.inst.state / "gatekeeper.db"

    @contextmanager
    def hold() -> Iterator[None]:
        holder = sqlite3.connect(db, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        try:
            yield
        finally:
            holder.execute("ROLLBACK")
            holder.close()

    clone, verify, log = busy_story(ak_site, tmp_path, hold)
    assert clone == verify == BUSY
    shell_lines = [line for line in log.splitlines() if " gatekeeper-shell[" in line]
    assert len(shell_lines) == 2, log
    assert all(f"state database is busy: {db} is locked" in line for line in shell_lines), log


def test_a_postgres_lock_timeout_is_busy_to_the_client_and_detailed_in_the_log(
    pg_site: Site, tmp_path: Path, postgres_url: str, postgres_server: Any
) -> None:
    import psycopg

    from gatekeeper.store.postgres import WRITE_LOCK_KEY

    @contextmanager
    def hold() -> Iterator[None]:
        with psycopg.connect(postgres_url, autocommit=True) as other:
            other.execute("BEGIN")
            other.execute("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK_KEY,))
            try:
                yield
            finally:
                other.execute("ROLLBACK")

    clone, verify, log = busy_story(pg_site, tmp_path, hold)
    # The same words as on SQLite: no URL, no database message.
    assert clone == verify == BUSY
    shell_lines = [line for line in log.splitlines() if " gatekeeper-shell[" in line]
    assert len(shell_lines) == 2, log
    for line in shell_lines:
        assert f"state database is busy: {postgres_url}" in line and "lock timeout" in line, line
    assert postgres_server.password not in log


def secret_from_uri(text: str) -> str:
    uri = re.search(r"otpauth://\S+", text)
    assert uri, text
    return parse_qs(urlparse(uri.group(0)).query)["secret"][0]


def test_an_enrolled_member_clones_pushes_fetches_and_archives(site: Site, tmp_path: Path) -> None:
    site.inst.enroll("bob")
    bob = site.client("bob")
    work = tmp_path / "work"
    rc, err = site.clone("bob", "platform/api", work)
    assert rc == 0, err
    (work / "change.txt").write_text("hello\n")
    assert bob.git("add", "change.txt", cwd=work).returncode == 0
    assert bob.git("commit", "-qm", "change", cwd=work).returncode == 0
    push = bob.git("push", "origin", "main", cwd=work)
    assert push.returncode == 0, push.stderr
    fetch = bob.git("fetch", "origin", cwd=work)
    assert fetch.returncode == 0, fetch.stderr
    remote = bob.git("-c", "protocol.version=2", "ls-remote", bob.url("platform/api"))
    assert remote.returncode == 0, remote.stderr
    local = bob.git("rev-parse", "HEAD", cwd=work).stdout.strip()
    assert f"{local}\trefs/heads/main" in remote.stdout
    archive = bob.git(
        "archive", "--remote", bob.url("platform/api"), "-o", str(tmp_path / "a.tar"), "main"
    )
    assert archive.returncode == 0, archive.stderr
    assert (tmp_path / "a.tar").stat().st_size > 0
    records = site.inst.audit(event="access", user="bob")
    assert {r["reason"] for r in records} == {"allowed"}
    assert {r["action"] for r in records} == {"read", "write"}
    assert all(r["client"] == "127.0.0.1" and r["key_fp"].startswith("SHA256:") for r in records)


def test_protocol_v2_reaches_git(ak_site: Site, tmp_path: Path) -> None:
    ak_site.inst.enroll("bob")
    bob = ak_site.client("bob")
    env = bob.git_env()
    env["GIT_TRACE_PACKET"] = "1"
    import subprocess

    result = subprocess.run(
        ["git", "-c", "protocol.version=2", "ls-remote", bob.url("platform/api")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "version 2" in result.stderr


def test_an_unenrolled_member_is_refused_and_told_how_to_enroll(site: Site, tmp_path: Path) -> None:
    rc, err = site.clone("bob", "platform/api", tmp_path / "w")
    assert rc != 0
    port = site.server.port
    user = site.server.user
    assert "read 'platform/api' refused" in err
    assert "have not enrolled" in err
    assert f"ssh -p {port} {user}@127.0.0.1 2fa enroll" in err
    assert not (tmp_path / "w" / "README.md").exists()
    (record,) = site.inst.audit(event="access", user="bob")
    assert record["reason"] == "2fa-not-enrolled" and record["repo"] == "platform/api"


def test_a_developer_enrolls_and_verifies_over_ssh(site: Site, tmp_path: Path) -> None:
    alice = site.client("alice")
    out = alice.run("2fa enroll")
    assert out.returncode == 0, out.stderr
    assert "otpauth://totp/" in out.stdout and "2fa confirm CODE" in out.stdout
    secret = secret_from_uri(out.stdout)
    # This step's code confirms; the next step's verifies: each stays inside the
    # server's +-1 window for at least 30 s, however slow the machine.
    now = time.time()
    confirm = alice.run(f"2fa confirm {totp.current_code(secret, now)}")
    assert confirm.returncode == 0, confirm.stderr
    assert "Recovery codes" in confirm.stdout
    # enrolled is enough for platform/api, not for platform/secrets (verified)
    assert site.clone("alice", "platform/api", tmp_path / "a")[0] == 0
    rc, err = site.clone("alice", "platform/secrets", tmp_path / "s")
    assert rc != 0 and "this key has no verified session" in err and "2fa verify" in err
    # the code read from stdin, as a person types it
    code = totp.current_code(secret, now + 30)
    verify = alice.run("2fa verify", input=code + "\n")
    assert verify.returncode == 0, verify.stderr
    assert "Verified" in verify.stdout
    assert site.clone("alice", "platform/secrets", tmp_path / "s2")[0] == 0
    # the same code again is a replay, refused
    again = alice.run(f"2fa verify {code}")
    assert again.returncode != 0 and "already used" in again.stderr
    status = alice.run("2fa status")
    assert "two-step verification: enrolled" in status.stdout
    assert "verified until" in status.stdout


def test_the_verified_session_belongs_to_the_key_and_expires(ak_site: Site, tmp_path: Path) -> None:
    site = ak_site
    site.inst.enroll("alice")
    alice = site.client("alice")
    assert alice.run(f"2fa verify {site.inst.code('alice')}").returncode == 0
    assert site.clone("alice", "platform/secrets", tmp_path / "one")[0] == 0
    # a second key of alice's has no session of its own
    second, _ = sshd.generate_user_key(tmp_path, "alice2")
    site.inst.gk(
        "key",
        "add",
        "alice",
        str(second) + ".pub",
        "--authorized-keys",
        str(site.inst.base / "authorized_keys"),
    )
    other = site.server.client(second)
    res = other.git("clone", other.url("platform/secrets"), str(tmp_path / "two"))
    assert res.returncode != 0 and "no verified session" in res.stderr
    # expire the session: the next clone says when it expired and how to verify again
    db = sqlite3.connect(site.inst.state / "gatekeeper.db")
    db.execute("UPDATE sessions SET expires_at = ?", (int(time.time()) - 60,))
    db.commit()
    db.close()
    rc, err = site.clone("alice", "platform/secrets", tmp_path / "three")
    assert rc != 0 and "expired at" in err and "2fa verify" in err


def test_public_repository_reads_without_2fa_but_writes_need_it(site: Site, tmp_path: Path) -> None:
    rc, err = site.clone("carol", "docs", tmp_path / "d")
    assert rc == 0, err
    carol = site.client("carol")
    (tmp_path / "d" / "x").write_text("x")
    carol.git("add", "x", cwd=tmp_path / "d")
    carol.git("commit", "-qm", "x", cwd=tmp_path / "d")
    push = carol.git("push", "origin", "main", cwd=tmp_path / "d")
    assert push.returncode != 0
    assert "not found, or you do not have access" in push.stderr


def test_missing_and_forbidden_repositories_look_the_same(site: Site, tmp_path: Path) -> None:
    site.inst.enroll("carol")
    _, missing = site.clone("carol", "platform/nope", tmp_path / "m")
    _, forbidden = site.clone("carol", "elsewhere", tmp_path / "f")

    def gatekeeper_lines(text: str) -> list[str]:
        return [
            line.replace("platform/nope", "X").replace("elsewhere", "X")
            for line in text.splitlines()
            if line.startswith("gatekeeper:")
        ]

    assert gatekeeper_lines(missing) == gatekeeper_lines(forbidden) != []
    reasons = [r["reason"] for r in site.inst.audit(event="access", user="carol")]
    assert reasons == ["not-found", "not-authorized"]


GRACE_POLICY = """\
teams:
  platform:
    members: [alice, bob]
    require_2fa: enrolled
    grace_until: 2999-12-31
  contractors:
    members: [carol]
    require_2fa: enrolled
    mode: report
repositories:
  - match: platform/*
    read: [contractors]
    write: [platform]
"""


def test_grace_and_report_modes_allow_with_a_warning(tmp_path: Path) -> None:
    for site in start_site(tmp_path, "authorized-keys", GRACE_POLICY):
        rc, err = site.clone("bob", "platform/api", tmp_path / "b")
        assert rc == 0, err
        assert "allowed until 2999-12-31 (grace period, " in err and "2fa enroll" in err
        rc, err = site.clone("carol", "platform/api", tmp_path / "c")
        assert rc == 0, err
        assert "would be refused" in err
        reasons = {r["user"]: r["reason"] for r in site.inst.audit(event="access")}
        assert reasons == {"bob": "grace-period", "carol": "report-only"}


def test_repeated_wrong_codes_lock_verification(ak_site: Site) -> None:
    ak_site.inst.enroll("alice")
    alice = ak_site.client("alice")
    for _ in range(2):
        wrong = alice.run("2fa verify 000000")
        assert wrong.returncode != 0 and "wrong code" in wrong.stderr
    third = alice.run("2fa verify 000000")
    assert "locked until" in third.stderr
    right = alice.run(f"2fa verify {ak_site.inst.code('alice')}")
    assert right.returncode != 0 and "locked" in right.stderr
    events = [r["event"] for r in ak_site.inst.audit(user="alice")]
    assert events.count("2fa-failure") == 3 and events.count("2fa-lockout") == 1


def test_info_and_help_answer_a_plain_ssh(ak_site: Site) -> None:
    ak_site.inst.enroll("bob")
    bob = ak_site.client("bob")
    info = bob.run()
    assert info.returncode == 0, info.stderr
    assert "user: bob" in info.stdout and "platform/api" in info.stdout
    assert "read/write" in info.stdout
    assert "help" in bob.run("help").stdout
    unknown = bob.run("bash -i")
    assert unknown.returncode != 0 and "unknown command" in unknown.stderr


def test_an_interactive_shell_request_gets_no_shell(ak_site: Site) -> None:
    # `restrict` on the key line makes sshd refuse the pty; no shell ever starts.
    bob = ak_site.client("bob")
    result = bob.run(options=["RequestTTY=force"], input="id\nexit\n")
    assert result.returncode != 0
    assert "PTY allocation request failed" in result.stderr
    assert "uid=" not in result.stdout + result.stderr


@pytest.mark.parametrize(
    "command",
    [
        "git-upload-pack 'platform/api'; touch /tmp/gatekeeper-pwned",
        "git-upload-pack '--upload-pack=touch /tmp/gatekeeper-pwned'",
        "git-upload-pack 'platform/../../etc'",
        "git-upload-pack 'platform/api' 'docs'",
        "$(touch /tmp/gatekeeper-pwned)",
    ],
)
def test_hostile_commands_over_ssh_are_refused(ak_site: Site, command: str) -> None:
    ak_site.inst.enroll("bob")
    result = ak_site.client("bob").run(command)
    assert result.returncode != 0
    assert result.stderr.startswith("gatekeeper: ")
    assert "Traceback" not in result.stderr
    assert not Path("/tmp/gatekeeper-pwned").exists()


def test_a_removed_key_is_refused_by_the_keys_command(tmp_path: Path) -> None:
    for site in start_site(tmp_path, "keys-command"):
        site.inst.enroll("bob")
        assert site.clone("bob", "platform/api", tmp_path / "a")[0] == 0
        fp = site.inst.audit(event="access", user="bob")[0]["key_fp"]
        site.inst.gk("key", "remove", fp)
        rc, err = site.clone("bob", "platform/api", tmp_path / "b")
        assert rc != 0 and "Permission denied" in err
