"""The store's promises, on SQLite and on PostgreSQL alike.

Each test runs on both. On PostgreSQL racing processes each open the store from their
own state directory, as separate git front-ends sharing one database would: the replay guard,
failure counting, session creation and the audit chain must hold across them.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from pathlib import Path

import pytest

from gatekeeper.errors import InputError
from gatekeeper.store import SCHEMA_VERSION, CodeCheck, Store

FP = "SHA256:" + "B" * 43


@pytest.fixture(
    params=[
        "sqlite",
        pytest.param("postgresql", marks=pytest.mark.postgres),
        pytest.param("postgresql-libpq", marks=pytest.mark.postgres),
    ]
)
def url(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """The store's URL; with "postgresql-libpq" every Store.open/create in this test
    (and in the processes it starts) goes through libpq instead of psycopg."""
    if request.param.startswith("postgresql"):
        if request.param.endswith("libpq"):
            monkeypatch.setenv("GK_TEST_LIGHT", "1")
        return str(request.getfixturevalue("postgres_url"))
    (tmp_path / "shared").mkdir()
    return f"sqlite://{tmp_path}/shared/gatekeeper.db"


def light() -> bool:
    return os.environ.get("GK_TEST_LIGHT") == "1"


def state_dir(base: Path | str, url: str, host: object) -> Path:
    """Front-end `host`'s state directory. A SQLite file cannot be shared between
    hosts, so its processes share one state directory (and audit head file) too."""
    return Path(base) / ("state" if url.startswith("sqlite") else f"state-{host}")


def open_store(tmp_path: Path, url: str, host: str = "a") -> Store:
    """The store as front-end `host` sees it."""
    return Store.create(state_dir(tmp_path, url, host), url, light=light())


def enrolled(store: Store, name: str = "alice") -> tuple[int, int]:
    user = store.add_user(name)
    key = store.add_key(name, "ssh-ed25519", "AAAA", FP, 256)
    store.start_enrollment(user, b"secret")
    assert store.confirm_enrollment(user, 10, ["h1", "h2"])
    return user.id, key.id


def test_create_is_idempotent_and_reports_the_schema_it_found(tmp_path: Path, url: str) -> None:
    first = open_store(tmp_path, url)
    driver = {"sqlite": "SqliteDatabase", "": "PostgresDatabase", "1": "LibpqDatabase"}
    assert (
        type(first.db).__name__
        == driver["sqlite" if "sqlite" in url else os.environ.get("GK_TEST_LIGHT", "")]
    )
    assert first.schema_before == 0
    first.close()
    again = open_store(tmp_path, url, "b")
    assert again.schema_before == SCHEMA_VERSION
    again.close()
    Store.open(state_dir(tmp_path, url, "c"), url, light=light()).close()


def test_users_keys_enrollment_and_status_round_trip(tmp_path: Path, url: str) -> None:
    store = open_store(tmp_path, url)
    user_id, key_id = enrolled(store)
    bob = store.add_user("bob")
    assert bob.id != user_id
    with pytest.raises(InputError, match="already exists"):
        store.add_user("bob")
    key = store.key_by_fingerprint(FP)
    assert key is not None and (key.id, key.user, key.bits) == (key_id, "alice", 256)
    totp = store.get_totp(user_id)
    assert totp is not None and totp.secret == b"secret" and totp.confirmed
    assert len(store.unused_recovery_codes(user_id)) == 2
    status = {row["user"]: row for row in store.user_status()}
    assert status["alice"]["state"] == "enrolled" and status["alice"]["keys"] == 1
    assert status["bob"]["state"] == "none"
    store.remove_user("bob")
    assert [u.name for u in store.list_users()] == ["alice"]
    events = [r["event"] for r in store.audit_records()]
    assert events == [
        "user-add",
        "key-add",
        "2fa-enroll-start",
        "2fa-enabled",
        "user-add",
        "user-remove",
    ]
    assert [r["user"] for r in store.audit_records(user="bob")] == ["bob", "bob"]
    assert store.verify_audit() == []


def test_the_replay_guard_accepts_a_step_once(tmp_path: Path, url: str) -> None:
    store = open_store(tmp_path, url)
    user_id, _ = enrolled(store)
    assert store.accept_timestep(user_id, 11)
    assert not store.accept_timestep(user_id, 11)
    assert not store.accept_timestep(user_id, 9)
    assert store.accept_timestep(user_id, 12)


def test_lockout_sessions_and_connection_facts(tmp_path: Path, url: str) -> None:
    store = open_store(tmp_path, url)
    _, key_id = enrolled(store)
    user = store.get_user("alice")
    key = store.key_by_id(key_id)
    assert key is not None
    now = time.time()
    store.open_session(user, key, now + 600, "10.0.0.1")
    facts = store.connection_facts(key_id, now)
    assert facts is not None and facts.enrolled and facts.verified_until == int(now + 600)
    limits = {"max_failures": 2, "window_seconds": 60, "lockout_seconds": 300}
    assert store.record_failure(user, now, **limits) is None
    until = store.record_failure(user, now, **limits)
    assert until == int(now + 300)
    assert store.reserve_attempt(user, now + 1, **limits) == (0, until)
    facts = store.connection_facts(key_id, now + 1)
    assert facts is not None and facts.locked_until == until
    assert store.connection_facts(key_id + 100, now) is None


def test_a_released_attempt_is_not_a_failure(tmp_path: Path, url: str) -> None:
    store = open_store(tmp_path, url)
    enrolled(store)
    user = store.get_user("alice")
    now = time.time()
    limits = {"max_failures": 1, "window_seconds": 60, "lockout_seconds": 300}
    attempt, locked = store.reserve_attempt(user, now, **limits)
    assert (attempt, locked) == (1, None)
    assert store.locked_until(user.id, now) is not None  # the last allowed attempt locks...
    store.release_attempt(user, attempt, max_failures=1)
    assert store.locked_until(user.id, now) is None  # ...until it turns out right


def test_a_code_check_counts_wrong_codes_and_never_a_used_right_one(
    tmp_path: Path, url: str
) -> None:
    store = open_store(tmp_path, url)
    enrolled(store)  # the confirming code was timestep 10
    user = store.get_user("alice")
    now = time.time()
    limits = {"max_failures": 2, "window_seconds": 60, "lockout_seconds": 300}

    def check(step: int | None, confirmed: bool = True) -> CodeCheck:
        return store.check_totp_code(
            user, now, lambda enrollment: step, confirmed=confirmed, **limits
        )

    assert check(12) == CodeCheck("accepted", step=12)
    assert check(12) == CodeCheck("replayed", step=12)
    assert check(11) == CodeCheck("replayed", step=11)
    assert check(13, confirmed=False) == CodeCheck("changed")
    assert check(None) == CodeCheck("wrong")
    assert store.locked_until(user.id, now) is None
    until = int(now + 300)
    assert check(None) == CodeCheck("wrong", locked_until=until)
    assert check(14) == CodeCheck("locked", locked_until=until)
    events = [r["event"] for r in store.audit_records(user="alice")]
    assert events.count("2fa-code-reused") == 2
    assert events.count("2fa-failure") == 2 and events.count("2fa-lockout") == 1


def test_edits_to_the_log_are_found_and_pruning_keeps_it_verifiable(
    tmp_path: Path, url: str
) -> None:
    store = open_store(tmp_path, url)
    enrolled(store)
    store.db.execute("UPDATE audit SET \"user\" = 'mallory' WHERE seq = 2")
    assert [p.seq for p in store.verify_audit()] == [2]
    store.db.execute("UPDATE audit SET \"user\" = 'alice' WHERE seq = 2")
    assert store.verify_audit() == []
    assert store.prune_audit("9999-01-01") == 4
    assert store.audit_anchor() is not None
    assert [r["event"] for r in store.audit_records()] == ["log-prune"]
    assert store.verify_audit() == []


def test_hook_tokens_expire(tmp_path: Path, url: str) -> None:
    from gatekeeper.store import HookToken, token_digest

    store = open_store(tmp_path, url)
    now = time.time()
    token = HookToken("alice", 1, FP, "api", "write", None, int(now), int(now + 60))
    store.audit_with_token("access", token_digest("t"), token, now=now, user="alice")
    assert store.hook_token(token_digest("t"), now) == token
    assert store.hook_token(token_digest("t"), now + 61) is None
    assert store.hook_token(token_digest("other"), now) is None


# -- racing front-ends ------------------------------------------------------------------


def _race_step(base: str, url: str, host: int, user_id: int, go: object, out: object) -> None:
    store = Store.open(state_dir(base, url, host), url, light=light())
    go.wait()  # type: ignore[attr-defined]
    out.put(store.accept_timestep(user_id, 99))  # type: ignore[attr-defined]
    store.close()


def _race_audit(base: str, url: str, host: int, count: int, go: object, out: object) -> None:
    store = Store.open(state_dir(base, url, host), url, light=light())
    go.wait()  # type: ignore[attr-defined]
    try:
        for i in range(count):
            store.audit("access", user=f"u{host}", detail={"i": i})
        out.put("ok")  # type: ignore[attr-defined]
    except Exception as exc:
        out.put(f"{type(exc).__name__}: {exc}")  # type: ignore[attr-defined]
    store.close()


def _race_guess(base: str, url: str, host: int, go: object, out: object) -> None:
    store = Store.open(state_dir(base, url, host), url, light=light())
    user = store.get_user("alice")
    go.wait()  # type: ignore[attr-defined]
    now = time.time()
    limits = {"max_failures": 5, "window_seconds": 600, "lockout_seconds": 600}
    attempt, locked = store.reserve_attempt(user, now, **limits)
    if locked is None:
        store.record_failure(user, now, attempt=attempt, **limits)
    out.put(attempt)  # type: ignore[attr-defined]
    store.close()


def _race_session(base: str, url: str, host: int, go: object, out: object) -> None:
    store = Store.open(state_dir(base, url, host), url, light=light())
    user = store.get_user("alice")
    key = store.key_by_fingerprint(FP)
    go.wait()  # type: ignore[attr-defined]
    store.open_session(user, key, time.time() + 60 + host, f"10.0.0.{host}")  # type: ignore[arg-type]
    out.put("ok")  # type: ignore[attr-defined]
    store.close()


def _run_hosts(tmp_path: Path, url: str, target: object, hosts: int, *args: object) -> list[object]:
    ctx = multiprocessing.get_context("spawn")
    go, out = ctx.Event(), ctx.Queue()
    for host in range(hosts):
        open_store(tmp_path, url, str(host)).close()
    procs = [
        ctx.Process(target=target, args=(str(tmp_path), url, host, *args, go, out))  # type: ignore[arg-type]
        for host in range(hosts)
    ]
    for p in procs:
        p.start()
    time.sleep(0.5)
    go.set()
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return results


def test_of_racing_front_ends_one_wins_a_timestep(tmp_path: Path, url: str) -> None:
    store = open_store(tmp_path, url)
    user_id, _ = enrolled(store)
    results = _run_hosts(tmp_path, url, _race_step, 8, user_id)
    assert sorted(results, key=str) == [False] * 7 + [True]


def test_front_ends_appending_at_once_leave_one_chain_without_a_gap(
    tmp_path: Path, url: str
) -> None:
    store = open_store(tmp_path, url)
    results = _run_hosts(tmp_path, url, _race_audit, 6, 15)
    assert results == ["ok"] * 6
    records = store.audit_records()
    assert [r["seq"] for r in records] == list(range(1, 91))
    assert store.verify_audit() == []


def test_racing_guesses_from_many_front_ends_evaluate_at_most_the_limit(
    tmp_path: Path, url: str
) -> None:
    store = open_store(tmp_path, url)
    enrolled(store)
    attempts = _run_hosts(tmp_path, url, _race_guess, 12)
    assert sorted(a for a in attempts if a) == [1, 2, 3, 4, 5]  # type: ignore[type-var]
    assert store.locked_until(store.get_user("alice").id, time.time()) is not None
    failures = store.audit_records(event="2fa-failure")
    assert len(failures) == 5
    assert len(store.audit_records(event="2fa-lockout")) == 1
    assert store.verify_audit() == []


def test_sessions_opened_at_once_leave_one_per_key(tmp_path: Path, url: str) -> None:
    store = open_store(tmp_path, url)
    enrolled(store)
    assert _run_hosts(tmp_path, url, _race_session, 6) == ["ok"] * 6
    rows = store.db.execute("SELECT count(*) AS n FROM sessions").fetchall()
    assert rows[0]["n"] == 1
    assert len(store.audit_records(event="2fa-verified")) == 6


# -- the audit head after a crash --------------------------------------------------------------


def _leave_pending(store: Store, old: tuple[int, str], new: tuple[int, str]) -> None:
    """What a writer killed between its head's two states leaves (auditlog/head.py)."""
    from gatekeeper.auditlog.head import Head

    store.head.lock()
    try:
        store.head.write(Head(*old, pending=new), durable=False)
    finally:
        store.head.unlock()


