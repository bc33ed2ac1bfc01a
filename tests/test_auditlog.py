"""The audit log as an admin uses it: `gatekeeper log` to read and follow it, `log verify`
to prove nobody changed it (and to name the record someone did change), `log prune`
to keep it short without breaking that proof.

Tampering is done the way an intruder with the database file would: plain SQL on
`gatekeeper.db`, then the real CLI in a subprocess."""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import queue
import signal
import sqlite3
import subprocess
import threading
from collections.abc import Callable, Iterator
from contextlib import closing
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from gatekeeper.auditlog.chain import FIELDS, GENESIS, record_hash, verify_chain
from gatekeeper.auditlog.check import explain_chain
from gatekeeper.auditlog.read import parse_when
from gatekeeper.store import DB_NAME, HEAD_NAME
from testing.installation import GATEKEEPER, Installation

USERS = [f"u{i}" for i in range(1, 8)]  # records 2-8; record 1 is init's policy-change
CONTENT = "at, event, actor, user, key_fp, repo, action, reason, client, detail"


@pytest.fixture
def logged(gk: Installation) -> Installation:
    for name in USERS:
        gk.gk("user", "add", name)
    return gk


def db(gk: Installation) -> closing[sqlite3.Connection]:
    conn = sqlite3.connect(gk.state / DB_NAME, isolation_level=None)
    conn.row_factory = sqlite3.Row
    return closing(conn)


def verify(gk: Installation) -> tuple[int, list[str], str]:
    """(exit status, the problem lines, all output)."""
    result = gk.gk("log", "verify", check=False)
    assert "Traceback" not in result.stderr
    problems = [line.strip() for line in result.stdout.splitlines() if line.startswith("  ")]
    return result.returncode, problems, result.stdout + result.stderr


def swap(gk: Installation, a: int, b: int, columns: str) -> None:
    with db(gk) as conn:
        rows = {
            seq: tuple(
                conn.execute(f"SELECT {columns} FROM audit WHERE seq = ?", (seq,)).fetchone()  # noqa: S608
            )
            for seq in (a, b)
        }
        marks = ",".join("?" * len(rows[a]))
        conn.execute("BEGIN")
        for here, there in ((a, b), (b, a)):
            conn.execute(
                f"UPDATE audit SET ({columns}) = ({marks}) WHERE seq = ?",  # noqa: S608
                (*rows[there], here),
            )
        conn.execute("COMMIT")


# -- an intact log ----------------------------------------------------------------------


def test_an_untouched_log_verifies(logged: Installation) -> None:
    status, problems, output = verify(logged)
    assert status == 0, output
    assert problems == []
    assert "8 record(s) (records 1-8); the head file names record 8" in output
    assert "audit log: intact" in output
    data = json.loads(logged.gk("log", "verify", "--json").stdout)
    assert data["ok"] is True and data["problems"] == [] and data["head"]["seq"] == 8


# -- tampering, each named -----------------------------------------------------------------


def test_an_edited_record_is_named(logged: Installation) -> None:
    with db(logged) as conn:
        conn.execute("UPDATE audit SET user = 'mallory' WHERE seq = 4")
    status, problems, output = verify(logged)
    assert status == 1, output
    assert len(problems) == 1, problems
    assert problems[0].startswith("record 4 was edited: its contents do not match its hash")
    assert "user-add mallory" in problems[0]  # what the record now claims
    assert "NOT intact" in output


def test_an_edited_record_with_a_recomputed_hash_is_named(logged: Installation) -> None:
    """A careful intruder fixes the edited record's own hash: the next record no longer
    links to it."""
    with db(logged) as conn:
        row = dict(conn.execute("SELECT * FROM audit WHERE seq = 4").fetchone())
        row["detail"] = json.dumps({"note": "nothing happened"})
        digest = record_hash(row["prev_hash"], row)
        conn.execute("UPDATE audit SET detail = ?, hash = ? WHERE seq = 4", (row["detail"], digest))
    status, problems, _ = verify(logged)
    assert status == 1
    assert problems == [problems[0]] and problems[0].startswith(
        "record 4 was replaced or re-hashed: record 5 does not link to it"
    )


