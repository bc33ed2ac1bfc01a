"""git receive-pack under the forced command, which answers the push re-check itself.

The push side of the hooks (hooks/prereceive.py) re-checks every push before any ref moves, and
audits each ref update. As a Python hook that is a second interpreter on every push.
The forced command already holds what it would rebuild (who the key is, which
repository, the policy file), so for an SSH push it stays alive as receive-pack's
parent, as it does for upload-pack (fetchgate.py), and the repository's installed
`hooks/pre-receive` (the top-level hooks/pre-receive.tmpl, a shell script) asks it:

    forced command --spawn--> git receive-pack --runs--> hooks/pre-receive (sh)
         |  request pipe <-- "push PID N" + the N ref update lines -----  |
         |  answer pipe  --> "say PID ..."*, "ok PID" / "no PID" ------> |
         |  request pipe <-- "legacy PID STATUS" (after the chained hook) |
         |  answer pipe  --> "say PID ..."*, "ok PID" / "no PID" ------> |

The forced command runs the same `PushCheck` (hooks/prereceive.py) the Python hook
runs: the identity it vouches for itself, the decision with the policy and the key's
2FA state as they are now, the ref names, then (after the script ran
`pre-receive.legacy`) one audit record per ref update in one transaction, or the
refusal's lines.

What this trusts, and why it holds. The script uses the pipes only when the
environment names them (`GATEKEEPER_PUSH_GATE`), and the forced command puts that in
receive-pack's environment only for the connection it decided. Anyone else who could
set that variable and hand the hook pipes of their own runs `git push` on the server
into the repository's directory, which takes write access to its files: they could
move its refs without any hook. So the gate gives nobody a way in that the files'
permissions do not already give; a local push without it still goes to the Python
hook, which proves the pusher from the connection's token and refuses a push that did
not come through gatekeeper (`hooks.allow_local_push`). The setting that makes git run
this hook at all, `core.hooksPath`, is pinned on receive-pack's command line
(shell.pinned_config), so a repository's config cannot switch it off either.
"""

from __future__ import annotations

import os

from gatekeeper.hooks.fetchgate import Pipes, _write_all, spawn_git

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence

    from gatekeeper.hooks.prereceive import PushCheck

ENV = "GATEKEEPER_PUSH_GATE"
MAX_UPDATES = 100_000
"""More ref updates than this in one push is not a push: refuse it (and bound memory)."""


def environment(pipes: Pipes) -> dict[str, str]:
    """What receive-pack's environment carries so that its pre-receive finds the pipes."""
    return {ENV: f"{pipes.request_write}:{pipes.answer_read}"}


def supervise(
    git: str,
    argv: Sequence[str],
    env: Mapping[str, str],
    pipes: Pipes,
    check: Callable[[bytes], PushCheck],
    log: Callable[[str], None],
) -> int:
    """Run git with the pipes' hook ends inherited, answer each push request with a
    `PushCheck` made by `check(ref update lines)`, and return git's exit status."""
    pid = spawn_git(git, argv, env, pipes)
    pending: dict[str, PushCheck] = {}
    answering = True
    with os.fdopen(pipes.request_read, "rb") as requests:
        while True:
            line = requests.readline()
            if not line:
                break
            if not answering:
                continue
            words = line.split()
            try:
                if len(words) == 3 and words[0] == b"push" and words[1].isdigit():
                    asker = words[1].decode()
                    count = int(words[2]) if words[2].isdigit() else -1
                    if not 0 < count <= MAX_UPDATES:
                        raise ValueError(f"a push of {words[2][:20]!r} updates")
                    data = b"".join(requests.readline() for _ in range(count))
                    pushed = check(data)
                    refusal = pushed.begin()
                    if refusal:
                        pushed.close()
                    else:
                        pending[asker] = pushed
                    _answer(pipes, asker, refusal)
                elif len(words) == 3 and words[0] == b"legacy" and words[1].decode() in pending:
                    asker = words[1].decode()
                    pushed = pending.pop(asker)
                    status = int(words[2]) if words[2].isdigit() else 1
                    try:
                        refusal = pushed.finish(status)
                    finally:
                        pushed.close()
                    _answer(pipes, asker, refusal)
                else:
                    raise ValueError(f"unexpected request {line[:80]!r}")
            except Exception as exc:  # noqa: BLE001 - fail closed: refuse every push from now
                # Nobody to address for sure: close the answers, so every asker from now
                # on reads the end of the pipe and refuses, rather than waiting forever.
                log(f"push gate: {type(exc).__name__}: {exc}; refusing every push")
                os.close(pipes.answer_write)
                answering = False
    if answering:
        os.close(pipes.answer_write)
    for pushed in pending.values():
        pushed.close()
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    return code if code >= 0 else 128 - code


def _answer(pipes: Pipes, asker: str, refusal: list[str]) -> None:
    verdict = "no" if refusal else "ok"
    reply = "".join(f"say {asker} {text}\n" for text in refusal)
    _write_all(pipes.answer_write, f"{reply}{verdict} {asker}\n".encode())
