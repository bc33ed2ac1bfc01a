"""Replacing a file all at once: a reader sees the old file or the new one, never part of
either, and a failure leaves no temporary file behind. Standard library only."""

from __future__ import annotations

import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    from os import PathLike


def replace_file(
    path: str | PathLike[str],
    data: bytes,
    *,
    mode: int = 0o666,
    exact_mode: bool = False,
    owner: tuple[int, int] | None = None,
    durable: bool = False,
) -> None:
    """Write `data` to a temporary file beside `path` and rename it over `path`.

    `mode` is filtered by the umask unless `exact_mode`; `owner` (uid, gid) is given to
    the new file before it is visible; `durable` syncs the file before the rename and
    the directory after it, so the new content survives a crash once this returns.
    Raises `OSError`; the caller says what it means for its file."""
    target = os.fspath(path)
    directory, name = os.path.split(target)
    tmp = os.path.join(directory, f".{name}.gatekeeper-{os.getpid()}.tmp")
    _unlink(tmp)  # left by a run with this pid that died before its rename
    try:
        # With an exact mode, no wider one than the owner's until it is set.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if exact_mode else mode)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if owner is not None:
                os.fchown(fd, *owner)
            if exact_mode:
                os.fchmod(fd, mode)  # after fchown, which may clear mode bits
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except BaseException:
        _unlink(tmp)
        raise
    if durable:
        _sync_directory(directory or ".")


def _sync_directory(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        pass  # a file system that cannot sync a directory still renamed the file
    finally:
        os.close(fd)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