def test_a_record_deleted_from_the_middle_is_named(logged: Installation) -> None:
    with db(logged) as conn:
        conn.execute("DELETE FROM audit WHERE seq = 4")
    status, problems, _ = verify(logged)
    assert status == 1
    assert problems == ["record 4 is missing: deleted (record 5 follows record 3)"]


def test_deleted_last_records_are_caught_by_the_head_file(logged: Installation) -> None:
    with db(logged) as conn:
        conn.execute("DELETE FROM audit WHERE seq = 8")
    status, problems, _ = verify(logged)
    assert status == 1
    assert problems == [
        "record 8 is missing: cut off the end of the log "
        "(the head file names record 8; the log ends at 7)"
    ]
    with db(logged) as conn:
        conn.execute("DELETE FROM audit WHERE seq >= 6")
    assert verify(logged)[1] == [
        "records 6-8 are missing: cut off the end of the log "
        "(the head file names record 8; the log ends at 5)"
    ]


def test_a_cut_off_tail_stays_visible_after_new_records(logged: Installation) -> None:
    """The next append chains on from the head file, not from the shortened table, so
    the gap cannot be papered over by simply using the system."""
    with db(logged) as conn:
        conn.execute("DELETE FROM audit WHERE seq >= 7")
    logged.gk("user", "add", "late")
    status, problems, _ = verify(logged)
    assert status == 1
    assert problems == ["records 7-8 are missing: deleted (record 9 follows record 6)"]
    assert [r["seq"] for r in logged.audit()][-1] == 9


@pytest.mark.parametrize(
    "columns",
    [f"{CONTENT}, prev_hash, hash", CONTENT],
    ids=["whole-records", "contents-only"],
)
def test_two_reordered_records_are_named(logged: Installation, columns: str) -> None:
    swap(logged, 4, 5, columns)
    status, problems, output = verify(logged)
    assert status == 1, output
    assert problems == ["records 4 and 5 were swapped: each holds the other's contents"]


def test_reordering_the_last_two_records_is_named_once(logged: Installation) -> None:
    swap(logged, 7, 8, f"{CONTENT}, prev_hash, hash")
    assert verify(logged)[1] == ["records 7 and 8 were swapped: each holds the other's contents"]


def test_a_missing_head_file_is_a_problem(logged: Installation) -> None:
    (logged.state / HEAD_NAME).unlink()
    status, problems, _ = verify(logged)
    assert status == 1
    assert problems == [
        "the head file audit.head is missing: records cut off the end of the log could not be seen"
    ]


def test_verify_json_names_each_problem_by_kind(logged: Installation) -> None:
    with db(logged) as conn:
        conn.execute("UPDATE audit SET reason = 'allowed' WHERE seq = 2")
        conn.execute("DELETE FROM audit WHERE seq = 6")
    result = logged.gk("log", "verify", "--json", check=False)
    assert result.returncode == 1
    data = json.loads(result.stdout)
    assert data["ok"] is False
    assert [(p["seq"], p["kind"]) for p in data["problems"]] == [(2, "edited"), (6, "deleted")]


# -- a crash is not tampering ----------------------------------------------------------------


def head_file(gk: Installation) -> str:
    return (gk.state / HEAD_NAME).read_text()


def pending_head(gk: Installation, old: int, new: tuple[int, str]) -> None:
    """The head file as a writer leaves it when it dies between writing its head pending
    and settling it (gatekeeper/auditlog/head.py): the committed end `old`, the new end."""
    with db(gk) as conn:
        digest = conn.execute("SELECT hash FROM audit WHERE seq = ?", (old,)).fetchone()[0]
    (gk.state / HEAD_NAME).write_text(f"{old} {digest}\npending {new[0]} {new[1]}\n")


