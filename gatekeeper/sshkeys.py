"""OpenSSH public keys: parse one pasted key line, check it, fingerprint it.

A person adds a key by pasting the line from their `.pub` file; sshd's
AuthorizedKeysCommand hands us a key as type and base64 blob (`%t %k`). Both go
through the same checks here: the wire blob is decoded (SSH strings and mpints),
the type inside the blob must equal the declared type, the structure must be
right for the type, and weak keys (DSA, RSA under 2048 bits) are refused. Every
refusal is an `InputError` whose message says what is wrong and whose hint says
what to do. Fingerprints are exactly what `ssh-keygen -lf` prints.

Standard library only: this is imported on the per-connection path.
"""

from __future__ import annotations

import binascii

from gatekeeper.errors import InputError
from gatekeeper.lightstd import sha256
from gatekeeper.record import record

MAX_INPUT_LENGTH = 64 * 1024
"""Longer text is refused before any parsing (an RSA-16384 key line is under 3 KiB)."""
MAX_COMMENT_LENGTH = 200
MIN_RSA_BITS = 2048
MAX_RSA_BITS = 16384
"""OpenSSH's own limit on an RSA modulus."""

ED25519 = "ssh-ed25519"
RSA = "ssh-rsa"
SK_ED25519 = "sk-ssh-ed25519@openssh.com"
SK_ECDSA = "sk-ecdsa-sha2-nistp256@openssh.com"
DSA = "ssh-dss"


class _Curve:
    """A NIST curve y^2 = x^3 - 3x + b (mod p). A plain class: cheaper to import."""

    __slots__ = ("b", "bits", "name", "p", "size")

    def __init__(self, name: str, bits: int, size: int, p: int, b: int) -> None:
        self.name = name  # the curve identifier inside the blob: "nistp256", ...
        self.bits = bits
        self.size = size  # bytes per coordinate
        self.p = p
        self.b = b


_P256 = _Curve(
    "nistp256",
    256,
    32,
    2**256 - 2**224 + 2**192 + 2**96 - 1,
    0x5AC635D8AA3A93E7B3EBBD55769886BC651D06B0CC53B0F63BCE3C3E27D2604B,
)
_P384 = _Curve(
    "nistp384",
    384,
    48,
    2**384 - 2**128 - 2**96 + 2**32 - 1,
    int(
        "B3312FA7E23EE7E4988E056BE3F82D19181D9C6EFE8141120314088F5013875A"
        "C656398D8A2ED19D2A85C8EDD3EC2AEF",
        16,
    ),
)
_P521 = _Curve(
    "nistp521",
    521,
    66,
    2**521 - 1,
    int(
        "0051953EB9618E1C9A1F929A21A0B68540EEA2DA725B99B315F3B8B489918EF1"
        "09E156193951EC7E937B1652C0BD3BB1BF073573DF883D2C34F1EF451FD46B503F00",
        16,
    ),
)

_ECDSA_CURVES: dict[str, _Curve] = {
    "ecdsa-sha2-nistp256": _P256,
    "ecdsa-sha2-nistp384": _P384,
    "ecdsa-sha2-nistp521": _P521,
    SK_ECDSA: _P256,
}

SUPPORTED_TYPES: tuple[str, ...] = (
    ED25519,
    RSA,
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    SK_ED25519,
    SK_ECDSA,
)

# Key types OpenSSH knows that we refuse by name (with a specific message).
_CERT_SUFFIX = "-cert-v01@openssh.com"
_KNOWN_TYPES: frozenset[str] = frozenset(
    [
        *SUPPORTED_TYPES,
        DSA,
        *(t.removesuffix("@openssh.com") + _CERT_SUFFIX for t in SUPPORTED_TYPES),
        DSA + _CERT_SUFFIX,
        "rsa-sha2-256",
        "rsa-sha2-512",
    ]
)

_NEW_KEY_HINT = "make a new key with `ssh-keygen -t ed25519` and add its .pub file"
_COPY_AGAIN_HINT = "copy the whole line from your .pub file again (e.g. ~/.ssh/id_ed25519.pub)"

# Character sets, not regular expressions, for what sshd's keys-command path checks.
_ALNUM = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
_BASE64_CHARS = _ALNUM | frozenset("+/")
_TYPE_NAME_CHARS = _ALNUM | frozenset(".@-")
# A key type name followed by base64 that starts like every SSH key blob does
# (the uint32 length of the type name has three zero bytes: "AAAA"). A string: `re`
# compiles (and caches) it only when a pasted key line is parsed.
_KEYISH = r"(?<![^\s,\"'])([A-Za-z0-9][A-Za-z0-9.@-]*)\s+AAAA[A-Za-z0-9+/]"


