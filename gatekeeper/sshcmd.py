"""The one place that parses what an SSH client asked to run.

`SSH_ORIGINAL_COMMAND` is split with POSIX shell-word rules (`split_words`, which
splits exactly as `shlex.split` does; no shell ever sees it) into an allow-listed verb
and exactly one argument. Anything else is refused
with a message that says what was wrong. Standard library only: this runs on every
connection.
"""

from __future__ import annotations

import os

from gatekeeper.errors import InputError
from gatekeeper.record import record

TYPE_CHECKING = False
if TYPE_CHECKING:
    from pathlib import Path

MAX_COMMAND_LENGTH = 1024
MAX_REPO_NAME_LENGTH = 200

GIT_VERBS = {
    "git-upload-pack": "read",
    "git-upload-archive": "read",
    "git-receive-pack": "write",
}
USER_VERBS = ("2fa", "info", "help")
# The spellings of the tools people come from (GitLab's `ssh git@host 2fa_verify`).
USER_ALIASES = {
    "2fa_verify": ("2fa", "verify"),
    "2fa_recovery_codes": ("2fa", "recovery-codes"),
    "2fa-verify": ("2fa", "verify"),
    "2fa-recovery-codes": ("2fa", "recovery-codes"),
}

# Character sets rather than regular expressions: compiling them cost every connection.
_CONTROL = frozenset(map(chr, [*range(0x20), 0x7F]))
_SHELL_SYNTAX = frozenset(";|&$`<>(){}\\!*?[]#")
_ALNUM = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
# A component starts with a letter, digit or underscore: never `-` (option
# injection) and never `.` (`..`, hidden directories).
_COMPONENT_FIRST = _ALNUM | {"_"}
_COMPONENT_CHARS = _ALNUM | frozenset("_.+-")
_USER_WORD_CHARS = _ALNUM | frozenset("_.-")


def _is_component(word: str) -> bool:
    """`[A-Za-z0-9_][A-Za-z0-9_.+-]*`, the whole string."""
    return bool(word) and word[0] in _COMPONENT_FIRST and _COMPONENT_CHARS.issuperset(word)


def _is_user_word(word: str) -> bool:
    """`[A-Za-z0-9][A-Za-z0-9_.-]{0,63}`, the whole string."""
    return 1 <= len(word) <= 64 and word[0] in _ALNUM and _USER_WORD_CHARS.issuperset(word)


@record
class GitRequest:
    verb: str
    """`git-upload-pack`, `git-receive-pack` or `git-upload-archive`."""
    repo: str
    """The normalised repository name: `platform/api`, no leading `/`, no `.git`."""
    typed: str = ""
    """The argument as the client typed it (`'/platform/api.git'`), for messages that
    must not say more than the client already knows."""

    @property
    def shown(self) -> str:
        """The name to echo back: what the client typed, without quotes or `~/`."""
        typed = self.typed.removeprefix("~/").strip("/")
        return typed or self.repo

    @property
    def action(self) -> str:
        return GIT_VERBS[self.verb]

    @property
    def git_subcommand(self) -> str:
        return self.verb.removeprefix("git-")


@record
class UserCommand:
    """A command for the person at the other end: `2fa ...`, `info`, `help`, or nothing."""

    words: tuple[str, ...]

    @property
    def verb(self) -> str:
        return self.words[0] if self.words else "info"


# shlex's whitespace in POSIX mode; its quotes, its escape, the quote escapes work in.
_WHITESPACE = " \t\r\n"


