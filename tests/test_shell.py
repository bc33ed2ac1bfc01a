"""gatekeeper-shell as sshd runs it: the real console script, a real store and real git,
without sshd in between (the end-to-end tests add sshd)."""

from __future__ import annotations

import os
import sqlite3
import subprocess
from pathlib import Path

import pytest

from gatekeeper.store import DB_NAME
from testing.installation import GATEKEEPER_SHELL, Installation


@pytest.fixture
def site(gk: Installation) -> tuple[Installation, int]:
    gk.repo("platform/api")
    _, key_id = gk.add_user("bob")
    gk.enroll("bob")
    return gk, key_id


def assert_clean_refusal(result: subprocess.CompletedProcess[str], *expected: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert lines and all(line.startswith("gatekeeper: ") for line in lines), result.stderr
    for text in expected:
        assert text in result.stderr


def test_an_allowed_fetch_runs_git_upload_pack(site: tuple[Installation, int]) -> None:
    gk, key = site
    result = gk.shell(key, "git-upload-pack 'platform/api.git'", stdin="0000")
    assert result.returncode == 0, result.stderr
    assert "refs/heads/main" in result.stdout


def test_without_ssh_connection_it_refuses(site: tuple[Installation, int]) -> None:
    gk, key = site
    env = {k: v for k, v in gk.env.items() if not k.startswith("SSH_")}
    env["SSH_ORIGINAL_COMMAND"] = "git-upload-pack 'platform/api'"
    result = subprocess.run(
        [GATEKEEPER_SHELL, "--config", str(gk.config), str(key)],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )
    assert_clean_refusal(result, "only SSH is supported")


def test_ssh_connection_unknown_from_sshd_i_is_accepted(site: tuple[Installation, int]) -> None:
    gk, key = site
    result = gk.shell(
        key,
        "git-upload-pack 'platform/api'",
        stdin="0000",
        extra_env={"SSH_CONNECTION": "UNKNOWN 65535 UNKNOWN 65535"},
    )
    assert result.returncode == 0, result.stderr
    assert gk.audit(event="access")[-1]["client"] == "UNKNOWN"


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["abc"],
        ["1", "2"],
        ["-1"],
        ["1;id"],
        ["--port", "0", "1"],
        ["--port", "65536", "1"],
        ["--port", "-22", "1"],
        ["--port", "1"],
        ["1", "--port", "22"],
    ],
)
def test_a_bad_key_id_argument_is_refused(gk: Installation, argv: list[str]) -> None:
    env = {**gk.env, "SSH_CONNECTION": "127.0.0.1 1 127.0.0.1 22"}
    result = subprocess.run(
        [GATEKEEPER_SHELL, *argv], capture_output=True, text=True, env=env, timeout=30
    )
    assert_clean_refusal(result, "one key id argument")


def test_a_key_that_does_not_exist_or_was_just_removed(site: tuple[Installation, int]) -> None:
    gk, key = site
    assert_clean_refusal(gk.shell(999, "git-upload-pack 'platform/api'"), "not registered")
    fingerprint = gk.audit(event="key-add")[0]["key_fp"]
    gk.gk("key", "remove", fingerprint)
    assert_clean_refusal(gk.shell(key, "git-upload-pack 'platform/api'"), "not registered")
    assert gk.audit(event="access")[-1]["reason"] == "unknown-key"


def test_a_user_removed_from_every_team_is_refused(site: tuple[Installation, int]) -> None:
    gk, key = site
    gk.write_policy(
        "teams:\n  platform:\n    members: [alice]\nrepositories:\n"
        "  - match: platform/*\n    write: [platform]\n"
    )
    result = gk.shell(key, "git-upload-pack 'platform/api'")
    assert_clean_refusal(result, "not found, or you do not have access")


@pytest.mark.parametrize(
    "command",
    [
        "git-upload-pack 'platform/api'; id",
        "git-upload-pack 'platform/api' | id",
        "git-upload-pack 'platform/api' && id",
        "git-upload-pack '`id`'",
        "git-upload-pack '$(id)'",
        "git-upload-pack 'platform/api'\nid",
        "git-upload-pack '--upload-pack=touch x'",
        "git-upload-pack -h",
        "git-upload-pack 'platform/api' 'x'",
        "git-upload-pack 'platform/../../etc'",
        "git-upload-pack '/etc/passwd'",
        "git-upload-pack '%2e%2e/x'",
        "git-upload-pack " + "a" * 2000,
        "rm -rf /",
        "git-upload-pack",
    ],
)
def test_bad_commands_are_refused_cleanly_and_audited(
    site: tuple[Installation, int], command: str
) -> None:
    gk, key = site
    result = gk.shell(key, command)
    assert_clean_refusal(result)
    assert result.stdout == ""
    last = gk.audit(event="access")[-1]
    assert last["reason"] in {"bad-command", "not-authorized", "not-found"}


