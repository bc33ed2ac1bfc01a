"""The fetch check: git's `uploadpack.packObjectsHook` re-checks a read when objects
are about to be packed (see the package's docstring, and fetchgate.py for the forced
command answering it itself)."""

from __future__ import annotations

import os
import time

from gatekeeper import decision, sshcmd
from gatekeeper.errors import INTERNAL_ERROR, Denied, StoreError, prefixed, render
from gatekeeper.hooks.identity import identify
from gatekeeper.hooks.recheck import Identity, decide, load_or_deny, log, refuse
from gatekeeper.policy import Policy
from gatekeeper.store import Store

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, Sequence
    from pathlib import Path
    from typing import Any, TextIO


def pack_objects(
    config: str | Path,
    command: Sequence[str],
    env: Mapping[str, str],
    stderr: TextIO,
    *,
    now: float | None = None,
) -> int:
    """Re-check a read when upload-pack is about to pack objects, then exec
    `git pack-objects` with the arguments upload-pack gave. Returns only on refusal."""
    now = time.time() if now is None else now
    if list(command[:2]) != ["git", "pack-objects"]:
        log(f"pack-objects hook called with {list(command[:4])!r}")
        stderr.write(prefixed([INTERNAL_ERROR]))
        return 1
    git_dir = os.path.realpath(env.get("GIT_DIR") or ".")

    def proven(policy: Policy, store: Store, audit: dict[str, Any]) -> Identity:
        return identify(policy, store, env, git_dir, "read", now, audit)

    refusal = check_fetch(config, now, proven)
    if refusal:
        stderr.write("".join(line + "\n" for line in refusal))
        stderr.flush()
        return 1
    from gatekeeper.frontend import git_binary

    os.execv(git_binary(), ["git", "pack-objects", *command[2:]])  # noqa: S606
    return 1  # pragma: no cover - execv does not return


def check_fetch(
    config: str | Path,
    now: float,
    who: Identity | Callable[[Policy, Store, dict[str, Any]], Identity],
    path: str | None = None,
) -> list[str]:
    """The pack-time re-check of a read: [] to pack, otherwise the refusal's lines for
    the git client (the refusal audited). `who` is the identity the forced command
    itself vouches for (fetchgate.py) with `path`, the real path it gave git, or how to
    prove one from a token (the hook)."""
    audit: dict[str, Any] = {"action": "read", "detail": {"hook": "pack-objects"}}
    store: Store | None = None
    try:
        policy, store = load_or_deny(config)
        if isinstance(who, Identity):
            ident = who
            audit.update(user=who.user, key_fp=who.key_fp, client=who.client, repo=who.repo)
            if path is not None:
                # The repository may have been moved or renamed since the connection:
                # its name must still be the one decided on.
                if sshcmd.resolve_repo(policy.server.repositories_str, who.repo) != path:
                    raise Denied(
                        decision.NOT_AUTHORIZED,
                        *decision.not_found_message(policy, who.repo),
                    )
        else:
            ident = who(policy, store, audit)
        decide(policy, store, ident, "read", now)
        return []
    except Denied as denied:
        return refuse(denied, store, audit, now)
    except StoreError as exc:
        log(f"store error: {' | '.join(exc.lines())}")
        return render(exc.for_client()).splitlines()
    finally:
        if store is not None:
            store.close()
