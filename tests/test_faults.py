"""Faults beyond the named ones in test_shell/test_store/test_cli: a full state
directory, a missing or exposed server key, a clock far off, a database locked during
`2fa verify`, and store or policy files that are there but unusable.

Each must refuse clearly (a message and at most a hint, no traceback), never let git
run without an audit record, and leave the store as it was: it opens, its audit chain
verifies and nothing was half-written."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from gatekeeper import totp, twofactor
from gatekeeper.errors import Refused, StoreError
from gatekeeper.policy import Policy, load_policy
from gatekeeper.store import DB_NAME, SCHEMA_VERSION, Store
from testing.installation import DEFAULT_POLICY, Installation

FETCH = "git-upload-pack 'platform/api'"


def assert_clean_refusal(result: subprocess.CompletedProcess[str], *expected: str) -> None:
    """Refused, in one message line and at most one hint line, with no traceback."""
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert 1 <= len(lines) <= 2, result.stderr
    assert lines[0].startswith("gatekeeper: ") and "hint:" not in lines[0], result.stderr
    assert all(line.startswith("gatekeeper: hint: ") for line in lines[1:]), result.stderr
    for text in expected:
        assert text in result.stderr, result.stderr


def assert_fetch_allowed(gk: Installation, key: int) -> None:
    result = gk.shell(key, FETCH, stdin="0000")
    assert result.returncode == 0, result.stderr
    assert "refs/heads/main" in result.stdout


@contextmanager
def opened(gk: Installation) -> Iterator[Store]:
    with Store.open(gk.state) as store:
        yield store


def state_of(gk: Installation) -> tuple[Any, int, Any]:
    """What a refused operation must not change."""
    with opened(gk) as store:
        assert store.verify_audit() == []
        rows = [
            store.conn.execute(f"SELECT * FROM {table} ORDER BY 1").fetchall()  # noqa: S608
            for table in ("users", "keys", "totp", "sessions", "failures", "recovery_codes")
        ]
        return (
            [[tuple(r) for r in table] for table in rows],
            len(store.audit_records()),
            store.read_head(),
        )


@pytest.fixture
def site(gk: Installation) -> tuple[Installation, int]:
    key_id = gk.enrolled_reader()
    return gk, key_id


# -- a full state directory ------------------------------------------------------------------


@contextmanager
def tmpfs(path: Path, size: str) -> Iterator[None]:
    """Mount a small tmpfs on `path` (tests run as root here and in CI)."""
    path.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        if os.environ.get("CI") == "true":
            pytest.fail(f"cannot mount a tmpfs: {result.stderr.strip()}")
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    try:
        yield
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], check=False)


def fill(directory: Path, leave: int = 0) -> Path:
    """Fill the file system of `directory` up, then free `leave` bytes again."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    block = b"\0" * 65536
    try:
        while True:
            try:
                os.write(fd, block)
            except OSError:
                if len(block) == 4096:
                    break
                block = block[:4096]
    finally:
        os.close(fd)
    if leave:
        os.truncate(filler, max(0, filler.stat().st_size - leave))
    return filler


def test_a_full_state_directory_refuses_git_and_keeps_the_store(tmp_path: Path) -> None:
    gk = Installation(tmp_path / "gk")
    with tmpfs(gk.state, "4m"):
        gk.init()
        key = gk.enrolled_reader()
        assert_fetch_allowed(gk, key)
        before = state_of(gk)

        filler = fill(gk.state)
        refused = gk.shell(key, FETCH, stdin="0000")
        # No audit record can be written, so no git: whichever write failed first.
        assert_clean_refusal(refused)
        assert "refs/heads/main" not in refused.stdout
        assert any(
            text in refused.stderr
            for text in ("cannot read its 2FA state", "cannot be written", "audit head")
        ), refused.stderr
        user_cmd = gk.shell(key, "2fa status")
        assert "Traceback" not in user_cmd.stderr

        filler.unlink()
        assert state_of(gk) == before, "the refused request left something behind"
        assert_fetch_allowed(gk, key)
        after = gk.audit()
        assert after[-1]["event"] == "access" and after[-1]["reason"] == "allowed"
        assert len(after) == before[1] + 1