def _is_base64(text: str) -> bool:
    """`[A-Za-z0-9+/]+={0,2}`, the whole string."""
    core = text.rstrip("=")
    return bool(core) and len(text) - len(core) <= 2 and _BASE64_CHARS.issuperset(core)


def _is_type_name(text: str) -> bool:
    """`[A-Za-z0-9][A-Za-z0-9.@-]{0,63}`, the whole string."""
    return 1 <= len(text) <= 64 and text[0] in _ALNUM and _TYPE_NAME_CHARS.issuperset(text)


@record
class PublicKey:
    key_type: str
    """The OpenSSH key type name, for example `ssh-ed25519`."""
    blob: bytes
    """The key in SSH wire format (what the base64 in a .pub line decodes to)."""
    comment: str
    """Informational only: control characters replaced, at most 200 characters."""
    bits: int

    @property
    def fingerprint(self) -> str:
        """`SHA256:...` exactly as `ssh-keygen -lf` prints it."""
        return fingerprint_of_blob(self.blob)

    @property
    def blob_b64(self) -> str:
        return _b64encode(self.blob)

    def openssh_line(self) -> str:
        """`type base64`, without the comment."""
        return f"{self.key_type} {self.blob_b64}"


SECURITY_KEY_TYPES = (SK_ED25519, SK_ECDSA)


def is_security_key(key_type: str) -> bool:
    """A FIDO2 security key: its signatures carry the authenticator's flags (touch, PIN)."""
    return key_type in SECURITY_KEY_TYPES


def fingerprint_of_blob(blob: bytes) -> str:
    """The SHA256 fingerprint of a key blob, as `ssh-keygen -lf` prints it."""
    digest = sha256(blob).digest()
    return "SHA256:" + _b64encode(digest).rstrip("=")


def _b64encode(data: bytes) -> str:
    """`base64.b64encode(data)` as text, without importing base64 (and its `re`)."""
    return binascii.b2a_base64(data, newline=False).decode("ascii")


def parse_public_key(text: str) -> PublicKey:
    """Parse one OpenSSH public key line (`type base64 [comment]`).

    Raises `InputError` with a message and a hint for anything else: nothing,
    garbage, a private key, another format, options before the key, several keys,
    a damaged or truncated key, an unsupported or weak key type.
    """
    if len(text) > MAX_INPUT_LENGTH:
        raise InputError(
            f"that is {len(text)} characters, far too long for a public key",
            "paste only the one line from your .pub file",
        )
    _refuse_other_formats(text)
    # Only "\n" ends a line (a stray "\x1e" or "\x85" in a comment must not split it).
    stripped = (line.strip() for line in text.split("\n"))
    lines = [line for line in stripped if line and not line.startswith("#")]
    if not lines:
        raise InputError("no public key given", "paste the line from your .pub file")
    import re

    keyish = re.findall(_KEYISH, "\n".join(lines))
    if sum(1 for name in keyish if name in _KNOWN_TYPES) > 1:
        raise InputError(
            "that is more than one public key; add one key at a time",
            "give each key separately (one line from one .pub file)",
        )
    if len(lines) > 1:
        raise InputError(
            f"expected one line, got {len(lines)} lines",
            "a public key is a single line: paste only that line, and if it was wrapped "
            "across lines, join it back into one",
        )
    return _parse_line(lines[0])


def parse_key_blob_b64(key_type: str, b64: str) -> PublicKey:
    """Parse a key given as type and base64 blob (sshd's AuthorizedKeysCommand `%t %k`)."""
    key_type = key_type.strip()
    b64 = b64.strip()
    if not key_type or not b64:
        raise InputError("no public key given", "pass the key type and the base64 key data")
    if not _is_type_name(key_type):
        raise InputError(
            f"{_show(key_type)!r} is not an SSH key type",
            f"supported types: {', '.join(SUPPORTED_TYPES)}",
        )
    _refuse_type(key_type)
    return _parse_key(key_type, b64, "")


# --- internals -------------------------------------------------------------


