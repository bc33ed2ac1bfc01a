"""The lines sshd reads to hand each key to gatekeeper-shell.

Two ways in (README, "Behind OpenSSH"):
- `authorized_keys`: `gatekeeper authorized-keys --write FILE` keeps one line per
  key between marker lines, rewritten atomically; lines outside the markers stay.
- `AuthorizedKeysCommand`: `gatekeeper keys-command %u %t %k` prints the line for
  one key, found by its fingerprint through an index. sshd also runs it for keys a
  client merely offers, so it changes nothing, logs to syslog (sshd discards its
  stderr) and stops itself after a few seconds. Standard library only.

Only ids and paths matching strict patterns are written into `command="..."`: a
key comment or user name never reaches the line sshd hands to a shell.
"""

from __future__ import annotations

import os
import sys

from gatekeeper.errors import GatekeeperError, InputError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from pathlib import Path

BEGIN = "# BEGIN gatekeeper: managed by `gatekeeper authorized-keys`; edits here are lost"
END = "# END gatekeeper"
# Character sets, not regular expressions: sshd runs keys-command for every key offered.
_DIGITS = "0123456789"
_LETTERS = "abcdefghijklmnopqrstuvwxyz"
_SAFE_PATH_CHARS = frozenset(_LETTERS + _LETTERS.upper() + _DIGITS + "_./+-")
_KEY_TYPE_CHARS = frozenset(_LETTERS + _DIGITS + "@.-")
_BLOB_CHARS = frozenset(_LETTERS + _LETTERS.upper() + _DIGITS + "+/")


def _safe_path(value: str) -> bool:
    """`[A-Za-z0-9_./+-]+`, the whole string."""
    return bool(value) and _SAFE_PATH_CHARS.issuperset(value)


def _key_type_ok(value: str) -> bool:
    """`[a-z0-9@.-]{3,64}`, the whole string."""
    return 3 <= len(value) <= 64 and _KEY_TYPE_CHARS.issuperset(value)


def _blob_ok(value: str) -> bool:
    """`[A-Za-z0-9+/]+={0,2}`, the whole string."""
    core = value.rstrip("=")
    return bool(core) and len(value) - len(core) <= 2 and _BLOB_CHARS.issuperset(core)


def shell_path() -> str:
    """gatekeeper-shell beside the interpreter running us (the installed virtualenv)."""
    return os.path.join(os.path.dirname(sys.executable), "gatekeeper-shell")


def forced_command(key_id: int, config: str | Path, shell: str | Path | None = None) -> str:
    shell = shell or shell_path()
    for value in (str(shell), str(config)):
        if not _safe_path(value):
            raise InputError(
                f"refusing to write {value!r} into authorized_keys: unsafe characters.",
                hint="install gatekeeper and its config under paths of letters, digits, ./_+-",
            )
    return f'command="{shell} --config {config} {int(key_id)}",restrict'


def key_line(
    key_id: int,
    key_type: str,
    blob_b64: str,
    config: str | Path,
    shell: str | Path | None = None,
) -> str:
    if not _key_type_ok(key_type) or not _blob_ok(blob_b64):
        raise InputError(f"refusing to write a malformed key (id {key_id}) into authorized_keys.")
    return f"{forced_command(key_id, config, shell)} {key_type} {blob_b64}"


def render_block(lines: list[str]) -> str:
    return "\n".join([BEGIN, *lines, END]) + "\n"


def splice(existing: str, block: str) -> str:
    """Replace the managed block in `existing` (or append it), keeping every other line."""
    lines = existing.splitlines(keepends=True)
    try:
        start = next(i for i, line in enumerate(lines) if line.rstrip("\n") == BEGIN)
        end = next(i for i in range(start, len(lines)) if lines[i].rstrip("\n") == END)
    except StopIteration:
        if any(line.rstrip("\n") == BEGIN for line in lines):
            raise InputError(
                "the authorized_keys file has a gatekeeper BEGIN marker without its END marker.",
                hint="fix the file by hand (remove the partial block) and run again.",
            ) from None
        prefix = existing if not existing or existing.endswith("\n") else existing + "\n"
        return prefix + block
    return "".join(lines[:start]) + block + "".join(lines[end + 1 :])


