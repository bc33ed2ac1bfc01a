"""Many processes at once, as many SSH connections are: verifications and audit records
are neither lost nor duplicated, the chain still verifies, a code is used once, and
parallel guessing gets no more tries at the secret than the policy allows.

Each worker is a separate process (spawn) with its own Store, like a forced command.
Every call passes an explicit `now`, so a test never depends on where in a 30 s TOTP
step it happens to run."""

from __future__ import annotations

import multiprocessing
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from gatekeeper import totp, twofactor
from gatekeeper.errors import GatekeeperError, Refused
from gatekeeper.policy import Policy
from gatekeeper.policy.check import compile_policy_text
from gatekeeper.store import Store

T0 = 1_900_000_005.0  # a fixed instant, 5 s into a TOTP step
STEP = 30
SPAWN = multiprocessing.get_context("spawn")


def policy_text(state: Path, *, max_failures: int = 5) -> str:
    return (
        "server:\n"
        f"  repositories: {state.parent / 'repositories'}\n"
        f"  state_dir: {state}\n"
        "two_factor:\n"
        f"  max_failures: {max_failures}\n"
        "  failure_window_minutes: 15\n"
        "  lockout_minutes: 15\n"
        "teams:\n"
        "  everyone:\n"
        "    members: [alice]\n"
    )


def load(state: str, text: str) -> tuple[Store, Policy]:
    return Store.open(state), compile_policy_text(text, str(Path(state).parent / "config.yaml"))


def enrolled_site(
    tmp_path: Path, users: list[str], **policy: Any
) -> tuple[Path, str, dict[str, str]]:
    """A store with a server key and `users`, each with a key and a confirmed enrollment
    at T0; returns (state dir, policy text, secrets)."""
    state = tmp_path / "state"
    text = policy_text(state, **policy)
    store = Store.create(state)
    totp.create_server_key(store.server_key_path)
    pol = compile_policy_text(text, str(tmp_path / "config.yaml"))
    secrets = {}
    for i, name in enumerate(users):
        store.add_user(name, actor="admin")
        store.add_key(name, "ssh-ed25519", "AAAA", f"SHA256:{i:043d}", 256, actor="admin")
        enrollment = twofactor.enroll(store, pol, name, actor="admin")
        code = totp.current_code(enrollment.secret, T0)
        twofactor.confirm(store, pol, name, code, actor="admin", now=T0)
        secrets[name] = enrollment.secret
    store.close()
    return state, text, secrets


def wrong_codes(secret: str, now: float, count: int) -> list[str]:
    """`count` distinct codes none of which is valid within the window at `now`."""
    valid = {totp.current_code(secret, now + STEP * k) for k in (-1, 0, 1)}
    codes = (f"{n:06d}" for n in range(1_000_000))
    return [c for c, _ in zip((c for c in codes if c not in valid), range(count), strict=False)]


# -- 50 processes verifying and writing audit records ----------------------------------------

RECORDS_EACH = 10


def _verify_and_audit(
    state: str, text: str, name: str, code: str, barrier: Any, results: Any
) -> None:
    store, policy = load(state, text)
    key = store.list_keys(name)[0]
    barrier.wait()
    outcome = "verified"
    try:
        twofactor.verify(store, policy, key, code, now=T0 + STEP, client=name)
    except Exception as exc:
        outcome = f"{type(exc).__name__}: {exc}"
    for i in range(RECORDS_EACH):
        store.audit("access", now=T0 + STEP, user=name, reason="ok", detail={"i": i})
    store.close()
    results.put((name, outcome))


