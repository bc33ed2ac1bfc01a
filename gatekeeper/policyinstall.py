"""`gatekeeper policy install FILE`: a new policy goes live only if it is valid.

Editing the live policy in place is how one typo refused every user: the forced
command reads the file on every connection, and a policy that does not validate
refuses them all. Installing checks the new text as the live file (relative paths
resolve from where it will live), then swaps it in with one rename, keeping the
live file's owner and mode, so a connection reads either the old policy or the new
one. The CLI then compiles it for the forced command and records who installed it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from gatekeeper.files import replace_file
from gatekeeper.policy import Policy, load_policy
from gatekeeper.policy.check import check_policy_text


@dataclass
class Installed:
    policy: Policy | None
    """The installed policy; None when FILE was refused (the live one is unchanged)."""
    problems: list[str] = field(default_factory=list)
    """Every problem found, one line each (warnings too, when it was installed)."""
    changed: bool = True


def install(target: Path, source: Path) -> Installed:
    """Check `source` as if it were `target`, then put it in place atomically."""
    try:
        data = source.read_bytes()
        text = data.decode("utf-8")
    except OSError as exc:
        return Installed(None, [f"cannot read {source}: {exc.strerror or exc}"])
    except UnicodeDecodeError as exc:
        return Installed(None, [f"{source} is not UTF-8 text (byte {exc.start})"])
    policy, problems = check_policy_text(text, str(target))
    lines = [p.format(str(source)) for p in problems]
    if policy is None:
        return Installed(None, lines)
    try:
        if target.read_bytes() == data:
            return Installed(load_policy(target, use_cache=False), lines, changed=False)
    except FileNotFoundError:
        pass
    except OSError as exc:
        return Installed(None, [*lines, f"cannot read {target}: {exc.strerror or exc}"])
    try:
        _swap(target, data)
    except OSError as exc:
        return Installed(
            None,
            [
                *lines,
                f"cannot write {target}: {exc.strerror or exc} (run as root, or as its owner)",
            ],
        )
    return Installed(load_policy(target, use_cache=False), lines)


def _swap(target: Path, data: bytes) -> None:
    """Replace `target` with `data` in one rename, with the old file's owner and mode
    (a new one: 0644, the forced command must read it), synced before and after."""
    try:
        st = os.stat(target)
        owner, group, mode = st.st_uid, st.st_gid, st.st_mode & 0o7777
    except FileNotFoundError:
        owner, group, mode = -1, -1, 0o644
    replace_file(
        target,
        data,
        mode=mode,
        exact_mode=True,
        owner=(owner, group) if os.geteuid() == 0 and owner != -1 else None,
        durable=True,
    )


def compile_for_connections(target: Path) -> bool:
    """Compile the installed policy into the running account's cache, so the first
    connection after the swap does not compile it (run as the git account)."""
    try:
        load_policy(target)
    except Exception:  # noqa: BLE001 - no cache only costs that first connection a compile
        return False
    return True
