"""Where the programs git and sshd run are: the pre-receive hook's template, the fetch
gate and the AuthorizedKeysCommand script, shell scripts an admin can read.

They live in the top-level `hooks/` folder of the source. The wheel ships them as
package data, `gatekeeper/programs/` (pyproject.toml maps that package to `hooks/`),
and they are read from there; in a checkout, and in an editable install (whose
import hook does not serve a data-only package), they are read from `hooks/` itself.
Standard library `os` only: the fetch gate's path is looked up on every clone.
"""

from __future__ import annotations

import os

_PACKAGE = os.path.dirname(os.path.abspath(__file__))
SHIPPED = os.path.join(_PACKAGE, "programs")
SOURCE = os.path.join(os.path.dirname(_PACKAGE), "hooks")


def path(name: str) -> str:
    """The absolute path of program `name` (`fetch-gate.sh`, say)."""
    shipped = os.path.join(SHIPPED, name)
    return shipped if os.path.exists(shipped) else os.path.join(SOURCE, name)


def text(name: str) -> str:
    with open(path(name), encoding="utf-8") as fh:
        return fh.read()
