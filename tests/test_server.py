"""`gatekeeper serve`, end to end: a real server process, real `ssh`, real `git`.

Each test starts `gatekeeper --config CFG serve --port PORT` on a free port against a
store made with the CLI (`init`, `user add`, `key add`) and bare repositories under
the policy's root. Scripted clients (paramiko) are used only where OpenSSH cannot be
made to misbehave: the key-swap regression, keyboard-interactive answers, clients
that never authenticate.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import pty
import queue
import resource
import shutil
import signal
import socket
import sqlite3
import struct
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import paramiko
import pytest
from paramiko.auth_handler import AuthHandler
from paramiko.common import (
    MSG_USERAUTH_FAILURE,
    MSG_USERAUTH_PK_OK,
    MSG_USERAUTH_SUCCESS,
    cMSG_USERAUTH_REQUEST,
)
from paramiko.message import Message
from test_faults import fill, tmpfs

from gatekeeper import sshcmd
from gatekeeper.errors import InputError, render
from gatekeeper.server import Startups
from gatekeeper.store import DB_NAME
from testing import sshd
from testing.installation import (
    Installation,
    avoid_step_boundary,
    git,
    password_file_url,
)
from testing.net import free_port
from testing.served import HOST, Served, client_env, ssh_argv

POLICY = """\
teams:
  dev:
    members: [alice, bob]
  ops:
    members: [olga]
    require_2fa: verified
repositories:
  - match: project
    read: [dev, ops]
    write: [dev]
  - match: vault
    read: [ops]
    write: [ops]
    require_2fa: verified
  - match: big
    read: [dev]