def test_a_write_killed_before_its_commit_is_recovered_not_reported(logged: Installation) -> None:
    pending_head(logged, 8, (9, "ab" * 32))  # record 9 never reached the database
    status, problems, output = verify(logged)
    assert status == 0, output
    assert problems == []
    assert (
        "audit log: recovered an interrupted write: a writer stopped (crashed or was killed) "
        "before committing record 9: that write is not in the log, which ends where it did "
        "before; the next write settles the head file. This is an interrupted write, not "
        "tampering."
    ) in output
    assert "audit log: intact" in output
    data = json.loads(logged.gk("log", "verify", "--json").stdout)
    assert data["ok"] is True and data["recovered"]["outcome"] == "rolled-back"
    logged.gk("user", "add", "late")
    with db(logged) as conn:
        hash9 = conn.execute("SELECT hash FROM audit WHERE seq = 9").fetchone()[0]
    assert head_file(logged) == f"9 {hash9}\n"  # settled, in the format of every version
    again = json.loads(logged.gk("log", "verify", "--json").stdout)
    assert again["ok"] is True and again["recovered"] is None


def test_the_next_write_after_a_killed_one_chains_on_without_a_gap(logged: Installation) -> None:
    pending_head(logged, 8, (9, "cd" * 32))
    logged.gk("user", "add", "late")  # resolves the head under the write lock, then writes
    records = logged.audit()
    assert [r["seq"] for r in records] == list(range(1, 10))
    assert records[-1]["prev_hash"] == records[-2]["hash"]
    status, problems, output = verify(logged)
    assert status == 0 and problems == [], output
    assert "recovered" not in output
    assert not [p.name for p in logged.state.iterdir() if p.name.startswith(".")]


def test_a_write_killed_after_its_commit_is_recovered_not_reported(logged: Installation) -> None:
    records = logged.audit()
    pending_head(logged, 7, (8, records[-1]["hash"]))  # committed, the settle lost
    status, problems, output = verify(logged)
    assert status == 0 and problems == [], output
    assert "right after committing record 8: record 8 is in the log" in output
    assert head_file(logged) == f"8 {records[-1]['hash']}\n"
    data = json.loads(logged.gk("log", "verify", "--json").stdout)
    assert data["ok"] is True


def test_a_pending_head_does_not_hide_records_cut_off_before_it(logged: Installation) -> None:
    """The record a pending head was written after must still be there: a crash after
    a cut is still a cut."""
    pending_head(logged, 8, (9, "ef" * 32))
    with db(logged) as conn:
        conn.execute("DELETE FROM audit WHERE seq >= 7")
    status, problems, output = verify(logged)
    assert status == 1, output
    assert "recovered" not in output
    assert problems == [
        "records 7-8 are missing: cut off the end of the log "
        "(the head file names record 8; the log ends at 6)"
    ]
    # ...and the next write keeps the cut visible, as after a settled head.
    logged.gk("user", "add", "late")
    assert verify(logged)[1] == ["records 7-8 are missing: deleted (record 9 follows record 6)"]


def test_a_write_sqlite_recovers_after_its_writer_was_killed_is_no_tampering(
    logged: Installation,
) -> None:
    """A writer killed inside COMMIT can leave its commit in the WAL file but not in the
    WAL index: the connections open then do not see it, a later recovery of the WAL
    does. A writer after it may have died too, leaving its own pending head for the
    number that write took. The records after the old end chain on from it: the log
    ends there."""
    records = logged.audit()
    pending_head(logged, 7, (8, "12" * 32))  # record 8 is another write's
    status, problems, output = verify(logged)
    assert status == 0 and problems == [], output
    assert "recovered an interrupted write" in output
    data = json.loads(logged.gk("log", "verify", "--json").stdout)
    assert data["head"]["seq"] == 8 and data["head"]["hash"] == records[-1]["hash"]
    # ...and an edit of the record the pending head was written after is tampering.
    with db(logged) as conn:
        conn.execute("UPDATE audit SET user = 'mallory' WHERE seq = 7")
    status, problems, output = verify(logged)
    assert status == 1, output
    assert problems[0].startswith("record 7 was edited")


