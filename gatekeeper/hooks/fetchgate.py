"""git upload-pack under the forced command, which answers the fetch re-check itself.

The fetch side of the hooks (hooks/fetch.py) re-checks a read when upload-pack is about to
pack objects. As a hook that is a second Python interpreter on every clone and fetch,
as costly as the forced command's own work (docs/performance.md). The forced command
already holds what that interpreter would rebuild (who the key is, which repository, the
policy file), so for an SSH read it stays alive as git's parent instead of exec'ing
git, and the hook is `hooks/fetch-gate.sh`, a plain shell script that asks it:

    forced command --spawn--> git upload-pack --runs--> /bin/sh fetch-gate.sh
         ^  answer pipe  ---------------------------------------> |
         |  request pipe <--------- "pack PID" ------------------ |

The forced command re-reads the policy and the key's 2FA state and decides afresh
with the same `decide()` (hooks/fetch.py, `check_fetch`), audits a refusal, and answers `ok PID`
or the refusal's lines and `no PID`. The script execs `git pack-objects` only on its
own `ok`. A fetch that never packs (`git ls-remote`) asks nothing.

What stays as it was: git sees the pipes only as two inherited descriptors, and the
hook setting still reaches upload-pack on its command line (protected configuration
that a repository cannot override). If the pipes cannot be given descriptors 3-9
(what dash's `>&N` accepts), the forced command execs git with the Python hook, as
before. The parent gives its stdin and stdout to git alone, so the SSH channel closes
when git is done, and exits with git's status.

Pushes go the same way (pushgate.py, with these pipes), through the installed
pre-receive script: why that trusts no more than this does is said there.
"""

from __future__ import annotations

import os

from gatekeeper import programs
from gatekeeper.errors import internal_error

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence

SCRIPT = programs.path("fetch-gate.sh")
SHELL = "/bin/sh"


class Pipes:
    """The two pipes between the forced command and the hook script."""

    def __init__(self) -> None:
        self.request_read, self.request_write = os.pipe()
        self.answer_read, self.answer_write = os.pipe()

    @property
    def usable(self) -> bool:
        """The hook's ends fit the script (a single digit, 3-9)."""
        return all(3 <= fd <= 9 for fd in (self.request_write, self.answer_read))

    def close(self) -> None:
        for fd in (self.request_read, self.request_write, self.answer_read, self.answer_write):
            try:
                os.close(fd)
            except OSError:
                pass  # closed already


def open_pipes() -> Pipes | None:
    """The pipes, or None when the hook's ends would not be descriptors 3-9."""
    pipes = Pipes()
    if pipes.usable:
        return pipes
    pipes.close()
    return None


def hook_command(git: str, pipes: Pipes, quote: Callable[[str], str]) -> str:
    """The shell command upload-pack runs instead of `git pack-objects` (it appends
    `git pack-objects ARGS`)."""
    return f"{SHELL} {quote(SCRIPT)} {quote(git)} {pipes.request_write} {pipes.answer_read}"


def spawn_git(git: str, argv: Sequence[str], env: Mapping[str, str], pipes: Pipes) -> int:
    """Start git with the hook's ends of `pipes` inherited and ours closed, leave it
    stdin and stdout, and return its pid: the start of both gates' supervision."""
    os.set_inheritable(pipes.request_write, True)
    os.set_inheritable(pipes.answer_read, True)
    try:
        # SIGPIPE back to its default, as sshd would leave it (Python ignores it).
        pid = os.posix_spawn(git, list(argv), dict(env), setsigdef=(_sigpipe(),))
    finally:
        os.close(pipes.request_write)
        os.close(pipes.answer_read)
    _leave_stdio_to_child()
    return pid


def supervise(
    git: str,
    argv: Sequence[str],
    env: Mapping[str, str],
    pipes: Pipes,
    recheck: Callable[[], list[str]],
    log: Callable[[str], None],
) -> int:
    """Run git with the pipes' hook ends inherited, answer each pack request with
    `recheck()` ([] to pack, else the refusal's lines), and return git's exit status."""
    pid = spawn_git(git, argv, env, pipes)
    answering = True
    with os.fdopen(pipes.request_read, "rb") as requests:
        for line in requests:
            words = line.split()
            if not answering:
                continue
            if len(words) != 2 or words[0] != b"pack" or not words[1].isdigit():
                # Nobody to address: close the answers, so every asker from now on
                # reads the end of the pipe and refuses, rather than waiting forever.
                log(f"fetch gate: unexpected request {line[:80]!r}; refusing every pack")
                os.close(pipes.answer_write)
                answering = False
                continue
            asker = words[1].decode()
            try:
                refusal = recheck()
            except Exception as exc:  # noqa: BLE001 - fail closed: refuse, never a traceback
                refusal = internal_error(exc, log, "fetch gate: ").splitlines()
            verdict = "no" if refusal else "ok"
            reply = "".join(f"say {asker} {text}\n" for text in refusal)
            _write_all(pipes.answer_write, f"{reply}{verdict} {asker}\n".encode())
    if answering:
        os.close(pipes.answer_write)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    return code if code >= 0 else 128 - code


def _sigpipe() -> int:
    TYPE_CHECKING = False
    if TYPE_CHECKING:
        from signal import SIGPIPE
    else:
        # The interpreter's own _signal, not `signal`, whose enums are costly to import
        # (docs/performance.md).
        from _signal import SIGPIPE
    return int(SIGPIPE)


def _leave_stdio_to_child() -> None:
    """Point our stdin and stdout at /dev/null: the channel is git's alone, and no
    later open() of ours can land on descriptor 0 or 1."""
    null = os.open(os.devnull, os.O_RDWR)
    try:
        os.dup2(null, 0)
        os.dup2(null, 1)
    finally:
        os.close(null)


def _write_all(fd: int, data: bytes) -> None:
    try:
        while data:
            data = data[os.write(fd, data) :]
    except OSError:
        pass  # the asker is gone (killed): git fails the fetch without our answer
