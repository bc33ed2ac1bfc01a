"""A crash is not tampering (docs/design.md, "The store"): writers are killed with SIGKILL at random
moments and at every step of the audit head's protocol (gatekeeper/auditlog/head.py), on
SQLite and on PostgreSQL. Afterwards `gatekeeper log verify` says intact (exit 0),
the next write chains on with no gap, and no temporary file is left in the state
directory.

The writers are the real write paths: `Store.audit`, a push's `audit_many`, `log
prune`'s `Store.prune_audit`, and the forced command itself (the installed
gatekeeper-shell, allowed a fetch with a real state directory). While they are
being killed, this process verifies the log over and over: no verify may ever see a
problem, however the kills and the verifies interleave. The figures (kills, verifies,
recoveries) are printed; `pytest -s` shows them.

One kill point is inside SQLite itself (strace kills the forced command at its WAL
sync): a commit the open connections miss and a later recovery of the WAL brings back."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from gatekeeper import shell
from gatekeeper.auditlog import head as audithead
from gatekeeper.auditlog.chain import verify_chain
from gatekeeper.store import DB_NAME, Store, postgres, utc_iso
from gatekeeper.store.sqlite import SqliteDatabase
from testing.installation import GATEKEEPER_SHELL, Installation

pytestmark = pytest.mark.slow

FETCH = "git-upload-pack 'platform/api'"
RANDOM_SECONDS = 12.0  # of random kills per store
VERIFY_EVERY = 0.15
STORE_WRITERS = ("audit", "many", "prune")


# -- the writers ------------------------------------------------------------------------------


def _loop(kind: str, state: str, url: str) -> None:
    """Write forever (until killed) along one of the store's write paths."""
    store = Store.open(state, url, light=bool(url))
    i = 0
    while True:
        i += 1
        if kind == "audit":
            store.audit("access", user="crash", reason="allowed", detail={"i": i})
        elif kind == "many":
            updates = [
                {"user": "crash", "repo": "platform/api", "detail": {"ref": n}} for n in (1, 2, 3)
            ]
            store.audit_many("ref-update", updates, now=time.time())
        else:
            store.audit("access", user="crash", reason="allowed", detail={"i": i})
            # Keep the log short, and move the prune anchor under the other writers.
            store.prune_audit(utc_iso(time.time() - 0.3), actor="crash-test")


def _fork(body: Callable[[], None]) -> int:
    """A child process running `body`; it reports an exception on stderr and exits 3."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 0
        try:
            body()
        except BaseException as exc:
            os.write(2, f"crash-test child: {type(exc).__name__}: {exc}\n".encode())
            code = 3
        os._exit(code)
    return pid


def _shell_env(gk: Installation) -> dict[str, str]:
    env = {k: v for k, v in gk.env.items() if not k.startswith("SSH_")}
    env.update(
        SSH_CONNECTION="127.0.0.1 50000 127.0.0.1 22",
        SSH_ORIGINAL_COMMAND=FETCH,
        GATEKEEPER_DRY_RUN="1",  # everything up to the exec of git, the record included
    )
    return env


def _in_process_shell(gk: Installation, key: int) -> None:
    """The forced command's main(), in this (forked) process, so that a trap can be set."""
    os.environ.clear()
    os.environ.update(_shell_env(gk))
    os.dup2(os.open(os.devnull, os.O_RDWR), 0)
    code = shell.main(["--config", str(gk.config), str(key)])
    if code != 0:
        raise RuntimeError(f"the forced command refused: {code}")


# -- a child that kills itself at one step of the protocol -------------------------------------

# Each step of one write transaction's head protocol, in order, with what the state
# directory must look like after a kill there: the head file as it was before the write
# ("old"), pending on the new end, or settled on it; whether the new record is in the
# database; whether the temporary file is left.
STEPS: list[tuple[str, int, str, str, bool, bool]] = [
    # (function, its nth call in the write, kill before/after it, head, committed, tmp left)
    ("write", 1, "before", "old", False, True),
    ("fsync", 1, "before", "old", False, True),
    ("fsync", 1, "after", "old", False, True),
    ("replace", 1, "before", "old", False, True),
    ("replace", 1, "after", "pending", False, False),
    ("fsync", 2, "after", "pending", False, False),
    ("commit", 1, "before", "pending", False, False),
    ("commit", 1, "after", "pending", True, False),
    ("write", 2, "after", "pending", True, True),
    ("replace", 2, "before", "pending", True, True),
    ("replace", 2, "after", "new", True, False),
]