def test_a_nearly_full_state_directory_never_leaves_the_audit_log_inconsistent(
    tmp_path: Path,
) -> None:
    """With 0, 4, 8 ... KiB free, an audit write either happens or fails with a
    StoreError; the chain and the head file agree afterwards every time (a COMMIT that
    fails after the head file was written used to leave the head ahead: 'cut off')."""
    state = tmp_path / "state"
    with tmpfs(state, "2m"):
        Store.create(state).close()
        watcher = Store.open(state)  # keeps the WAL in place, as a busy server does
        try:
            written = 0
            outcomes = []
            for leave_kib in range(0, 100, 4):
                filler = fill(state, leave=leave_kib * 1024)
                try:
                    with Store.open(state) as store:
                        store.audit("access", user="bob", detail={"free_kib": leave_kib})
                    written += 1
                    outcomes.append("written")
                except StoreError as exc:
                    outcomes.append(exc.message.split(":")[0])
                finally:
                    filler.unlink()
                with Store.open(state) as store:
                    assert store.verify_audit() == [], (leave_kib, outcomes)
                    assert len(store.audit_records()) == written
            assert "written" in outcomes and outcomes[0] != "written", outcomes
            assert not list(state.glob(".audit.head*")), "temporary head files left behind"
        finally:
            watcher.close()


# -- the server key ----------------------------------------------------------------------------


def test_a_missing_server_key_refuses_verify_but_not_git(
    site: tuple[Installation, int],
) -> None:
    """The git-access path never reads the server key (it needs only the store's facts),
    so members keep working at level `enrolled` and within open verified sessions; what
    needs the key (verify, confirm, disable) refuses, changing nothing, and the server
    log tells the admin what to do."""
    gk, key = site
    gk.repo("platform/secrets")
    assert gk.shell(key, f"2fa verify {gk.code('bob')}").returncode == 0
    key_file = gk.state / "server.key"
    saved = key_file.read_bytes()
    key_file.unlink()
    before = state_of(gk)

    refused = gk.shell(key, f"2fa verify {gk_code_from(saved, gk, 'bob', 0)}")
    assert_clean_refusal(refused, "cannot read its 2FA state")
    assert "server key" not in refused.stderr
    assert_logged(gk, "server key", "does not exist", "restore it from a backup")
    assert state_of(gk) == before
    assert_fetch_allowed(gk, key)  # platform/api needs `enrolled`
    secrets = gk.shell(key, "git-upload-pack 'platform/secrets'", stdin="0000")
    assert secrets.returncode == 0, secrets.stderr  # the session opened above still holds

    restore_key(key_file, saved)
    assert gk.shell(key, f"2fa verify {gk.code('bob')}").returncode == 0


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
def test_a_server_key_readable_by_others_refuses_with_the_fix(
    site: tuple[Installation, int], mode: int
) -> None:
    gk, key = site
    key_file = gk.state / "server.key"
    key_file.chmod(mode)
    before = state_of(gk)
    refused = gk.shell(key, f"2fa verify {gk_code_from(key_file.read_bytes(), gk, 'bob', 0)}")
    assert_clean_refusal(refused, "cannot read its 2FA state")
    assert_logged(gk, f"mode {mode:04o}", f"chmod 600 {key_file}")
    assert state_of(gk) == before
    assert_fetch_allowed(gk, key)


