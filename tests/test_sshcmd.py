"""The SSH command parser: what a client may ask to run, and everything it may not."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gatekeeper.errors import InputError
from gatekeeper.sshcmd import (
    MAX_COMMAND_LENGTH,
    GitRequest,
    UserCommand,
    normalize_repo_name,
    parse_command,
    resolve_repo_path,
)


@pytest.mark.parametrize(
    ("command", "verb", "repo"),
    [
        ("git-upload-pack 'platform/api.git'", "git-upload-pack", "platform/api"),
        ("git-upload-pack '/platform/api.git'", "git-upload-pack", "platform/api"),
        ("git-upload-pack '~/platform/api'", "git-upload-pack", "platform/api"),
        ("git-receive-pack platform/api", "git-receive-pack", "platform/api"),
        ('git-upload-archive "tools.git"', "git-upload-archive", "tools"),
        ("git upload-pack 'platform/api.git'", "git-upload-pack", "platform/api"),
        ("git receive-pack 'a/b/c.git/'", "git-receive-pack", "a/b/c"),
        ("git-upload-pack 'repo_1.2+x-y'", "git-upload-pack", "repo_1.2+x-y"),
    ],
)
def test_git_commands_as_clients_send_them(command: str, verb: str, repo: str) -> None:
    request = parse_command(command)
    assert isinstance(request, GitRequest)
    assert (request.verb, request.repo) == (verb, repo)


def test_actions_follow_the_verb() -> None:
    assert parse_command("git-upload-pack 'a'").action == "read"  # type: ignore[union-attr]
    assert parse_command("git-upload-archive 'a'").action == "read"  # type: ignore[union-attr]
    assert parse_command("git-receive-pack 'a'").action == "write"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("command", "words"),
    [
        (None, ()),
        ("", ()),
        ("   ", ()),
        ("info", ("info",)),
        ("help", ("help",)),
        ("2fa verify 123456", ("2fa", "verify", "123456")),
        ("2fa verify", ("2fa", "verify")),
        ("2fa disable abcde-fghij", ("2fa", "disable", "abcde-fghij")),
    ],
)
def test_user_commands(command: str | None, words: tuple[str, ...]) -> None:
    assert parse_command(command) == UserCommand(words)


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        ("git-upload-pack 'a'; rm -rf /", "exactly one repository argument"),
        ("git-upload-pack 'a;rm'", "not a valid repository name"),
        ("git-upload-pack 'a' | cat", "exactly one repository argument"),
        ("git-upload-pack 'a|cat'", "not a valid repository name"),
        ("git-upload-pack 'a' && id", "exactly one repository argument"),
        ("git-upload-pack '`id`'", "not a valid repository name"),
        ("git-upload-pack '$(id)'", "not a valid repository name"),
        ("git-upload-pack 'a'\nid", "control characters"),
        ("git-upload-pack 'a\x00b'", "control characters"),
        ("git-upload-pack 'a\x1b[31m'", "control characters"),
        ("git-upload-pack '--upload-pack=touch x'", "looks like an option"),
        ("git-upload-pack -h", "looks like an option"),
        ("git-upload-pack --help", "looks like an option"),
        ("git-upload-pack '-oProxyCommand=id'", "looks like an option"),
        ("git-upload-pack 'a' 'b'", "exactly one repository argument"),
        ("git-upload-pack", "missing the repository argument"),
        ("git upload-pack", "missing the repository argument"),
        ("git-upload-pack '../etc'", "not a valid repository name"),
        ("git-upload-pack 'cc/../../x'", "not a valid repository name"),
        ("git-upload-pack 'a/..'", "not a valid repository name"),
        ("git-upload-pack '%2e%2e/x'", "not a valid repository name"),
        ("git-upload-pack 'a/.hidden'", "not a valid repository name"),
        ("git-upload-pack 'a//b'", "not a valid repository name"),
        ("git-upload-pack ''", "not a valid repository name"),
        ("git-upload-pack '/'", "not a valid repository name"),
        ("git-upload-pack 'unbalanced", "unbalanced quotes"),
        ("git-upload-pack " + "a" * 300, "not a valid repository name"),
        ("x" * (MAX_COMMAND_LENGTH + 1), "longer than"),
        ("bash", "unknown command"),
        ("git-shell -c id", "unknown command"),
        ("git config --global x y", "unknown command"),
        ("scp -t /tmp", "unknown command"),
        ("id; bash", "shell syntax"),
        ("2fa verify 12;34", "not a valid argument"),
        ("2fa verify $(id)", "not a valid argument"),
        ("git-upload-pack 'caf\u00e9'", "not a valid repository name"),
    ],
)
def test_bad_commands_are_refused_with_a_reason(command: str, expected: str) -> None:
    with pytest.raises(InputError) as info:
        parse_command(command)
    assert expected in info.value.message


def test_a_refusal_names_what_is_accepted() -> None:
    with pytest.raises(InputError) as info:
        parse_command("rm -rf /")
    assert info.value.hint and "git" in info.value.hint


def test_normalize_strips_decorations_only() -> None:
    assert normalize_repo_name("/a/b.git/") == "a/b"
    assert normalize_repo_name("~/a") == "a"
    with pytest.raises(InputError):
        normalize_repo_name("~user/a")


def make_bare(root: Path, name: str) -> Path:
    path = root / f"{name}.git"
    path.mkdir(parents=True)
    (path / "HEAD").write_text("ref: refs/heads/main\n")
    return path


def test_resolve_finds_bare_repositories_under_the_root(tmp_path: Path) -> None:
    root = tmp_path / "repos"
    repo = make_bare(root, "platform/api")
    assert resolve_repo_path(root, "platform/api") == repo.resolve()
    assert resolve_repo_path(root, "platform/missing") is None


def test_resolve_refuses_a_symlink_pointing_outside_the_root(tmp_path: Path) -> None:
    root = tmp_path / "repos"
    root.mkdir()
    outside = make_bare(tmp_path / "elsewhere", "secret")
    os.symlink(outside, root / "innocent.git")
    assert resolve_repo_path(root, "innocent") is None
    os.symlink(tmp_path / "elsewhere", root / "dir")
    assert resolve_repo_path(root, "dir/secret") is None


def test_resolve_accepts_a_symlink_that_stays_inside(tmp_path: Path) -> None:
    root = tmp_path / "repos"
    real = make_bare(root, "real")
    os.symlink(real, root / "alias.git")
    assert resolve_repo_path(root, "alias") == real.resolve()


def test_resolve_needs_a_repository_not_just_a_directory(tmp_path: Path) -> None:
    root = tmp_path / "repos"
    (root / "plain.git").mkdir(parents=True)
    assert resolve_repo_path(root, "plain") is None
