"""The admin CLI, as an admin uses it: real processes, a real policy file and store."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from test_faults import fill, tmpfs

from gatekeeper.store import DB_NAME
from testing.asuser import AsUser, throwaway_user
from testing.installation import Installation


def assert_one_line_error(result: subprocess.CompletedProcess[str], *expected: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("gatekeeper: error: "), result.stderr
    for text in expected:
        assert text in result.stderr, result.stderr


def snapshot(gk: Installation) -> tuple[object, ...]:
    """What a failed command must not change: users, keys, enrollments, audit records."""
    users = gk.gk("user", "list", "--json").stdout
    keys = gk.gk("key", "list", "--json").stdout
    return users, keys, len(gk.audit())


def test_init_creates_a_tight_state_directory(tmp_path: Path) -> None:
    gk = Installation(tmp_path / "gk")
    result = gk.gk("init")
    assert "created server key" in result.stdout
    assert oct(os.stat(gk.state).st_mode & 0o777) == "0o700"
    assert oct(os.stat(gk.state / "server.key").st_mode & 0o777) == "0o600"
    assert os.stat(gk.state / DB_NAME).st_mode & 0o077 == 0
    again = gk.gk("init")
    assert "store is up to date" in again.stdout
    assert "created server key" not in again.stdout


def test_the_admin_workflow(gk: Installation) -> None:
    gk.gk("user", "add", "alice")
    private = gk.keys / "alice"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(private)], check=True)
    fingerprint = gk.gk("key", "add", "alice", str(private) + ".pub").stdout.strip()
    listed = subprocess.run(
        ["ssh-keygen", "-lf", str(private) + ".pub"], capture_output=True, text=True, check=True
    ).stdout
    assert fingerprint.startswith("SHA256:") and fingerprint in listed
    enroll = gk.gk("2fa", "enroll", "alice")
    uri_lines = [line for line in enroll.stdout.splitlines() if line.startswith("otpauth://")]
    assert len(uri_lines) == 1 and "issuer=" in uri_lines[0]
    assert "\u2580" in enroll.stdout or "\u2584" in enroll.stdout or "\u2588" in enroll.stdout
    status = json.loads(gk.gk("2fa", "status", "alice", "--json").stdout)
    assert status[0]["state"] == "pending"
    confirmed = gk.gk("2fa", "confirm", "alice", gk.code("alice"))
    assert "recovery codes" in confirmed.stdout
    status = json.loads(gk.gk("2fa", "status", "--json").stdout)
    assert status[0]["state"] == "enrolled" and status[0]["recovery_codes_left"] == 10
    table = gk.gk("user", "list").stdout
    assert table.splitlines()[0].split()[:3] == ["USER", "TEAMS", "STATE"]
    assert "alice" in table and "platform" in table
    codes = gk.gk("2fa", "recovery-codes", "alice").stdout.split()
    assert len(codes) == 10
    gk.gk("2fa", "reset", "alice")
    assert json.loads(gk.gk("2fa", "status", "alice", "--json").stdout)[0]["state"] == "none"
    gk.gk("key", "remove", fingerprint)
    gk.gk("user", "remove", "alice")
    events = [r["event"] for r in gk.audit()]
    for event in (
        "user-add",
        "key-add",
        "2fa-enroll-start",
        "2fa-enabled",
        "2fa-recovery-codes",
        "2fa-reset",
        "key-remove",
        "user-remove",
    ):
        assert event in events
    assert all(r["actor"] for r in gk.audit() if r["event"] != "policy-change")


def test_enroll_with_code_confirms_at_once(gk: Installation) -> None:
    gk.gk("user", "add", "bob")
    enroll = gk.gk("2fa", "enroll", "bob", "--no-qr", "--code", "000000", check=False)
    assert_one_line_error(enroll, "wrong code")
    # the enrollment stays pending; the right code confirms it
    gk.gk("2fa", "confirm", "bob", gk.code("bob"))
    again = gk.gk("2fa", "enroll", "bob", "--no-qr", check=False)
    assert_one_line_error(again, "already enrolled")


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("", "no public key"),
        ("this is not a key\n", "not"),
        ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJ", "truncated"),
        (
            "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n"
            "-----END OPENSSH PRIVATE KEY-----\n",
            "private key",
        ),
    ],
)
def test_bad_public_keys_are_refused_and_change_nothing(
    gk: Installation, content: str, expected: str
) -> None:
    gk.gk("user", "add", "alice")
    before = snapshot(gk)
    result = gk.gk("key", "add", "alice", "-", input=content, check=False)
    assert_one_line_error(result, expected)
    assert snapshot(gk) == before


def test_weak_and_duplicate_keys_are_refused(gk: Installation) -> None:
    gk.gk("user", "add", "alice")
    gk.gk("user", "add", "bob")
    weak = gk.keys / "weak"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "rsa", "-b", "1024", "-N", "", "-f", str(weak)], check=True
    )
    assert_one_line_error(gk.gk("key", "add", "alice", str(weak) + ".pub", check=False), "1024")
    good = gk.keys / "good"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(good)], check=True)
    gk.gk("key", "add", "alice", str(good) + ".pub")
    before = snapshot(gk)
    dupe = gk.gk("key", "add", "bob", str(good) + ".pub", check=False)
    assert_one_line_error(dupe, "already registered to another user")
    assert snapshot(gk) == before


@pytest.mark.parametrize("name", ["al ice", "a/b", "a\tb", "a\x1bb", "-x", "..", ""])
def test_bad_user_names_are_refused(gk: Installation, name: str) -> None:
    before = snapshot(gk)
    assert_one_line_error(gk.gk("user", "add", "--", name, check=False), "invalid user name")
    assert snapshot(gk) == before


@pytest.mark.parametrize(
    "code", ["", "12345", "1234567890", "12a456", "\uff11\uff12\uff13\uff14\uff15\uff16"]
)
def test_malformed_codes_are_refused(gk: Installation, code: str) -> None:
    gk.gk("user", "add", "bob")
    gk.gk("2fa", "enroll", "bob", "--no-qr")
    before = len(gk.audit())
    assert_one_line_error(gk.gk("2fa", "confirm", "bob", code, check=False))
    assert len(gk.audit()) == before


def test_a_code_from_long_ago_is_refused(gk: Installation) -> None:
    gk.gk("user", "add", "bob")
    gk.gk("2fa", "enroll", "bob", "--no-qr")
    old = gk.code("bob", offset_steps=-120)
    assert_one_line_error(gk.gk("2fa", "confirm", "bob", old, check=False), "wrong code")


def test_check_explains_the_decision(gk: Installation) -> None:
    gk.gk("user", "add", "bob")
    refused = gk.gk("check", "bob", "platform/api", "write", check=False)
    assert refused.returncode == 1
    assert "REFUSE (2fa-not-enrolled)" in refused.stdout
    assert "requires enrolled by team 'platform'" in refused.stdout
    gk.enroll("bob")
    allowed = gk.gk("check", "bob", "platform/secrets", "read", "--json", check=False)
    data = json.loads(allowed.stdout)
    assert allowed.returncode == 1 and data["level"] == "verified"
    assert [r["met"] for r in data["requirements"]] == [False, True]
    ok = gk.gk("check", "bob", "platform/api.git", "write")
    assert "ALLOW (allowed)" in ok.stdout


POLICY_ERRORS = [
    ("teams: [unclosed\n", 2, "malformed YAML"),
    ("teams: !!python/object/apply:os.system ['touch /tmp/gk-pwned']\n", 1, "tags are not"),
    (
        "teams:\n  a:\n    members: [x]\nrepositories:\n  - match: r\n    read: [ghost]\n",
        6,
        "unknown team 'ghost'",
    ),
    ("teams:\n  a:\n    grace_until: 2026-13-45\n", 3, "expected a date like"),
    ("teams:\n  a:\n    grace_until: next week\n", 3, "expected a date like"),
    ("teams:\n  a:\n    require_2fa: always\n", 3, "unknown level 'always'"),
    ("teams:\n  a:\n    members: [x]\n  a:\n    members: [y]\n", 4, "duplicate key 'a'"),
    ("teams:\n  a:\n    requre_2fa: enrolled\n", 3, "unknown key 'requre_2fa'"),
    ("two_factor:\n  session_hours: -1\n", 2, "positive number"),
    ("two_factor:\n  self_enroll: sometimes\n", 2, "true or false"),
]


@pytest.mark.parametrize(("text", "line", "expected"), POLICY_ERRORS)
def test_policy_check_names_the_line_and_the_problem(
    gk: Installation, tmp_path: Path, text: str, line: int, expected: str
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    result = gk.gk("policy", "check", str(bad), check=False)
    assert result.returncode == 1
    lines = [x for x in result.stderr.splitlines() if f"bad.yaml:{line}: error: " in x]
    assert any(expected in x for x in lines), result.stderr
    assert not Path("/tmp/gk-pwned").exists()


def test_policy_check_warns_about_members_unknown_to_the_store(gk: Installation) -> None:
    gk.gk("user", "add", "alice")
    result = gk.gk("policy", "check")
    assert "warning: team 'platform': member 'bob' is not a user in the store" in result.stdout
    assert "ok" in result.stdout


def test_policy_check_reports_several_problems_at_once(gk: Installation, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("teams:\n  a:\n    require_2fa: x\n    mode: loud\nbogus: 1\n")
    result = gk.gk("policy", "check", str(bad), check=False)
    assert result.stderr.count(": error: ") == 3
    assert "3 error(s)" in result.stderr


def test_every_command_refuses_an_invalid_policy_in_one_line(gk: Installation) -> None:
    gk.config.write_text("teams: !!python/name:os.system\n")
    result = gk.gk("user", "list", check=False)
    assert_one_line_error(result, "invalid policy file")
    assert "tags are not allowed" in result.stderr


def test_a_missing_state_directory_says_to_run_init(tmp_path: Path) -> None:
    gk = Installation(tmp_path / "gk")
    result = gk.gk("user", "list", check=False)
    assert_one_line_error(result, "state directory not found", "gatekeeper init")


def test_a_database_from_a_newer_schema_is_refused(gk: Installation) -> None:
    import sqlite3

    conn = sqlite3.connect(gk.state / DB_NAME)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    assert_one_line_error(gk.gk("user", "list", check=False), "newer than this gatekeeper")


def test_a_corrupt_database_is_refused(gk: Installation) -> None:
    db = gk.state / DB_NAME
    for suffix in ("-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    db.write_bytes(b"\x00garbage" * 512)
    assert_one_line_error(gk.gk("user", "add", "x", check=False), "corrupt")


@contextmanager
def read_only_mount(path: Path) -> Iterator[None]:
    """`path` becomes an empty read-only file system (root ignores permission bits)."""
    path.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        if os.environ.get("CI") == "true" and os.geteuid() == 0:
            pytest.fail(f"cannot mount a read-only tmpfs: {result.stderr}")
        pytest.skip(f"cannot mount a read-only tmpfs here: {result.stderr.strip()}")
    try:
        yield
    finally:
        subprocess.run(["umount", str(path)], check=False)


def test_a_read_only_state_directory_is_refused(tmp_path: Path) -> None:
    gk = Installation(tmp_path / "gk")
    with read_only_mount(gk.state):
        result = gk.gk("init", check=False)
    assert_one_line_error(result, "state directory is not writable")


def test_authorized_keys_are_written_between_markers(gk: Installation) -> None:
    _, key_id = gk.add_user("alice")
    target = gk.base / "authorized_keys"
    target.write_text("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOther admin@box\n")
    assert "updated" in gk.gk("authorized-keys", "--write", str(target)).stdout
    text = target.read_text()
    assert text.startswith("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOther admin@box\n")
    line = next(x for x in text.splitlines() if "gatekeeper-shell" in x)
    assert line.startswith('command="') and f' {key_id}",restrict ssh-ed25519 ' in line
    assert "alice" not in line, "comments and names never reach the command line"
    assert "unchanged" in gk.gk("authorized-keys", "--write", str(target)).stdout
    fingerprint = gk.audit(event="key-add")[0]["key_fp"]
    gk.gk("key", "remove", fingerprint, "--authorized-keys", str(target))
    assert "gatekeeper-shell" not in target.read_text()
    assert "admin@box" in target.read_text()


def test_keys_command_prints_a_line_only_for_known_keys_and_the_git_user(
    gk: Installation,
) -> None:
    private, _ = gk.add_user("alice")
    key_type, blob = Path(str(private) + ".pub").read_text().split()[:2]
    out = gk.gk("keys-command", "git", key_type, blob).stdout
    assert out.startswith('command="') and out.rstrip().endswith(f"{key_type} {blob}")
    assert gk.gk("keys-command", "root", key_type, blob).stdout == ""
    other = gk.keys / "other"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    t2, b2 = Path(str(other) + ".pub").read_text().split()[:2]
    assert gk.gk("keys-command", "git", t2, b2).stdout == ""
    garbage = gk.gk("keys-command", "git", "ssh-ed25519", "!!!", check=False)
    assert garbage.stdout == "" and "Traceback" not in garbage.stderr


# -- authorized-keys --write where the account cannot write ------------------------------------


@pytest.fixture(scope="module")
def unprivileged() -> Iterator[AsUser]:
    with throwaway_user() as user:
        yield user


@pytest.fixture
def their_install(unprivileged: AsUser) -> Iterator[Installation]:
    """An installation with one registered key, owned by the unprivileged user."""
    base = Path(tempfile.mkdtemp(prefix="gk.", dir=unprivileged.home))
    gk = Installation(base).init()
    gk.add_user("alice")
    unprivileged.own(base)
    yield gk
    shutil.rmtree(base, ignore_errors=True)


def tree(directory: Path) -> dict[str, bytes | None]:
    """Every entry under `directory` with its bytes (None for a directory)."""
    return {
        str(p.relative_to(directory)): None if p.is_dir() else p.read_bytes()
        for p in sorted(directory.rglob("*"))
    }


def _root_owned_dir(gk: Installation) -> Path:
    """A directory the user may read but not write, holding an authorized_keys it owns."""
    directory = gk.base / "sealed"
    directory.mkdir(mode=0o755)
    target = directory / "authorized_keys"
    target.write_text("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOther admin@box\n")
    os.chown(target, *_owner(gk.base))
    return target


def _missing_under_a_root_owned_dir(gk: Installation) -> Path:
    directory = gk.base / "sealed"
    directory.mkdir(mode=0o755)
    return directory / "ssh" / "authorized_keys"


def _unreadable_file(gk: Installation) -> Path:
    target = gk.base / "authorized_keys"
    target.write_text("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOther admin@box\n")
    os.chown(target, 0, 0)
    target.chmod(0o600)
    return target


def _a_directory(gk: Installation) -> Path:
    target = gk.base / "authorized_keys"
    target.mkdir()
    os.chown(target, *_owner(gk.base))
    return target


def _owner(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_uid, st.st_gid


@pytest.mark.parametrize(
    ("make_target", "expected"),
    [
        (_root_owned_dir, "cannot write"),
        (_missing_under_a_root_owned_dir, "cannot create the directory"),
        (_unreadable_file, "cannot read"),
        (_a_directory, "it is a directory"),
    ],
    ids=lambda v: getattr(v, "__name__", "")[1:] if callable(v) else None,
)
def test_authorized_keys_write_refuses_in_one_line_and_leaves_the_file(
    unprivileged: AsUser, their_install: Installation, make_target: object, expected: str
) -> None:
    gk = their_install
    target: Path = make_target(gk)  # type: ignore[operator]
    before = tree(gk.base)
    result = unprivileged.gk("authorized-keys", "--write", str(target), env=gk.env)
    assert_one_line_error(result, expected, str(target))
    assert len(result.stderr.splitlines()) == 2 and "gatekeeper: hint: " in result.stderr
    assert tree(gk.base) == before, "the file and its directory are as they were"


def test_key_add_says_the_key_was_added_when_authorized_keys_cannot_be_written(
    unprivileged: AsUser, their_install: Installation
) -> None:
    gk = their_install
    target = _root_owned_dir(gk)
    before = target.read_bytes()
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(gk.base / "k")])
    unprivileged.own(gk.base / "k.pub")
    result = unprivileged.gk(
        "key", "add", "alice", str(gk.base / "k.pub"), "--authorized-keys", str(target), env=gk.env
    )
    assert_one_line_error(result, "added SHA256:", "but cannot write")
    assert f"gatekeeper authorized-keys --write {target}" in result.stderr
    assert target.read_bytes() == before
    assert len(gk.audit(event="key-add")) == 2


def test_authorized_keys_write_on_a_full_disk_leaves_the_file(
    unprivileged: AsUser, their_install: Installation
) -> None:
    gk = their_install
    mount = gk.base / "full"
    with tmpfs(mount, "1m"):
        os.chown(mount, unprivileged.uid, unprivileged.gid)
        target = mount / "authorized_keys"
        target.write_text("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOther admin@box\n")
        os.chown(target, unprivileged.uid, unprivileged.gid)
        fill(mount)
        before = tree(mount)
        result = unprivileged.gk("authorized-keys", "--write", str(target), env=gk.env)
        after = tree(mount)
    assert_one_line_error(result, "cannot write", "no space left")
    assert "free space" in result.stderr
    assert after == before


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("key", "add", "alice", "{bad}"), "not UTF-8 text"),
        (("policy", "check", "{bad}"), "not UTF-8 text"),
        (("authorized-keys", "--write", "{bad}"), "not UTF-8 text"),
    ],
)
def test_files_that_are_not_text_are_refused_in_one_line(
    gk: Installation, args: tuple[str, ...], expected: str
) -> None:
    bad = gk.base / "binary"
    bad.write_bytes(b"ssh-ed25519 \xff\xfe\n")
    result = gk.gk(*(a.replace("{bad}", str(bad)) for a in args), check=False)
    assert_one_line_error(result, expected)
    assert bad.read_bytes() == b"ssh-ed25519 \xff\xfe\n"


def test_a_file_error_no_command_foresaw_is_still_one_line(
    gk: Installation, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from gatekeeper import authkeys
    from gatekeeper.cli import main as cli

    def broken(lines: list[str]) -> str:
        raise PermissionError(13, "Permission denied", "/somewhere/else")

    monkeypatch.setattr(authkeys, "render_block", broken)
    assert cli.main(["--config", str(gk.config), "authorized-keys"]) == 1
    err = capsys.readouterr().err
    assert err.splitlines() == [
        "gatekeeper: error: Permission denied (/somewhere/else)",
        "gatekeeper: hint: check that file's owner, mode and file system; run gatekeeper as "
        "the git user.",
    ]
