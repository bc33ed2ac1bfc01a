"""TOTP secrets, codes, recovery codes and the enrollment QR code (docs/design.md, "TOTP rules").

Pure functions: nothing here touches the database; `gatekeeper.store` keeps what these
functions produce (the encrypted secret, the last accepted timestep, recovery code hashes).

- The server key is 32 random bytes in a file of mode 0600; TOTP secrets are encrypted with it
  (AES-256-GCM, the user id bound as associated data, so a secret copied to another user's
  row does not decrypt).
- Codes are RFC 6238 TOTP (SHA-1, 6 digits, 30 s steps) computed by pyotp. `match_timestep`
  returns the matched timestep so the store can refuse any step not strictly greater than the
  last accepted one (replay protection lives in the store's conditional UPDATE).
- Recovery codes are `xxxxx-xxxxx` from a 32-letter lowercase alphabet (50 bits), stored as
  self-describing scrypt hashes.

This module is not on the git-access hot path, but heavy imports (pyotp, cryptography, segno)
still happen inside the functions that need them.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import secrets
import stat
from pathlib import Path
from typing import TYPE_CHECKING

from gatekeeper.errors import InputError, StoreError

if TYPE_CHECKING:
    import pyotp

# -- server key ------------------------------------------------------------------

SERVER_KEY_BYTES = 32
NONCE_BYTES = 12
_GCM_TAG_BYTES = 16
_INIT_HINT = "run `gatekeeper init` to create the state directory and the server key."
_WRONG_KEY_HINT = (
    "the server key file is not the one this secret was encrypted with (restored from another "
    "host or a backup?); put the original key back, or reset the enrollment with "
    "`gatekeeper 2fa reset USER`."
)


def create_server_key(path: Path) -> None:
    """Write a new 32-byte random server key to `path` (mode 0600); refuse to overwrite one."""
    path = Path(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        raise StoreError(
            f"server key {path} already exists; refusing to overwrite it.",
            hint="keep it: it decrypts every stored TOTP secret (a new key makes them unreadable).",
        ) from None
    except FileNotFoundError:
        raise StoreError(
            f"cannot create server key {path}: its directory does not exist.", hint=_INIT_HINT
        ) from None
    except OSError as exc:
        raise StoreError(
            f"cannot create server key {path}: {exc.strerror or exc}.",
            hint="check the ownership and permissions of the state directory.",
        ) from None
    try:
        os.fchmod(fd, 0o600)  # whatever the umask did, the key ends up exactly 0600
        data = memoryview(os.urandom(SERVER_KEY_BYTES))
        while data:
            written = os.write(fd, data)
            data = data[written:]
        os.fsync(fd)
    except OSError as exc:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise StoreError(
            f"cannot write server key {path}: {exc.strerror or exc}.",
            hint="check free space and permissions of the state directory, then run "
            "`gatekeeper init` again.",
        ) from None
    os.close(fd)
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    """Make the new directory entry durable (best effort: not every platform allows it)."""
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_server_key(path: Path) -> bytes:
    """Read the server key; refuse one that is missing, unreadable, damaged or not private."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise StoreError(
            f"server key {path} does not exist.",
            # `gatekeeper init` makes a new key, which cannot decrypt the stored secrets.
            hint="restore it from a backup if anyone is enrolled; on a new installation run "
            "`gatekeeper init` to create it.",
        ) from None
    except PermissionError:
        raise StoreError(
            f"cannot read server key {path}: permission denied.",
            hint="run gatekeeper as the user that owns the state directory.",
        ) from None
    except OSError as exc:
        raise StoreError(
            f"cannot read server key {path}: {exc.strerror or exc}.", hint=_INIT_HINT
        ) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise StoreError(
                f"server key {path} is not a regular file.",
                hint="restore the key file from a backup (a new key cannot decrypt stored "
                "secrets).",
            )
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o077:
            raise StoreError(
                f"server key {path} has mode {mode:04o}: group and others must have no access.",
                hint=f"chmod 600 {path}",
            )
        chunks: list[bytes] = []
        size = 0
        while size <= SERVER_KEY_BYTES:
            chunk = os.read(fd, SERVER_KEY_BYTES + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as exc:
        raise StoreError(
            f"cannot read server key {path}: {exc.strerror or exc}.",
            hint="check the file and the disk it is on.",
        ) from None
    finally:
        os.close(fd)
    key = b"".join(chunks)
    if len(key) != SERVER_KEY_BYTES:
        what = "more than 32" if len(key) > SERVER_KEY_BYTES else str(len(key))
        raise StoreError(
            f"server key {path} is damaged: it has {what} bytes, expected exactly 32.",
            hint="restore it from a backup; a new key cannot decrypt the stored TOTP secrets.",
        )
    return key


def _aad(user_id: int) -> bytes:
    return f"gatekeeper totp secret v1; user id {int(user_id)}".encode("ascii")


def _check_key(key: bytes) -> None:
    if not isinstance(key, bytes) or len(key) != SERVER_KEY_BYTES:
        raise StoreError(
            "the server key must be exactly 32 bytes.",
            hint="load it with `load_server_key`; run `gatekeeper init` if there is none.",
        )


def encrypt_secret(key: bytes, user_id: int, secret: str) -> bytes:
    """Encrypt a TOTP secret for one user: 12-byte random nonce + AES-256-GCM ciphertext."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    _check_key(key)
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, secret.encode("utf-8"), _aad(user_id))


def decrypt_secret(key: bytes, user_id: int, blob: bytes) -> str:
    """Decrypt what `encrypt_secret` produced for this very user; StoreError on any mismatch."""
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    _check_key(key)
    blob = bytes(blob)
    if len(blob) < NONCE_BYTES + _GCM_TAG_BYTES:
        raise StoreError(
            f"cannot decrypt the TOTP secret of user id {user_id}: the stored value is truncated.",
            hint="reset the enrollment with `gatekeeper 2fa reset USER`.",
        )
    nonce, ciphertext = blob[:NONCE_BYTES], blob[NONCE_BYTES:]
    try:
        plain = AESGCM(key).decrypt(nonce, ciphertext, _aad(user_id))
    except InvalidTag:
        raise StoreError(
            f"cannot decrypt the TOTP secret of user id {user_id}: wrong server key, or the "
            "stored value was altered or belongs to another user.",
            hint=_WRONG_KEY_HINT,
        ) from None
    try:
        return plain.decode("utf-8")
    except UnicodeDecodeError:
        raise StoreError(
            f"the TOTP secret of user id {user_id} is not text after decryption.",
            hint="reset the enrollment with `gatekeeper 2fa reset USER`.",
        ) from None


# -- TOTP ------------------------------------------------------------------------

CODE_DIGITS = 6
STEP_SECONDS = 30
_ASCII_DIGITS = frozenset("0123456789")


def new_secret() -> str:
    """A fresh TOTP secret: 32 base32 characters (160 bits)."""
    import pyotp

    return pyotp.random_base32()


def _totp(secret: str) -> pyotp.TOTP:
    """A pyotp.TOTP for `secret`, refusing a secret that is not valid base32 of >= 112 bits."""
    import pyotp

    try:
        otp = pyotp.TOTP(secret, digits=CODE_DIGITS, interval=STEP_SECONDS)
        otp.byte_secret()
    except (ValueError, TypeError):  # binascii.Error is a ValueError
        raise StoreError(
            "the TOTP secret is not valid base32 (or too short).",
            hint="reset the enrollment with `gatekeeper 2fa reset USER`.",
        ) from None
    return otp


def provisioning_uri(secret: str, account: str, issuer: str) -> str:
    """The otpauth://totp/ URI an authenticator app reads from the QR code."""
    if not account:
        raise InputError("the account name for the authenticator app is empty.")
    return _totp(secret).provisioning_uri(name=account, issuer_name=issuer or None)


def _describe_char(ch: str) -> str:
    """A safe way to name a character in a message (no control or look-alike characters)."""
    if ch.isascii() and ch.isprintable():
        return repr(ch)
    return f"U+{ord(ch):04X}"


def _digits(count: int) -> str:
    return f"{count} digit" if count == 1 else f"{count} digits"


def normalize_code(code: str) -> str:
    """Return the 6 ASCII digits of a typed code; InputError says precisely what is wrong.

    Surrounding whitespace and inner spaces or hyphens are dropped ("123 456", "123-456").
    Only 0-9 count as digits (not Arabic-Indic, fullwidth or other Unicode digits), and
    codes stay strings: "012345" keeps its leading zero.
    """
    if not isinstance(code, str):
        raise InputError("the code must be text.")
    digits = code.strip().replace(" ", "").replace("-", "")
    if not digits:
        raise InputError(
            "no code given: enter the 6-digit code from your authenticator app.",
        )
    for ch in digits:
        if ch not in _ASCII_DIGITS:
            raise InputError(
                f"the code must contain only the digits 0-9; found {_describe_char(ch)}.",
                hint="type the 6 digits your authenticator app shows now.",
            )
    if len(digits) > CODE_DIGITS:
        raise InputError(
            f"the code is too long: {_digits(len(digits))}, expected {CODE_DIGITS}.",
            hint="type the 6 digits your authenticator app shows now.",
        )
    if len(digits) < CODE_DIGITS:
        raise InputError(
            f"the code is too short: {_digits(len(digits))}, expected {CODE_DIGITS}.",
            hint="type all 6 digits, including leading zeros.",
        )
    return digits


def timestep(now: float) -> int:
    """The RFC 6238 time counter for `now` (Unix seconds)."""
    return int(now) // STEP_SECONDS


def match_timestep(secret: str, code: str, now: float, window: int = 1) -> int | None:
    """The timestep within +-`window` steps of `now` whose code is `code`, or None.

    The current step is checked first, then -1, +1, -2, +2, ...; each comparison is
    constant-time. Raises InputError when `code` is not 6 digits at all.
    """
    if window < 0:
        raise ValueError("window must be >= 0")
    wanted = normalize_code(code)
    otp = _totp(secret)
    current = timestep(now)
    offsets = [0]
    for distance in range(1, window + 1):
        offsets += [-distance, distance]
    for offset in offsets:
        step = current + offset
        if step < 0:
            continue
        if hmac.compare_digest(otp.generate_otp(step), wanted):
            return step
    return None


def current_code(secret: str, now: float) -> str:
    """The code an authenticator app shows at `now` (for tests and tools)."""
    return _totp(secret).generate_otp(timestep(now))


# -- recovery codes --------------------------------------------------------------

# Crockford's base32 alphabet in lowercase: no i, l, o (read as 1, 1, 0 when typed) and no u.
RECOVERY_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"
RECOVERY_GROUPS = (5, 5)
_RECOVERY_LEN = sum(RECOVERY_GROUPS)
_RECOVERY_LETTERS = frozenset(RECOVERY_ALPHABET) - _ASCII_DIGITS
_TYPO_MAP = str.maketrans({"o": "0", "i": "1", "l": "1", " ": None, "-": None})

SCRYPT_N = 2**14
SCRYPT_R = 8
SCRYPT_P = 1
SCRYPT_SALT_BYTES = 16
SCRYPT_DKLEN = 32
_SCRYPT_MAXMEM = 64 * 1024 * 1024


def _normalize_recovery(code: str) -> str:
    """Lowercase, drop whitespace and hyphens, and read o/i/l as the 0/1 they must be."""
    return "".join(code.strip().lower().split()).translate(_TYPO_MAP)


def new_recovery_codes(n: int = 10) -> list[str]:
    """`n` distinct codes like `k3x9q-7mfa2` (10 symbols of 5 bits: 50 bits each).

    A code always contains a letter, so it can never be taken for a 6-digit TOTP code
    (drawing again in the rare all-digits case costs far less than 0.001 bit).
    """
    if n < 1:
        raise ValueError("n must be >= 1")
    codes: list[str] = []
    seen: set[str] = set()
    while len(codes) < n:
        raw = "".join(secrets.choice(RECOVERY_ALPHABET) for _ in range(_RECOVERY_LEN))
        if raw in seen or not _RECOVERY_LETTERS.intersection(raw):
            continue
        seen.add(raw)
        parts: list[str] = []
        start = 0
        for size in RECOVERY_GROUPS:
            parts.append(raw[start : start + size])
            start += size
        codes.append("-".join(parts))
    return codes


def looks_like_recovery_code(text: str) -> bool:
    """True when `text` has the shape of a recovery code rather than a 6-digit TOTP code."""
    if not isinstance(text, str):
        return False
    norm = _normalize_recovery(text)
    return (
        len(norm) == _RECOVERY_LEN
        and all(ch in RECOVERY_ALPHABET for ch in norm)
        and bool(_RECOVERY_LETTERS.intersection(norm))
    )


def _scrypt(code: str, salt: bytes, n: int, r: int, p: int, dklen: int) -> bytes:
    return hashlib.scrypt(
        _normalize_recovery(code).encode("utf-8"),
        salt=salt,
        n=n,
        r=r,
        p=p,
        maxmem=_SCRYPT_MAXMEM,
        dklen=dklen,
    )


def hash_recovery_code(code: str) -> str:
    """`scrypt$n$r$p$salt_b64$hash_b64` for a recovery code (normalised first)."""
    if not _normalize_recovery(code):
        raise InputError("the recovery code is empty.")
    salt = os.urandom(SCRYPT_SALT_BYTES)
    digest = _scrypt(code, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P, SCRYPT_DKLEN)
    b64 = base64.b64encode
    return (
        f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}$"
        f"{b64(salt).decode('ascii')}${b64(digest).decode('ascii')}"
    )


