"""What scripts/install.sh recorded about the installation this gatekeeper runs from.

install.sh writes `install.conf` into the virtualenv it installs gatekeeper in, which
is `sys.prefix` for the CLI it installed: the mode in which sshd gets its keys, the
policy file the installation serves, and, in authorized_keys mode, the file sshd
reads. The CLI reads it so that a key change reaches sshd without a second command
that an admin would forget:

- authorized_keys mode: every key change rewrites that file, but only for the policy
  the installation serves (an admin trying another `--config` leaves the box's file
  alone, and hears so);
- keys-command mode: nothing to do, the store keeps the key index that
  `keys-command` reads;
- no record (a development checkout, a hand-made installation): which file sshd
  reads is unknown here, so the CLI says in one line what to run.

The file is `KEY=VALUE` lines; `#` starts a comment. Standard library only.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

CONF_NAME = "install.conf"
AUTHORIZED_KEYS = "authorized-keys"
KEYS_COMMAND = "keys-command"
MODES = (AUTHORIZED_KEYS, KEYS_COMMAND)


@dataclass(frozen=True)
class Installed:
    """One installation as install.sh recorded it."""

    mode: str
    config: str | None = None
    authorized_keys: str | None = None


@dataclass(frozen=True)
class KeyChangeFollowUp:
    """What a key change needs so that sshd sees it: files to rewrite, or a note."""

    rewrite: tuple[Path, ...] = ()
    note: str | None = None


def conf_path(prefix: str | None = None) -> str:
    return os.path.join(sys.prefix if prefix is None else prefix, CONF_NAME)


def read_installed(prefix: str | None = None) -> Installed | None:
    """The record in `prefix` (default: this interpreter's virtualenv), or None when
    there is none or it names no known mode."""
    try:
        with open(conf_path(prefix), encoding="utf-8") as fh:
            text = fh.read(64 * 1024)
    except (OSError, UnicodeDecodeError):
        return None
    values: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        values[key.strip()] = value.strip()
    mode = values.get("mode", "")
    if mode not in MODES:
        return None
    return Installed(
        mode=mode,
        config=values.get("config") or None,
        authorized_keys=values.get("authorized_keys") or None,
    )


def _same_file(a: str | Path, b: str | Path) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def after_key_change(
    config: Path, explicit: Path | None = None, prefix: str | None = None
) -> KeyChangeFollowUp:
    """The authorized_keys files to rewrite after a key change made with the policy
    `config` (`explicit`: the one named by `--authorized-keys`), and the note to print
    when sshd may still not see the change."""
    wanted: list[Path] = [explicit] if explicit is not None else []
    installed = read_installed(prefix)
    note = None
    if installed is None:
        if explicit is None:
            note = (
                "note: sshd may not see this change yet (no install.sh record says how it "
                "reads keys): with an authorized_keys file, run `gatekeeper authorized-keys "
                "--write FILE` or pass --authorized-keys FILE; keys-command mode and "
                "`gatekeeper serve` need nothing."
            )
    elif installed.mode == AUTHORIZED_KEYS:
        recorded = installed.authorized_keys
        if recorded is None or installed.config is None:
            if explicit is None:
                note = (
                    f"note: sshd may not see this change yet: {conf_path(prefix)} names no "
                    "authorized_keys file; run `gatekeeper authorized-keys --write FILE` "
                    "with the file sshd reads."
                )
        elif not _same_file(installed.config, config):
            if explicit is None or not _same_file(explicit, recorded):
                note = (
                    f"note: {recorded} was not rewritten: this installation serves "
                    f"{installed.config}, not {config}; sshd reads keys from that file."
                )
        elif explicit is None or not _same_file(explicit, recorded):
            wanted.append(Path(recorded))
    return KeyChangeFollowUp(rewrite=tuple(wanted), note=note)


def policy_caches(cache_dir: str, config: str) -> list[str]:
    """The compiled policies in `cache_dir` made from the policy file `config`: what
    `install.sh --uninstall` removes of a cache directory that other installations'
    policies (or another checkout's) may share."""
    from gatekeeper.policy.compiled import compiled_source

    found = []
    try:
        names = sorted(os.listdir(cache_dir))
    except FileNotFoundError:
        return []
    for name in names:
        if not name.startswith("policy-"):
            continue
        path = os.path.join(cache_dir, name)
        try:
            with open(path, "rb") as fh:
                source = compiled_source(fh.read(64 << 20))
        except OSError:
            continue
        if source is not None and _same_file(source, config):
            found.append(path)
    return found
