"""The audit head file: where the chain must end, kept outside the database.

A hash chain shows an edited, deleted or reordered record but not records cut off
its end, so `audit.head` beside the database names the newest record (its sequence
number and hash), and `log verify` holds the log to it (docs/design.md, "The store").
On a shared PostgreSQL store each host keeps its own: it names the newest record
*this host* appended, which must still be there, unchanged.

A writer may die at any instruction (kill -9, OOM, power loss), so the file has two
states, and every write transaction (store/base.py) goes through both:

    settled   SEQ HASH                      the end of the chain
    pending   SEQ HASH                      the committed end before the transaction
              pending SEQ HASH              the end the transaction is adding

1. After its INSERTs, still holding the store's write lock, the transaction writes the
   head *pending*, durably (the file and the directory are fsynced before COMMIT, so
   a commit that survives a power loss never has a head that did not).
2. COMMIT, durably (SQLite in WAL mode syncs the WAL on every commit at
   `synchronous = FULL`; see store/sqlite.py).
3. It rewrites the head *settled* on the new end. Not synced: a settle that is lost
   leaves the pending head, which resolves to the same end.

A pending head is resolved (`Store._resolve_head`) by the next writer and by `log
verify`: if its new record is in the database with that hash, the write committed
and the new end is the head; if it is absent (or, on a shared store, where another
front-end may have taken that number since, there with another hash) while the old
end is still there unchanged, the write was interrupted before COMMIT and the old end
is the head. Anything else is tampering, and the log is held to the old end, so
`log verify` names what is missing or changed.

The store's write lock ends at COMMIT and step 3 comes after it, so the file has a
lock of its own: an flock on the state directory (per host, like the file), held from
the transaction's first read of the head to step 3. That makes one fixed temporary
name enough: no per-process names, nothing left behind but that one name after a
crash, reused by the next write. `log verify` reads without it while the head is
settled and unchanged around its snapshot of the log (no local write committed in
between), and takes it only to resolve a pending head.

Standard library only, and light: the forced command writes the head on every
connection.
"""

from __future__ import annotations

import os
import time

from gatekeeper import pathstr
from gatekeeper.errors import PermissionDenied, StoreError
from gatekeeper.record import record

HEAD_NAME = "audit.head"
TMP_NAME = f".{HEAD_NAME}.tmp"
PENDING = "pending"


@record
class Head:
    """What the head file says: the settled end, and the end an unfinished write was
    adding (`pending`), if any."""

    seq: int
    hash: str
    pending: tuple[int, str] | None = None

    @property
    def end(self) -> tuple[int, str]:
        return self.seq, self.hash


def render(head: Head) -> str:
    text = f"{head.seq} {head.hash}\n"
    if head.pending is not None:
        text += f"{PENDING} {head.pending[0]} {head.pending[1]}\n"
    return text


