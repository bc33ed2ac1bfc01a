"""The server log (gatekeeper/logs.py), and what a store problem tells the client.

A git client learns only that the server's 2FA state is busy or unusable, in the same
words whatever the store; the admin finds the details (the database's path or URL and
its own error) in `STATE_DIR/gatekeeper.log`, which exists on a box without syslog too.
"""

from __future__ import annotations

import io
import os
import re
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gatekeeper import logs
from gatekeeper.errors import StoreError
from gatekeeper.hooks import fetch, prereceive, recheck
from gatekeeper.store import DB_NAME
from testing.installation import GATEKEEPER, Installation

BUSY = [
    "gatekeeper: access refused: the server's 2FA state is busy right now.",
    "gatekeeper: hint: try again in a moment; if it persists, tell an administrator.",
]
LINE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ (gatekeeper-[a-z]+)\[(\d+)\]: (.*)")


@pytest.fixture(autouse=True)
def no_log_directory_afterwards() -> Iterator[None]:
    """The log's directory is process-wide: what one test set must not leak."""
    yield
    logs.use_state_dir(None)


@pytest.fixture
def state(tmp_path: Path) -> Path:
    directory = tmp_path / "state"
    directory.mkdir()
    logs.use_state_dir(str(directory))
    return directory


def entries(state: Path) -> list[tuple[str, int, str]]:
    text = (state / logs.LOG_NAME).read_text()
    found = []
    for line in text.splitlines():
        match = LINE.fullmatch(line)
        assert match, line
        found.append((match[1], int(match[2]), match[3]))
    return found


# -- the file -------------------------------------------------------------------------------


def test_each_event_is_one_line_with_time_program_and_pid(state: Path) -> None:
    logs.log("gatekeeper-shell", "store error: state database is busy")
    logs.log("gatekeeper-hook", "two\nlines\tand a\x1b[31m colour")
    assert entries(state) == [
        ("gatekeeper-shell", os.getpid(), "store error: state database is busy"),
        ("gatekeeper-hook", os.getpid(), "two\\nlines\\tand a\\x1b[31m colour"),
    ]
    assert (state / logs.LOG_NAME).stat().st_mode & 0o777 == 0o600


def test_without_a_state_directory_nothing_is_written_and_nothing_raised(tmp_path: Path) -> None:
    logs.use_state_dir(None)
    logs.log("gatekeeper-shell", "policy error: the policy names no state directory")
    logs.use_state_dir(str(tmp_path / "missing"))
    try:
        logs.log("gatekeeper-shell", "the directory does not exist")
    finally:
        logs.use_state_dir(None)
    assert not (tmp_path / "missing").exists()


def _write_lines(directory: str, worker: int, count: int) -> None:
    logs.use_state_dir(directory)
    for i in range(count):
        logs.log("gatekeeper-shell", f"worker {worker} line {i} " + "x" * 200)


def test_lines_from_many_processes_at_once_never_mix(
    state: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_write_lines, args=(str(state), w, 200)) for w in range(8)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    found = entries(state)
    assert len(found) == 8 * 200
    for w in range(8):
        mine = [m for _, _, m in found if m.startswith(f"worker {w} ")]
        assert mine == [f"worker {w} line {i} " + "x" * 200 for i in range(200)]