def test_fifty_processes_verify_and_audit_at_once(tmp_path: Path) -> None:
    users = [f"user{n:02d}" for n in range(50)]
    state, text, secrets = enrolled_site(tmp_path, users)
    with Store.open(state) as store:
        before = len(store.audit_records())
    barrier = SPAWN.Barrier(len(users))
    results = SPAWN.Queue()
    procs = [
        SPAWN.Process(
            target=_verify_and_audit,
            args=(
                str(state),
                text,
                name,
                totp.current_code(secrets[name], T0 + STEP),
                barrier,
                results,
            ),
        )
        for name in users
    ]
    started = time.monotonic()
    for p in procs:
        p.start()
    outcomes = dict(results.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    elapsed = time.monotonic() - started

    assert outcomes == {name: "verified" for name in users}, outcomes
    with Store.open(state) as store:
        records = store.audit_records(after_seq=before)
        assert [r["seq"] for r in records] == list(range(before + 1, before + 1 + 11 * 50))
        verified = Counter(r["user"] for r in records if r["event"] == "2fa-verified")
        assert verified == dict.fromkeys(users, 1)
        accesses = Counter((r["user"], r["detail"]) for r in records if r["event"] == "access")
        assert len(accesses) == 50 * RECORDS_EACH and set(accesses.values()) == {1}
        assert store.verify_audit() == []
        assert store.read_head() == (records[-1]["seq"], records[-1]["hash"])
        sessions = store.conn.execute("SELECT count(*) FROM sessions").fetchone()[0]
        assert sessions == 50
    assert elapsed < 120


# -- the same code from many processes: one wins ---------------------------------------------


def _race_same_code(state: str, text: str, code: str, barrier: Any, results: Any) -> None:
    store, policy = load(state, text)
    key = store.list_keys("alice")[0]
    barrier.wait()
    try:
        twofactor.verify(store, policy, key, code, now=T0 + STEP)
        results.put("won")
    except Refused as exc:
        results.put(exc.message)
    finally:
        store.close()


@pytest.mark.parametrize("racers", [2, 20])
def test_racing_uses_of_the_same_code_exactly_one_wins(tmp_path: Path, racers: int) -> None:
    state, text, secrets = enrolled_site(tmp_path, ["alice"], max_failures=100)
    code = totp.current_code(secrets["alice"], T0 + STEP)
    barrier = SPAWN.Barrier(racers)
    results = SPAWN.Queue()
    procs = [
        SPAWN.Process(target=_race_same_code, args=(str(state), text, code, barrier, results))
        for _ in range(racers)
    ]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    assert outcomes.count("won") == 1, outcomes
    assert all("already used" in o for o in outcomes if o != "won"), outcomes
    with Store.open(state) as store:
        events = Counter(r["event"] for r in store.audit_records(user="alice"))
        assert events["2fa-verified"] == 1
        assert store.verify_audit() == []


# -- the same right code from many connections, whatever the command: no lockout -------------

RACERS = 10


def pending_site(tmp_path: Path) -> tuple[Path, str, str]:
    """alice with a key and an enrollment not confirmed yet; (state dir, policy, secret)."""
    state = tmp_path / "state"
    text = policy_text(state)
    store = Store.create(state)
    totp.create_server_key(store.server_key_path)
    store.add_user("alice", actor="admin")
    store.add_key("alice", "ssh-ed25519", "AAAA", f"SHA256:{0:043d}", 256, actor="admin")
    pol = compile_policy_text(text, str(tmp_path / "config.yaml"))
    secret = twofactor.enroll(store, pol, "alice", actor="admin").secret
    store.close()
    return state, text, secret


def _race_command(
    state: str, text: str, command: str, code: str, barrier: Any, results: Any
) -> None:
    """One connection running `2fa COMMAND CODE` (as usercmd does) at T0 + STEP."""
    store, policy = load(state, text)
    key = store.list_keys("alice")[0]
    user = store.get_user("alice")
    now = T0 + STEP
    barrier.wait()
    try:
        if command == "verify":
            twofactor.verify(store, policy, key, code, now=now, client="racer")
        elif command == "confirm":
            twofactor.confirm(store, policy, "alice", code, actor="alice", now=now)
        elif command == "disable":
            twofactor.disable(
                store, policy, "alice", code, actor="alice", key_fp=key.fingerprint, now=now
            )
        else:
            twofactor.check_code(store, policy, user, code, now=now, allow_recovery=False)
            twofactor.new_recovery_codes(store, "alice", actor="alice")
        results.put("won")
    except GatekeeperError as exc:
        results.put(exc.message)
    finally:
        store.close()


WINNER_EVENT = {
    "verify": "2fa-verified",
    "confirm": "2fa-enabled",
    "disable": "2fa-disabled",
    "recovery-codes": "2fa-recovery-codes",
}


@pytest.mark.parametrize("command", list(WINNER_EVENT))
def test_racing_connections_with_one_right_code_lock_nobody_out(
    tmp_path: Path, command: str
) -> None:
    """Ten connections send the same right code at once, with the default limit of 5
    failures: one wins, the nine others are told the code was used, and none of them is
    a failure or locks the user out."""
    if command == "confirm":
        state, text, secret = pending_site(tmp_path)
    else:
        state, text, secrets = enrolled_site(tmp_path, ["alice"])
        secret = secrets["alice"]
    with Store.open(state) as store:
        before = len(store.audit_records())
    code = totp.current_code(secret, T0 + STEP)
    barrier = SPAWN.Barrier(RACERS)
    results = SPAWN.Queue()
    procs = [
        SPAWN.Process(
            target=_race_command, args=(str(state), text, command, code, barrier, results)
        )
        for _ in range(RACERS)
    ]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=30)

    assert outcomes.count("won") == 1, outcomes
    losers = [o for o in outcomes if o != "won"]
    reused = [o for o in losers if o == "this code was already used; wait for the next one."]
    # A connection that comes after the winner finds the enrollment in its new state: no
    # enrollment left once 2FA is off, or nothing pending once it is confirmed.
    late = {"disable": "has not enrolled", "confirm": "is already enrolled; nothing to confirm"}
    gone = [o for o in losers if command in late and late[command] in o]
    assert len(reused) + len(gone) == RACERS - 1, outcomes
    with Store.open(state) as store:
        events = Counter(r["event"] for r in store.audit_records(after_seq=before))
        assert events[WINNER_EVENT[command]] == 1
        assert events["2fa-code-reused"] == len(reused)
        assert events["2fa-failure"] == 0 and events["2fa-lockout"] == 0, events
        user = store.get_user("alice")
        assert store.locked_until(user.id, T0 + STEP) is None
        assert store.conn.execute("SELECT count(*) FROM failures").fetchone()[0] == 0
        assert store.verify_audit() == []