def _arm(function: str, nth: int, when: str) -> None:
    """Make this process SIGKILL itself at the `nth` call of `function`."""
    calls = Counter[str]()

    def trap(real: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            calls[function] += 1
            hit = calls[function] == nth
            if hit and when == "before":
                os.kill(os.getpid(), signal.SIGKILL)
            result = real(*args, **kwargs)
            if hit:
                os.kill(os.getpid(), signal.SIGKILL)
            return result

        return wrapper

    if function == "commit":
        SqliteDatabase.commit = trap(SqliteDatabase.commit)  # type: ignore[method-assign]
        postgres._Postgres.commit = trap(postgres._Postgres.commit)  # type: ignore[method-assign]
    else:
        setattr(os, function, trap(getattr(os, function)))


def _trapped_write(
    kind: str, state: str, url: str, gk: Installation, key: int, step: tuple[str, int, str]
) -> None:
    if kind == "shell":
        _arm(*step)
        _in_process_shell(gk, key)
        return
    store = Store.open(state, url, light=bool(url))
    _arm(*step)
    if kind == "audit":
        store.audit("access", user="trap", detail={"step": list(step)})
    elif kind == "many":
        store.audit_many(
            "ref-update", [{"user": "trap", "detail": {"ref": n}} for n in (1, 2)], now=time.time()
        )
    else:
        store.prune_audit(utc_iso(time.time() + 1), actor="trap")  # everything before now


# -- checks ---------------------------------------------------------------------------------


@contextmanager
def opened(gk: Installation) -> Iterator[Store]:
    with Store.open(gk.state, gk.store_url) as store:
        yield store


def strays(gk: Installation) -> list[str]:
    """Files in the state directory that are nobody's: temporary names, old-style
    per-process head files."""
    return sorted(p.name for p in gk.state.iterdir() if p.name.startswith("."))


def assert_intact_and_chains_on(gk: Installation, key: int) -> None:
    result = gk.gk("log", "verify", check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "audit log: intact" in result.stdout
    with opened(gk) as store:
        before = store.audit_records()
        anchor = store.audit_anchor()
    # A further write: the forced command, for real, then the admin CLI.
    allowed = gk.shell(key, FETCH, stdin="0000")
    assert allowed.returncode == 0, allowed.stderr
    gk.gk("user", "add", f"after{len(before)}")
    with opened(gk) as store:
        after = store.audit_records(after_seq=before[-1]["seq"] if before else 0)
        rows = store.audit_records()
        assert store.verify_audit() == []
        assert store.read_head() == (rows[-1]["seq"], rows[-1]["hash"])
        raw = store.head.read()
        assert raw is not None and raw.pending is None, "the head is settled after a write"
    start = anchor[0] if anchor else 0
    assert [r["seq"] for r in rows] == list(range(start + 1, start + 1 + len(rows))), "a gap"
    assert after and after[0]["prev_hash"] == before[-1]["hash"]
    assert verify_chain(rows, None, anchor) == []
    assert strays(gk) == [], "temporary files left in the state directory"


# -- the test ----------------------------------------------------------------------------------


def run_kills(gk: Installation, key: int, seed: int) -> Counter[str]:
    rng = random.Random(seed)
    state, url = str(gk.state), gk.store_url
    figures = Counter[str]()
    problems: list[str] = []

    def verify(where: str) -> None:
        with opened(gk) as store:
            view = store.audit_view()
            found = verify_chain(view.records, view.head, view.anchor, head_is_witness=bool(url))
        figures["verifies"] += 1
        if view.recovered is not None:
            figures[f"recovered ({view.recovered.outcome})"] += 1
        if found or view.head_error:
            figures["verify failures"] += 1
            problems.append(f"{where}: {view.head_error} {found}")
            seqs = [p.seq for p in found]
            print(
                "FAIL",
                where,
                found,
                "anchor",
                view.anchor,
                "head",
                view.head,
                "recovered",
                view.recovered,
            )
            for r in view.records:
                if seqs and seqs[0] is not None and abs(r["seq"] - seqs[0]) <= 2:
                    print(
                        "  row", r["seq"], r["event"], r["at"], r["prev_hash"][:10], r["hash"][:10]
                    )
            print(
                "  first rows",
                [(r["seq"], r["event"]) for r in view.records[:3]],
                "n",
                len(view.records),
            )
            with opened(gk) as store:
                again = store.audit_view()
                print(
                    "  again",
                    verify_chain(again.records, again.head, again.anchor),
                    again.anchor,
                    again.head,
                )

    # 1. Every step of the protocol, on every write path.
    for kind in (*STORE_WRITERS, "shell"):
        for function, nth, when, head_state, committed, tmp_left in STEPS:
            with opened(gk) as store:
                last = store.audit_records()[-1]
            before = audithead.HeadFile(state, 1000).read()
            pid = _fork(
                lambda kind=kind, step=(function, nth, when): _trapped_write(
                    kind, state, url, gk, key, step
                )
            )
            _, status = os.waitpid(pid, 0)
            where = f"{kind}: kill {when} {function} #{nth}"
            assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, where
            figures["kills at a protocol step"] += 1
            raw = audithead.HeadFile(state, 1000).read()
            assert raw is not None, where
            with opened(gk) as store:
                newest = store.audit_records()[-1]
            if head_state == "old":
                assert raw == before, (where, raw)
            elif head_state == "pending":
                assert raw.pending is not None and raw.pending[0] > last["seq"], (where, raw)
            else:
                assert raw == audithead.Head(newest["seq"], newest["hash"]), (where, raw)
            assert (newest["seq"] > last["seq"]) is committed, where
            assert (gk.state / audithead.TMP_NAME).exists() is tmp_left, where
            verify(where)

    # 2. Random kills of writers running side by side, verifies in between.
    shell_env = _shell_env(gk)
    started = time.monotonic()
    probe = subprocess.run(
        [GATEKEEPER_SHELL, "--config", str(gk.config), str(key)],
        env=shell_env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        check=True,
    )
    assert probe.returncode == 0
    shell_time = time.monotonic() - started

    children: dict[str, tuple[Any, float]] = {}
    head = audithead.HeadFile(state, 5000)

    def left_pending() -> None:
        """Under the head's lock no live writer is between its pending and settled
        head: a pending head there is the killed one's (unless another writer resolved
        it first, or the lock was not free soon: this counts fewer than there were)."""
        for _ in range(20):
            if head.try_lock():
                break
            time.sleep(0.001)
        else:
            return  # writers busy: they resolve it anyway
        try:
            raw = head.read()
        finally:
            head.unlock()
        if raw is not None and raw.pending is not None:
            figures["random kills that left a pending head"] += 1

    def start(kind: str) -> None:
        now = time.monotonic()
        if kind == "shell":
            proc: Any = subprocess.Popen(
                [GATEKEEPER_SHELL, "--config", str(gk.config), str(key)],
                env=shell_env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            children[kind] = (proc, now + rng.uniform(0.2, 1.3) * shell_time)
        else:
            pid = _fork(lambda: _loop(kind, state, url))
            children[kind] = (pid, now + rng.uniform(0.002, 0.06))

    def stop(kind: str, *, kill: bool) -> None:
        child, _ = children.pop(kind)
        if kind == "shell":
            if kill and child.poll() is None:
                child.kill()
                child.wait()
                figures["kills (forced command)"] += 1
                left_pending()
            err = child.communicate()[1].decode()
            if child.returncode not in (0, -signal.SIGKILL):
                figures["writer failures"] += 1
                problems.append(f"forced command exit {child.returncode}: {err}")
            elif child.returncode == 0:
                figures["forced commands finished"] += 1
            return
        if kill:
            os.kill(child, signal.SIGKILL)
        _, status = os.waitpid(child, 0)
        if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL:
            figures[f"kills ({kind})"] += 1
            left_pending()
        else:
            figures["writer failures"] += 1
            problems.append(f"{kind} writer stopped by itself: {status}")

    for kind in (*STORE_WRITERS, "shell"):
        start(kind)
    deadline = time.monotonic() + RANDOM_SECONDS
    next_verify = time.monotonic() + VERIFY_EVERY
    try:
        while time.monotonic() < deadline:
            now = time.monotonic()
            for kind, (child, kill_at) in list(children.items()):
                finished = child.poll() is not None if kind == "shell" else False
                if finished or now >= kill_at:
                    stop(kind, kill=not finished)
                    start(kind)
            if now >= next_verify:
                verify("while writers run")
                next_verify = time.monotonic() + VERIFY_EVERY
            time.sleep(0.001)
    finally:
        for kind in list(children):
            stop(kind, kill=True)
    verify("after the last kill")
    assert not problems, problems[:5]
    return figures


# -- SQLite's own commit, killed between its WAL sync and its WAL index ------------------------


def test_a_commit_sqlite_brings_back_after_its_writer_died_is_no_tampering(
    gk: Installation,
) -> None:
    """A writer killed inside SQLite's COMMIT, after its WAL frames and their sync but
    before the WAL index names them, leaves a write the connections open then do not
    see: it looks rolled back. Once every connection has died, the next one to open
    the store recovers the WAL, and the write is back, at the number a later writer
    (killed too) had meant to use. Neither moment is tampering, and the chain goes on
    without a gap."""
    strace = shutil.which("strace")
    if strace is None:
        pytest.skip("needs strace (to kill a writer at SQLite's WAL sync)")
    key = gk.enrolled_reader()
    db = gk.state / DB_NAME
    # A reader holding a snapshot keeps the WAL from being restarted (so the next
    # commit's first sync of it is its own) and, killed later, from being checkpointed
    # away on a clean close.
    hold = (
        "import sqlite3, sys, time\n"
        "c = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
        "c.execute('BEGIN'); c.execute('SELECT count(*) FROM audit').fetchone()\n"
        "print('holding', flush=True); time.sleep(120)\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", hold, str(db)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "holding\n"
        gk.gk("user", "add", "before")  # the WAL has frames: no header to write and sync
        before = gk.audit()[-1]
        env = _shell_env(gk)
        syncs = "fsync,fdatasync"
        killed = subprocess.run(
            [
                *(strace, "-f", "-qq", "-o", os.devnull, "-P", f"{db}-wal", "-e"),
                *(f"trace={syncs}", "-e", f"inject={syncs}:signal=SIGKILL:when=1"),
                *(GATEKEEPER_SHELL, "--config", str(gk.config), str(key)),
            ],
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            check=False,
        )
        assert killed.returncode == -signal.SIGKILL, killed.stderr
        raw = audithead.HeadFile(str(gk.state), 1000).read()
        assert raw is not None and raw.pending is not None
        limbo = raw.pending
        assert gk.audit()[-1]["seq"] == before["seq"], "the killed commit is not visible yet"
        result = gk.gk("log", "verify")
        assert "before committing record" in result.stdout and "audit log: intact" in result.stdout

        # Another writer takes that number and is killed before its own COMMIT.
        pid = _fork(
            lambda: _trapped_write("audit", str(gk.state), "", gk, key, ("commit", 1, "before"))
        )
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status)
        raw = audithead.HeadFile(str(gk.state), 1000).read()
        assert raw is not None and raw.pending is not None and raw.pending[0] == limbo[0]
        assert raw.pending != limbo
    finally:
        holder.kill()  # the last connection dies: no clean close, no checkpoint
        holder.wait()
    back = gk.audit()[-1]  # the first connection since recovers the WAL
    assert (back["seq"], back["hash"]) == limbo, "SQLite recovered the killed writer's commit"
    result = gk.gk("log", "verify", check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "audit log: intact" in result.stdout
    assert_intact_and_chains_on(gk, key)


def report(label: str, figures: Counter[str]) -> None:
    kills = sum(n for k, n in figures.items() if k.startswith("kills"))
    print(
        f"\n{label}: {kills} kills in all; "
        + ", ".join(f"{k} {n}" for k, n in sorted(figures.items()))
    )


def test_sqlite_writers_killed_at_any_moment_leave_an_intact_log(gk: Installation) -> None:
    key = gk.enrolled_reader()
    figures = run_kills(gk, key, seed=20)
    report("SQLite", figures)
    assert figures["verify failures"] == 0 and figures["writer failures"] == 0
    assert_intact_and_chains_on(gk, key)


def test_postgres_writers_killed_at_any_moment_leave_an_intact_log(pg_gk: Installation) -> None:
    key = pg_gk.enrolled_reader()
    figures = run_kills(pg_gk, key, seed=21)
    report("PostgreSQL", figures)
    assert figures["verify failures"] == 0 and figures["writer failures"] == 0
    assert_intact_and_chains_on(pg_gk, key)
