"""Who is pushing or fetching: proven by the connection's token, never believed from
the environment alone (see the package's docstring)."""

from __future__ import annotations

import os

from gatekeeper import sshcmd
from gatekeeper.errors import Denied
from gatekeeper.hooks.recheck import BAD_IDENTITY, NO_IDENTITY, Identity, log
from gatekeeper.policy import Policy
from gatekeeper.store import Store, token_digest

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any

_HEX = frozenset("0123456789abcdef")


def _is_token(text: str) -> bool:
    return len(text) == 64 and _HEX.issuperset(text)


def remote_url(policy: Policy, repo: str) -> str:
    server = policy.server
    port = "" if server.port == 22 else f":{server.port}"
    return f"ssh://{server.user}@{server.host}{port}/{repo}.git"


def verb_of(action: str) -> str:
    return "push to" if action == "write" else "read"


def repo_name(root: str, git_dir: str) -> str | None:
    """The canonical name of the repository at the real path `git_dir` under the real
    `root`, or None (`sshcmd.canonical_name`)."""
    return sshcmd.canonical_name(root, git_dir)


def identify(
    policy: Policy,
    store: Store,
    env: Mapping[str, str],
    git_dir: str,
    action: str,
    now: float,
    audit: dict[str, Any],
) -> Identity:
    """Whose request this is, proven by the connection's token; refuse otherwise."""
    root = os.path.realpath(policy.server.repositories_str)
    derived = repo_name(root, git_dir)
    shown = derived or os.path.basename(git_dir)
    audit["repo"] = derived or git_dir
    verb = verb_of(action)
    token = env.get("GATEKEEPER_TOKEN", "")
    claimed = env.get("GATEKEEPER_USER")
    unproven = Denied(
        BAD_IDENTITY,
        f"{verb} '{shown}' refused: its gatekeeper identity could not be verified.",
        "To fix: connect again over SSH; if it persists, tell an administrator.",
    )
    if not token:
        if claimed or env.get("GATEKEEPER_KEY"):
            audit["user"] = claimed
            log(f"{verb} {shown}: GATEKEEPER_USER={claimed!r} without a token")
            raise unproven
        if action == "write" and policy.allow_local_push:
            return Identity(repo=derived or git_dir)
        fix = f"To fix: use the SSH remote {remote_url(policy, shown)}"
        if action == "write":
            fix += "; an administrator can allow local pushes with hooks.allow_local_push: true"
        raise Denied(
            NO_IDENTITY,
            f"{verb} '{shown}' refused: it did not come through gatekeeper "
            "(no gatekeeper identity).",
            fix + ".",
        )
    grant = store.hook_token(token_digest(token), now) if _is_token(token) else None
    audit["user"] = claimed
    if grant is None:
        log(f"{verb} {shown}: unknown or expired token (user {claimed!r})")
        raise unproven
    audit.update(user=grant.user, key_fp=grant.key_fp, client=grant.client)
    key_id = env.get("GATEKEEPER_KEY_ID")
    mismatch = [
        what
        for what, ok in (
            ("user", grant.user == claimed),
            ("key", grant.key_fp == env.get("GATEKEEPER_KEY")),
            ("key id", key_id is None or key_id == str(grant.key_id)),
            ("action", grant.action == action),
            # The repository git opened, by its one identity: whatever name the client
            # used, the token names the canonical one.
            ("repository", grant.repo == derived),
        )
        if not ok
    ]
    if mismatch:
        log(f"{verb} {shown}: token of {grant.user} does not match its {', '.join(mismatch)}")
        raise unproven
    audit["repo"] = grant.repo
    return Identity(grant.repo, grant.user, grant.key_id, grant.key_fp, grant.client, grant.factor)