def test_the_last_transactions_records_cut_off_are_reported(logged: Installation) -> None:
    """A push's ref updates are one transaction with one settled head: deleting all of
    them is a cut tail, not an interrupted write."""
    from gatekeeper.store import Store

    with Store.open(logged.state) as store:
        store.audit_many(
            "ref-update", [{"user": "u1", "detail": {"ref": n}} for n in (1, 2, 3)], now=0
        )
    assert head_file(logged).startswith("11 ")
    with db(logged) as conn:
        conn.execute("DELETE FROM audit WHERE seq >= 9")
    status, problems, _ = verify(logged)
    assert status == 1
    assert problems == [
        "records 9-11 are missing: cut off the end of the log "
        "(the head file names record 11; the log ends at 8)"
    ]


def test_the_head_file_reads_every_versions_settled_format() -> None:
    from gatekeeper.auditlog.head import Head, parse, render
    from gatekeeper.errors import StoreError

    digest, other = "a1" * 32, "b2" * 32
    for text in (f"12 {digest}\n", f"12 {digest}", f" 12  {digest} \n\n"):
        assert parse(text, "audit.head") == Head(12, digest)
    pending = Head(12, digest, (13, other))
    assert render(pending) == f"12 {digest}\npending 13 {other}\n"
    assert parse(render(pending), "audit.head") == pending
    for bad in ("", "12\n", f"x {digest}\n", f"12 {digest[:-1]}\n", f"12 {digest}\n13 {other}\n"):
        with pytest.raises(StoreError, match="malformed"):
            parse(bad, "audit.head")


def test_verify_sweeps_what_older_versions_left_behind_when_killed(logged: Installation) -> None:
    dead = 2**22 + 12345  # above any pid this machine hands out by default
    for name in (f".{HEAD_NAME}.{dead}", f".{HEAD_NAME}.{dead}.before"):
        (logged.state / name).write_text("7 x\n")
    (logged.state / f".{HEAD_NAME}.{os.getpid()}").write_text("in use\n")
    assert verify(logged)[0] == 0
    left = sorted(p.name for p in logged.state.iterdir() if p.name.startswith("."))
    assert left == [f".{HEAD_NAME}.{os.getpid()}"]  # a live process's is left alone


# -- pruning -------------------------------------------------------------------------------


def test_prune_keeps_the_rest_verifiable(logged: Installation) -> None:
    records = logged.audit()
    cut = records[4]["at"]  # records 1-4 are older than record 5
    result = logged.gk("log", "prune", "--before", cut)
    assert "pruned 4 record(s)" in result.stdout
    assert "verifies on from the anchor at record 4" in result.stdout
    status, _, output = verify(logged)
    assert status == 0, output
    assert "after the prune anchor at record 4" in output
    kept = logged.audit()
    assert [r["seq"] for r in kept] == [5, 6, 7, 8, 9]
    assert kept[-1]["event"] == "log-prune"
    assert kept[-1]["actor"] == getpass.getuser()
    assert json.loads(kept[-1]["detail"])["removed"] == 4
    # The policy-change record went with them; its hash did not: no spurious change,
    # and the next real one names the right old hash.
    policy = hashlib.sha256(logged.config.read_bytes()).hexdigest()
    assert json.loads(kept[-1]["detail"])["policy"] == policy
    assert logged.gk("log", "--event", "policy-change", "--json").stdout.strip() == "[]"
    logged.config.write_text(logged.config.read_text() + "# edited\n")
    change = json.loads(logged.gk("log", "--event", "policy-change", "--json").stdout)
    assert [c["detail"]["old"] for c in change] == [policy]
    assert "nothing to prune" in logged.gk("log", "prune", "--before", "2000-01-01").stdout
    # The anchor still catches tampering right after it.
    with db(logged) as conn:
        conn.execute("DELETE FROM audit WHERE seq = 5")
    assert verify(logged)[1] == [
        "record 5 is missing: deleted (record 6 follows the prune anchor at record 4)"
    ]
    # Wiping the whole table: the records verify itself appends (the policy is new to
    # an empty log) chain on from the head file, so the wipe stays a visible gap.
    with db(logged) as conn:
        conn.execute("DELETE FROM audit")
    assert verify(logged)[1] == [
        "records 5-10 are missing: deleted (record 11 follows the prune anchor at record 4)"
    ]