def parse(text: str, where: str) -> Head:
    """The settled format of every version (`SEQ HASH`), or the pending one."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    first = lines[0].split(" ") if lines else []
    if len(first) != 2 or not _is_end(first[0], first[1]):
        # Older versions wrote `SEQ HASH` and nothing else; allow their whitespace.
        parts = text.split()
        if len(parts) == 2 and _is_end(parts[0], parts[1]):
            return Head(int(parts[0]), parts[1])
        raise StoreError(f"the audit head file {where} is malformed")
    if len(lines) == 1:
        return Head(int(first[0]), first[1])
    second = lines[1].split(" ")
    if (
        len(lines) != 2
        or len(second) != 3
        or second[0] != PENDING
        or not _is_end(second[1], second[2])
    ):
        raise StoreError(f"the audit head file {where} is malformed")
    return Head(int(first[0]), first[1], (int(second[1]), second[2]))


_HEX = frozenset("0123456789abcdef")


def _is_end(seq: str, digest: str) -> bool:
    return seq.isascii() and seq.isdigit() and len(digest) == 64 and _HEX.issuperset(digest)


class HeadFile:
    """This host's head file, its temporary name and its lock."""

    def __init__(self, state_dir: str, timeout_ms: int) -> None:
        self.state_dir = state_dir
        self.path = pathstr.join(state_dir, HEAD_NAME)
        self.tmp = pathstr.join(state_dir, TMP_NAME)
        self.timeout = timeout_ms / 1000
        self._dir_fd: int | None = None

    @property
    def locked(self) -> bool:
        return self._dir_fd is not None

    def lock(self) -> None:
        """Take the head's lock, waiting at most the store's busy timeout (nothing may
        hang a git client). Writers hold it for one short write transaction, from its
        first read of the head until the head is settled (docs/performance.md)."""
        deadline = time.monotonic() + self.timeout
        pause = 0.0005
        while not self.try_lock():
            if time.monotonic() >= deadline:
                raise StoreError(
                    f"the audit head file {self.path} is busy: another process holds its lock.",
                    hint="try again in a moment; if it persists, look for a stuck "
                    "gatekeeper process.",
                )
            time.sleep(pause)
            pause = min(pause * 2, 0.01)

    def try_lock(self) -> bool:
        """Take the head's lock if it is free; True if this process holds it now."""
        if self._dir_fd is not None:
            return True
        import fcntl

        try:
            fd = os.open(self.state_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise _error(
                f"cannot open the state directory {self.state_dir}", self.path, exc
            ) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except OSError as exc:
            os.close(fd)
            raise _error(f"cannot lock the audit head file {self.path}", self.path, exc) from exc
        self._dir_fd = fd
        return True

    def unlock(self) -> None:
        fd, self._dir_fd = self._dir_fd, None
        if fd is not None:
            os.close(fd)  # releases the flock

    def read(self) -> Head | None:
        try:
            with open(self.path, encoding="ascii", errors="replace") as fh:
                text = fh.read(4096)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise _error(f"cannot read the audit head file {self.path}", self.path, exc) from exc
        return parse(text, self.path)

    def write(self, head: Head, *, durable: bool) -> None:
        """Replace the file through the one temporary name; hold the lock. `durable`:
        on disk, name and contents, when this returns."""
        assert self._dir_fd is not None, "write the head file only under its lock"
        data = render(head).encode("ascii")
        try:
            # Whatever a writer that died left there, and whoever's it was: this
            # directory is ours, its files need not be, and O_EXCL follows no link.
            _unlink_missing_ok(self.tmp)
            fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                if durable:
                    os.fsync(fd)  # contents first: a renamed but empty head is no head
            finally:
                os.close(fd)
            os.replace(self.tmp, self.path)
            if durable:
                _sync_directory(self._dir_fd)  # then the rename itself
        except OSError as exc:
            try:
                _unlink_missing_ok(self.tmp)
            except OSError:
                pass
            raise _error(f"cannot write the audit head file {self.path}", self.path, exc) from exc

    def sweep(self) -> None:
        """Remove what versions before this protocol left when a writer died: their
        per-process temporary names (`.audit.head.PID`, `.audit.head.PID.before`), once
        that process is gone."""
        prefix = f".{HEAD_NAME}."
        try:
            names = os.listdir(self.state_dir)
        except OSError:
            return
        for name in names:
            pid = name[len(prefix) :].removesuffix(".before")
            if not name.startswith(prefix) or not pid.isdigit() or _alive(int(pid)):
                continue
            try:
                os.unlink(pathstr.join(self.state_dir, name))
            except OSError:
                pass


def _sync_directory(fd: int) -> None:
    try:
        os.fsync(fd)
    except OSError as exc:
        import errno

        # Some file systems cannot sync a directory (and order renames themselves, or
        # promise nothing): refusing every git access for it would be worse.
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # someone else's
    return True


def _unlink_missing_ok(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _error(message: str, path: str, exc: OSError) -> StoreError:
    if isinstance(exc, PermissionError):
        from gatekeeper.statedir import ownership_hint

        return PermissionDenied(f"{message}: {exc.strerror}", hint=ownership_hint(path))
    return StoreError(
        f"{message}: {exc.strerror}",
        hint="the state directory must be writable by the git user (and not full).",
    )


@record
class Recovery:
    """A write a crash interrupted, found and settled: "committed" (the process died
    after COMMIT, before settling the head) or "rolled-back" (before COMMIT: `new`
    never reached the database, and the head is back on `old`)."""

    outcome: str
    old: tuple[int, str]
    new: tuple[int, str]
    settled: bool  # the head file was rewritten (False: left for the next write)