def _refuse_other_formats(text: str) -> None:
    upper = text.upper()
    if (
        "PRIVATE KEY-----" in upper
        or "BEGIN OPENSSH PRIVATE KEY" in upper
        or "PUTTY-USER-KEY-FILE-" in upper
    ):
        raise InputError(
            "this is a private key; never share it — add the .pub file instead",
            "the public key is the file ending in .pub (for example ~/.ssh/id_ed25519.pub); "
            "if you sent this private key anywhere, make a new key pair",
        )
    if "BEGIN SSH2 PUBLIC KEY" in upper:
        raise InputError(
            "this is a PuTTY/RFC 4716 public key, not an OpenSSH one",
            "convert it with `ssh-keygen -i -f key.pub` (or PuTTYgen: "
            "'Public key for pasting into OpenSSH authorized_keys file') and add that line",
        )
    if "-----BEGIN PUBLIC KEY-----" in upper or "-----BEGIN RSA PUBLIC KEY-----" in upper:
        raise InputError(
            "this is a PEM public key, not an OpenSSH one",
            "convert it with `ssh-keygen -i -m PKCS8 -f key.pem` and add that line",
        )


def refuse_no_touch() -> None:
    """A security key without a touch is a key file that works while its owner is away."""
    raise InputError(
        "gatekeeper never drops a security key's touch (no-touch-required): without it "
        "the key signs for whoever holds the computer, and stops being a second factor",
        "register the key without that option; each connection then needs a touch",
    )


def _parse_line(line: str) -> PublicKey:
    options = line.split(None, 1)[:1]
    if options and "no-touch-required" in options[0]:
        refuse_no_touch()
    parts = line.split(None, 2)
    first = parts[0]
    if first in _KNOWN_TYPES:
        _refuse_type(first)
        if len(parts) < 2:
            raise InputError(f"the {first} key has no key data after the type", _COPY_AGAIN_HINT)
        comment = parts[2] if len(parts) > 2 else ""
        return _parse_key(first, parts[1], comment)
    import re

    match = re.search(_KEYISH, line)
    if match and match.group(1) in _KNOWN_TYPES and match.start() > 0:
        raise InputError(
            "this line has authorized_keys options before the key; give the key alone",
            f"remove {_show(line[: match.start()].strip(), 40)!r} and keep "
            "`type base64 [comment]`; gatekeeper writes the options itself",
        )
    if len(parts) >= 2 and _is_type_name(first) and parts[1].startswith("AAAA"):
        _refuse_type(first)
    raise InputError(
        "this is not an OpenSSH public key",
        "an OpenSSH public key is one line like `ssh-ed25519 AAAAC3Nz... you@laptop`, "
        "from a file ending in .pub",
    )


def _refuse_type(key_type: str) -> None:
    """Refuse key types we know but do not take; unknown names too."""
    if key_type in SUPPORTED_TYPES:
        return
    if key_type == DSA:
        raise InputError(
            "DSA (ssh-dss) keys are too weak and are refused (OpenSSH disabled them too)",
            _NEW_KEY_HINT,
        )
    if key_type.endswith(_CERT_SUFFIX):
        raise InputError(
            f"SSH certificates ({_show(key_type)}) are not supported",
            "add the plain public key (the .pub file without -cert in its name)",
        )
    if key_type in ("rsa-sha2-256", "rsa-sha2-512"):
        raise InputError(
            f"{key_type} is a signature algorithm, not a key type",
            "an RSA public key line starts with `ssh-rsa`; " + _COPY_AGAIN_HINT,
        )
    raise InputError(
        f"unsupported key type {_show(key_type)!r}",
        f"supported types: {', '.join(SUPPORTED_TYPES)}; or {_NEW_KEY_HINT}",
    )


def _decode_b64(b64: str) -> bytes:
    if not _is_base64(b64):
        raise InputError(
            "the key data is not valid base64 (it contains characters that do not belong)",
            _COPY_AGAIN_HINT,
        )
    bare = b64.rstrip("=")
    if len(bare) % 4 == 1:
        raise _truncated()
    try:
        # The characters are checked above, which is what b64decode(validate=True) adds.
        return binascii.a2b_base64(bare + "=" * (-len(bare) % 4))
    except (binascii.Error, ValueError):  # pragma: no cover - excluded by the checks above
        raise InputError("the key data is not valid base64", _COPY_AGAIN_HINT) from None


def _truncated() -> InputError:
    return InputError(
        "the key is truncated: part of it is missing (cut off while copying?)",
        _COPY_AGAIN_HINT,
    )


