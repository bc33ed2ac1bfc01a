"""Whose the state directory is: the account the forced command runs as, whose every
file in it must stay. Standard library only: the store's error messages use it.
"""

from __future__ import annotations

import os
import pwd


def ownership_hint(path: str) -> str:
    """Whose the file is, whose it should be (the state directory's owner, whom the
    forced command runs as), and the command that gives it back."""

    def name(uid: int) -> str:
        try:
            return pwd.getpwuid(uid).pw_name
        except KeyError:
            return str(uid)

    directory = path if os.path.isdir(path) else os.path.dirname(path) or "."
    try:
        owner = name(os.stat(directory).st_uid)
    except OSError:
        return "the state directory and its files must belong to the account gatekeeper runs as."
    try:
        st = os.stat(path)
        now = f"it belongs to {name(st.st_uid)}, mode {st.st_mode & 0o7777:04o}; "
    except OSError:
        now = ""
    return (
        f"{now}the state directory belongs to {owner}: run gatekeeper as {owner}, or give "
        f"the file back with `chown {owner}: {path}`. A permission problem, not tampering."
    )