def check_recovery_code(code: str, hashed: str) -> bool:
    """Whether `code` matches `hashed`; False (never an exception) for a malformed hash."""
    try:
        if not isinstance(code, str) or not isinstance(hashed, str):
            return False
        parts = hashed.split("$")
        if len(parts) != 6 or parts[0] != "scrypt":
            return False
        if not all(part.isascii() and part.isdigit() for part in parts[1:4]):
            return False
        n, r, p = (int(part) for part in parts[1:4])
        # Bounds keep a damaged or planted row from costing unbounded memory or time.
        if not (2 <= n <= 2**20 and n & (n - 1) == 0 and 1 <= r <= 32 and 1 <= p <= 16):
            return False
        if 128 * n * r * p > _SCRYPT_MAXMEM // 2:
            return False
        salt = base64.b64decode(parts[4], validate=True)
        expected = base64.b64decode(parts[5], validate=True)
        if len(salt) < 8 or not 16 <= len(expected) <= 64:
            return False
        if not _normalize_recovery(code):
            return False
        actual = _scrypt(code, salt, n, r, p, len(expected))
    except (ValueError, binascii.Error, MemoryError, UnicodeError):
        return False
    return hmac.compare_digest(actual, expected)


# -- QR code for the terminal ----------------------------------------------------