def test_a_symlink_in_the_root_pointing_outside_is_treated_as_missing(
    site: tuple[Installation, int], tmp_path: Path
) -> None:
    gk, key = site
    outside = tmp_path / "outside.git"
    subprocess.run(["git", "init", "-q", "--bare", str(outside)], check=True)
    os.symlink(outside, gk.repos / "platform" / "escape.git")
    result = gk.shell(key, "git-upload-pack 'platform/escape'")
    assert_clean_refusal(result, "not found, or you do not have access")


def test_client_environment_never_reaches_git(
    site: tuple[Installation, int], tmp_path: Path
) -> None:
    gk, key = site
    decoy = tmp_path / "decoy.git"
    subprocess.run(["git", "init", "-q", "--bare", str(decoy)], check=True)
    trace = tmp_path / "trace"
    hostile = {
        "LD_PRELOAD": "/nonexistent/evil.so",
        "GIT_TRACE": str(trace),
        "GIT_DIR": str(decoy),
        "GIT_CONFIG_PARAMETERS": "'uploadpack.packobjectshook'='touch /tmp/pwned'",
        "GIT_PROTOCOL": "version=2\nx",
    }
    result = gk.shell(key, "git-upload-pack 'platform/api'", stdin="0000", extra_env=hostile)
    assert result.returncode == 0, result.stderr
    assert "refs/heads/main" in result.stdout, "served the real repository, not GIT_DIR"
    assert not trace.exists(), "GIT_TRACE reached git"
    # The loader complains once, for gatekeeper-shell itself (sshd never passes LD_PRELOAD);
    # a second complaint would come from git.
    assert result.stderr.count("evil.so") == 1


