"""Security-key (FIDO2 `sk-`) signatures, checked as OpenSSH's PROTOCOL.u2f defines them,
for the embedded server: paramiko knows no `sk-` key types.

A security key's public key blob is the plain key plus the FIDO *application* it was
made for (`ssh:` for keys made by ssh-keygen):

    sk-ssh-ed25519@openssh.com:  string type, string key[32], string application
    sk-ecdsa-sha2-nistp256@...:  string type, string "nistp256", string Q, string application

Its signature carries what the authenticator asserted beside the signature itself:

    string type, string signature, byte flags, uint32 counter

and the authenticator signed not the SSH data but

    SHA256(application) || flags || counter || SHA256(data)

(Ed25519 over those bytes; ECDSA P-256 over their SHA-256). The flags say whether the
user touched the key (0x01, user presence) and proved a PIN or biometric (0x04, user
verification). The counter grows with every signature the authenticator makes: the
server keeps the last one and refuses one that does not grow (a cloned key).
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

from gatekeeper.sshkeys import SK_ECDSA, SK_ED25519

USER_PRESENT = 0x01
USER_VERIFIED = 0x04
MAX_BLOB = 8192


class BadSignature(Exception):
    """A security-key signature that is malformed or does not verify."""


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise BadSignature("truncated")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def string(self) -> bytes:
        (n,) = struct.unpack(">I", self.take(4))
        return self.take(n)

    def byte(self) -> int:
        return self.take(1)[0]

    def uint32(self) -> int:
        (n,) = struct.unpack(">I", self.take(4))
        return int(n)

    def end(self) -> None:
        if self.pos != len(self.data):
            raise BadSignature("trailing data")


@dataclass(frozen=True)
class PublicKey:
    key_type: str
    key: bytes
    """The Ed25519 key (32 bytes) or the P-256 point (65 bytes, uncompressed)."""
    application: bytes
    blob: bytes


@dataclass(frozen=True)
class Assertion:
    """What a valid signature says the authenticator saw."""

    flags: int
    counter: int

    @property
    def user_present(self) -> bool:
        return bool(self.flags & USER_PRESENT)

    @property
    def user_verified(self) -> bool:
        return bool(self.flags & USER_VERIFIED)


def parse_public_key(blob: bytes) -> PublicKey:
    if len(blob) > MAX_BLOB:
        raise BadSignature("key too long")
    r = _Reader(blob)
    key_type = r.string().decode("ascii", "replace")
    if key_type == SK_ED25519:
        key = r.string()
        if len(key) != 32:
            raise BadSignature("Ed25519 key of the wrong size")
    elif key_type == SK_ECDSA:
        if r.string() != b"nistp256":
            raise BadSignature("wrong curve")
        key = r.string()
        if len(key) != 65 or key[0] != 4:
            raise BadSignature("P-256 point of the wrong form")
    else:
        raise BadSignature(f"not a security key type: {key_type[:60]!r}")
    application = r.string()
    r.end()
    if not application.startswith(b"ssh:"):
        raise BadSignature("application does not start with ssh:")
    return PublicKey(key_type, key, application, blob)


def verify(public: PublicKey, data: bytes, signature: bytes) -> Assertion:
    """Check `signature` (the SSH signature blob) over `data`; return the flags and
    counter it asserts, or raise BadSignature. Whether those flags are enough is the
    caller's to decide (presence always; verification for keys that require it)."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

    if len(signature) > MAX_BLOB:
        raise BadSignature("signature too long")
    r = _Reader(signature)
    if r.string().decode("ascii", "replace") != public.key_type:
        raise BadSignature("signature of another key type")
    raw = r.string()
    flags = r.byte()
    counter = r.uint32()
    r.end()
    signed = (
        hashlib.sha256(public.application).digest()
        + bytes([flags])
        + struct.pack(">I", counter)
        + hashlib.sha256(data).digest()
    )
    try:
        if public.key_type == SK_ED25519:
            if len(raw) != 64:
                raise BadSignature("Ed25519 signature of the wrong size")
            Ed25519PublicKey.from_public_bytes(public.key).verify(raw, signed)
        else:
            inner = _Reader(raw)
            rr, ss = _mpint(inner.string()), _mpint(inner.string())
            inner.end()
            point = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), public.key)
            point.verify(encode_dss_signature(rr, ss), signed, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature as exc:
        raise BadSignature("the signature does not verify") from exc
    except ValueError as exc:  # a point off the curve, and the like
        raise BadSignature(str(exc)) from exc
    return Assertion(flags, counter)


def _mpint(data: bytes) -> int:
    if len(data) > 33 or (data and data[0] & 0x80):
        raise BadSignature("bad ECDSA signature integer")
    return int.from_bytes(data, "big")
