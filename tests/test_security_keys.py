"""Security keys: a touch (and a PIN) on every connection as a policy level.

There is no hardware here: a software authenticator (tests/softkey.py) holds the key and
signs as a FIDO2 authenticator does, with the flags and counter each test chooses, and
paramiko's client presents it to a real OpenSSH sshd (authorized_keys and
AuthorizedKeysCommand) and to `gatekeeper serve`. sshd checks the touch and the PIN
itself; `serve` checks them with its own PROTOCOL.u2f code, and one thing more: a
signature counter that does not grow (a cloned authenticator).
"""

from __future__ import annotations

import json
import socket
import struct
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import paramiko
import pytest

from testing import sshd
from testing.fronts import sshd_front
from testing.installation import Installation
from testing.net import free_port
from testing.served import HOST, Served
from testing.softkey import PIN, TOUCH, SoftKey, SoftKeyPKey

pytestmark = pytest.mark.sshd

GRACE = (datetime.now(timezone.utc).date() + timedelta(days=30)).isoformat()
POLICY = f"""\
teams:
  hw:
    members: [alice, bob, carol]
repositories:
  - match: hw/*
    read: [hw]
    write: [hw]
    require_2fa: security-key
  - match: pin/*
    read: [hw]
    require_2fa: security-key-pin
  - match: soon/*
    read: [hw]
    require_2fa: security-key
    grace_until: {GRACE}
  - match: totp/*
    read: [hw]
    require_2fa: verified
"""


@dataclass
class Result:
    ok: bool
    """Authenticated at all."""
    out: str = ""
    err: str = ""
    status: int = -1


class Front:
    def __init__(self, inst: Installation, kind: str) -> None:
        self.inst = inst
        self.kind = kind
        self.port = 0
        self.user = "git"
        self.server: sshd.SshServer | None = None
        self.served: Served | None = None

    def run(self, key: paramiko.PKey, command: str) -> Result:
        sock = socket.create_connection((HOST, self.port), timeout=20)
        t = paramiko.Transport(sock)
        try:
            t.start_client(timeout=20)
            try:
                t.auth_publickey(self.user, key)
            except paramiko.AuthenticationException:
                return Result(False)
            chan = t.open_session(timeout=20)
            chan.exec_command(command)
            chan.sendall(b"0000")  # git's flush packet: the client wants nothing
            chan.shutdown_write()
            out, err = b"", b""
            while True:
                if chan.recv_ready():
                    out += chan.recv(65536)
                elif chan.recv_stderr_ready():
                    err += chan.recv_stderr(65536)
                elif chan.exit_status_ready() and not chan.recv_ready():
                    err += chan.recv_stderr(65536) if chan.recv_stderr_ready() else b""
                    break
                else:
                    chan.status_event.wait(0.05)
            return Result(
                True,
                out.decode(errors="replace"),
                err.decode(errors="replace"),
                chan.recv_exit_status(),
            )
        finally:
            t.close()

    def read(self, key: paramiko.PKey, repo: str) -> Result:
        return self.run(key, f"git-upload-pack '{repo}.git'")


def build(inst: Installation) -> dict[str, SoftKey]:
    for repo in ("hw/app", "pin/vault", "soon/app", "totp/app"):
        inst.repo(repo)
    soft = {"alice": SoftKey("ed25519"), "carol": SoftKey("ecdsa")}
    inst.gk("user", "add", "alice")
    inst.gk("key", "add", "alice", "-", input=soft["alice"].public_line())
    inst.gk("user", "add", "carol")
    inst.gk("key", "add", "carol", "-", "--verify-required", input=soft["carol"].public_line())
    inst.add_user("bob")  # a plain Ed25519 key
    inst.enroll("bob")
    return soft


@pytest.fixture(params=["authorized-keys", "keys-command", "serve"])
def front(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Front, dict]]:
    kind = str(request.param)
    if kind == "serve":
        port = free_port()
        inst = Installation(tmp_path / "gk", POLICY, host=HOST, port=port).init()
        soft = build(inst)
        f = Front(inst, kind)
        f.port = port
        f.served = Served(inst, port, "--auth-timeout", "10")
        try:
            yield f, soft
        finally:
            f.served.stop()
        return
    inst = Installation(tmp_path / "gk", POLICY, user=sshd.current_user()).init()
    soft = build(inst)
    server = sshd_front(inst, kind, tmp_path)
    with server:
        inst.write_policy(POLICY, host="127.0.0.1", port=server.port, user=server.user)
        f = Front(inst, kind)
        f.port, f.user, f.server = server.port, server.user, server
        yield f, soft