def split_words(text: str) -> list[str]:
    """`shlex.split(text)` (POSIX mode, no comments) without importing shlex, which
    imports `re`: words separated by whitespace, `'...'` literal, `"..."` with `\\`
    escaping only `"` and `\\`, `\\` escaping any character outside quotes. Raises
    ValueError with shlex's messages for an unclosed quote or a trailing escape.
    tests/test_hotpath.py checks it against shlex on arbitrary text."""
    words: list[str] = []
    i, n = 0, len(text)
    while True:
        while i < n and text[i] in _WHITESPACE:
            i += 1
        if i >= n:
            return words
        word: list[str] = []
        while i < n and text[i] not in _WHITESPACE:
            c = text[i]
            if c == "\\":
                if i + 1 >= n:
                    raise ValueError("No escaped character")
                word.append(text[i + 1])
                i += 2
            elif c == "'":
                end = text.find("'", i + 1)
                if end < 0:
                    raise ValueError("No closing quotation")
                word.append(text[i + 1 : end])
                i = end + 1
            elif c == '"':
                i += 1
                while True:
                    if i >= n:
                        raise ValueError("No closing quotation")
                    c = text[i]
                    if c == '"':
                        i += 1
                        break
                    if c == "\\":
                        if i + 1 >= n:
                            raise ValueError("No escaped character")
                        if text[i + 1] not in '"\\':
                            word.append(c)
                        word.append(text[i + 1])
                        i += 2
                    else:
                        word.append(c)
                        i += 1
            else:
                word.append(c)
                i += 1
        words.append("".join(word))


def parse_command(text: str | None) -> GitRequest | UserCommand:
    """Parse `SSH_ORIGINAL_COMMAND`; raise `InputError` for anything not allowed."""
    if text is None or not text.strip():
        return UserCommand(())
    if len(text) > MAX_COMMAND_LENGTH:
        raise InputError(
            f"command refused: longer than {MAX_COMMAND_LENGTH} characters.", hint=HELP_HINT
        )
    if not _CONTROL.isdisjoint(text):
        raise InputError(
            "command refused: it contains control characters (newline, NUL, escape...).",
            hint=HELP_HINT,
        )
    try:
        words = split_words(text)
    except ValueError as exc:
        raise InputError(f"command refused: {exc} (unbalanced quotes?).", hint=HELP_HINT) from exc
    if not words:
        return UserCommand(())
    if words[0] == "git" and len(words) >= 2 and f"git-{words[1]}" in GIT_VERBS:
        words = [f"git-{words[1]}", *words[2:]]
    if words[0] in USER_ALIASES:
        words = [*USER_ALIASES[words[0]], *words[1:]]
    verb = words[0]
    if verb in GIT_VERBS:
        return GitRequest(verb, _repo_argument(verb, words[1:]), words[1])
    if verb in USER_VERBS:
        for word in words[1:]:
            if not _is_user_word(word):
                raise InputError(
                    f"command refused: {_describe(word)} is not a valid argument to '{verb}'.",
                    hint=HELP_HINT,
                )
        return UserCommand(tuple(words))
    if not _SHELL_SYNTAX.isdisjoint(text):
        raise InputError("command refused: shell syntax is not accepted here.", hint=HELP_HINT)
    raise InputError(f"unknown command {_describe(verb)}.{did_you_mean(verb)}", hint=HELP_HINT)


def did_you_mean(word: str) -> str:
    """` Did you mean 'verify'?` for a near miss of a command, or nothing. Only a
    refusal gets here, so difflib's import is paid only then."""
    import difflib

    known = [*USER_VERBS, *USER_ALIASES, *(f"2fa {sub}" for sub in TWOFA_VERBS), "git-upload-pack"]
    close = difflib.get_close_matches(word.lower(), known, n=1, cutoff=0.6)
    if not close:
        return ""
    suggestion = close[0]
    if suggestion in USER_ALIASES:
        suggestion = " ".join(USER_ALIASES[suggestion])
    return f" Did you mean '{suggestion}'?"


TWOFA_VERBS = ("enroll", "confirm", "verify", "status", "disable", "recovery-codes")


def redact(command: str) -> str:
    """`command` as it may be written to a log or an audit record: every word after a
    `2fa` verb (a code or recovery code) and every run of digits that could be a code
    replaced by `***`, so no second factor ever reaches a log."""
    words = command.split()
    if words and (words[0] == "2fa" or words[0] in USER_ALIASES):
        keep = 2 if words[0] == "2fa" else 1
        words = words[:keep] + ["***"] * (len(words) > keep)
    out = []
    for word in words:
        digits = sum(c.isdigit() for c in word)
        out.append("***" if digits >= 6 else word)
    return " ".join(out)


HELP_HINT = "only git (clone, fetch, push, archive) and the commands listed by `help` are accepted."


def _describe(word: str) -> str:
    shown = word if len(word) <= 40 else word[:40] + "..."
    return repr(shown)