"""


def run(
    argv: list[str],
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float = 60,
    input: bytes | None = None,
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        argv, env=env, cwd=cwd, capture_output=True, timeout=timeout, input=input
    )
    return subprocess.CompletedProcess(
        result.args,
        result.returncode,
        result.stdout.decode(errors="replace"),
        result.stderr.decode(errors="replace"),
    )


def url(port: int, repo: str, user: str = "git") -> str:
    return f"ssh://{user}@{HOST}:{port}/{repo}.git"


class Site:
    """An installation with users, repositories and a running server."""

    def __init__(
        self, base: Path, two_factor: str = "", *serve_args: str, store_url: str = ""
    ) -> None:
        self.port = free_port()
        self.inst = Installation(
            base, POLICY, host=HOST, port=self.port, user="git", store_url=store_url
        )
        if two_factor:
            self.inst.write_policy(
                POLICY, host=HOST, port=self.port, user="git", two_factor=two_factor
            )
        self.inst.init()
        self.keys: dict[str, Path] = {}
        self.key_ids: dict[str, int] = {}
        for name in ("alice", "bob", "carol", "olga"):
            self.keys[name], self.key_ids[name] = self.inst.add_user(name)
        self.inst.repo("project")
        self.inst.repo("vault")
        self.serve_args = serve_args
        self.server = Served(self.inst, self.port, *serve_args)

    def env(self, user: str, *extra: str) -> dict[str, str]:
        return client_env(self.inst, self.keys[user], self.port, *extra)

    def ssh(
        self,
        user: str,
        *command: str,
        extra: tuple[str, ...] = (),
        login: str = "git",
        timeout: float = 30,
    ) -> subprocess.CompletedProcess[str]:
        argv = ssh_argv(self.keys[user], self.port, *extra, f"{login}@{HOST}", *command)
        return run(argv, timeout=timeout)

    def pkey(self, user: str) -> paramiko.PKey:
        return paramiko.Ed25519Key(filename=str(self.keys[user]))


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    s = Site(tmp_path / "gk", "", "--auth-timeout", "3")
    yield s
    assert s.server.stop() == 0


@pytest.fixture
def pg_site(tmp_path: Path, postgres_server: object, postgres_url: str) -> Iterator[Site]:
    url = password_file_url(postgres_server, postgres_url)
    s = Site(tmp_path / "gk", "", "--auth-timeout", "3", store_url=url)
    yield s
    assert s.server.stop() == 0


@pytest.fixture
def kbd_site(tmp_path: Path) -> Iterator[Site]:
    tf = "two_factor:\n  max_failures: 3\n  keyboard_interactive: true\n"
    s = Site(tmp_path / "gk", tf, "--auth-timeout", "5")
    yield s
    assert s.server.stop() == 0


def connect(port: int) -> paramiko.Transport:
    t = paramiko.Transport(socket.create_connection((HOST, port), timeout=10))
    t.start_client(timeout=10)
    return t


def read_all(chan: paramiko.Channel) -> tuple[bytes, bytes, int]:
    out, err = b"", b""
    while True:
        data = chan.recv(65536)
        if not data:
            break
        out += data
    while True:
        data = chan.recv_stderr(65536)
        if not data:
            break
        err += data
    return out, err, chan.recv_exit_status()


def processes_with(text: str) -> list[str]:
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in cmdline:
            found.append(f"{pid}: {cmdline}")
    return found


# -- the git workflows -------------------------------------------------------------------


def test_the_embedded_server_on_a_postgres_store(pg_site: Site, tmp_path: Path) -> None:
    """Clone and push, and a 2fa verify that opens a session for the vault, with the
    state in PostgreSQL."""
    work = tmp_path / "work"
    env = pg_site.env("alice")
    assert run(["git", "clone", url(pg_site.port, "project"), str(work)], env=env).returncode == 0
    (work / "f.txt").write_text("x\n")
    git("add", "f.txt", cwd=work)
    git("commit", "-q", "-m", "f", cwd=work)
    pushed = run(["git", "push", "origin", "main"], env=env, cwd=work)
    assert pushed.returncode == 0, pushed.stderr
    pg_site.inst.enroll("olga")
    vault = run(
        ["git", "clone", url(pg_site.port, "vault"), str(tmp_path / "v")], env=pg_site.env("olga")
    )
    assert vault.returncode != 0 and "2fa verify" in vault.stderr
    verify = pg_site.ssh("olga", "2fa", "verify", pg_site.inst.code("olga"))
    assert verify.returncode == 0, verify.stderr
    vault = run(
        ["git", "clone", url(pg_site.port, "vault"), str(tmp_path / "v")], env=pg_site.env("olga")
    )
    assert vault.returncode == 0, vault.stderr
    reasons = [(r["user"], r["repo"], r["reason"]) for r in pg_site.inst.audit(event="access")]
    assert ("alice", "project", "allowed") in reasons
    assert ("olga", "vault", "2fa-not-verified") in reasons
    assert ("olga", "vault", "allowed") in reasons
    assert pg_site.inst.gk("log", "verify").returncode == 0


def test_clone_push_and_fetch_through_the_embedded_server(site: Site, tmp_path: Path) -> None:
    env = site.env("alice")
    work = tmp_path / "work"
    result = run(["git", "clone", url(site.port, "project"), str(work)], env=env)
    assert result.returncode == 0, result.stderr
    assert (work / "README.md").read_text() == "# project\n"

    (work / "change.txt").write_text("from alice\n")
    git("add", "change.txt", cwd=work)
    git("commit", "-q", "-m", "change", cwd=work)
    result = run(["git", "push", "origin", "main"], env=env, cwd=work)
    assert result.returncode == 0, result.stderr
    head = git("rev-parse", "HEAD", cwd=work).stdout.strip()
    assert git("rev-parse", "main", cwd=site.inst.repos / "project.git").stdout.strip() == head

    bob = tmp_path / "bob"
    result = run(["git", "clone", url(site.port, "project"), str(bob)], env=site.env("bob"))
    assert result.returncode == 0, result.stderr
    assert (bob / "change.txt").read_text() == "from alice\n"

    # The same audit records as through OpenSSH's forced command.
    records = site.inst.audit(event="access")
    reasons = [(r["user"], r["repo"], r["action"]) for r in records]
    assert ("alice", "project", "read") in reasons
    assert ("alice", "project", "write") in reasons
    assert ("bob", "project", "read") in reasons
    # One log line per connection, naming the user and the key.
    site.server.wait_log("alice SHA256:")
    assert "exit 0" in site.server.wait_log("bob SHA256:")


def test_ls_remote_speaks_protocol_v2(site: Site) -> None:
    env = {**site.env("alice"), "GIT_TRACE_PACKET": "1"}
    result = run(
        ["git", "-c", "protocol.version=2", "ls-remote", url(site.port, "project")], env=env
    )
    assert result.returncode == 0, result.stderr
    assert "refs/heads/main" in result.stdout
    assert "version 2" in result.stderr  # the server answered in v2: GIT_PROTOCOL got through
    assert "ls-refs" in result.stderr


def test_archive_over_the_embedded_server(site: Site, tmp_path: Path) -> None:
    tarball = tmp_path / "project.tar"
    result = run(
        ["git", "archive", f"--remote={url(site.port, 'project')}", "-o", str(tarball), "main"],
        env=site.env("alice"),
    )
    assert result.returncode == 0, result.stderr
    listing = run(["tar", "tf", str(tarball)])
    assert listing.stdout.split() == ["README.md"]


def test_refused_user_sees_the_refusal_text(site: Site, tmp_path: Path) -> None:
    result = run(
        ["git", "clone", url(site.port, "project"), str(tmp_path / "x")], env=site.env("carol")
    )
    assert result.returncode != 0
    assert (
        "gatekeeper: repository 'project.git' not found, or you do not have access to it."
        in result.stderr
    )
    assert not (tmp_path / "x").exists()
    records = site.inst.audit(event="access", user="carol")
    assert records and records[-1]["reason"] == "not-authorized"


def test_verified_repository_refuses_an_unverified_key_with_the_fix(
    site: Site, tmp_path: Path
) -> None:
    result = run(
        ["git", "clone", url(site.port, "vault"), str(tmp_path / "v")], env=site.env("olga")
    )
    assert result.returncode != 0
    assert "read 'vault' refused" in result.stderr
    assert "2fa enroll" in result.stderr or "enroll" in result.stderr


@pytest.mark.parametrize("key_type", ["rsa", "ecdsa"])
def test_rsa_and_ecdsa_keys_work_too(site: Site, key_type: str) -> None:
    key, _ = site.inst.add_user(f"dave-{key_type}", key_type=key_type)
    result = run(ssh_argv(key, site.port, f"git@{HOST}", "info"))
    assert result.returncode == 0, result.stderr
    assert f"dave-{key_type}" in result.stdout


def test_unknown_key_and_wrong_login_are_refused(site: Site, tmp_path: Path) -> None:
    stranger = tmp_path / "stranger"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(stranger)], check=True)
    result = run(ssh_argv(stranger, site.port, f"git@{HOST}", "info"))
    assert result.returncode == 255
    assert "Permission denied (publickey)" in result.stderr

    result = site.ssh("alice", "info", login="alice")
    assert result.returncode == 255
    assert "Permission denied" in result.stderr
    site.server.wait_log("wrong user 'alice'")
    site.server.wait_log("unknown key SHA256:")


def test_no_command_prints_the_info_text_without_a_pty_warning(site: Site) -> None:
    result = site.ssh("alice", extra=("-T",))
    assert result.returncode == 0, result.stderr
    assert "alice" in result.stdout
    assert "project" in result.stdout

    # From a terminal, as a person types `ssh git@HOST`: the pty is granted in name
    # only (none is made) and the same text arrives, in lines a raw terminal shows.
    primary, secondary = pty.openpty()
    argv = ssh_argv(site.keys["alice"], site.port, f"git@{HOST}")
    proc = subprocess.Popen(
        argv, stdin=secondary, stdout=secondary, stderr=secondary, start_new_session=True
    )
    os.close(secondary)
    output = b""
    try:
        while True:
            try:
                data = os.read(primary, 65536)
            except OSError:
                break
            if not data:
                break
            output += data
        status = proc.wait(timeout=30)
    finally:
        os.close(primary)
    text = output.decode(errors="replace")
    assert status == 0, text
    assert "PTY allocation request failed" not in text
    assert "alice" in text and "project" in text
    assert "\r\n" in text and "\r\r\n" not in text


def test_subsystems_forwarding_and_other_environment_are_refused(site: Site) -> None:
    t = connect(site.port)
    try:
        t.auth_publickey("git", site.pkey("alice"))
        assert t.is_authenticated()
        with pytest.raises(paramiko.ChannelException):
            t.open_channel("direct-tcpip", ("127.0.0.1", 22), ("127.0.0.1", 40000))
        with pytest.raises(paramiko.SSHException):
            t.request_port_forward("127.0.0.1", 0)
        # paramiko closes a channel whose request failed: one channel per refusal.
        refusals = [
            lambda c: c.invoke_subsystem("sftp"),
            lambda c: c.request_x11(),
        ]
        for refuse in refusals:
            with pytest.raises(paramiko.SSHException):
                refuse(t.open_session())
        chan = t.open_session()
        # Only GIT_PROTOCOL is taken from the client; the rest never reaches git.
        chan.set_environment_variable("GIT_CONFIG_PARAMETERS", "'core.sshCommand=touch x'")
        chan.exec_command("info")
        out, err, status = read_all(chan)
        assert status == 0, err
        assert b"alice" in out
    finally:
        t.close()
    log = site.server.wait_log("subsystem sftp refused")
    assert "port forwarding refused" in log


def test_the_forced_command_gets_a_clean_environment(site: Site) -> None:
    """The child sees SSH_CONNECTION with both ends, as sshd would set it."""
    t = connect(site.port)
    try:
        t.auth_publickey("git", site.pkey("alice"))
        chan = t.open_session()
        chan.exec_command("git-upload-pack 'no/such/repo.git'")
        _, err, status = read_all(chan)
    finally:
        t.close()
    assert status != 0
    assert b"not found, or you do not have access" in err
    record = site.inst.audit(event="access", user="alice")[-1]
    assert record["client"] == HOST


# -- the same words as the forced command ------------------------------------------------


def refusal_of(command: str) -> str:
    """What the forced command prints for `command` when its parser refuses it."""
    with pytest.raises(InputError) as refused:
        sshcmd.parse_command(command)
    return render(refused.value)


def test_a_nul_in_a_command_is_refused_in_the_forced_commands_words(site: Site) -> None:
    """No environment variable can carry a NUL to the forced command; the server says
    what the forced command says of such a command, exits as it does and records it
    the same way (OpenSSH's sshd drops the connection instead)."""
    commands = ["info\0", "git-upload-pack 'project.git'\0; touch x", "\0" + "y" * 2000]
    c = HandCrafted(site.port)
    try:
        assert c.request(site.pkey("alice"), signer=site.pkey("alice")) == MSG_USERAUTH_SUCCESS
        answers = [c.run(command) for command in commands]
    finally:
        c.close()
    for command, (out, err, status) in zip(commands, answers, strict=True):
        assert (out, err, status) == ("", refusal_of(command), 2)
    assert "it contains control characters (newline, NUL, escape...)." in answers[0][1]
    assert "longer than 1024 characters" in answers[2][1]
    records = site.inst.audit(event="access", user="alice")
    assert [(r["reason"], json.loads(r["detail"])["command"]) for r in records] == [
        ("bad-command", command[:200]) for command in commands
    ]
    assert records[0]["key_fp"] and records[0]["client"] == HOST


def test_a_long_command_is_refused_as_the_forced_command_refuses_it(site: Site) -> None:
    """Over 4096 bytes the server keeps only what the audit record keeps and answers
    itself; up to there the forced command answers. Either way the same lines and exit
    code as the forced command run by hand, and all blanks is still `info`."""
    alice = site.key_ids["alice"]
    for command in ["x" * 1025, "x" * 5000, "\U0001f600" * 1024, "\U0001f600" * 1025]:
        through_serve = site.ssh("alice", command)
        by_hand = site.inst.shell(alice, command)
        assert (through_serve.returncode, through_serve.stderr) == (
            by_hand.returncode,
            by_hand.stderr,
        ), command[:20]
        assert through_serve.stderr.startswith("gatekeeper: "), through_serve.stderr
    blanks = site.ssh("alice", " " * 5000)
    assert blanks.returncode == 0 and "alice" in blanks.stdout, blanks.stderr
    assert site.server.proc.poll() is None


def test_a_packet_longer_than_openssh_takes_is_refused_before_it_is_read(site: Site) -> None:
    with socket.create_connection((HOST, site.port), timeout=10) as raw:
        assert raw.recv(256).startswith(b"SSH-2.0-")
        raw.sendall(b"SSH-2.0-client\r\n")
        # An unencrypted packet that says it is 64 MiB long (a multiple of the block size).
        raw.sendall(struct.pack(">I", 64 * 1024 * 1024 + 4) + b"\0" * 4)
        start = time.monotonic()
        with contextlib.suppress(OSError):
            while raw.recv(65536):
                pass
        assert time.monotonic() - start < 2.5
    site.server.wait_log("a packet of 67108864 bytes (at most 262144)")


@pytest.mark.sshd
def test_sshd_and_serve_refuse_a_bad_command_in_the_same_words(tmp_path: Path) -> None:
    """The same commands through OpenSSH's sshd (authorized_keys and the forced
    command) and through `gatekeeper serve`, with the real ssh client: the same
    gatekeeper lines, the same exit code, the same audit records."""
    user = sshd.current_user()
    port = free_port()
    inst = Installation(tmp_path / "gk", POLICY, host=HOST, port=port, user=user).init()
    key, _ = inst.add_user("alice")
    inst.repo("project")
    authorized = inst.base / "authorized_keys"
    inst.gk("authorized-keys", "--write", str(authorized))
    commands = [
        "x" * 1025,
        "x" * 5000,
        "\U0001f600" * 1025,
        "git-upload-pack '" + "a" * 100_000 + "'",
        "git-upload-pack 'project.git'; touch x",
        "git-upload-pack 'project.git' extra",
    ]
    served = Served(inst, port)
    try:
        with sshd.SshServer(authorized_keys_file=authorized, tmp_dir=tmp_path) as server:
            client = server.client(key)
            for command in commands:
                through_sshd = client.run(command)
                through_serve = run(ssh_argv(key, port, f"{user}@{HOST}", command))
                assert through_sshd.stderr.startswith("gatekeeper: "), through_sshd.stderr
                assert (through_serve.returncode, through_serve.stderr) == (
                    through_sshd.returncode,
                    through_sshd.stderr,
                ), command[:40]
    finally:
        assert served.stop() == 0
    records = [
        (r["reason"], json.loads(r["detail"])["command"]) for r in inst.audit(event="access")
    ]
    assert records == [("bad-command", c[:200]) for c in commands for _ in ("sshd", "serve")]


# -- identity only from a verified signature --------------------------------------------


class _Recorder(AuthHandler):  # type: ignore[misc]
    """Client side: collect the server's userauth replies instead of acting on them."""

    def __init__(self, transport: paramiko.Transport, replies: queue.Queue[int]) -> None:
        super().__init__(transport)
        self.replies = replies

    @property
    def _client_handler_table(self) -> dict[int, Any]:
        def record(ptype: int) -> Any:
            def handle(m: Message) -> None:
                if ptype == MSG_USERAUTH_SUCCESS:
                    self.authenticated = True
                    self.transport._auth_trigger()
                self.replies.put(ptype)

            return handle

        return {
            p: record(p) for p in (MSG_USERAUTH_SUCCESS, MSG_USERAUTH_FAILURE, MSG_USERAUTH_PK_OK)
        }


class HandCrafted:
    """A client whose publickey requests the test writes byte by byte."""

    def __init__(self, port: int) -> None:
        self.t = connect(port)
        with pytest.raises(paramiko.BadAuthenticationType):
            self.t.auth_none("git")  # also opens the ssh-userauth service
        self.replies: queue.Queue[int] = queue.Queue()
        self.t.auth_handler = _Recorder(self.t, self.replies)

    def signed_data(self, algorithm: str, blob: bytes) -> bytes:
        m = Message()
        m.add_string(self.t.session_id)
        m.add_byte(cMSG_USERAUTH_REQUEST)
        m.add_string("git")
        m.add_string("ssh-connection")
        m.add_string("publickey")
        m.add_boolean(True)
        m.add_string(algorithm)
        m.add_string(blob)
        return m.asbytes()

    def request(
        self,
        key: paramiko.PKey,
        signer: paramiko.PKey | None = None,
        signed_blob: bytes | None = None,
    ) -> int:
        """Send a publickey request for `key`, signed by `signer` (None: a query)."""
        algorithm = key.get_name()
        m = Message()
        m.add_byte(cMSG_USERAUTH_REQUEST)
        m.add_string("git")
        m.add_string("ssh-connection")
        m.add_string("publickey")
        m.add_boolean(signer is not None)
        m.add_string(algorithm)
        m.add_string(key.asbytes())
        if signer is not None:
            data = self.signed_data(algorithm, signed_blob or key.asbytes())
            m.add_string(signer.sign_ssh_data(data, algorithm).asbytes())
        self.t._send_message(m)
        try:
            return self.replies.get(timeout=10)
        except queue.Empty:
            raise AssertionError("no reply from the server") from None

    def run(self, command: str) -> tuple[str, str, int]:
        chan = self.t.open_session()
        chan.exec_command(command)
        out, err, status = read_all(chan)
        return out.decode(), err.decode(), status

    def close(self) -> None:
        self.t.close()


def test_offering_one_users_key_and_signing_with_anothers_gets_the_signer(site: Site) -> None:
    """The published bypass: identity must come from the key that signed, never from
    a key the client merely offered."""
    alice, bob = site.pkey("alice"), site.pkey("bob")
    c = HandCrafted(site.port)
    try:
        assert c.request(alice) == MSG_USERAUTH_PK_OK  # "would you take alice's key?" yes
        assert c.request(bob, signer=bob) == MSG_USERAUTH_SUCCESS
        out, err, status = c.run("info")
    finally:
        c.close()
    assert status == 0, err
    assert "bob" in out and "alice" not in out
    log = site.server.wait_log("bob SHA256:")
    assert "alice SHA256:" not in log


def test_a_signature_by_another_key_does_not_authenticate_the_offered_key(site: Site) -> None:
    alice, bob = site.pkey("alice"), site.pkey("bob")
    c = HandCrafted(site.port)
    try:
        # alice's key in the request, bob's signature (over alice's blob, then over his own).
        assert c.request(alice, signer=bob) == MSG_USERAUTH_FAILURE
        assert c.request(alice, signer=bob, signed_blob=bob.asbytes()) == MSG_USERAUTH_FAILURE
        assert not c.t.is_authenticated()
        # A garbage signature is refused the same way and the connection stays usable.
        assert c.request(bob, signer=bob) == MSG_USERAUTH_SUCCESS
        out, _, _ = c.run("info")
    finally:
        c.close()
    assert "bob" in out and "alice" not in out
    assert "bad signature for" in site.server.wait_log("bob SHA256:")


def test_too_many_failed_attempts_disconnect(site: Site) -> None:
    t = connect(site.port)
    try:
        for attempt in range(1, 7):  # Limits.max_auth_tries is 6
            with pytest.raises(paramiko.AuthenticationException):
                t.auth_publickey("git", paramiko.ECDSAKey.generate())
            if attempt < 6:
                assert t.is_active(), f"disconnected after {attempt} attempts"
        end = time.monotonic() + 3
        while t.is_active() and time.monotonic() < end:
            time.sleep(0.05)
        assert not t.is_active()
    finally:
        t.close()
    site.server.wait_log("too many authentication attempts")


# -- keyboard-interactive second factor -------------------------------------------------


def answer(code: str) -> Any:
    seen: list[tuple[str, str, list[tuple[str, bool]]]] = []

    def handler(title: str, instructions: str, prompts: list[tuple[str, bool]]) -> list[str]:
        seen.append((title, instructions, prompts))
        return [code] * len(prompts)

    handler.seen = seen  # type: ignore[attr-defined]
    return handler


def test_keyboard_interactive_code_opens_a_verified_session(kbd_site: Site, tmp_path: Path) -> None:
    site = kbd_site
    site.inst.enroll("olga")
    avoid_step_boundary()
    t = connect(site.port)
    try:
        assert t.auth_publickey("git", site.pkey("olga")) == ["keyboard-interactive"]
        assert not t.is_authenticated()
        handler = answer(site.inst.code("olga", 1))
        t.auth_interactive("git", handler)
        assert t.is_authenticated()
        title, instructions, prompts = handler.seen[0]
        assert title == "gatekeeper"
        assert "olga" in instructions and prompts == [("Verification code: ", False)]
    finally:
        t.close()
    verified = site.inst.audit(event="2fa-verified", user="olga")
    assert len(verified) == 1
    assert verified[0]["key_fp"] in site.server.wait_log("2fa=verified")

    # The session is bound to the key, so plain git (no prompt: BatchMode) now works.
    result = run(
        ["git", "clone", url(site.port, "vault"), str(tmp_path / "vault")], env=site.env("olga")
    )
    assert result.returncode == 0, result.stderr
    site.server.wait_log("2fa=session")


def test_keyboard_interactive_wrong_code_is_refused_and_counted(kbd_site: Site) -> None:
    site = kbd_site
    site.inst.enroll("olga")
    avoid_step_boundary()
    t = connect(site.port)
    try:
        t.auth_publickey("git", site.pkey("olga"))
        with pytest.raises(paramiko.AuthenticationException):
            t.auth_interactive(
                "git", answer("000000" if site.inst.code("olga") != "000000" else "111111")
            )
        assert not t.is_authenticated()
        # The next prompt says why; the right code still works on the same connection.
        handler = answer(site.inst.code("olga", 1))
        t.auth_interactive("git", handler)
        assert t.is_authenticated()
        assert "wrong code" in handler.seen[0][1]
    finally:
        t.close()
    failures = site.inst.audit(event="2fa-failure", user="olga")
    assert len(failures) == 1
    site.server.wait_log("code refused: wrong code")


def test_keyboard_interactive_on_a_busy_store_says_busy_and_logs_the_details(
    tmp_path: Path,
) -> None:
    tf = "two_factor:\n  max_failures: 3\n  keyboard_interactive: true\n"
    site = Site(tmp_path / "gk", tf, "--auth-timeout", "30")  # the busy timeout is 5 s
    try:
        site.inst.enroll("olga")
        avoid_step_boundary(10)
        t = connect(site.port)
        try:
            t.auth_publickey("git", site.pkey("olga"))
            holder = sqlite3.connect(site.inst.state / "gatekeeper.db", isolation_level=None)
            holder.execute("BEGIN IMMEDIATE")
            try:
                with pytest.raises(paramiko.AuthenticationException):
                    t.auth_interactive("git", answer(site.inst.code("olga")))
            finally:
                holder.execute("ROLLBACK")
                holder.close()
            handler = answer(site.inst.code("olga"))
            t.auth_interactive("git", handler)
            assert t.is_authenticated()
        finally:
            t.close()
        said = handler.seen[0][1]
        assert "access refused: the server's 2FA state is busy right now." in said
        assert str(site.inst.state) not in said and "locked" not in said
        site.server.wait_log("2fa=verified")
        log = (site.inst.state / "gatekeeper.log").read_text()
        assert " gatekeeper-serve[" in log and "2fa=verified" in log
        assert f"code refused: state database is busy: {site.inst.state}" in log
    finally:
        assert site.server.stop() == 0


def test_keyboard_interactive_empty_answer_goes_on_without_a_session(kbd_site: Site) -> None:
    site = kbd_site
    site.inst.enroll("olga")
    t = connect(site.port)
    try:
        t.auth_publickey("git", site.pkey("olga"))
        t.auth_interactive("git", answer(""))
        assert t.is_authenticated()
        chan = t.open_session()
        chan.exec_command("git-upload-pack 'vault.git'")
        _, err, status = read_all(chan)
    finally:
        t.close()
    assert status != 0
    assert b"this key has no verified session" in err
    assert not site.inst.audit(event="2fa-verified")
    assert not site.inst.audit(event="2fa-failure")


def test_keyboard_interactive_is_asked_only_when_a_reachable_repository_needs_it(
    kbd_site: Site,
) -> None:
    kbd_site.inst.enroll("alice")  # enrolled, but nothing alice reaches needs `verified`
    for user in ("alice", "bob"):  # bob is not enrolled at all
        t = connect(kbd_site.port)
        try:
            assert t.auth_publickey("git", kbd_site.pkey(user)) == []
            assert t.is_authenticated()
        finally:
            t.close()


def test_keyboard_interactive_with_openssh_and_askpass(kbd_site: Site, tmp_path: Path) -> None:
    site = kbd_site
    site.inst.enroll("olga")
    avoid_step_boundary()
    askpass = tmp_path / "askpass"
    askpass.write_text(f"#!/bin/sh\necho '{site.inst.code('olga', 1)}'\n")
    askpass.chmod(0o700)
    env = {
        **os.environ,
        "SSH_ASKPASS": str(askpass),
        "SSH_ASKPASS_REQUIRE": "force",
        "DISPLAY": ":0",
    }
    argv = ssh_argv(
        site.keys["olga"],
        site.port,
        "-o",
        "KbdInteractiveAuthentication=yes",
        "-o",
        "PreferredAuthentications=publickey,keyboard-interactive",
        f"git@{HOST}",
        "2fa",
        "status",
        batch=False,
    )
    result = subprocess.run(
        argv,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    assert result.returncode == 0, result.stderr
    assert site.inst.audit(event="2fa-verified", user="olga")
    assert "olga" in result.stdout


# -- limits: slow, silent and too many clients ------------------------------------------


def test_a_client_that_never_authenticates_is_dropped_after_the_timeout(site: Site) -> None:
    # Silent after the banner exchange (auth timeout is 3 s for this server).
    with socket.create_connection((HOST, site.port), timeout=15) as raw:
        assert raw.recv(256).startswith(b"SSH-2.0-")
        raw.sendall(b"SSH-2.0-silent\r\n")
        start = time.monotonic()
        while raw.recv(4096):
            pass
        silent = time.monotonic() - start
    # Key exchange done, then nothing.
    t = connect(site.port)
    start = time.monotonic()
    while t.is_active() and time.monotonic() - start < 15:
        time.sleep(0.05)
    idle = time.monotonic() - start
    t.close()
    assert 2.0 < silent < 6.0
    assert 2.0 < idle < 6.0
    site.server.wait_log("dropped: no authentication within 3s")


def test_silent_clients_do_not_stall_others(site: Site) -> None:
    silent = [socket.create_connection((HOST, site.port)) for _ in range(8)]
    try:
        start = time.monotonic()
        result = run(["git", "ls-remote", url(site.port, "project")], env=site.env("alice"))
        elapsed = time.monotonic() - start
        assert result.returncode == 0, result.stderr
        assert elapsed < 3.0
    finally:
        for s in silent:
            s.close()


def silent_connection(port: int, source: str = HOST) -> socket.socket:
    """A TCP connection from `source` (any 127.x.y.z address is this host) that never
    says a word, once the server has sent its banner (so it is being served)."""
    raw = socket.socket()
    try:
        raw.bind((source, 0))
        raw.connect((HOST, port))
        raw.settimeout(10)
        assert raw.recv(256).startswith(b"SSH-2.0-"), f"{source}: refused at once"
    except BaseException:
        raw.close()
        raise
    return raw


def is_open(raw: socket.socket) -> bool:
    """Whether the server still holds this connection (nothing to read, no EOF)."""
    raw.setblocking(False)
    try:
        return raw.recv(4096) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        raw.setblocking(True)


def closed_after(raw: socket.socket, since: float, timeout: float = 30) -> float:
    """Seconds from `since` until the server closed `raw`."""
    raw.settimeout(timeout)
    with contextlib.suppress(OSError):
        while raw.recv(4096):
            pass
    return time.monotonic() - since


def test_a_hundred_silent_addresses_do_not_keep_members_from_cloning(tmp_path: Path) -> None:
    """The flood from issue 20: a hundred TCP connections from a hundred addresses that
    never say a word. With the default limits every clone and ls-remote made while they
    are held works at the first try, and each silent one is closed once its login grace
    time (here 15 s) is over."""
    site = Site(tmp_path / "gk", "", "--auth-timeout", "15")
    silent: list[socket.socket] = []
    try:
        opened = time.monotonic()
        silent = [silent_connection(site.port, f"127.0.0.{i + 2}") for i in range(100)]
        env = site.env("alice")
        failures = []
        for i in range(4):
            cloned = run(
                ["git", "clone", url(site.port, "project"), str(tmp_path / f"c{i}")], env=env
            )
            listed = run(["git", "ls-remote", url(site.port, "project")], env=env)
            failures += [r.stderr for r in (cloned, listed) if r.returncode != 0]
        assert failures == [], failures
        assert all(is_open(raw) for raw in silent), "the flood was not held throughout"
        waits = [closed_after(raw, opened) for raw in silent]
        assert 14.5 < min(waits) and max(waits) < 19, (min(waits), max(waits))
        site.server.wait_log("dropped: no authentication within 15s")
    finally:
        for raw in silent:
            raw.close()
        assert site.server.stop() == 0


def test_past_max_startups_new_connections_are_dropped_but_logged_in_ones_never_count(
    tmp_path: Path,
) -> None:
    """`--max-startups 2` (2:100:2): two connections that have not logged in make the
    server drop every new one; any number that have logged in do not."""
    site = Site(tmp_path / "gk", "", "--max-startups", "2", "--auth-timeout", "5")
    held: list[Any] = []
    try:
        for _ in range(3):
            t = connect(site.port)
            t.auth_publickey("git", site.pkey("alice"))
            held.append(t)
        held += [silent_connection(site.port, f"127.0.1.{i + 1}") for i in range(2)]
        with socket.create_connection((HOST, site.port), timeout=5) as third:
            assert third.recv(256) == b""
        refused = run(["git", "ls-remote", url(site.port, "project")], env=site.env("alice"))
        assert refused.returncode != 0
        site.server.wait_log(
            "refused: 2 connections are not authenticated yet (max startups 2:100:2)"
        )
        gone = held.pop()
        source, port = gone.getsockname()[:2]
        gone.close()
        site.server.wait_log(f"from {source}:{port}: -")  # its one log line: the slot is free
        result = run(["git", "ls-remote", url(site.port, "project")], env=site.env("alice"))
        assert result.returncode == 0, result.stderr
    finally:
        for h in held:
            h.close()
        assert site.server.stop() == 0


def test_drop_chance_rises_from_rate_at_start_to_all_at_full() -> None:
    """sshd's MaxStartups arithmetic, and its sshd_config spelling."""
    startups = Startups.parse("10:30:100")
    assert [startups.drop_percent(n) for n in (0, 9, 10, 55, 99, 100, 500)] == [
        0,
        0,
        30,
        65,
        99,
        100,
        100,
    ]
    assert Startups.parse("5") == Startups(5, 100, 5)
    assert str(Startups()) == "128:30:512"
    assert (
        Startups().drop_percent(100) == 0
    )  # the default keeps a hundred silent ones out of the way
    for bad in ("10:30", "a:b:c", "10:0:100", "10:101:100", "100:30:10", "0", ""):
        with pytest.raises(ValueError):
            Startups.parse(bad)


def test_connections_over_the_limit_are_closed_at_once(tmp_path: Path) -> None:
    """`--max-connections` counts logged-in connections: while they are all taken a new
    connection is closed at once, and one that was still logging in is told why."""
    site = Site(tmp_path / "gk", "", "--max-connections", "2", "--auth-timeout", "5")
    held: list[Any] = []
    records: list[logging.LogRecord] = []
    try:
        late = connect(site.port)  # key exchange done, not logged in yet
        held.append(late)
        for _ in range(2):
            t = connect(site.port)
            t.auth_publickey("git", site.pkey("alice"))
            held.append(t)
        with socket.create_connection((HOST, site.port), timeout=5) as third:
            assert third.recv(256) == b""
        site.server.wait_log("refused: 2 connections open")
        capture = logging.Handler()
        capture.emit = records.append  # type: ignore[method-assign]
        client_log = logging.getLogger("paramiko.transport")
        level = client_log.level
        client_log.addHandler(capture)
        client_log.setLevel(logging.INFO)  # paramiko logs the server's reason at INFO
        try:
            with pytest.raises(paramiko.SSHException):
                late.auth_publickey("git", site.pkey("bob"))
        finally:
            client_log.removeHandler(capture)
            client_log.setLevel(level)
        said = [r.getMessage() for r in records]
        assert any("too many connections right now" in m for m in said), said
        for h in held:
            h.close()
        time.sleep(0.5)  # the slots free up as the server notices
        result = run(["git", "ls-remote", url(site.port, "project")], env=site.env("alice"))
        assert result.returncode == 0, result.stderr
    finally:
        for h in held:
            h.close()
        assert site.server.stop() == 0


def test_one_address_cannot_take_every_slot_without_logging_in(tmp_path: Path) -> None:
    # At most half of max startups' START from one address: 2 here.
    site = Site(tmp_path / "gk", "", "--max-startups", "4:30:8", "--auth-timeout", "5")
    silent = []
    try:
        for _ in range(2):
            raw = socket.create_connection((HOST, site.port))
            assert raw.recv(256).startswith(b"SSH-2.0-")
            silent.append(raw)
        with socket.create_connection((HOST, site.port), timeout=5) as third:
            assert third.recv(256) == b""
        site.server.wait_log("refused: 2 connections from there are not authenticated yet")
        other = silent_connection(site.port, "127.0.2.1")  # another address is served
        other.close()
        for raw in silent:
            raw.close()
        time.sleep(0.5)
        result = run(["git", "ls-remote", url(site.port, "project")], env=site.env("alice"))
        assert result.returncode == 0, result.stderr
    finally:
        for raw in silent:
            raw.close()
        assert site.server.stop() == 0


def test_serve_lifts_its_open_files_limit_to_the_hard_one(site: Site) -> None:
    """Started with the common soft limit of 1024 (or less), the server could not hold
    the connections its defaults allow."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert site.server.stop() == 0
    again = Served(
        site.inst,
        site.port,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard)),
    )
    try:
        limits = Path(f"/proc/{again.proc.pid}/limits").read_text()
        soft = next(line for line in limits.splitlines() if line.startswith("Max open files"))
        assert soft.split()[3] == ("unlimited" if hard == resource.RLIM_INFINITY else str(hard))
    finally:
        assert again.stop() == 0


# -- the port users connect to -------------------------------------------------------------


def test_messages_name_the_port_serve_listens_on_not_the_policys(tmp_path: Path) -> None:
    """The policy says port 22 (OpenSSH's) and serve listens on another: every command
    that a refusal, `info`, `help` or a 2fa message shows names the port served."""
    port = free_port()
    inst = Installation(tmp_path / "gk", POLICY, host=HOST, port=22, user="git").init()
    keys = {name: inst.add_user(name)[0] for name in ("alice", "carol", "olga")}
    inst.repo("project")
    inst.repo("vault")
    by_hand = inst.shell(inst.key_id("carol"), "git-upload-pack 'project.git'")
    assert f"`ssh git@{HOST} info`" in by_hand.stderr  # the policy's port, for OpenSSH
    served = Served(inst, port)
    prefix = f"ssh -p {port} git@{HOST}"
    try:
        assert f"ssh://git@{HOST}:{port}/REPOSITORY.git" in served.banner[2]

        def ssh(user: str, *command: str) -> subprocess.CompletedProcess[str]:
            return run(ssh_argv(keys[user], port, f"git@{HOST}", *command))

        def clone(user: str, repo: str) -> subprocess.CompletedProcess[str]:
            env = client_env(inst, keys[user], port)
            return run(["git", "clone", url(port, repo), str(tmp_path / f"{user}-{repo}")], env=env)

        carol = clone("carol", "project")
        assert f"`{prefix} info` lists what you can reach" in carol.stderr, carol.stderr
        olga = clone("olga", "vault")
        assert f"{prefix} 2fa enroll" in olga.stderr, olga.stderr
        info = ssh("alice", "info")
        assert f"`{prefix} help`" in info.stdout, info.stdout
        help_ = ssh("alice", "help")
        assert f"{prefix} 2fa enroll" in help_.stdout, help_.stdout
        assert f"ssh://git@{HOST}:{port}/REPOSITORY.git" in help_.stdout
        enroll = ssh("olga", "2fa", "enroll")
        assert f"{prefix} 2fa confirm CODE" in enroll.stdout, enroll
        usage = ssh("alice", "2fa")
        assert f"`{prefix} help` lists the commands" in usage.stderr, usage
        said = [carol.stderr, olga.stderr, info.stdout, help_.stdout, enroll.stdout, usage.stderr]
        assert not any(f"ssh git@{HOST}" in text for text in said), said
    finally:
        assert served.stop() == 0


# -- a server at fault -------------------------------------------------------------------

STORE_FAULT = (
    "gatekeeper: access refused: the server cannot read its 2FA state right now.\n"
    "gatekeeper: hint: try again in a moment; if it persists, tell an administrator.\n"
)
POLICY_FAULT = (
    "gatekeeper: access refused: the server's policy file is invalid or unreadable.\n"
    "gatekeeper: hint: an administrator must run `gatekeeper policy check`.\n"
)


def assert_told_the_server_is_at_fault(site: Site, words: str, tmp_path: Path) -> None:
    """Known keys read the forced command's `words` for a command, for no command and
    for a clone, exit 1, and nothing runs; an unknown key or another login name is
    still denied; the admin reads about it once."""
    info = site.ssh("alice", "info")
    assert (info.returncode, info.stdout, info.stderr) == (1, "", words)
    no_command = site.ssh("bob", extra=("-T",))
    assert (no_command.returncode, no_command.stdout, no_command.stderr) == (1, "", words)
    target = tmp_path / "fault-clone"
    clone = run(["git", "clone", url(site.port, "project"), str(target)], env=site.env("alice"))
    assert clone.returncode != 0 and words in clone.stderr, clone.stderr
    assert not target.exists()
    stranger = tmp_path / "stranger"
    if not stranger.exists():
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(stranger)], check=True
        )
    denied = run(ssh_argv(stranger, site.port, f"git@{HOST}", "info"))
    assert denied.returncode == 255 and "Permission denied (publickey)" in denied.stderr
    wrong_login = site.ssh("alice", "info", login="alice")
    assert wrong_login.returncode == 255 and "Permission denied" in wrong_login.stderr
    log = site.server.wait_log("server fault: access refused")
    assert log.count("cannot serve anyone until this is fixed") == 1, log
    assert "exit 0" not in log.split("cannot serve anyone")[1]


def assert_served_again(site: Site, tmp_path: Path) -> None:
    target = tmp_path / "clone-again"
    clone = run(["git", "clone", url(site.port, "project"), str(target)], env=site.env("alice"))
    assert clone.returncode == 0, clone.stderr
    site.server.wait_log("the policy and the store load again")


def test_a_truncated_database_tells_known_keys_the_server_is_at_fault(
    site: Site, tmp_path: Path
) -> None:
    """Through OpenSSH the forced command says the server cannot read its 2FA state;
    through the embedded server a known key reads the same, not "Permission denied"."""
    db = site.inst.state / DB_NAME
    saved = {p: p.read_bytes() for p in site.inst.state.glob(DB_NAME + "*")}
    by_hand = site.inst.shell(site.key_ids["alice"], "info")
    os.truncate(db, 4096)
    assert site.inst.shell(site.key_ids["alice"], "info").stderr == STORE_FAULT
    assert_told_the_server_is_at_fault(site, STORE_FAULT, tmp_path)
    for path, data in saved.items():
        path.write_bytes(data)
    assert site.inst.shell(site.key_ids["alice"], "info").stdout == by_hand.stdout
    assert_served_again(site, tmp_path)


def test_a_tab_in_the_policy_tells_known_keys_the_policy_is_invalid(
    site: Site, tmp_path: Path
) -> None:
    good = site.inst.config.read_text()
    site.inst.config.write_text(good.replace("  dev:\n", "\tdev:\n"))
    assert site.inst.gk("policy", "check", check=False).returncode != 0
    assert site.inst.shell(site.key_ids["alice"], "info").stderr == POLICY_FAULT
    before = len(site.inst.audit())
    assert_told_the_server_is_at_fault(site, POLICY_FAULT, tmp_path)
    assert len(site.inst.audit()) == before  # nothing ran, so nothing was recorded
    site.inst.config.write_text(good)
    assert_served_again(site, tmp_path)


def test_a_full_state_directory_tells_known_keys_the_server_is_at_fault(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "gk" / "state", "4m"):
        site = Site(tmp_path / "gk", "", "--auth-timeout", "3")
        try:
            assert site.ssh("alice", "info").returncode == 0
            # Once no one has the database open its write-ahead log is gone, and opening
            # it needs room for a new one.
            site.server.wait_log("'info' exit 0")
            filler = fill(site.inst.state)
            assert site.inst.shell(site.key_ids["alice"], "info").stderr == STORE_FAULT
            assert_told_the_server_is_at_fault(site, STORE_FAULT, tmp_path)
            filler.unlink()
            assert_served_again(site, tmp_path)
        finally:
            assert site.server.stop() == 0


def test_client_closing_early_stops_git(site: Site) -> None:
    t = connect(site.port)
    try:
        t.auth_publickey("git", site.pkey("alice"))
        chan = t.open_session()
        chan.exec_command("git-upload-pack 'project.git'")
        assert chan.recv(4)  # the ref advertisement begins; upload-pack now waits for us
        repo = str(site.inst.repos / "project.git")
        assert processes_with(repo)
        chan.close()
    finally:
        t.close()
    end = time.monotonic() + 5
    while processes_with(repo) and time.monotonic() < end:
        time.sleep(0.05)
    assert processes_with(repo) == []


# -- host key and stopping --------------------------------------------------------------


def test_host_key_is_created_once_and_its_fingerprint_printed(site: Site) -> None:
    key = site.inst.state / "ssh_host_ed25519_key"
    assert key.stat().st_mode & 0o777 == 0o600
    printed = site.server.banner[1].split("host key ")[1].split()[0]
    listed = subprocess.run(
        ["ssh-keygen", "-lf", str(key) + ".pub"], capture_output=True, text=True, check=True
    ).stdout.split()[1]
    assert printed == listed
    scanned = run(["ssh-keyscan", "-p", str(site.port), "-t", "ed25519", HOST]).stdout
    assert (key.with_name(key.name + ".pub")).read_text().split()[1] in scanned

    assert site.server.stop() == 0
    again = Served(site.inst, site.port)
    try:
        assert again.banner[1] == site.server.banner[1]
    finally:
        assert again.stop() == 0


def test_sigterm_lets_an_open_session_finish_then_exits_zero(site: Site) -> None:
    t = connect(site.port)
    try:
        t.auth_publickey("git", site.pkey("alice"))
        chan = t.open_session()
        chan.exec_command("git-upload-pack 'project.git'")
        assert chan.recv(4)
        site.server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        with pytest.raises(OSError):
            socket.create_connection((HOST, site.port), timeout=2).close()
        assert site.server.proc.poll() is None  # still serving the open session
        chan.sendall(b"0000")  # no wants: upload-pack is done
        _, _, status = read_all(chan)
        assert status == 0
    finally:
        t.close()
    assert site.server.proc.wait(timeout=10) == 0
    assert "gatekeeper: stopped" in site.server.line()


def test_a_second_signal_closes_open_sessions_at_once(site: Site) -> None:
    t = connect(site.port)
    try:
        t.auth_publickey("git", site.pkey("alice"))
        chan = t.open_session()
        chan.exec_command("git-upload-pack 'project.git'")
        assert chan.recv(4)
        site.server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        start = time.monotonic()
        site.server.proc.send_signal(signal.SIGINT)
        assert site.server.proc.wait(timeout=10) == 0
        assert time.monotonic() - start < 5
        while chan.recv(65536):
            pass
        assert chan.closed or chan.eof_received
    finally:
        t.close()
    assert processes_with(str(site.inst.repos / "project.git")) == []


# -- many clones of a large repository --------------------------------------------------


@pytest.fixture(scope="session")
def big_repository(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A 50 MB repository of incompressible content, made once per test session."""
    base = tmp_path_factory.mktemp("big")
    work = base / "work"
    git("init", "-q", "-b", "main", str(work))
    digest = hashlib.sha256()
    for i in range(10):
        data = os.urandom(5 * 1024 * 1024)
        digest.update(data)
        (work / f"blob{i}.bin").write_bytes(data)
    # Noise does not compress: store it as is, which also makes the fixture quick.
    git("-c", "core.compression=0", "add", "-A", cwd=work)
    git("commit", "-q", "-m", "50 MB of noise", cwd=work)
    bare = base / "big.git"
    git("-c", "core.compression=0", "clone", "-q", "--bare", "--no-local", str(work), str(bare))
    shutil.rmtree(work)
    return bare, digest.hexdigest()


@pytest.mark.slow
def test_twenty_concurrent_clones_of_a_50_mb_repository(
    site: Site, tmp_path: Path, big_repository: tuple[Path, str]
) -> None:
    source, digest = big_repository
    shutil.copytree(source, site.inst.repos / "big.git")
    expected = git("rev-parse", "main", cwd=site.inst.repos / "big.git").stdout.strip()
    env = site.env("alice")

    def clone(i: int) -> tuple[int, str, str, float]:
        target = tmp_path / f"clone{i}"
        start = time.monotonic()
        result = run(
            ["git", "clone", "-q", "--bare", url(site.port, "big"), str(target)],
            env=env,
            timeout=180,
        )
        elapsed = time.monotonic() - start
        head = git("rev-parse", "main", cwd=target, check=False).stdout.strip()
        return result.returncode, result.stderr, head, elapsed

    start = time.monotonic()
    with ThreadPoolExecutor(max_workers=20) as pool:
        results = list(pool.map(clone, range(20)))
    wall = time.monotonic() - start
    for rc, err, head, _ in results:
        assert rc == 0, err
        assert head == expected
    # Content matches, not only the commit id: every object was hashed by index-pack;
    # check one clone's blobs byte for byte anyway.
    content = hashlib.sha256()
    for i in range(10):
        blob = subprocess.run(
            ["git", "cat-file", "blob", f"main:blob{i}.bin"],
            cwd=tmp_path / "clone7",
            capture_output=True,
            check=True,
        ).stdout
        content.update(blob)
    assert content.hexdigest() == digest
    # Streamed, not buffered: 1 GB went through a server that never held much of it.
    status = Path(f"/proc/{site.server.proc.pid}/status").read_text()
    peak_mb = int(status.split("VmHWM:")[1].split()[0]) / 1024
    print(
        f"20 clones of 50 MB: {wall:.1f}s wall, slowest {max(r[3] for r in results):.1f}s, "
        f"server peak RSS {peak_mb:.0f} MB"
    )
    assert wall < 60
    assert peak_mb < 300


@pytest.mark.slow
def test_pushing_50_mb_streams_into_the_server(
    site: Site, tmp_path: Path, big_repository: tuple[Path, str]
) -> None:
    source, _ = big_repository
    git("init", "-q", "--bare", "-b", "main", str(site.inst.repos / "big.git"))
    site.inst.write_policy(
        POLICY.replace("  - match: big\n    read: [dev]\n", "  - match: big\n    write: [dev]\n"),
        host=HOST,
        port=site.port,
        user="git",
    )
    expected = git("rev-parse", "main", cwd=source).stdout.strip()
    start = time.monotonic()
    result = run(
        ["git", "push", url(site.port, "big"), "main"],
        env=site.env("alice"),
        cwd=source,
        timeout=120,
    )
    elapsed = time.monotonic() - start
    assert result.returncode == 0, result.stderr
    assert git("rev-parse", "main", cwd=site.inst.repos / "big.git").stdout.strip() == expected
    assert git("fsck", "--no-progress", cwd=site.inst.repos / "big.git").returncode == 0
    print(f"push of 50 MB: {elapsed:.1f}s")


@pytest.mark.slow
def test_a_clone_killed_halfway_stops_git_on_the_server(
    site: Site, tmp_path: Path, big_repository: tuple[Path, str]
) -> None:
    source, _ = big_repository
    shutil.copytree(source, site.inst.repos / "big.git")
    target = tmp_path / "half"
    proc = subprocess.Popen(
        ["git", "clone", "-q", "--bare", url(site.port, "big"), str(target)],
        env=site.env("alice"),
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    end = time.monotonic() + 30
    received = 0
    while time.monotonic() < end and received < 5 * 1024 * 1024:
        received = (
            sum(p.stat().st_size for p in (target / "objects" / "pack").glob("tmp_pack_*"))
            if (target / "objects" / "pack").exists()
            else 0
        )
        time.sleep(0.01)
    assert received >= 5 * 1024 * 1024
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    repo = str(site.inst.repos / "big.git")
    end = time.monotonic() + 10
    while processes_with(repo) and time.monotonic() < end:
        time.sleep(0.05)
    assert processes_with(repo) == []
    site.server.wait_log("git-upload-pack '/big.git'")
