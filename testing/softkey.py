"""A software FIDO2 authenticator for the tests (there is no hardware here).

It holds an Ed25519 or P-256 key, makes the `sk-` public key OpenSSH's ssh-keygen
would (application `ssh:`), and signs as an authenticator does (PROTOCOL.u2f) with the
flags and counter a test chooses: a touch, a PIN, neither; a counter that grows, repeats
or goes back. `SoftKeyPKey` hands it to paramiko's client, which then authenticates to a
real sshd or to `gatekeeper serve` exactly as OpenSSH's client would with a real key.
"""

from __future__ import annotations

import base64
import hashlib
import struct
from collections.abc import Callable
from typing import Any

import paramiko
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from paramiko.message import Message

SK_ED25519 = "sk-ssh-ed25519@openssh.com"
SK_ECDSA = "sk-ecdsa-sha2-nistp256@openssh.com"
TOUCH = 0x01
PIN = 0x04


def _string(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def _mpint(n: int) -> bytes:
    raw = n.to_bytes((n.bit_length() + 8) // 8, "big") if n else b""
    return _string(raw)


class SoftKey:
    def __init__(self, kind: str = "ed25519", application: bytes = b"ssh:") -> None:
        self.kind = kind
        self.application = application
        self.counter = 0
        self.flags = TOUCH
        if kind == "ed25519":
            self.private: Any = Ed25519PrivateKey.generate()
            raw = self.private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
            self.key_type = SK_ED25519
            self.blob = _string(SK_ED25519.encode()) + _string(raw) + _string(application)
        else:
            self.private = ec.generate_private_key(ec.SECP256R1())
            point = self.private.public_key().public_bytes(
                Encoding.X962, PublicFormat.UncompressedPoint
            )
            self.key_type = SK_ECDSA
            self.blob = (
                _string(SK_ECDSA.encode())
                + _string(b"nistp256")
                + _string(point)
                + _string(application)
            )

    def public_line(self, comment: str = "softkey") -> str:
        return f"{self.key_type} {base64.b64encode(self.blob).decode()} {comment}"

    def sign(self, data: bytes, flags: int | None = None, counter: int | None = None) -> bytes:
        """The SSH signature blob over `data`; by default a touch and the next counter."""
        if counter is None:
            self.counter += 1
            counter = self.counter
        flags = self.flags if flags is None else flags
        signed = (
            hashlib.sha256(self.application).digest()
            + bytes([flags])
            + struct.pack(">I", counter)
            + hashlib.sha256(data).digest()
        )
        if self.kind == "ed25519":
            raw = self.private.sign(signed)
        else:
            r, s = decode_dss_signature(self.private.sign(signed, ec.ECDSA(hashes.SHA256())))
            raw = _mpint(r) + _mpint(s)
        return (
            _string(self.key_type.encode())
            + _string(raw)
            + bytes([flags])
            + struct.pack(">I", counter)
        )


class SoftKeyPKey(paramiko.PKey):
    """The soft key as paramiko's client sees a key: its blob, its name, and a
    signature made by `sign` (which a test may replace to send anything at all)."""

    def __init__(self, key: SoftKey) -> None:
        self.key = key
        self.public_blob = None
        self.sign_with: Callable[[bytes], bytes] | None = None
        """Replaces the signature over the data paramiko asks for (malformed ones)."""

    def asbytes(self) -> bytes:
        return self.key.blob

    def get_name(self) -> str:
        return self.key.key_type

    def get_bits(self) -> int:
        return 256

    def can_sign(self) -> bool:
        return True

    def sign_ssh_data(self, data: bytes, algorithm: str | None = None) -> Message:
        signature = self.sign_with(data) if self.sign_with else self.key.sign(data)
        return Message(signature)