def _repo_argument(verb: str, args: list[str]) -> str:
    if not args:
        raise InputError(f"{verb}: missing the repository argument.", hint=HELP_HINT)
    if len(args) > 1:
        # Reject rather than silently drop trailing junk after the repository.
        raise InputError(
            f"{verb}: expected exactly one repository argument, got {len(args)}.",
            hint=HELP_HINT,
        )
    return normalize_repo_name(args[0])


def normalize_repo_name(arg: str) -> str:
    """`'/platform/api.git'` -> `platform/api`; refuse anything that is not a plain name."""
    if arg.startswith("-"):
        raise InputError(
            f"refused: {_describe(arg)} looks like an option, not a repository name.",
            hint="repository names start with a letter, digit or underscore.",
        )
    name = arg
    if name.startswith("~/"):
        name = name[2:]
    name = name.lstrip("/").rstrip("/")
    name = name.removesuffix(".git")
    if not name or len(name) > MAX_REPO_NAME_LENGTH or ".." in name:
        raise InputError(f"refused: {_describe(arg)} is not a valid repository name.")
    for component in name.split("/"):
        if not _is_component(component):
            raise InputError(
                f"refused: {_describe(arg)} is not a valid repository name.",
                hint="use letters, digits, '_', '.', '+', '-' and '/' between parts.",
            )
    return name


def valid_repo_name(name: str) -> bool:
    """A canonical repository name: components as `normalize_repo_name` allows them,
    taken as they are (a repository may itself be called `r.git`, on disk `r.git.git`)."""
    return (
        0 < len(name) <= MAX_REPO_NAME_LENGTH
        and ".." not in name
        and all(_is_component(part) for part in name.split("/"))
    )


def canonical_name(real_root: str, real: str) -> str | None:
    """The name of the repository at the real path `real`, relative to the real
    repositories root: the one identity of a repository, however a client spelled it
    and whatever symlinks led there. None when no client could name it."""
    if not real.startswith(real_root + os.sep) or not real.endswith(".git"):
        return None
    name = real[len(real_root) + 1 : -len(".git")]
    return name if valid_repo_name(name) else None


@record
class Located:
    """The repository a client's name opens."""

    name: str
    """Its canonical name (`canonical_name`): what the policy, the audit log, the hooks
    and every report speak of."""
    path: str
    """Its real path, which is what git is given."""


def locate_repo(root: str | os.PathLike[str], name: str) -> Located | None:
    """The bare repository that `<root>/<name>.git` opens, or None if it is missing,
    escapes the root, or is not a repository a client could name directly.

    Symlinks are followed, so an alias reaches exactly the repository it points to,
    under that repository's name and rules; the alias's own name grants nothing."""
    real_root = os.path.realpath(root)
    real = os.path.realpath(os.path.join(real_root, name + ".git"))
    if not os.path.isdir(real) or not os.path.isfile(os.path.join(real, "HEAD")):
        return None
    canonical = canonical_name(real_root, real)
    return Located(canonical, real) if canonical is not None else None


def list_repositories(root: str | os.PathLike[str]) -> list[Located]:
    """Every bare repository under `root` that a client can name, by canonical name,
    sorted; symlinks are not followed (an alias is not a repository of its own), and
    repositories are not looked into."""
    real_root = os.path.realpath(root)
    found: list[Located] = []
    for dirpath, dirnames, _ in os.walk(real_root):
        keep = []
        for d in sorted(dirnames):
            full = os.path.join(dirpath, d)
            if os.path.islink(full) or d.startswith("."):
                continue
            if d.endswith(".git") and os.path.isfile(os.path.join(full, "HEAD")):
                name = canonical_name(real_root, full)
                if name is not None:
                    found.append(Located(name, full))
                continue
            keep.append(d)
        dirnames[:] = keep
    return sorted(found, key=lambda repo: repo.name)


def resolve_repo_path(root: str | os.PathLike[str], name: str) -> Path | None:
    """`resolve_repo` as a Path."""
    real = resolve_repo(root, name)
    if real is None:
        return None
    from pathlib import Path

    return Path(real)


def resolve_repo(root: str | os.PathLike[str], name: str) -> str | None:
    """The real path of the bare repository `name` opens (`locate_repo`), or None."""
    located = locate_repo(root, name)
    return located.path if located is not None else None