def test_a_used_right_code_is_never_a_failure_and_a_wrong_one_always_is(tmp_path: Path) -> None:
    store, policy, user, secret = one_user(tmp_path, max_failures=2)
    now = T0 + STEP
    right = totp.current_code(secret, now)
    wrong = wrong_codes(secret, now, 2)
    assert attempt(store, policy, user, right, now) == "totp"
    assert attempt(store, policy, user, wrong[0], now) == "wrong"
    for _ in range(20):
        with pytest.raises(Refused, match="already used"):
            twofactor.check_code(store, policy, user, right, now=now)
    assert store.locked_until(user.id, now) is None
    assert attempt(store, policy, user, wrong[1], now) == "wrong"  # the second failure
    assert store.locked_until(user.id, now) is not None
    events = Counter(r["event"] for r in store.audit_records(user="alice"))
    assert events["2fa-code-reused"] == 20
    assert events["2fa-failure"] == 2 and events["2fa-lockout"] == 1


# -- brute force from parallel connections ---------------------------------------------------

ATTEMPTS = 10_000
GUESSERS = 16
MAX_FAILURES = 5


def _guess(state: str, text: str, codes: list[str], barrier: Any, results: Any) -> None:
    """Try every code; report how many were evaluated against the secret."""
    evaluated = 0
    real_match = totp.match_timestep

    def counting_match(*args: Any, **kwargs: Any) -> int | None:
        nonlocal evaluated
        evaluated += 1
        return real_match(*args, **kwargs)

    totp.match_timestep = counting_match  # twofactor calls it through the module
    store, policy = load(state, text)
    user = store.get_user("alice")
    accepted = 0
    other: list[str] = []
    barrier.wait()
    for code in codes:
        try:
            twofactor.check_code(store, policy, user, code, now=T0 + STEP, client="attacker")
            accepted += 1
        except Refused:
            pass
        except Exception as exc:
            other.append(f"{type(exc).__name__}: {exc}")
    store.close()
    results.put((evaluated, accepted, other))


def test_ten_thousand_parallel_wrong_codes_get_at_most_max_failures_tries(
    tmp_path: Path,
) -> None:
    state, text, secrets = enrolled_site(tmp_path, ["alice"], max_failures=MAX_FAILURES)
    codes = wrong_codes(secrets["alice"], T0 + STEP, ATTEMPTS)
    barrier = SPAWN.Barrier(GUESSERS)
    results = SPAWN.Queue()
    share = ATTEMPTS // GUESSERS
    procs = [
        SPAWN.Process(
            target=_guess,
            args=(str(state), text, codes[i * share : (i + 1) * share], barrier, results),
        )
        for i in range(GUESSERS)
    ]
    started = time.monotonic()
    for p in procs:
        p.start()
    reports = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    elapsed = time.monotonic() - started

    evaluated = sum(r[0] for r in reports)
    assert sum(r[1] for r in reports) == 0
    assert [o for r in reports for o in r[2]] == []
    # Every evaluation is a guess at the secret: no more than the policy allows per window.
    assert 1 <= evaluated <= MAX_FAILURES, f"{evaluated} codes were checked against the secret"
    with Store.open(state) as store:
        events = Counter(r["event"] for r in store.audit_records(user="alice"))
        assert events["2fa-failure"] == evaluated
        assert events["2fa-lockout"] == 1
        assert store.locked_until(store.get_user("alice").id, T0 + STEP) is not None
        assert store.verify_audit() == []
    assert elapsed < 60, f"{ATTEMPTS} attempts took {elapsed:.1f} s"


