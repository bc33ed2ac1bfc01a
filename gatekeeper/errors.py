"""The few exceptions that carry a message meant for a person, and the one function
that prints them.

Every entry point (the forced command, the CLI, the hooks, the embedded server)
catches `GatekeeperError` at the top and writes `render(exc)` with `exc.exit_code`:
the message, the lines that explain it, the problems found, and the hint, in that
order; nothing expected ever reaches a person as a traceback.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

PREFIX = "gatekeeper: "
"""What starts every line gatekeeper writes where a person reads it (over SSH a git
client shows it beside git's own lines, so it says who is speaking)."""


class GatekeeperError(Exception):
    """An expected failure with a one-line reason and, where possible, what to do about it.

    `details`: further lines for the person, after the message (a refusal's
    explanation and its fix); `problems`: each finding behind it (a policy file's
    errors, with their lines), shown indented under the message."""

    exit_code = 1

    def __init__(
        self, message: str, hint: str | None = None, *, details: Iterable[str] = ()
    ) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.details = tuple(details)
        self.problems: list[str] = []

    def lines(self) -> list[str]:
        """Every line, unprefixed, in the order `render` prints them (for the server log)."""
        out = [self.message, *self.details, *self.problems]
        if self.hint:
            out.append(f"hint: {self.hint}")
        return out


def prefixed(lines: Iterable[str]) -> str:
    """`lines` as gatekeeper writes them to a person: each one prefixed, each ended."""
    return "".join(PREFIX + line + "\n" for line in lines)


def render(exc: GatekeeperError, *, label: str = "") -> str:
    """The one way an expected failure is shown, on every entry point: the message
    (after `label`, the CLI's `error: `), its details, its problems indented, then the
    hint."""
    text = prefixed([label + exc.message, *exc.details])
    text += "".join(f"  {problem}\n" for problem in exc.problems)
    if exc.hint:
        text += prefixed([f"hint: {exc.hint}"])
    return text


class InputError(GatekeeperError):
    """Something a person typed or passed is not acceptable (a name, a key, a code)."""

    exit_code = 2


class PolicyError(GatekeeperError):
    """The policy file is missing, unreadable or invalid; `problems` lists each finding."""

    exit_code = 3

    def __init__(self, message: str, hint: str | None = None, problems: list[str] | None = None):
        super().__init__(message, hint)
        self.problems = problems or []


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


INTERNAL_ERROR = "access refused: internal error (logged on the server)."
"""All a client learns of an unexpected failure; the details go to the server log."""


def internal_error(exc: BaseException, log: Callable[[str], None], where: str = "") -> str:
    """Log an unexpected failure for the admin and return the client's one line: fail
    closed, never a traceback, the same words on every front-end."""
    log(f"{where}internal error: {type(exc).__name__}: {exc}")
    return prefixed([INTERNAL_ERROR])


class Denied(Refused):
    """A hook's refusal (a push or a fetch re-checked in the repository): the lines the
    user reads, and `reason`, the code its audit record carries. `audit=False` for a
    refusal that must not be recorded (the server cannot read its own state)."""

    def __init__(
        self,
        reason: str,
        message: str,
        *details: str,
        hint: str | None = None,
        audit: bool = True,
    ) -> None:
        super().__init__(message, hint, details=details)
        self.reason = reason
        self.audit = audit

    @classmethod
    def of(cls, reason: str, exc: GatekeeperError, *, audit: bool = True) -> Denied:
        """`exc`, in the same words, as a hook's refusal."""
        return cls(reason, exc.message, *exc.details, hint=exc.hint, audit=audit)


class HookError(GatekeeperError):
    """A repository whose hooks cannot be installed or removed as asked."""

    exit_code = 1
