"""The server's host key: created on first start, refused when others can read it."""

from __future__ import annotations

import base64
import hashlib
import logging
import os
from pathlib import Path

import paramiko

from gatekeeper.errors import StoreError

log = logging.getLogger("gatekeeper.server")  # one logger for the whole server

HOST_KEY_NAME = "ssh_host_ed25519_key"


def key_fingerprint(key: paramiko.PKey) -> str:
    """`SHA256:...` as ssh-keygen -l prints it (and as the store indexes keys)."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode("ascii").rstrip("=")


def load_host_key(state_dir: Path) -> paramiko.Ed25519Key:
    """The server's Ed25519 host key, created (mode 0600) on first start."""
    path = state_dir / HOST_KEY_NAME
    if not path.exists():
        _create_host_key(path)
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise StoreError(f"cannot read host key {path}: {exc.strerror}") from exc
    if mode & 0o077:
        raise StoreError(
            f"host key {path} is readable by others (mode {mode & 0o777:o}).",
            hint=f"chmod 600 {path}",
        )
    try:
        return paramiko.Ed25519Key(filename=str(path))
    except (OSError, paramiko.SSHException) as exc:
        raise StoreError(
            f"cannot load host key {path}: {exc}",
            hint="move it away to have a new one created (clients will see a new fingerprint).",
        ) from exc


def _create_host_key(path: Path) -> None:
    # paramiko cannot generate Ed25519 keys; cryptography writes the OpenSSH format.
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    private = Ed25519PrivateKey.generate()
    pem = private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = private.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return  # another `serve` just created it; use theirs
    except OSError as exc:
        raise StoreError(
            f"cannot create host key {path}: {exc.strerror}",
            hint="run `gatekeeper init` as the git user, or fix the state directory's owner.",
        ) from exc
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
        f.flush()
        os.fsync(f.fileno())
    pub = path.with_name(path.name + ".pub")
    pub.write_bytes(public + b" gatekeeper\n")
    log.info("created host key %s", path)