def write_file(path: Path, block: str, expected_digest: str | None = None) -> bool:
    """Atomically put `block` into `path`; refuse if the file changed since it was read.

    The file keeps its owner, group and mode; a new one is 0600 and, written by root,
    belongs to whoever owns its directory (sshd reads it as that account, and with
    StrictModes accepts only that account's or root's). Returns False when nothing
    needed to change.
    """
    import hashlib

    try:
        existing = path.read_text()
    except FileNotFoundError:
        existing = ""
    except OSError as exc:
        raise _cannot_write(path, exc) from exc
    digest = hashlib.sha256(existing.encode()).hexdigest()
    if expected_digest is not None and digest != expected_digest:
        raise GatekeeperError(
            f"{path} changed while it was being updated; nothing written.",
            hint="run the command again.",
        )
    new = splice(existing, block)
    if new == existing:
        return False
    tmp = path.with_name(f".{path.name}.gatekeeper.{os.getpid()}")
    try:
        _make_parent(path.parent)
        try:
            st = os.stat(path)
            owner, group, mode = st.st_uid, st.st_gid, st.st_mode & 0o7777
        except FileNotFoundError:
            parent = os.stat(path.parent)
            owner, group, mode = parent.st_uid, parent.st_gid, 0o600
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(new)
            fh.flush()
            if os.geteuid() == 0:
                os.fchown(fh.fileno(), owner, group)
            os.fchmod(fh.fileno(), mode)
            os.fsync(fh.fileno())
        # Check again right before the rename: an edit that raced us wins, ours is dropped.
        try:
            current = path.read_text()
        except FileNotFoundError:
            current = ""
        if current != existing:
            os.unlink(tmp)
            raise GatekeeperError(
                f"{path} changed while it was being updated; nothing written.",
                hint="run the command again.",
            )
        os.replace(tmp, path)
    except OSError as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise _cannot_write(path, exc) from exc
    return True


def _make_parent(directory: Path) -> None:
    """Create `directory` (0700) if missing, as its parent's owner's (`~git/.ssh`)."""
    if directory.is_dir():
        return
    _make_parent(directory.parent)
    directory.mkdir(mode=0o700)
    if os.geteuid() == 0:
        parent = os.stat(directory.parent)
        os.chown(directory, parent.st_uid, parent.st_gid)


def _cannot_write(path: Path, exc: OSError) -> GatekeeperError:
    return GatekeeperError(
        f"cannot write {path}: {exc.strerror or exc}",
        hint="run as the account the file belongs to (as root, gatekeeper runs as the state "
        "directory's owner); or print the lines with `gatekeeper authorized-keys` and "
        "put them there yourself.",
    )


KEYS_COMMAND_TIMEOUT = 5


def keys_command(argv: list[str]) -> int:
    """`gatekeeper keys-command USER TYPE BASE64` or `gatekeeper keys-command USER SHA256:FP`.

    Prints the forced-command line for the key when it belongs to a registered user
    and USER is the git account; prints nothing otherwise. Never raises.
    """
    # The interpreter's own _signal, not `signal`, whose enums cost every key ~3 ms.
    if TYPE_CHECKING:
        import signal as _signal
    else:
        import _signal

    _signal.signal(_signal.SIGALRM, lambda *_: os._exit(1))
    _signal.alarm(KEYS_COMMAND_TIMEOUT)
    try:
        line = lookup_line(argv)
    except Exception as exc:  # noqa: BLE001 - sshd discards stderr: log, print nothing
        _log(f"keys-command: {type(exc).__name__}: {exc}")
        return 1
    if line:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()
    return 0


def lookup_line(argv: list[str]) -> str | None:
    from gatekeeper import pathstr
    from gatekeeper.policy import DEFAULT_CONFIG, load_policy
    from gatekeeper.sshkeys import fingerprint_of_blob, parse_key_blob_b64
    from gatekeeper.store import Store

    args = list(argv)
    config = ""
    if len(args) >= 2 and args[0] == "--config":
        config, args = args[1], args[2:]
    if len(args) == 2 and args[1].startswith("SHA256:"):
        login, fingerprint, key = args[0], args[1], None
    elif len(args) == 3:
        login, key = args[0], parse_key_blob_b64(args[1], args[2])
        fingerprint = fingerprint_of_blob(key.blob)
    else:
        raise InputError("usage: keys-command USER (TYPE BASE64 | SHA256:FINGERPRINT)")
    # Strings, not pathlib (and the `re` it imports): sshd runs this for every key.
    config = pathstr.resolve(config or os.environ.get("GATEKEEPER_CONFIG") or DEFAULT_CONFIG)
    policy = load_policy(config)
    if login != policy.server.user:
        return None
    with Store.open(policy.server.state_dir_str, policy.server.store, light=True) as store:
        record = store.key_by_fingerprint(fingerprint)
    if record is None or (key is not None and key.key_type != record.key_type):
        return None
    return key_line(record.id, record.key_type, record.blob, config)


def _log(message: str) -> None:
    from gatekeeper import logs

    logs.log("gatekeeper-keys", message)