# -- the attempt counter's rules, one connection at a time -----------------------------------


def one_user(tmp_path: Path, max_failures: int = 3) -> tuple[Store, Policy, Any, str]:
    state, text, secrets = enrolled_site(tmp_path, ["alice"], max_failures=max_failures)
    store, policy = load(str(state), text)
    return store, policy, store.get_user("alice"), secrets["alice"]


def attempt(store: Store, policy: Policy, user: Any, code: str, now: float) -> str:
    try:
        return twofactor.check_code(store, policy, user, code, now=now)
    except Refused as exc:
        return "locked" if exc.message.startswith("verification is locked") else "wrong"


def test_only_failures_count_a_right_code_is_not_one(tmp_path: Path) -> None:
    store, policy, user, secret = one_user(tmp_path, max_failures=3)
    now = T0 + STEP
    wrong = wrong_codes(secret, now, 3)
    assert attempt(store, policy, user, wrong[0], now) == "wrong"
    assert attempt(store, policy, user, wrong[1], now) == "wrong"
    assert attempt(store, policy, user, totp.current_code(secret, now), now) == "totp"
    assert store.locked_until(user.id, now) is None
    assert attempt(store, policy, user, wrong[2], now) == "wrong"  # the third failure
    assert store.locked_until(user.id, now) is not None
    assert attempt(store, policy, user, totp.current_code(secret, now + STEP), now) == "locked"


def test_the_last_allowed_attempt_when_right_succeeds_and_lifts_its_lock(tmp_path: Path) -> None:
    store, policy, user, secret = one_user(tmp_path, max_failures=3)
    now = T0 + STEP
    for code in wrong_codes(secret, now, 2):
        assert attempt(store, policy, user, code, now) == "wrong"
    assert attempt(store, policy, user, totp.current_code(secret, now), now) == "totp"
    assert store.locked_until(user.id, now) is None
    events = [r["event"] for r in store.audit_records(user="alice")]
    assert "2fa-lockout" not in events


def test_a_failure_settled_after_the_lockout_never_lifts_it(tmp_path: Path) -> None:
    store, _, user, _ = one_user(tmp_path)
    limits: dict[str, Any] = {"max_failures": 3, "window_seconds": 900, "lockout_seconds": 900}
    now = T0 + STEP
    numbers = [store.reserve_attempt(user, now, **limits) for _ in range(4)]
    assert numbers[:3] == [(1, None), (2, None), (3, None)]
    assert numbers[3] == (0, int(now + 900)), "the fourth evaluation must be refused"
    # Attempts 1 and 2 are still in flight when the lock is set; their failures arrive late.
    assert store.record_failure(user, now + 1, **limits, attempt=1) is None
    assert store.record_failure(user, now + 2, **limits, attempt=2) is None
    assert store.record_failure(user, now + 3, **limits, attempt=3) == int(now + 900)
    assert store.locked_until(user.id, now + 5) == int(now + 900)
    events = Counter(r["event"] for r in store.audit_records(user="alice"))
    assert events["2fa-failure"] == 3 and events["2fa-lockout"] == 1
    # A failure counted the old way (no reservation) may extend the lock, never shorten it.
    store.record_failure(user, now + 4, **limits)
    assert (store.locked_until(user.id, now + 5) or 0) >= int(now + 900)


def test_guessing_for_hours_stays_within_the_limit_per_lockout(tmp_path: Path) -> None:
    """One wrong code every 7 s for 3 hours of (simulated) time: at most max_failures
    evaluations per lockout period, and every lockout audited."""
    store, policy, user, user_secret = one_user(tmp_path, max_failures=5)
    lockout = policy.two_factor.lockout_minutes * 60
    duration = 3 * 3600
    evaluated: list[float] = []
    real_match = totp.match_timestep
    try:

        def counting_match(secret: str, code: str, now: float, window: int = 1) -> int | None:
            evaluated.append(now)
            return real_match(secret, code, now, window)

        totp.match_timestep = counting_match
        for tick in range(0, duration, 7):
            now = T0 + tick
            attempt(store, policy, user, wrong_codes(user_secret, now, 1)[0], now)
    finally:
        totp.match_timestep = real_match
    cycles = duration // lockout + 1
    assert len(evaluated) <= policy.two_factor.max_failures * cycles
    for start in evaluated:
        in_period = [t for t in evaluated if start <= t < start + lockout]
        assert len(in_period) <= policy.two_factor.max_failures
    lockouts = [r for r in store.audit_records(user="alice") if r["event"] == "2fa-lockout"]
    assert len(lockouts) == len(evaluated) // policy.two_factor.max_failures