class _Reader:
    """Reads SSH wire-format fields (RFC 4251 section 5) from a blob."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def string(self) -> bytes:
        if self.pos + 4 > len(self.data):
            raise _truncated()
        length = int.from_bytes(self.data[self.pos : self.pos + 4], "big")
        start = self.pos + 4
        if start + length > len(self.data):
            raise _truncated()
        self.pos = start + length
        return self.data[start : self.pos]

    def mpint(self, what: str) -> int:
        raw = self.string()
        if raw and raw[0] & 0x80:
            raise _damaged(f"the RSA {what} is negative")
        if len(raw) > 1 and raw[0] == 0 and not raw[1] & 0x80:
            raise _damaged(f"the RSA {what} has a needless leading zero byte")
        return int.from_bytes(raw, "big")

    def end(self) -> None:
        if self.pos != len(self.data):
            raise _damaged(f"{len(self.data) - self.pos} unexpected bytes after the key")


def _damaged(detail: str) -> InputError:
    return InputError(f"the key data is damaged: {detail}", _COPY_AGAIN_HINT)


def _parse_key(key_type: str, b64: str, comment: str) -> PublicKey:
    if any(name in b64 for name in (*SUPPORTED_TYPES, DSA)):
        raise InputError(
            "that is more than one public key, run together without a line break",
            "give each key separately (one line from one .pub file)",
        )
    blob = _decode_b64(b64)
    if not b64.startswith("AAAA"):
        # Every key blob starts with the uint32 length of its type name: 3 zero bytes.
        raise _damaged("this is not SSH key data")
    reader = _Reader(blob)
    inner = reader.string()
    if inner != key_type.encode("ascii"):
        inner_text = inner.decode("ascii", "replace")
        raise InputError(
            f"key type mismatch: the line says {key_type} but the key data is "
            f"{_show(inner_text, 40)!r}",
            "the line was edited or pieced together from two keys; " + _COPY_AGAIN_HINT,
        )
    bits = _check_structure(key_type, reader)
    reader.end()
    return PublicKey(key_type=key_type, blob=blob, comment=_clean_comment(comment), bits=bits)


def _check_structure(key_type: str, reader: _Reader) -> int:
    """Check the fields after the type name; return the key size in bits."""
    if key_type in (ED25519, SK_ED25519):
        if len(reader.string()) != 32:
            raise _damaged("an Ed25519 key must be 32 bytes")
        if key_type == SK_ED25519:
            _check_application(reader.string())
        return 256
    if key_type == RSA:
        e = reader.mpint("exponent")
        n = reader.mpint("modulus")
        if e < 3 or e % 2 == 0:
            raise _damaged("the RSA exponent is not valid")
        if n % 2 == 0:
            raise _damaged("the RSA modulus is not valid")
        bits = n.bit_length()
        if bits > MAX_RSA_BITS:
            raise InputError(
                f"RSA key has {bits} bits; OpenSSH accepts at most {MAX_RSA_BITS}", _NEW_KEY_HINT
            )
        if bits < MIN_RSA_BITS:
            raise InputError(
                f"RSA key is only {bits} bits; at least {MIN_RSA_BITS} bits are required",
                _NEW_KEY_HINT,
            )
        return bits
    curve = _ECDSA_CURVES[key_type]
    if reader.string() != curve.name.encode("ascii"):
        raise _damaged(f"the curve name does not match {key_type}")
    _check_point(curve, reader.string())
    if key_type == SK_ECDSA:
        _check_application(reader.string())
    return curve.bits


def _check_application(application: bytes) -> None:
    """OpenSSH makes and accepts only security keys whose FIDO application starts
    with `ssh:`; anything else was not made for SSH (or was edited)."""
    if not application.startswith(b"ssh:"):
        raise _damaged("a security key's application must start with 'ssh:'")


def _check_point(curve: _Curve, point: bytes) -> None:
    """An uncompressed point (0x04 || X || Y) that lies on the curve."""
    if len(point) != 1 + 2 * curve.size or point[0] != 4:
        raise _damaged(f"wrong point size for {curve.name}")
    x = int.from_bytes(point[1 : 1 + curve.size], "big")
    y = int.from_bytes(point[1 + curve.size :], "big")
    p = curve.p
    if x >= p or y >= p or (y * y - (x * x * x - 3 * x + curve.b)) % p != 0:
        raise _damaged(f"the point is not on the {curve.name} curve")


def _clean_comment(comment: str) -> str:
    """Replace control and other non-printable characters; at most 200 characters."""
    if not comment.isprintable():
        comment = "".join(
            ch if ch.isprintable() else (" " if ch.isspace() else "?") for ch in comment
        )
    return comment.strip()[:MAX_COMMENT_LENGTH].rstrip()


def _show(text: str, limit: int = 60) -> str:
    """A piece of user input that is safe to put in a message: printable, short."""
    cleaned = "".join(ch if ch.isprintable() else "?" for ch in text[: limit + 1])
    return cleaned if len(cleaned) <= limit else cleaned[:limit] + "..."
