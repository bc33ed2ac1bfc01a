"""The key index: one small file per registered key, for `keys-command` to read.

sshd runs the AuthorizedKeysCommand for every key a client offers, as a user that
should be able to read as little as possible (docs/threat-model.md). The index lets
that lookup read one file named by the key's fingerprint, and nothing else: not the
database, not the server key, not even the policy when the policy is broken. Each
entry holds `KEY_ID KEY_TYPE BLOB FACTOR` (FACTOR: `touch`, `touch+pin` for a security
key, `-` otherwise); `keys-command` builds sshd's line from it.

Why an entry can never grant more than the store does:
- The line it yields runs the forced command with the key id *and* the fingerprint,
  and the forced command re-reads that key from the store and refuses unless both
  match ("this key is not registered"). A stale entry (a key removed on another
  front-end of a shared store, or a removal interrupted by a crash) therefore only
  gets its holder a refusal in words, never another key's rights.
- Entries are written after the key's row commits and removed before its row is
  deleted, so on one host the index is never ahead of the store for a key id.
- A missing entry (a key added on another front-end, an index not built yet) makes
  `keys-command` fall back to the store, read-only.

Layout: `state_dir/keyindex/` (setgid, 2750), one file per key (0640) named by the
fingerprint with `/` and `+` spelled `_` and `-`. Give the AuthorizedKeysCommandUser
the directory's group, and search (x) permission on the state directory.
Standard library only: keys-command imports this on every offered key.
"""

from __future__ import annotations

import os

INDEX_DIR = "keyindex"
_FP_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")


def entry_name(fingerprint: str) -> str | None:
    """The file name of a `SHA256:...` fingerprint, or None for anything else."""
    if not fingerprint.startswith("SHA256:"):
        return None
    body = fingerprint[len("SHA256:") :]
    if not 40 <= len(body) <= 44 or not _FP_CHARS.issuperset(body):
        return None
    return "SHA256_" + body.replace("/", "_").replace("+", "-")


def index_dir(state_dir: str) -> str:
    return os.path.join(state_dir, INDEX_DIR)


Entry = tuple[int, str, str, str | None]
"""(key id, key type, blob, factor)."""


def read_entry(state_dir: str, fingerprint: str) -> Entry | None:
    """The entry for `fingerprint`, or None when there is no usable entry."""
    name = entry_name(fingerprint)
    if name is None:
        return None
    try:
        with open(os.path.join(index_dir(state_dir), name), encoding="ascii") as fh:
            text = fh.read(16384)
    except (OSError, UnicodeDecodeError):
        return None
    parts = text.split()
    if len(parts) == 3:  # written before security keys: no factor
        parts.append("-")
    if len(parts) != 4 or not parts[0].isdigit() or parts[3] not in FACTORS:
        return None
    return int(parts[0]), parts[1], parts[2], None if parts[3] == "-" else parts[3]


FACTORS = ("-", "touch", "touch+pin")


def _ensure_dir(state_dir: str) -> str:
    directory = index_dir(state_dir)
    try:
        os.mkdir(directory, 0o750)
    except FileExistsError:
        return directory
    # setgid, so entries take the directory's group (the AuthorizedKeysCommandUser's,
    # once an admin gives it): an explicit chmod, whatever the umask.
    os.chmod(directory, 0o2750)  # noqa: S103 - group read is the point: see the docstring
    return directory


def write_entry(
    state_dir: str,
    fingerprint: str,
    key_id: int,
    key_type: str,
    blob: str,
    factor: str | None = None,
) -> None:
    """Add or replace the entry for one key (atomically: a reader sees old or new)."""
    name = entry_name(fingerprint)
    if name is None:
        return
    from gatekeeper.files import replace_file  # not on keys-command's reading path

    directory = _ensure_dir(state_dir)
    line = f"{int(key_id)} {key_type} {blob} {factor or '-'}\n".encode("ascii")
    replace_file(os.path.join(directory, name), line, mode=0o640, exact_mode=True)


def remove_entry(state_dir: str, fingerprint: str) -> None:
    name = entry_name(fingerprint)
    if name is not None:
        _unlink(os.path.join(index_dir(state_dir), name))


def sync(state_dir: str, keys: list[tuple[str, int, str, str, str | None]]) -> tuple[int, int]:
    """Make the index hold exactly `keys` (fingerprint, id, type, blob, factor): write what is
    missing or different, remove what is not a key any more (and stray temporary
    files). Returns (written, removed)."""
    directory = _ensure_dir(state_dir)
    wanted = {}
    for fingerprint, key_id, key_type, blob, factor in keys:
        name = entry_name(fingerprint)
        if name is not None:
            wanted[name] = (fingerprint, key_id, key_type, blob, factor)
    written = removed = 0
    for fingerprint, key_id, key_type, blob, factor in wanted.values():
        if read_entry(state_dir, fingerprint) != (key_id, key_type, blob, factor):
            write_entry(state_dir, fingerprint, key_id, key_type, blob, factor)
            written += 1
    for name in os.listdir(directory):
        if name not in wanted:
            _unlink(os.path.join(directory, name))
            removed += 1
    return written, removed


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