def bob_key(inst: Installation) -> paramiko.PKey:
    return paramiko.Ed25519Key(filename=str(inst.keys / "bob"))


def test_a_touch_meets_security_key_and_the_audit_says_so(front: tuple[Front, dict]) -> None:
    f, soft = front
    alice = SoftKeyPKey(soft["alice"])
    ok = f.read(alice, "hw/app")
    assert ok.ok and ok.status == 0 and "refs/heads/main" in ok.out, ok.err
    # A touch is a fresh second factor: it meets `verified` too, with no TOTP at all.
    assert f.read(alice, "totp/app").status == 0
    records = [r for r in f.inst.audit(event="access", user="alice") if r["repo"] == "hw/app"]
    assert json.loads(records[-1]["detail"])["factor"] == "touch"


def test_no_touch_is_refused(front: tuple[Front, dict]) -> None:
    f, soft = front
    soft["alice"].flags = 0
    assert not f.read(SoftKeyPKey(soft["alice"]), "hw/app").ok


def test_the_pin_level_needs_a_key_registered_for_it_and_its_pin(
    front: tuple[Front, dict],
) -> None:
    f, soft = front
    alice = SoftKeyPKey(soft["alice"])  # registered without --verify-required
    soft["alice"].flags = TOUCH | PIN
    refused = f.read(alice, "pin/vault")
    assert refused.ok and refused.status != 0
    assert "requires a security key (FIDO2) with a touch and its PIN" in refused.err
    assert "not registered to prove its PIN" in refused.err
    assert "ssh-keygen -t ed25519-sk -O verify-required" in refused.err
    assert "gatekeeper key add alice FILE.pub --verify-required" in refused.err
    reasons = [r["reason"] for r in f.inst.audit(event="access", user="alice")]
    assert reasons[-1] == "2fa-no-user-verification"
    carol = SoftKeyPKey(soft["carol"])  # ECDSA, registered with --verify-required
    soft["carol"].flags = TOUCH | PIN
    ok = f.read(carol, "pin/vault")
    assert ok.ok and ok.status == 0, ok.err
    soft["carol"].flags = TOUCH
    assert not f.read(carol, "pin/vault").ok  # its PIN is required on every use


def test_a_plain_key_is_told_what_to_do_and_totp_never_meets_a_security_key_level(
    front: tuple[Front, dict],
) -> None:
    f, _ = front
    bob = bob_key(f.inst)
    f.inst.gk("2fa", "status", "bob")
    refused = f.read(bob, "hw/app")
    assert refused.ok and refused.status != 0
    assert "this connection was not made with a security key" in refused.err
    assert "ssh-keygen -t ed25519-sk -O verify-required" in refused.err
    assert f.inst.audit(event="access", user="bob")[-1]["reason"] == "2fa-no-security-key"
    graced = f.read(bob, "soon/app")
    assert graced.status == 0 and f"allowed until {GRACE}" in graced.err


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Front, dict]]:
    """`gatekeeper serve` alone: sshd keeps no counter, the embedded server goes beyond it."""
    port = free_port()
    inst = Installation(tmp_path / "gk", POLICY, host=HOST, port=port).init()
    soft = build(inst)
    f = Front(inst, "serve")
    f.port = port
    f.served = Served(inst, port, "--auth-timeout", "10")
    try:
        yield f, soft
    finally:
        f.served.stop()


def test_serve_refuses_a_counter_that_does_not_grow(served: tuple[Front, dict]) -> None:
    f, soft = served
    key = soft["alice"]
    alice = SoftKeyPKey(key)
    key.counter = 41
    assert f.read(alice, "hw/app").status == 0  # counter 42
    alice.sign_with = lambda data: key.sign(data, counter=42)  # the same again
    assert not f.read(alice, "hw/app").ok
    alice.sign_with = lambda data: key.sign(data, counter=7)  # going back
    assert not f.read(alice, "hw/app").ok
    events = f.inst.audit(event="sk-counter", user="alice")
    assert [json.loads(e["detail"])["counter"] for e in events] == [42, 7]
    alice.sign_with = None
    key.counter = 100
    assert f.read(alice, "hw/app").status == 0