def test_git_protocol_v2_is_passed_when_valid(site: tuple[Installation, int]) -> None:
    gk, key = site
    result = gk.shell(
        key, "git-upload-pack 'platform/api'", stdin="0000", extra_env={"GIT_PROTOCOL": "version=2"}
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("000eversion 2")


def test_an_invalid_policy_fails_closed(site: tuple[Installation, int]) -> None:
    gk, key = site
    gk.config.write_text("teams: [unclosed\n")
    result = gk.shell(key, "git-upload-pack 'platform/api'")
    assert_clean_refusal(result, "policy file is invalid")


def test_a_missing_policy_fails_closed(site: tuple[Installation, int]) -> None:
    gk, key = site
    gk.config.unlink()
    assert_clean_refusal(gk.shell(key, "git-upload-pack 'platform/api'"), "policy file")


def test_a_corrupt_database_fails_closed(site: tuple[Installation, int]) -> None:
    gk, key = site
    db = gk.state / DB_NAME
    for suffix in ("-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    db.write_bytes(b"garbage" * 1000)
    result = gk.shell(key, "git-upload-pack 'platform/api'")
    assert_clean_refusal(result, "cannot read its 2FA state")


def test_a_missing_database_fails_closed(site: tuple[Installation, int]) -> None:
    gk, key = site
    for path in gk.state.glob(f"{DB_NAME}*"):
        path.unlink()
    assert_clean_refusal(
        gk.shell(key, "git-upload-pack 'platform/api'"), "cannot read its 2FA state"
    )


def test_a_locked_database_refuses_rather_than_hangs(site: tuple[Installation, int]) -> None:
    gk, key = site
    holder = sqlite3.connect(gk.state / DB_NAME, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        result = gk.shell(key, "git-upload-pack 'platform/api'")
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    # No audit record could be written, so no git: a clean refusal.
    assert_clean_refusal(result, "busy")


def test_info_lists_what_the_user_can_reach(site: tuple[Installation, int]) -> None:
    gk, key = site
    gk.repo("platform/secrets")
    gk.repo("docs")
    result = gk.shell(key, None)
    assert result.returncode == 0, result.stderr
    lines = result.stdout
    assert "user: bob" in lines and "two-step verification: enrolled" in lines
    assert "platform/api" in lines and "platform/secrets" in lines and "docs" in lines
    secrets_line = next(x for x in lines.splitlines() if "platform/secrets" in x)
    assert "needs verified" in secrets_line


def test_self_enrollment_can_be_turned_off(gk: Installation) -> None:
    _, key = gk.add_user("alice")
    gk.write_policy(
        "teams:\n  t:\n    members: [alice]\n", two_factor="two_factor:\n  self_enroll: false\n"
    )
    result = gk.shell(key, "2fa enroll")
    assert_clean_refusal(result, "self-enrollment is turned off", "gatekeeper 2fa enroll alice")


def test_enrolling_twice_needs_disable_first(site: tuple[Installation, int]) -> None:
    gk, key = site
    result = gk.shell(key, "2fa enroll")
    assert_clean_refusal(result, "already enrolled", "2fa disable")


def test_disable_needs_a_current_code_and_takes_effect_at_once(
    site: tuple[Installation, int],
) -> None:
    gk, key = site
    assert_clean_refusal(gk.shell(key, "2fa disable 000000"), "wrong code")
    ok = gk.shell(key, f"2fa disable {gk.code('bob')}")
    assert ok.returncode == 0, ok.stderr
    refused = gk.shell(key, "git-upload-pack 'platform/api'")
    assert_clean_refusal(refused, "have not enrolled")
    assert "2fa-disabled" in [r["event"] for r in gk.audit(user="bob")]


def test_a_recovery_code_works_once(gk: Installation) -> None:
    gk.repo("platform/secrets")
    _, key = gk.add_user("alice")
    gk.gk("2fa", "enroll", "alice", "--no-qr")
    confirm = gk.gk("2fa", "confirm", "alice", gk.code("alice"))
    codes = [line.strip() for line in confirm.stdout.splitlines()[1:] if line.strip()]
    assert len(codes) == 10
    first = gk.shell(key, f"2fa verify {codes[0]}")
    assert first.returncode == 0, first.stderr
    again = gk.shell(key, f"2fa verify {codes[0]}")
    assert_clean_refusal(again, "wrong or already used recovery code")


@pytest.mark.parametrize("code", ["12345", "1234567", "12a456", "abc", "\u0661\u0662\u0663456"])
def test_malformed_codes_are_refused_without_counting(
    site: tuple[Installation, int], code: str
) -> None:
    gk, key = site
    result = gk.shell(key, f"2fa verify {code}")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "2fa-failure" not in [r["event"] for r in gk.audit(user="bob")]


def test_a_line_left_for_a_removed_key_never_acts_as_the_key_that_took_its_id(
    gk: Installation,
) -> None:
    """SQLite gives a new row the largest id plus one, so the id of a removed key is
    handed out again. An authorized_keys line (or key index entry) left behind for the
    removed key names the key's fingerprint too, and the forced command holds the id to
    it: the old key is "not registered", never the new key's owner."""
    gk.repo("platform/api")
    _, bob_id = gk.add_user("bob")
    gk.enroll("bob")
    lines = gk.gk("authorized-keys").stdout
    old_line = next(line for line in lines.splitlines() if f' {bob_id}",' in line)
    old_fp = gk.audit(event="key-add", user="bob")[-1]["key_fp"]
    assert f"--key {old_fp} {bob_id}" in old_line
    gk.gk("key", "remove", old_fp)
    _, alice_id = gk.add_user("alice")  # platform, enrolled: could read platform/api
    gk.enroll("alice")
    assert alice_id == bob_id
    env = {**gk.env, "SSH_CONNECTION": "127.0.0.1 1 127.0.0.1 22"}
    env["SSH_ORIGINAL_COMMAND"] = "git-upload-pack 'platform/api'"
    stale = subprocess.run(
        [GATEKEEPER_SHELL, "--config", str(gk.config), "--key", old_fp, str(bob_id)],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
        input="0000",
    )
    assert_clean_refusal(stale, "this key is not registered")
    record = gk.audit(event="access")[-1]
    assert (record["reason"], record["key_fp"], record["user"]) == ("unknown-key", old_fp, None)


@pytest.mark.parametrize("entry", ["gatekeeper.shell", "gatekeeper.hooks.__main__"])
def test_an_unexpected_failure_is_one_line_for_the_client_and_the_details_for_the_log(
    entry: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Whatever breaks inside the forced command or a hook, the client reads the same
    one line and no traceback; the server log gets what broke."""
    import importlib

    module = importlib.import_module(entry)
    logged: list[str] = []
    monkeypatch.setattr(module, "log", logged.append)

    def boom(*args: object, **kwargs: object) -> int:
        raise ValueError("the disk caught fire")

    if entry == "gatekeeper.shell":
        monkeypatch.setattr(module, "run", boom)
        argv = ["7"]
    else:
        monkeypatch.setattr("gatekeeper.hooks.prereceive.pre_receive", boom)
        monkeypatch.setattr("sys.stdin", open(os.devnull))
        argv = ["pre-receive", "--config", "/nonexistent/policy.yaml"]
    assert module.main(argv) == 1
    err = capsys.readouterr().err
    assert err == "gatekeeper: access refused: internal error (logged on the server).\n"
    assert logged == ["internal error: ValueError: the disk caught fire"]