def test_a_server_key_from_elsewhere_refuses_with_the_fix(
    site: tuple[Installation, int],
) -> None:
    gk, key = site
    key_file = gk.state / "server.key"
    saved = key_file.read_bytes()
    restore_key(key_file, os.urandom(32))
    before = state_of(gk)
    refused = gk.shell(key, f"2fa verify {gk_code_from(saved, gk, 'bob', 0)}")
    assert_clean_refusal(refused, "cannot read its 2FA state")
    assert_logged(gk, "wrong server key", "2fa reset")
    assert state_of(gk) == before


def assert_logged(gk: Installation, *expected: str) -> None:
    """The details the client was spared are in the server log, on one line."""
    lines = (gk.state / "gatekeeper.log").read_text().splitlines()
    assert any(all(text in line for text in expected) for line in lines), lines


def restore_key(path: Path, data: bytes) -> None:
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, data)
    os.close(fd)


def gk_code_from(key: bytes, gk: Installation, user: str, offset_steps: int) -> str:
    """The code the user's phone shows, decrypting the secret with a key held aside."""
    with opened(gk) as store:
        record = store.get_user(user)
        row = store.get_totp(record.id)
        assert row is not None
        secret = totp.decrypt_secret(key, record.id, row.secret)
    return totp.current_code(secret, time.time() + 30 * offset_steps)


# -- the clock ---------------------------------------------------------------------------------


@pytest.fixture
def direct(site: tuple[Installation, int]) -> Iterator[tuple[Store, Policy, str]]:
    """The site's store and policy in this process, and bob's secret (tests play the phone);
    max_failures is raised so that a series of wrong codes is not cut short by a lockout."""
    gk, _ = site
    gk.write_policy(DEFAULT_POLICY, two_factor="two_factor:\n  max_failures: 50\n")
    policy = load_policy(gk.config, cache_dir=gk.base / "cache")
    secret = gk.secret("bob")
    with opened(gk) as store:
        yield store, policy, secret


def test_a_code_from_long_ago_is_refused(direct: tuple[Store, Policy, str]) -> None:
    store, policy, secret = direct
    key = store.list_keys("bob")[0]
    now = time.time()
    for ago in (90, 3600, 86_400, 365 * 86_400):
        old = totp.current_code(secret, now - ago)
        if old in {totp.current_code(secret, now + 30 * k) for k in (-1, 0, 1)}:
            continue  # one in 300,000: the old code happens to be valid now
        with pytest.raises(Refused, match="wrong code"):
            twofactor.verify(store, policy, key, old, now=now)
    assert store.session_until(key.user_id, key.id) is None
    events = [r["event"] for r in store.audit_records(user="bob")]
    assert events.count("2fa-failure") >= 3


def test_a_server_clock_far_ahead_refuses_the_current_code(
    direct: tuple[Store, Policy, str],
) -> None:
    store, policy, secret = direct
    key = store.list_keys("bob")[0]
    now = time.time()
    code = totp.current_code(secret, now)
    for skew in (120, 3600, 86_400):
        with pytest.raises(Refused, match="wrong code"):
            twofactor.verify(store, policy, key, code, now=now + skew)
    assert store.session_until(key.user_id, key.id) is None


def test_after_the_clock_ran_ahead_codes_are_refused_until_it_catches_up(
    direct: tuple[Store, Policy, str],
) -> None:
    """A timestep once accepted is never accepted again, nor any earlier one: if the
    server's clock ran an hour ahead and a code for that hour was accepted, codes are
    refused until real time passes that step. Fail closed; the cure is NTP."""
    store, policy, secret = direct
    key = store.list_keys("bob")[0]
    now = time.time()
    ahead = now + 3600
    twofactor.verify(store, policy, key, totp.current_code(secret, ahead), now=ahead)
    with pytest.raises(Refused, match="already used"):
        twofactor.verify(store, policy, key, totp.current_code(secret, now), now=now)
    later = ahead + 30
    twofactor.verify(store, policy, key, totp.current_code(secret, later), now=later)


# -- the database locked during `2fa verify` ---------------------------------------------------