def test_prune_refuses_to_hide_a_broken_log(logged: Installation) -> None:
    with db(logged) as conn:
        conn.execute("UPDATE audit SET user = 'mallory' WHERE seq = 3")
    before = len(logged.audit())
    refused = logged.gk("log", "prune", "--before", "1s", check=False)
    assert refused.returncode == 2
    assert "does not verify (1 problem(s)): pruning could remove the evidence" in refused.stderr
    assert "--force" in refused.stderr
    assert len(logged.audit()) == before
    forced = logged.gk("log", "prune", "--before", "0s", "--force")
    assert "pruned" in forced.stdout
    assert verify(logged)[0] == 0  # the edited record is gone with the rest


# -- policy changes ------------------------------------------------------------------------


def test_a_policy_edit_appears_in_the_log_with_both_hashes_and_who(logged: Installation) -> None:
    old = hashlib.sha256(logged.config.read_bytes()).hexdigest()
    logged.config.write_text(logged.config.read_text() + "  - match: extra\n    read: [platform]\n")
    new = hashlib.sha256(logged.config.read_bytes()).hexdigest()
    table = logged.gk("log", "--event", "policy-change").stdout
    assert f"{old[:12]} -> {new[:12]}" in table
    changes = json.loads(logged.gk("log", "--event", "policy-change", "--json").stdout)
    assert [c["detail"]["new"] for c in changes] == [old, new]
    assert changes[0]["detail"]["old"] is None  # the first policy this store saw
    assert changes[-1]["detail"]["old"] == old
    # Edited in place: who did it is not known, so nobody is named as its author; the
    # record says who noticed it (the next command), when and whose the file is.
    assert changes[-1]["actor"] is None
    assert changes[-1]["detail"]["how"] == f"edited in place; noticed by {getpass.getuser()}"
    assert changes[-1]["detail"]["file"] == str(logged.config)
    # Recorded once, not on every command.
    logged.gk("log")
    assert len(json.loads(logged.gk("log", "--event", "policy-change", "--json").stdout)) == 2
    assert verify(logged)[0] == 0


# -- reading -------------------------------------------------------------------------------


def test_filters_select_records(logged: Installation) -> None:
    def seqs(*args: str) -> list[int]:
        return [r["seq"] for r in json.loads(logged.gk("log", "--json", *args).stdout)]

    assert seqs() == list(range(1, 9))
    assert seqs("--user", "u3") == [4]
    assert seqs("--event", "user-add") == list(range(2, 9))
    assert seqs("--event", "user-add", "--last", "2") == [7, 8]
    assert seqs("--since", "1h") == list(range(1, 9))
    tomorrow = (datetime.now(timezone.utc) + timedelta(days=1)).date().isoformat()
    assert seqs("--since", tomorrow) == []
    first_at = logged.audit()[3]["at"]
    assert seqs("--since", first_at) == list(range(4, 9))
    table = logged.gk("log", "--user", "u1").stdout.splitlines()
    assert table[0].split()[:4] == ["SEQ", "AT", "EVENT", "ACTOR"]
    assert len(table) == 2 and "user-add" in table[1] and " u1 " in table[1]
    bad = logged.gk("log", "--since", "last tuesday", check=False)
    assert bad.returncode == 2 and "not a date or time: 'last tuesday'" in bad.stderr
    misuse = logged.gk("log", "--user", "u1", "verify", check=False)
    assert misuse.returncode == 2 and "not with `log verify`" in misuse.stderr


def test_parse_when_accepts_dates_times_and_ages() -> None:
    now = datetime(2027, 1, 31, 12, 0, tzinfo=timezone.utc).timestamp()
    assert parse_when("2027-01-30", now) == "2027-01-30T00:00:00.000000Z"
    assert parse_when("2027-01-30T10:15", now) == "2027-01-30T10:15:00.000000Z"
    assert parse_when("2027-01-30T10:15:00+02:00", now) == "2027-01-30T08:15:00.000000Z"
    assert parse_when("2027-01-30T10:15:00Z", now) == "2027-01-30T10:15:00.000000Z"
    assert parse_when("90m", now) == "2027-01-31T10:30:00.000000Z"
    assert parse_when("2d", now) == "2027-01-29T12:00:00.000000Z"