def test_a_full_log_is_moved_aside_and_a_fresh_one_begun(
    state: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(logs, "MAX_BYTES", 1000)
    for i in range(40):
        logs.log("gatekeeper-shell", f"event {i:02d} " + "y" * 60)
    current = (state / logs.LOG_NAME).read_text()
    previous = (state / (logs.LOG_NAME + ".1")).read_text()
    assert len(current) < 1000 + 100 and len(previous) < 1000 + 100
    assert "event 39" in current and "event 00" not in current + previous
    assert sorted(os.listdir(state)) == [logs.LOG_NAME, logs.LOG_NAME + ".1"]


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can give a file away")
def test_a_log_root_creates_belongs_to_the_state_directorys_owner(state: Path) -> None:
    os.chown(state, 12345, 12345)
    logs.log("gatekeeper-serve", "started as root")
    st = (state / logs.LOG_NAME).stat()
    assert (st.st_uid, st.st_gid) == (12345, 12345)


def test_the_log_costs_the_per_connection_path_no_heavy_import(tmp_path: Path) -> None:
    root = str(Path(__file__).resolve().parent.parent)
    probe = (
        # -S and this checkout first: the editable install's path finder imports pathlib.
        f"import sys\nsys.path.insert(0, {root!r})\n"
        "from gatekeeper import logs\n"
        f"logs.use_state_dir({str(tmp_path)!r})\n"
        "logs.log('gatekeeper-shell', 'x')\n"
        "logs.MAX_BYTES = 0\n"
        "logs.log('gatekeeper-shell', 'rotated')\n"
        "print(' '.join(sorted(sys.modules)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-I", "-S", "-c", probe],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    heavy = {"re", "json", "pathlib", "datetime", "logging", "functools", "collections"}
    assert not heavy & set(out), sorted(heavy & set(out))
    assert (tmp_path / "gatekeeper.log").read_text().endswith(": rotated\n")
    assert (tmp_path / "gatekeeper.log.1").read_text().endswith(": x\n")


# -- what a busy store tells the client, and the admin -------------------------------------


@pytest.fixture
def site(gk: Installation) -> tuple[Installation, int]:
    return gk, gk.enrolled_reader()


def held(gk: Installation) -> sqlite3.Connection:
    holder = sqlite3.connect(gk.state / DB_NAME, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    return holder


def test_a_locked_store_tells_the_client_busy_and_the_log_where_and_why(
    site: tuple[Installation, int],
) -> None:
    gk, key = site
    holder = held(gk)
    try:
        fetch = gk.shell(key, "git-upload-pack 'platform/api.git'")
        status = gk.shell(key, "2fa verify 123456")
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    for result in (fetch, status):
        assert result.returncode != 0
        assert result.stderr.splitlines() == BUSY, result.stderr
        assert str(gk.state) not in result.stderr and "locked" not in result.stderr
    details = [m for prog, _, m in entries(gk.state) if prog == "gatekeeper-shell"]
    where = f"state database is busy: {gk.state / DB_NAME} is locked by another process."
    assert len(details) == 2 and all(where in m for m in details), details


def test_the_keys_command_logs_to_the_file(gk: Installation) -> None:
    (gk.state / DB_NAME).write_bytes(b"not a database" * 100)
    result = subprocess.run(
        [GATEKEEPER, "--config", str(gk.config), "keys-command", "git", "SHA256:" + "A" * 43],
        capture_output=True,
        text=True,
        env=gk.env,
        timeout=60,
    )
    assert result.stdout == "" and result.returncode != 0
    ((prog, _, message),) = entries(gk.state)
    assert prog == "gatekeeper-keys" and "StoreError" in message and str(gk.state) in message


def _busy(*args: Any, **kwargs: Any) -> Any:
    raise StoreError(
        "state database is busy: postgresql://gatekeeper@db:5432/gk (ERROR: canceling "
        "statement due to lock timeout).",
        hint="look for a stuck gatekeeper process or a long transaction.",
        busy=True,
    )


def test_the_fetch_gate_and_the_push_hook_say_busy_in_the_same_words(
    site: tuple[Installation, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    gk, _ = site
    monkeypatch.setattr(fetch, "decide", _busy)
    ident = recheck.Identity("platform/api", "bob", 1, "SHA256:x", "127.0.0.1")
    assert fetch.check_fetch(str(gk.config), 0.0, ident) == BUSY
    monkeypatch.setattr(prereceive, "identify", _busy)
    out = io.StringIO()
    assert prereceive.pre_receive(gk.config, None, {}, b"", out) == 1
    assert out.getvalue().splitlines() == BUSY
    details = [m for prog, _, m in entries(gk.state) if prog == "gatekeeper-hook"]
    assert len(details) == 2
    assert all("postgresql://gatekeeper@db:5432/gk" in m and "lock timeout" in m for m in details)
