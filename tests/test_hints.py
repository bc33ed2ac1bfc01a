"""Every `gatekeeper ...` command that a message, hint or docstring names exists.

A hint that names a command the CLI does not have (`gatekeeper audit verify` for
`gatekeeper log verify`) sends an admin in a moment of trouble nowhere. This test reads
every string in gatekeeper/*.py, finds the commands they name, and resolves each against
the click command tree: every subcommand must exist, every option must belong to the
command it follows, and a command must take the arguments it is given.

A command is recognised when written in backticks (`` `gatekeeper log verify` ``), or when
the word after "gatekeeper" is a top-level command ("ask an administrator: gatekeeper 2fa
enroll alice"); "gatekeeper refuses access" is prose.
"""

from __future__ import annotations

import ast
import math
import re
from collections.abc import Iterator
from pathlib import Path

import click
import pytest

from gatekeeper.cli.main import cli

PACKAGE = Path(__file__).resolve().parent.parent / "gatekeeper"
# One word of a command line: a name, an option, a placeholder (USER, {user}, %u, ...).
WORD = re.compile(r"[A-Za-z0-9_%{}.:/=|@~+-]+")
TRAILING = ".,;:)'\""


def strings(path: Path) -> Iterator[tuple[int, str]]:
    """Every string constant in `path`, an f-string with `{}` for each placeholder."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.JoinedStr):
            text = "".join(
                part.value if isinstance(part, ast.Constant) else "{}" for part in node.values
            )
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            text = node.value
        else:
            continue
        yield node.lineno, text


def mentions(text: str) -> Iterator[tuple[bool, list[str]]]:
    """(in backticks?, the words after "gatekeeper") for each mention in `text`."""
    for match in re.finditer(r"\bgatekeeper ", text):
        quoted = text[max(0, match.start() - 1) : match.start()] == "`"
        rest = text[match.end() :]
        if quoted:
            rest = rest.split("`", 1)[0]
        words: list[str] = []
        for raw in rest.split():
            word = raw.rstrip(TRAILING) if not quoted else raw
            if not WORD.fullmatch(word):
                break
            words.append(word)
            if word != raw:
                break  # punctuation ends the command line
        yield quoted, words


def _option(command: click.Command, word: str) -> click.Option | None:
    name = word.split("=", 1)[0]
    for param in command.params:
        if isinstance(param, click.Option) and name in (*param.opts, *param.secondary_opts):
            return param
    if name in ("-h", "--help"):
        return click.Option(["--help"], is_flag=True)
    return None


def resolve(words: list[str], command: click.Command = cli, path: str = "gatekeeper") -> list[str]:
    """What is wrong with `gatekeeper WORDS` (nothing: an empty list)."""
    positional = 0
    i = 0
    while i < len(words):
        word = words[i]
        if word.startswith("-") and len(word) > 1:
            option = _option(command, word)
            if option is None:
                return [f"`{path}` has no option {word}"]
            takes_value = not option.is_flag and not option.count
            i += 2 if takes_value and "=" not in word else 1
            continue
        if isinstance(command, click.Group):
            names = word.split("|")
            unknown = [n for n in names if n not in command.commands]
            if unknown:
                return [f"`{path}` has no subcommand {unknown[0]!r}"]
            problems: list[str] = []
            for name in names:
                problems += resolve(words[i + 1 :], command.commands[name], f"{path} {name}")
            return problems
        positional += 1
        i += 1
    capacity = sum(
        math.inf if p.nargs < 0 else p.nargs
        for p in command.params
        if isinstance(p, click.Argument)
    )
    if positional > capacity:
        return [f"`{path}` takes {capacity} argument(s), given {positional}: {' '.join(words)}"]
    return []


def named_commands() -> list[tuple[str, list[str]]]:
    found = []
    for path in sorted(PACKAGE.glob("*.py")):
        for line, text in strings(path):
            for quoted, words in mentions(text):
                if not words:
                    continue
                first = words[0].split("|")[0]
                if quoted or first in cli.commands:
                    found.append((f"{path.name}:{line}", words))
    return found


def test_the_checker_catches_a_command_that_does_not_exist() -> None:
    assert resolve(["log", "verify"]) == []
    assert resolve(["hooks", "install|status|uninstall"]) == []
    assert resolve(["2fa", "confirm", "{}", "CODE"]) == []
    assert resolve(["authorized-keys", "--write", "FILE"]) == []
    assert resolve(["audit", "verify"]) != []  # `audit` takes no arguments
    assert resolve(["log", "check"]) != []
    assert resolve(["authorized-keys", "--to", "FILE"]) != []
    assert resolve(["user", "delete", "alice"]) != []
    assert [words for _, words in mentions("run `gatekeeper audit verify` now")] == [
        ["audit", "verify"]
    ]
    assert [w for _, w in mentions("ask an admin: gatekeeper 2fa reset bob.")] == [
        ["2fa", "reset", "bob"]
    ]


def test_messages_name_only_commands_that_exist() -> None:
    found = named_commands()
    assert len(found) > 30, "the scan finds the commands named in the package"
    problems = [f"{where}: {problem}" for where, words in found for problem in resolve(words)]
    assert problems == []


@pytest.mark.parametrize(
    "text",
    [
        "gatekeeper refuses access while it cannot keep its audit log",
        "install gatekeeper with its postgres extra",
        "gatekeeper serve: the embedded SSH server",
    ],
)
def test_prose_about_gatekeeper_is_not_taken_for_a_command(text: str) -> None:
    for quoted, words in mentions(text):
        first = words[0].split("|")[0] if words else ""
        assert quoted or first not in cli.commands or resolve(words) == []
