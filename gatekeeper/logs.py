"""The server log: `gatekeeper.log` in the state directory, and syslog where there is one.

Refusals tell the client only what it needs; the details (a policy problem, a store
error with the database's own words, an internal fault) go here for admins. sshd
discards an AuthorizedKeysCommand's stderr, so this is also the only place it can
report anything.

syslog alone is not enough: a container, or a box without a syslog daemon, has no
`/dev/log`, and the details vanished. So every per-connection entry point (the forced
command, keys-command, the hooks, the fetch gate, `gatekeeper serve`) calls
`use_state_dir()` once it knows the policy, and from then on each event is one line
appended to `STATE_DIR/gatekeeper.log`:

    2030-01-02T03:04:05Z gatekeeper-shell[4242]: store error: state database is busy: ...

The file is opened with O_APPEND and each line written with a single write(), so lines
from connections writing at once never mix. When it reaches `MAX_BYTES` it is renamed
to `gatekeeper.log.1` (replacing the one before), so the two together stay under twice
that. It is created 0600, and given to the state directory's owner when root creates it
(`gatekeeper serve` run as root, say), so the git user can still append. syslog (auth
facility) gets the same events as well when `/dev/log` exists. Logging never fails the
caller: a log that cannot be written is skipped.

Standard library C modules only (os, time; fcntl to rotate; syslog): a refusal on the
per-connection path pays for it.
"""

from __future__ import annotations

import os
import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    import logging

LOG_NAME = "gatekeeper.log"
HANDLER_NAME = "gatekeeper.log"
MAX_BYTES = 1 << 20
SYSLOG_SOCKET = "/dev/log"

_state_dir: str | None = None


def use_state_dir(state_dir: str | None) -> None:
    """Log into `state_dir/gatekeeper.log` from now on (None: syslog only)."""
    global _state_dir
    _state_dir = state_dir


def log_path() -> str | None:
    return None if _state_dir is None else os.path.join(_state_dir, LOG_NAME)


def log(ident: str, message: str) -> None:
    """One event from program `ident`: a line in the log file, and in syslog if any."""
    text = _one_line(message)
    path = log_path()
    if path is not None:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        _append(path, f"{stamp} {ident}[{os.getpid()}]: {text}\n".encode("utf-8", "replace"))
    if os.path.exists(SYSLOG_SOCKET):
        _syslog(ident, text)


def _one_line(message: str) -> str:
    if message.isprintable():
        return message
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in message)


def _append(path: str, data: bytes) -> None:
    fd = -1
    try:
        fd = _open(path)
        if os.fstat(fd).st_size >= MAX_BYTES:
            _rotate(path, fd)
            os.close(fd)
            fd = -1
            fd = _open(path)
        os.write(fd, data)
    except OSError:
        pass  # logging must never turn a refusal into a traceback
    finally:
        if fd >= 0:
            os.close(fd)


def _open(path: str) -> int:
    flags = os.O_WRONLY | os.O_APPEND | getattr(os, "O_CLOEXEC", 0)
    try:
        return os.open(path, flags)
    except FileNotFoundError:
        pass
    try:
        fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return os.open(path, flags)  # another process made it a moment ago
    if os.geteuid() == 0:
        owner = os.stat(os.path.dirname(path))
        try:
            os.fchown(fd, owner.st_uid, owner.st_gid)
        except OSError:
            pass
    return fd


def _rotate(path: str, fd: int) -> None:
    """Move the full log `fd` is open on aside, unless another process did already
    (then `path` is a fresh file). The caller opens `path` again to write."""
    import fcntl

    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        current = os.stat(path)
        if os.path.samestat(current, os.fstat(fd)) and current.st_size >= MAX_BYTES:
            os.replace(path, path + ".1")
    except FileNotFoundError:
        pass
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)


def _syslog(ident: str, text: str) -> None:
    try:
        import syslog

        syslog.openlog(ident, syslog.LOG_PID, syslog.LOG_AUTH)
        syslog.syslog(syslog.LOG_WARNING, text)
    except Exception:  # noqa: BLE001, S110 - logging must never turn a refusal into a traceback
        pass


def handler(ident: str) -> logging.Handler:
    """A `logging` handler that writes through `log()`: for `gatekeeper serve`, whose
    connections log with the logging module."""
    import logging

    class _Handler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            try:
                log(ident, record.getMessage())
            except Exception:  # noqa: BLE001 - as logging's own handlers: never raise
                self.handleError(record)

    made = _Handler()
    made.set_name(HANDLER_NAME)
    return made