def test_a_pending_head_resolves_by_what_the_database_has(tmp_path: Path, url: str) -> None:
    store = open_store(tmp_path, url)
    # The very first write of a store, killed: the log's start is what it held to.
    _leave_pending(store, (0, "0" * 64), (1, "ab" * 32))
    view = store.audit_view()
    assert view.recovered is not None and view.recovered.outcome == "rolled-back"
    assert view.head == (0, "0" * 64) and view.records == [] and store.verify_audit() == []
    for i in range(3):
        store.audit("access", user="alice", detail={"i": i})
    rows = store.audit_records()
    ends = [(0, "0" * 64)] + [(r["seq"], r["hash"]) for r in rows]
    # Killed after COMMIT: the new end is there.
    _leave_pending(store, ends[2], ends[3])
    view = store.audit_view()
    assert view.recovered is not None and view.recovered.outcome == "committed"
    assert view.head == ends[3] and store.head.read() is not None
    assert store.verify_audit() == []
    # Killed before COMMIT: the new end never arrived. (Settled at once on a shared
    # store; on SQLite by the next write, see Store._locked_view.)
    _leave_pending(store, ends[3], (4, "ab" * 32))
    view = store.audit_view()
    assert view.recovered is not None and view.recovered.outcome == "rolled-back"
    assert view.recovered.settled is (not url.startswith("sqlite"))
    assert view.head == ends[3] and store.verify_audit() == []
    # Another record where the pending head points: on a shared store another front-end
    # took the number after the killed write; on SQLite a write killed inside its
    # COMMIT, which the WAL's recovery brought back later (see Store._resolve_head).
    _leave_pending(store, ends[2], (3, "cd" * 32))
    view = store.audit_view()
    assert view.recovered is not None and view.recovered.outcome == "rolled-back"
    assert view.head == (ends[3] if url.startswith("sqlite") else ends[2])
    assert store.verify_audit() == []
    # The next write chains on from the database's end either way, with no gap.
    _leave_pending(store, ends[3], (4, "ef" * 32))
    store.audit("access", user="alice", detail={"after": True})
    assert [r["seq"] for r in store.audit_records()] == [1, 2, 3, 4]
    assert store.verify_audit() == []
    head = store.head.read()
    assert head is not None and head.pending is None
