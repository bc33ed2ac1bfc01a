"""The lines sshd reads to hand each key to gatekeeper-shell.

Two ways in (docs/install.md, "Behind OpenSSH by hand"):
- `authorized_keys`: `gatekeeper authorized-keys --write FILE` keeps one line per
  key between marker lines, rewritten atomically; lines outside the markers stay.
- `AuthorizedKeysCommand`: `gatekeeper keys-command %u %t %k` prints the line for
  one key, found by its fingerprint through an index. sshd also runs it for keys a
  client merely offers, so it changes nothing, logs to the server log (logs.py; sshd
  discards its stderr) and stops itself after a few seconds. Standard library only.

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


def valid_fingerprint(value: str) -> bool:
    """`SHA256:` and 43 characters of unpadded base64, as ssh-keygen prints it."""
    from gatekeeper.keyindex import entry_name

    return entry_name(value) is not None


FACTORS = ("touch", "touch+pin")


def forced_command(
    key_id: int,
    config: str | Path,
    shell: str | Path | None = None,
    fingerprint: str | None = None,
    factor: str | None = None,
) -> str:
    """`command="gatekeeper-shell --config CONFIG [--key FP] [--factor F] KEY_ID",restrict`.

    With the fingerprint, the forced command accepts the key id only while it still
    names that key: a line left behind for a removed key can never act as another key
    whose row took its id. With a factor (a security key's), the line also carries the
    options that make sshd enforce it: sshd asks a security key for a touch unless told
    `no-touch-required`, which gatekeeper never writes, and for the PIN with
    `verify-required`; `--factor` tells the forced command what sshd enforced for this
    very line, so a line written before a key's flags changed can never claim more."""
    shell = shell or shell_path()
    for value in (str(shell), str(config)):
        if not _safe_path(value):
            raise InputError(
                f"refusing to write {value!r} into authorized_keys: unsafe characters.",
                hint="install gatekeeper and its config under paths of letters, digits, ./_+-",
            )
    args = ""
    if fingerprint is not None:
        if not valid_fingerprint(fingerprint):
            raise InputError(f"refusing to write a malformed fingerprint (key id {key_id}).")
        args += f" --key {fingerprint}"
    options = "restrict"
    if factor is not None:
        if factor not in FACTORS:
            raise InputError(f"refusing to write an unknown factor {factor!r} (key id {key_id}).")
        args += f" --factor {factor}"
        if factor == "touch+pin":
            options += ",verify-required"
    return f'command="{shell} --config {config}{args} {int(key_id)}",{options}'


def key_line(
    key_id: int,
    key_type: str,
    blob_b64: str,
    config: str | Path,
    shell: str | Path | None = None,
    fingerprint: str | None = None,
    factor: str | None = None,
) -> str:
    if not _key_type_ok(key_type) or not _blob_ok(blob_b64):
        raise InputError(f"refusing to write a malformed key (id {key_id}) into authorized_keys.")
    command = forced_command(key_id, config, shell, fingerprint, factor)
    return f"{command} {key_type} {blob_b64}"


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
    needed to change. Any failure leaves the file as it was and raises a
    `GatekeeperError` naming the file and what to do.
    """
    import hashlib

    existing = _read_existing(path)
    digest = hashlib.sha256(existing.encode()).hexdigest()
    if expected_digest is not None and digest != expected_digest:
        raise GatekeeperError(
            f"{path} changed while it was being updated; nothing written.",
            hint="run the command again.",
        )
    new = splice(existing, block)
    if new == existing:
        return False
    try:
        _make_parent(path.parent)
    except OSError as exc:
        raise GatekeeperError(
            f"cannot create the directory for {path}: {_reason(exc)}; nothing written.",
            hint=_WHO_WRITES,
        ) from None
    tmp = path.with_name(f".{path.name}.gatekeeper.{os.getpid()}")
    try:
        _write_new(tmp, new, _ownership(path))
        # Check again right before the rename: an edit that raced us wins, ours is dropped.
        if _read_existing(path) != existing:
            raise GatekeeperError(
                f"{path} changed while it was being updated; nothing written.",
                hint="run the command again.",
            )
        os.replace(tmp, path)
    except OSError as exc:
        raise GatekeeperError(
            f"cannot write {path}: {_reason(exc)}; it was left as it was.",
            hint=_hint_for(exc),
        ) from None
    finally:
        _remove_quietly(tmp)
    return True


_WHO_WRITES = (
    "run gatekeeper as the account that owns the file and its directory (the git user), "
    "or fix their owner and mode."
)


def _read_existing(path: Path) -> str:
    """The file's text, or "" when there is none yet."""
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read()
    except FileNotFoundError:
        return ""
    except IsADirectoryError:
        raise GatekeeperError(
            f"cannot update {path}: it is a directory.",
            hint="name the authorized_keys file itself, e.g. ~git/.ssh/authorized_keys.",
        ) from None
    except UnicodeDecodeError as exc:
        raise GatekeeperError(
            f"cannot update {path}: it is not UTF-8 text (byte {exc.start}).",
            hint="fix the file by hand (sshd reads it as text), then run again.",
        ) from None
    except OSError as exc:
        raise GatekeeperError(f"cannot read {path}: {_reason(exc)}.", hint=_hint_for(exc)) from None


def _ownership(path: Path) -> tuple[int, int, int]:
    """(owner, group, mode) the new file takes: the old file's, or for a new one its
    directory's owner and group with 0600."""
    try:
        st = os.stat(path)
        return st.st_uid, st.st_gid, st.st_mode & 0o7777
    except FileNotFoundError:
        parent = os.stat(path.parent)
        return parent.st_uid, parent.st_gid, 0o600


def _write_new(tmp: Path, text: str, ownership: tuple[int, int, int]) -> None:
    owner, group, mode = ownership
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        if os.geteuid() == 0:
            os.fchown(fh.fileno(), owner, group)
        os.fchmod(fh.fileno(), mode)
        os.fsync(fh.fileno())


def _remove_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass  # gone already (renamed into place), or never created


def _reason(exc: OSError) -> str:
    return (exc.strerror or str(exc)).lower()


def _hint_for(exc: OSError) -> str:
    import errno

    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return "free space on that file system, then run the command again."
    if exc.errno == errno.EROFS:
        return "the file system is read-only: write the file where sshd reads it on a writable one."
    if exc.errno in (errno.ENOTDIR, errno.EISDIR):
        return "a part of the path is not what it should be: name the authorized_keys file itself."
    return _WHO_WRITES


KEYS_SCRIPT = "keys-command.sh"


def keys_script(config: str | Path, state_dir: str, user: str) -> str:
    """The text of the shell AuthorizedKeysCommand (hooks/keys-command.sh) with
    this installation's paths written in; every one must be a safe path, as in the
    lines themselves, because sh reads them."""
    from gatekeeper import keyindex

    gatekeeper = os.path.join(os.path.dirname(sys.executable), "gatekeeper")
    values = {
        "@USER@": user,
        "@INDEX@": keyindex.index_dir(state_dir),
        "@SHELL@": shell_path(),
        "@CONFIG@": str(config),
        "@GATEKEEPER@": gatekeeper,
    }
    for value in values.values():
        if not _safe_path(value):
            raise InputError(
                f"refusing to write {value!r} into the keys script: unsafe characters.",
                hint="install gatekeeper, its config and state under paths of letters, digits, "
                "./_+- (and the git account's name likewise).",
            )
    from gatekeeper import programs

    text = programs.text(KEYS_SCRIPT)
    for name, value in values.items():
        text = text.replace(name, value)
    return text


def _make_parent(directory: Path) -> None:
    """Create `directory` (0700) if missing, as its parent's owner's (`~git/.ssh`)."""
    if directory.is_dir():
        return
    _make_parent(directory.parent)
    directory.mkdir(mode=0o700)
    if os.geteuid() == 0:
        parent = os.stat(directory.parent)
        os.chown(directory, parent.st_uid, parent.st_gid)


KEYS_COMMAND_TIMEOUT = 5


def keys_command(argv: list[str]) -> int:
    """`gatekeeper keys-command USER TYPE BASE64` or `gatekeeper keys-command USER SHA256:FP`.

    Prints the forced-command line for the key when it belongs to a registered user
    and USER is the git account; prints nothing otherwise. Never raises.
    """
    # The interpreter's own _signal, not `signal`, whose enums every key lookup would pay
    # to import (docs/performance.md).
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
    """The line for the key in `argv`, from the key index (keyindex.py), else from the
    store, read-only. When the policy or the store cannot be read, a key the index
    knows still gets its line, so its owner reaches the forced command and learns
    that the server is at fault (which refuses everything); an unknown key gets
    nothing."""
    from gatekeeper import keyindex, logs, pathstr
    from gatekeeper.errors import PolicyError
    from gatekeeper.policy import DEFAULT_CONFIG, load_policy
    from gatekeeper.sshkeys import fingerprint_of_blob, parse_key_blob_b64

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
    try:
        policy = load_policy(config)
    except PolicyError as exc:
        state_dir = fallback_state_dir(config)
        if state_dir is not None:
            logs.use_state_dir(state_dir)
        _log(f"keys-command: policy error: {exc.message}")
        if state_dir is None:
            return None
        found = keyindex.read_entry(state_dir, fingerprint)
        if found is None or (key is not None and key.key_type != found[1]):
            return None
        return key_line(*found[:3], config, fingerprint=fingerprint, factor=found[3])
    logs.use_state_dir(policy.server.state_dir_str)
    if login != policy.server.user:
        return None
    found = keyindex.read_entry(policy.server.state_dir_str, fingerprint)
    if found is None:
        found = _from_store(policy.server.state_dir_str, policy.server.store, fingerprint)
    if found is None or (key is not None and key.key_type != found[1]):
        return None
    return key_line(*found[:3], config, fingerprint=fingerprint, factor=found[3])


def _from_store(
    state_dir: str, url: str, fingerprint: str
) -> tuple[int, str, str, str | None] | None:
    from gatekeeper.store import Store

    with Store.open(state_dir, url, light=True, readonly=True) as store:
        record = store.key_by_fingerprint(fingerprint)
    if record is None:
        return None
    return record.id, record.key_type, record.blob, record.factor


def fallback_state_dir(config: str) -> str | None:
    """`server.state_dir` read from the policy file line by line, for when the policy as
    a whole does not load (a tab, a typo elsewhere): the key index is still found, so a
    known key's owner hears why the server refuses. None when not even that line reads."""
    try:
        with open(config, encoding="utf-8") as fh:
            lines = fh.read(1 << 20).splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    in_server = False
    value = "state"  # the default, relative to the policy file
    for line in lines:
        text = line.split(" #", 1)[0].rstrip()
        if not text or text.lstrip().startswith("#"):
            continue
        if not line[0].isspace():
            in_server = text == "server:"
            continue
        stripped = text.strip()
        if in_server and stripped.startswith("state_dir:"):
            value = stripped[len("state_dir:") :].strip().strip("'\"")
            break
    if not value:
        return None
    value = os.path.expanduser(value)
    from gatekeeper import pathstr

    try:
        return pathstr.resolve(os.path.join(os.path.dirname(config), value))
    except RuntimeError:  # a symlink loop
        return None


def _log(message: str) -> None:
    from gatekeeper import logs

    logs.log("gatekeeper-keys", message)