def test_a_database_locked_past_the_busy_timeout_during_verify(
    site: tuple[Installation, int],
) -> None:
    gk, key = site
    before = state_of(gk)
    code = gk.code("bob")  # stays inside the server's window for 30 s
    holder = sqlite3.connect(gk.state / DB_NAME, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        started = time.monotonic()
        refused = gk.shell(key, f"2fa verify {code}")
        waited = time.monotonic() - started
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert_clean_refusal(refused, "busy")
    assert waited < 30, "it must give up after the busy timeout, not hang"
    assert state_of(gk) == before, "nothing may be half-written"
    # Nothing was consumed: the same code still works once the lock is gone.
    accepted = gk.shell(key, f"2fa verify {code}")
    assert accepted.returncode == 0, accepted.stderr


# -- store and policy files that exist but cannot be used --------------------------------------


def _db_is_a_directory(gk: Installation) -> None:
    db = gk.state / DB_NAME
    db.rename(gk.base / "db.saved")
    db.mkdir()


def _db_from_a_newer_schema(gk: Installation) -> None:
    conn = sqlite3.connect(gk.state / DB_NAME)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()


def _db_empty_file(gk: Installation) -> None:
    db = gk.state / DB_NAME
    db.rename(gk.base / "db.saved")
    db.write_bytes(b"")


def _db_not_sqlite(gk: Installation) -> None:
    db = gk.state / DB_NAME
    db.rename(gk.base / "db.saved")
    db.write_text("SQLite format 3\0" + "x" * 5000)


def _policy_is_a_directory(gk: Installation) -> None:
    gk.config.rename(gk.base / "config.saved")
    gk.config.mkdir()


def _policy_not_utf8(gk: Installation) -> None:
    gk.config.rename(gk.base / "config.saved")
    gk.config.write_bytes(b"teams:\n  \xff\xfe: {}\n")


def _policy_empty(gk: Installation) -> None:
    gk.config.rename(gk.base / "config.saved")
    gk.config.write_text("")


def _restore(gk: Installation) -> None:
    for stray in gk.state.glob(f"{DB_NAME}-*"):
        stray.unlink()  # never let another file's WAL be replayed into the real database
    for saved, target in (
        (gk.base / "db.saved", gk.state / DB_NAME),
        (gk.base / "config.saved", gk.config),
    ):
        if saved.exists():
            if target.is_dir():
                target.rmdir()
            else:
                target.unlink()
            saved.rename(target)
    conn = sqlite3.connect(gk.state / DB_NAME)
    if conn.execute("PRAGMA user_version").fetchone()[0] > SCHEMA_VERSION:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    conn.close()


@pytest.mark.parametrize(
    ("fault", "expected"),
    [
        (_db_is_a_directory, "cannot read its 2FA state"),
        (_db_from_a_newer_schema, "cannot read its 2FA state"),
        (_db_empty_file, "cannot read its 2FA state"),
        (_db_not_sqlite, "cannot read its 2FA state"),
        (_policy_is_a_directory, "policy file is invalid or unreadable"),
        (_policy_not_utf8, "policy file is invalid or unreadable"),
        (_policy_empty, "policy file is invalid or unreadable"),
    ],
    ids=lambda v: getattr(v, "__name__", "")[1:] if callable(v) else None,
)
def test_unusable_store_or_policy_files_refuse_git_and_user_commands(
    site: tuple[Installation, int], fault: object, expected: str
) -> None:
    gk, key = site
    before = state_of(gk)
    assert not list(gk.state.glob(f"{DB_NAME}-*")), "the WAL is checkpointed on last close"
    fault(gk)  # type: ignore[operator]
    for command in (FETCH, "git-receive-pack 'platform/api'", "2fa status", None):
        result = gk.shell(key, command, stdin="0000")
        assert_clean_refusal(result, expected)
        assert "refs/heads" not in result.stdout
    _restore(gk)
    assert state_of(gk) == before
    assert_fetch_allowed(gk, key)
