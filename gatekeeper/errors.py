"""The few exceptions that carry a message meant for a person.

Every entry point (the shell, the CLI, the hooks, the embedded server) catches
`GatekeeperError` at the top and prints `message` (and `hint`, when there is one)
as clean lines with `exit_code`; nothing expected ever reaches the user as a traceback.
"""

from __future__ import annotations


class GatekeeperError(Exception):
    """An expected failure with a one-line reason and, where possible, what to do about it."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def lines(self) -> list[str]:
        out = [self.message]
        if self.hint:
            out.append(f"hint: {self.hint}")
        return out


class InputError(GatekeeperError):
    """Something a person typed or passed is not acceptable (a name, a key, a code)."""

    exit_code = 2


class PolicyError(GatekeeperError):
    """The policy file is missing, unreadable or invalid; `problems` lists each finding."""

    exit_code = 3

    def __init__(self, message: str, hint: str | None = None, problems: list[str] | None = None):
        super().__init__(message, hint)
        self.problems = problems or []

    def lines(self) -> list[str]:
        return [*self.problems, *super().lines()] if self.problems else super().lines()


class StoreError(GatekeeperError):
    """The state database or the server key is missing, locked, corrupt or unwritable.

    Its message names the database (a path or a URL) and quotes the database's own
    words: for the admin, on the box. A git client is told `for_client()` instead."""

    exit_code = 4

    def __init__(self, message: str, hint: str | None = None, *, busy: bool = False) -> None:
        super().__init__(message, hint)
        self.busy = busy
        """Another writer held the store past the timeout: it may well work in a moment."""

    def for_client(self) -> Refused:
        """What a git client learns: that the server's 2FA state is busy or unusable, in
        the same words whatever the store; never where it lives or what the database said
        (the entry point logs that on the server)."""
        if self.busy:
            return Refused("access refused: the server's 2FA state is busy right now.", TRY_AGAIN)
        return Refused("access refused: the server cannot read its 2FA state right now.", TRY_AGAIN)


TRY_AGAIN = "try again in a moment; if it persists, tell an administrator."


class PermissionDenied(StoreError):
    """A file of the state exists but this account may not read or write it: a matter of
    owner and mode (say, one left behind by a command run as root), never of tampering
    or corruption, so it has an exit code of its own."""

    exit_code = 5


class NotFound(GatekeeperError):
    """A user, key or record that the command names does not exist."""

    exit_code = 1


class Refused(GatekeeperError):
    """Access or an operation was refused by the policy or the 2FA rules."""

    exit_code = 1