def _mangled(key: SoftKey, how: str):  # type: ignore[no-untyped-def]
    def sign(data: bytes) -> bytes:
        good = key.sign(data)
        if how == "truncated":
            return good[: len(good) // 2]
        if how == "trailing":
            return good + b"\0"
        if how == "wrong-type":
            return struct.pack(">I", 11) + b"ssh-ed25519" + good[4 + len(key.key_type) :]
        if how == "flipped-flags":
            at = len(good) - 5
            return good[:at] + bytes([good[at] ^ 0x04]) + good[at + 1 :]
        if how == "other-data":
            return key.sign(data + b"x")
        raise AssertionError(how)

    return sign


@pytest.mark.parametrize(
    "how", ["truncated", "trailing", "wrong-type", "flipped-flags", "other-data"]
)
def test_malformed_security_key_signatures_are_refused_cleanly(tmp_path: Path, how: str) -> None:
    port = free_port()
    inst = Installation(tmp_path / "gk", POLICY, host=HOST, port=port).init()
    soft = build(inst)
    served = Served(inst, port, "--auth-timeout", "10")
    try:
        f = Front(inst, "serve")
        f.port = port
        alice = SoftKeyPKey(soft["alice"])
        alice.sign_with = _mangled(soft["alice"], how)
        assert not f.read(alice, "hw/app").ok
        alice.sign_with = None
        assert f.read(alice, "hw/app").status == 0  # the server is still fine
    finally:
        served.stop()
    assert "Traceback" not in served.log()


def test_a_key_with_the_wrong_application_or_no_touch_option_is_not_registered(
    gk: Installation,
) -> None:
    gk.gk("user", "add", "dave")
    odd = SoftKey("ed25519", application=b"https://example.com")
    result = gk.gk("key", "add", "dave", "-", input=odd.public_line(), check=False)
    assert result.returncode != 0 and "application must start with 'ssh:'" in result.stderr
    line = "no-touch-required " + SoftKey().public_line()
    result = gk.gk("key", "add", "dave", "-", input=line, check=False)
    assert result.returncode != 0 and "never drops a security key's touch" in result.stderr
    result = gk.gk(
        "key", "add", "dave", "-", "--no-touch-required", input=SoftKey().public_line(), check=False
    )
    assert result.returncode != 0 and "never drops a security key's touch" in result.stderr
    plain = gk.keys / "plain.pub"

    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(gk.keys / "plain")], check=True
    )
    result = gk.gk("key", "add", "dave", str(plain), "--verify-required", check=False)
    assert result.returncode != 0 and "only a security key" in result.stderr
    gk.gk("key", "add", "dave", "-", "--verify-required", input=SoftKey("ecdsa").public_line())
    listed = json.loads(gk.gk("key", "list", "dave", "--json").stdout)
    assert [k["security_key"] for k in listed] == ["touch+pin"]
    lines = gk.gk("authorized-keys").stdout
    assert "--factor touch+pin" in lines and ",restrict,verify-required sk-ecdsa" in lines


def test_the_audit_shows_who_has_a_security_key_per_team(gk: Installation) -> None:
    gk.write_policy(POLICY)
    gk.add_user("bob")
    gk.gk("user", "add", "alice")
    gk.gk("key", "add", "alice", "-", input=SoftKey().public_line())
    data = json.loads(gk.gk("audit", "--format", "json").stdout)["rollout"]
    assert {u["user"]: u["security_keys"] for u in data["per_user"]} == {"alice": 1, "bob": 0}
    assert data["per_team"][0]["with_security_key"] == 1
    table = gk.gk("audit").stdout
    assert "1 (1 sk)" in table and "SECURITY KEYS" in table
    metrics = gk.gk("audit", "--format", "prometheus").stdout
    assert 'gatekeeper_users_with_security_key{team="hw"} 1' in metrics