def _lines(stream: Any) -> queue.Queue[str]:
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        for line in stream:
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    return lines


def _until(lines: queue.Queue[str], done: Callable[[dict[str, Any]], bool]) -> list[Any]:
    seen = []
    while True:
        record = json.loads(lines.get(timeout=30))
        seen.append(record)
        if done(record):
            return seen


@pytest.fixture
def follower(logged: Installation) -> Iterator[subprocess.Popen[str]]:
    args = ["log", "--follow", "--json", "--event", "user-add", "--interval", "0.1"]
    proc = subprocess.Popen(
        [GATEKEEPER, *args, "--max-wait", "120"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=logged.env,
    )
    yield proc
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_follow_prints_new_records_until_interrupted(
    logged: Installation, follower: subprocess.Popen[str]
) -> None:
    lines = _lines(follower.stdout)
    first = _until(lines, lambda r: r["user"] == "u7")
    assert [r["user"] for r in first] == USERS  # existing ones first (the newest 10)
    logged.gk("user", "add", "late")
    logged.gk("2fa", "reset", "u1")  # another event: filtered out
    logged.gk("user", "add", "later")
    more = _until(lines, lambda r: r["user"] == "later")
    assert [(r["event"], r["user"]) for r in more] == [("user-add", "late"), ("user-add", "later")]
    follower.send_signal(signal.SIGINT)
    _, err = follower.communicate(timeout=30)
    assert follower.returncode == 0, err
    assert "Traceback" not in err


def _sigint_ignored() -> None:
    # What a non-interactive shell does to a job it starts with `&` (a script, a CI step).
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _sigint_blocked() -> None:
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})


