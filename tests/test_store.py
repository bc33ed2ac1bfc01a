"""The SQLite store: schema, permissions, faults, and the atomic parts under concurrency."""

from __future__ import annotations

import multiprocessing
import os
import sqlite3
import stat
from pathlib import Path

import pytest

from gatekeeper.errors import InputError, NotFound, StoreError
from gatekeeper.store import DB_NAME, SCHEMA_VERSION, Store

FP = "SHA256:" + "A" * 43


def make_store(tmp_path: Path) -> Store:
    return Store.create(tmp_path / "state")


def test_create_sets_tight_permissions_and_wal(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    assert stat.S_IMODE(os.stat(tmp_path / "state").st_mode) == 0o700
    assert stat.S_IMODE(os.stat(store.path).st_mode) & 0o077 == 0
    assert store.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store.conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    store.close()


def test_users_and_keys_round_trip_and_are_audited(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    store.add_user("alice", actor="admin")
    key = store.add_key("alice", "ssh-ed25519", "AAAA", FP, 256, "laptop", actor="admin")
    assert store.key_by_id(key.id) == key
    assert store.key_by_fingerprint(FP) == key
    assert [k.fingerprint for k in store.list_keys("alice")] == [FP]
    events = [r["event"] for r in store.audit_records()]
    assert events == ["user-add", "key-add"]
    assert store.verify_audit() == []


@pytest.mark.parametrize("name", ["", "al ice", "a/b", "../x", "a\nb", "a\x00", "-rf", "x" * 65])
def test_bad_user_names_are_refused_and_change_nothing(tmp_path: Path, name: str) -> None:
    store = make_store(tmp_path)
    with pytest.raises(InputError):
        store.add_user(name)
    assert store.list_users() == []
    assert store.audit_records() == []


def test_a_key_belongs_to_one_user_only(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    store.add_user("alice")
    store.add_user("bob")
    store.add_key("alice", "ssh-ed25519", "AAAA", FP, 256)
    with pytest.raises(InputError, match="another user"):
        store.add_key("bob", "ssh-ed25519", "AAAA", FP, 256)
    with pytest.raises(InputError, match="this user"):
        store.add_key("alice", "ssh-ed25519", "AAAA", FP, 256)
    assert len(store.list_keys()) == 1


def test_removing_a_user_removes_their_keys(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    store.add_user("alice")
    key = store.add_key("alice", "ssh-ed25519", "AAAA", FP, 256)
    store.remove_user("alice")
    assert store.connection_facts(key.id, 0) is None
    with pytest.raises(NotFound):
        store.remove_user("alice")


def test_missing_state_directory_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="state directory not found") as info:
        Store.open(tmp_path / "nowhere")
    assert "gatekeeper init" in (info.value.hint or "")


def test_missing_database_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "state").mkdir()
    with pytest.raises(StoreError, match="state database not found"):
        Store.open(tmp_path / "state")
    assert not (tmp_path / "state" / DB_NAME).exists(), "opening must not create the file"


def test_corrupt_database_is_refused(tmp_path: Path) -> None:
    make_store(tmp_path).close()
    db = tmp_path / "state" / DB_NAME
    for suffix in ("-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    db.write_bytes(b"this is not a database at all" * 100)
    with pytest.raises(StoreError, match="corrupt"):
        Store.open(tmp_path / "state")


def test_database_from_a_newer_schema_is_refused(tmp_path: Path) -> None:
    make_store(tmp_path).close()
    conn = sqlite3.connect(tmp_path / "state" / DB_NAME)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(StoreError, match="newer than this gatekeeper"):
        Store.open(tmp_path / "state")


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_state_directory_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o500)
    try:
        with pytest.raises(StoreError, match="not writable"):
            Store.create(state)
    finally:
        state.chmod(0o700)


def test_unwritable_state_directory_parent_is_refused(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StoreError, match="cannot create state directory"):
        Store.create(blocker / "state")


def test_a_writer_holding_the_lock_makes_others_wait_then_refuse(tmp_path: Path) -> None:
    make_store(tmp_path).close()
    holder = sqlite3.connect(tmp_path / "state" / DB_NAME, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        store = Store.open(tmp_path / "state", busy_timeout_ms=200)
        with pytest.raises(StoreError, match="busy"):
            store.add_user("alice")
        holder.execute("ROLLBACK")
        store.add_user("alice")
        assert [u.name for u in store.list_users()] == ["alice"]
    finally:
        holder.close()


def _enrolled(tmp_path: Path) -> tuple[Store, int]:
    store = make_store(tmp_path)
    user = store.add_user("alice")
    store.start_enrollment(user, b"secret")
    assert store.confirm_enrollment(user, 100, [])
    return store, user.id


def test_a_timestep_is_accepted_once_and_only_newer_ones_after(tmp_path: Path) -> None:
    store, uid = _enrolled(tmp_path)
    assert not store.accept_timestep(uid, 100), "the confirming step is already used"
    assert store.accept_timestep(uid, 101)
    assert not store.accept_timestep(uid, 101)
    assert not store.accept_timestep(uid, 99)
    assert store.accept_timestep(uid, 102)


def _race(args: tuple[str, int]) -> bool:
    state, uid = args
    store = Store.open(state)
    try:
        return store.accept_timestep(uid, 500)
    finally:
        store.close()


def test_two_processes_racing_with_the_same_step_one_wins(tmp_path: Path) -> None:
    store, uid = _enrolled(tmp_path)
    store.close()
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(8) as pool:
        results = pool.map(_race, [(str(tmp_path / "state"), uid)] * 16)
    assert results.count(True) == 1


def _append(args: tuple[str, int]) -> int:
    state, n = args
    store = Store.open(state)
    try:
        for i in range(n):
            store.audit("access", user=f"u{os.getpid()}", reason="allowed", detail={"i": i})
        return n
    finally:
        store.close()


def test_forty_processes_append_audit_records_without_a_fork_or_a_lock_error(
    tmp_path: Path,
) -> None:
    make_store(tmp_path).close()
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(40) as pool:
        counts = pool.map(_append, [(str(tmp_path / "state"), 10)] * 40)
    store = Store.open(tmp_path / "state")
    records = store.audit_records()
    assert len(records) == sum(counts) == 400
    assert [r["seq"] for r in records] == list(range(1, 401))
    assert store.verify_audit() == []
    assert store.read_head() == (400, records[-1]["hash"])


def test_failures_lock_out_after_the_limit_and_are_audited(tmp_path: Path) -> None:
    store, uid = _enrolled(tmp_path)
    user = store.get_user("alice")
    limits = {"max_failures": 3, "window_seconds": 600, "lockout_seconds": 900}
    assert store.record_failure(user, 1000.0, **limits) is None
    assert store.record_failure(user, 1001.0, **limits) is None
    assert store.record_failure(user, 1002.0, **limits) == 1902
    assert store.locked_until(uid, 1500.0) == 1902
    assert store.locked_until(uid, 1903.0) is None
    events = [r["event"] for r in store.audit_records()]
    assert events.count("2fa-failure") == 3
    assert events.count("2fa-lockout") == 1


def test_failures_outside_the_window_start_a_new_count(tmp_path: Path) -> None:
    store, _ = _enrolled(tmp_path)
    user = store.get_user("alice")
    limits = {"max_failures": 2, "window_seconds": 60, "lockout_seconds": 900}
    assert store.record_failure(user, 1000.0, **limits) is None
    assert store.record_failure(user, 1100.0, **limits) is None
    assert store.record_failure(user, 1101.0, **limits) is not None


def test_connection_facts_reflect_enrollment_session_and_lock(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    user = store.add_user("alice")
    key = store.add_key("alice", "ssh-ed25519", "AAAA", FP, 256)
    facts = store.connection_facts(key.id, 0)
    assert facts and not facts.enrolled and not facts.pending
    store.start_enrollment(user, b"s")
    facts = store.connection_facts(key.id, 0)
    assert facts and facts.pending and not facts.enrolled
    store.confirm_enrollment(user, 1, [])
    store.open_session(user, key, 5000.0, "127.0.0.1")
    facts = store.connection_facts(key.id, 0)
    assert facts and facts.enrolled and facts.verified_until == 5000
    store.disable_2fa(user, actor="alice")
    facts = store.connection_facts(key.id, 0)
    assert facts and not facts.enrolled and facts.verified_until is None


def test_audit_chain_detects_edit_delete_and_reorder(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    for i in range(5):
        store.audit("access", user="alice", detail={"i": i})
    assert store.verify_audit() == []
    store.conn.execute("UPDATE audit SET user = 'mallory' WHERE seq = 2")
    assert any(p.seq == 2 and "edited" in p.message for p in store.verify_audit())
    store.conn.execute("UPDATE audit SET user = 'alice' WHERE seq = 2")
    assert store.verify_audit() == []
    store.conn.execute("DELETE FROM audit WHERE seq = 5")
    assert any("cut off" in p.message for p in store.verify_audit())


def test_prune_keeps_the_chain_verifiable(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    for i in range(5):
        store.audit("access", user="alice", now=1000.0 + i, detail={"i": i})
    store.audit("access", user="alice", now=5000.0)
    removed = store.prune_audit("1970-01-01T01:00:00Z")
    assert removed == 5
    assert store.verify_audit() == []
    assert [r["event"] for r in store.audit_records()] == ["access", "log-prune"]
