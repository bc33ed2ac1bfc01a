"""Paths as strings, spelled exactly as `pathlib` spells them, for the forced command.

`import pathlib` costs a fresh interpreter about as much as the rest of the forced
command's imports together (it imports `re`, `fnmatch`, `urllib.parse` and
`ipaddress`). The git-access path keeps its paths as strings normalised the way
`str(pathlib.PurePosixPath(p))` normalises them, so every message, audit record and
cache key reads as before; the public APIs still take and return `Path`.
tests/test_hotpath.py checks each function against pathlib. POSIX only, as gatekeeper is.
"""

from __future__ import annotations

import os


def norm(path: str | os.PathLike[str]) -> str:
    """`str(PurePosixPath(path))`: no empty or `.` components, no trailing `/`, a
    leading `//` kept (POSIX leaves its meaning open), `.` for nothing at all."""
    text = os.fspath(path)
    if not isinstance(text, str):
        raise TypeError(f"expected str or os.PathLike[str], not {type(text).__name__}")
    if text.startswith("/"):
        rest = text.lstrip("/")
        root = "//" if len(text) - len(rest) == 2 else "/"
    else:
        root, rest = "", text
    parts = [p for p in rest.split("/") if p and p != "."]
    if not root and not parts:
        return "."
    return root + "/".join(parts)


def join(directory: str, name: str) -> str:
    """`str(Path(directory) / name)` for a normalised `directory` and a plain `name`
    (one component, neither empty nor `.` nor containing `/`)."""
    if directory == ".":
        return name
    if directory.endswith("/"):  # "/" or "//"
        return directory + name
    return directory + "/" + name


def absolute(path: str | os.PathLike[str]) -> str:
    """`str(Path(path).absolute())`: the current directory in front of a relative
    path, nothing resolved (no symlinks, no `..`)."""
    text = norm(path)
    if text.startswith("/"):
        return text
    return norm(os.getcwd() + "/" + text)


def resolve(path: str | os.PathLike[str]) -> str:
    """`str(Path(path).resolve())` (not strict): symlinks and `..` resolved by
    `os.path.realpath`, as pathlib does; a symlink loop raises RuntimeError as
    pathlib does up to Python 3.12 (3.13 returns the path)."""
    real = os.path.realpath(norm(path))
    try:
        os.stat(real)
    except OSError as exc:
        import errno
        import sys

        if exc.errno == errno.ELOOP and sys.version_info < (3, 13):
            raise RuntimeError(f"Symlink loop from {exc.filename!r}") from None
    return norm(real)