@pytest.mark.parametrize(
    ("inherited", "signum"),
    [
        (_sigint_ignored, signal.SIGINT),
        (_sigint_blocked, signal.SIGINT),
        (None, signal.SIGTERM),
        (_sigint_ignored, signal.SIGTERM),
    ],
    ids=["sigint-ignored-by-the-parent", "sigint-blocked-by-the-parent", "sigterm", "sigterm-bg"],
)
def test_follow_stops_on_a_signal_however_it_was_started(
    logged: Installation, inherited: Callable[[], None] | None, signum: int
) -> None:
    args = ["log", "--follow", "--json", "--event", "user-add", "--interval", "0.1"]
    proc = subprocess.Popen(
        [GATEKEEPER, *args, "--max-wait", "120"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=logged.env,
        preexec_fn=inherited,
    )
    try:
        lines = _lines(proc.stdout)
        _until(lines, lambda r: r["user"] == "u7")
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert err == ""


def test_follow_stops_on_a_signal_that_arrives_while_it_reads(
    logged: Installation, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In process: SIGINT lands in the middle of a database read; the read finishes, the
    loop ends at its next check, nothing is raised where the signal landed."""
    from click.testing import CliRunner

    from gatekeeper.auditlog import read
    from gatekeeper.cli.main import cli

    reads = 0
    real = read.LogFilter.records

    def records(self: read.LogFilter, store: Any, after_seq: int = 0) -> list[dict[str, Any]]:
        nonlocal reads
        reads += 1
        if reads == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return real(self, store, after_seq)

    monkeypatch.setattr(read.LogFilter, "records", records)
    before = signal.getsignal(signal.SIGINT)
    args = ["--config", str(logged.config), "log", "--follow", "--interval", "0.05"]
    result = CliRunner().invoke(cli, [*args, "--max-wait", "30"])
    assert result.exit_code == 0, result.output
    assert reads == 3
    assert signal.getsignal(signal.SIGINT) is before, "the handler is put back"


def test_follow_stops_by_itself_after_max_wait(logged: Installation) -> None:
    result = logged.gk("log", "--follow", "--max-wait", "0.3", "--interval", "0.1", "--user", "u2")
    lines = result.stdout.splitlines()
    assert lines[0].startswith("   SEQ  AT") and len(lines) == 2 and " u2 " in lines[1]


# -- grace and report mode, end to end -------------------------------------------------------

ROLLOUT = """\
teams:
  platform:
    members: [bob]
    require_2fa: enrolled
    grace_until: 2099-12-31
  contractors:
    members: [carol]
repositories:
  - match: platform/*
    write: [platform]
  - match: pilot
    read: [contractors]
    require_2fa: enrolled
    mode: report
"""


def test_grace_and_report_mode_warn_and_are_logged(tmp_path: Path) -> None:
    gk = Installation(tmp_path / "gk", ROLLOUT).init()
    gk.repo("platform/api")
    gk.repo("pilot")
    _, bob = gk.add_user("bob")
    _, carol = gk.add_user("carol")
    graced = gk.shell(bob, "git-upload-pack 'platform/api.git'", stdin="0000")
    assert graced.returncode == 0, graced.stderr
    assert "allowed until 2099-12-31" in graced.stderr
    assert "ssh git@git.example.com 2fa enroll" in graced.stderr
    reported = gk.shell(carol, "git-upload-pack 'pilot.git'", stdin="0000")
    assert reported.returncode == 0, reported.stderr
    assert "'pilot' would be refused" in reported.stderr and "report mode" in reported.stderr

    would = json.loads(gk.gk("log", "--reason", "report-only", "--json").stdout)
    assert [(r["user"], r["repo"], r["action"], r["event"]) for r in would] == [
        ("carol", "pilot", "read", "access")
    ]
    grace = json.loads(gk.gk("log", "--reason", "grace-period", "--json").stdout)
    assert [(r["user"], r["repo"]) for r in grace] == [("bob", "platform/api")]
    by_repo = gk.gk("log", "--repo", "pilot.git").stdout
    assert "report-only" in by_repo and "carol" in by_repo
    listed = json.loads(gk.gk("audit", "--would-refuse", "--format", "json").stdout)
    assert {(w["user"], w["repo"], w["now"]) for w in listed["would_refuse"]} == {
        ("bob", "platform/api", "grace-period"),
        ("carol", "pilot", "report-only"),
    }
    assert os.environ.get("GATEKEEPER_CONFIG") != str(gk.config)  # the test stayed isolated


# -- the diagnosis itself, on synthetic chains -----------------------------------------------


def _chain(n: int) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    prev = GENESIS
    for seq in range(1, n + 1):
        row: dict[str, Any] = {f: None for f in FIELDS}
        row.update(seq=seq, at=f"2027-01-01T00:00:{seq:02d}.000000Z", event="access")
        row.update(user=f"u{seq}", detail="{}", prev_hash=prev)
        row["hash"] = prev = record_hash(row["prev_hash"], row)
        rows.append(row)
    return rows


def _move(rows: list[dict[str, Any]], mapping: dict[int, int]) -> list[dict[str, Any]]:
    """Put the whole contents of record `src` at position `dst` for each dst: src."""
    by_seq = {r["seq"]: r for r in rows}
    return [{**by_seq[mapping.get(r["seq"], r["seq"])], "seq": r["seq"]} for r in rows]


def _messages(rows: list[dict[str, Any]], head: tuple[int, str] | None = None) -> list[str]:
    problems = verify_chain(rows, head)
    found = explain_chain(rows, head, None)
    assert bool(problems) == bool(found)
    return [f.message for f in found]


def test_explain_names_distant_swaps_and_rotations() -> None:
    rows = _chain(10)
    head = (10, rows[-1]["hash"])
    assert _messages(rows, head) == []
    assert _messages(_move(rows, {3: 7, 7: 3}), head) == [
        "records 3 and 7 were swapped: each holds the other's contents"
    ]
    assert _messages(_move(rows, {2: 3, 3: 4, 4: 2}), head) == [
        "record 2 holds the contents of record 3 (moved)",
        "record 3 holds the contents of record 4 (moved)",
        "record 4 holds the contents of record 2 (moved)",
    ]


def test_explain_names_a_re_hashed_last_record_by_the_head_file() -> None:
    rows = _chain(5)
    head = (5, rows[-1]["hash"])
    rows[-1]["user"] = "mallory"
    rows[-1]["hash"] = record_hash(rows[-1]["prev_hash"], rows[-1])
    assert _messages(rows, head) == [
        "record 5 differs from the head file: it was replaced or re-hashed"
    ]
