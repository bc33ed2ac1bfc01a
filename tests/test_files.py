"""files.replace_file: the one way gatekeeper replaces a file it writes whole (hooks, the
keys script, the audit page, key index entries, the policy and its compiled cache)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from gatekeeper.files import replace_file


def test_the_new_content_replaces_the_old_and_nothing_else_is_left(tmp_path: Path) -> None:
    target = tmp_path / "hook"
    target.write_text("old\n")
    replace_file(target, b"new\n" * 100_000, mode=0o755, exact_mode=True)
    assert target.read_bytes() == b"new\n" * 100_000
    assert stat.S_IMODE(target.stat().st_mode) == 0o755
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hook"]


def test_without_an_exact_mode_the_umask_applies(tmp_path: Path) -> None:
    old = os.umask(0o027)
    try:
        replace_file(tmp_path / "page.html", b"<p>")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "page.html").stat().st_mode) == 0o640


def test_an_exact_mode_ignores_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        replace_file(tmp_path / "entry", b"x", mode=0o640, exact_mode=True, durable=True)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "entry").stat().st_mode) == 0o640


def test_a_failed_rename_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "taken"
    target.mkdir()
    (target / "inside").write_text("keep")
    with pytest.raises(OSError):
        replace_file(target, b"new")
    assert (target / "inside").read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_a_temporary_left_by_a_dead_run_with_this_pid_is_replaced(tmp_path: Path) -> None:
    stale = tmp_path / f".policy.yaml.gatekeeper-{os.getpid()}.tmp"
    stale.write_text("half")
    replace_file(tmp_path / "policy.yaml", b"teams: {}\n")
    assert (tmp_path / "policy.yaml").read_text() == "teams: {}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["policy.yaml"]