# Black on bright white, whatever the terminal's own colours are.
_ANSI_ON = "\x1b[30;107m"
_ANSI_OFF = "\x1b[0m"
_HALF_BLOCKS = {
    (True, True): "\u2588",  # full block
    (True, False): "\u2580",  # upper half block
    (False, True): "\u2584",  # lower half block
    (False, False): " ",
}


def qr_text(data: str, *, border: int = 4, color: bool = True, invert: bool = False) -> str:
    """A QR code (error level M or better) as text: Unicode half blocks, two rows per line.

    With `color` (the default) each line sets black on bright white with ANSI escapes and
    draws the dark modules, so it scans on dark-on-light and light-on-dark terminals alike;
    `click.echo` strips those escapes when the output is not a terminal. Without `color`,
    dark modules are drawn as ink (right for a light background); `invert` draws the light
    modules instead (right for a dark background, like `qrencode -t UTF8`). The quiet zone is
    `border` modules wide. The text has no trailing newline.
    """
    import segno

    if border < 0:
        raise ValueError("border must be >= 0")
    qr = segno.make(data, error="m", micro=False)
    size = len(qr.matrix)
    width = size + 2 * border
    blank = [False] * width
    rows: list[list[bool]] = [blank] * border
    for matrix_row in qr.matrix:
        rows.append([False] * border + [bool(bit) for bit in matrix_row] + [False] * border)
    rows += [blank] * border
    if len(rows) % 2:
        rows.append(blank)
    ink_is_dark = color or not invert
    lines: list[str] = []
    for top, bottom in zip(rows[0::2], rows[1::2], strict=True):
        line = "".join(
            _HALF_BLOCKS[(t == ink_is_dark, b == ink_is_dark)]
            for t, b in zip(top, bottom, strict=True)
        )
        lines.append(f"{_ANSI_ON}{line}{_ANSI_OFF}" if color else line)
    return "\n".join(lines)
