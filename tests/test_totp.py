"""TOTP secrets, codes, recovery codes, the server key and the terminal QR code."""

from __future__ import annotations

import base64
import os
import re
import stat
import subprocess
import sys
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

import pyotp
import pytest
import segno

from gatekeeper import totp
from gatekeeper.errors import InputError, StoreError

# RFC 6238 appendix B: the SHA-1 seed "12345678901234567890" and its 8-digit codes; a
# 6-digit code is the last 6 digits of the same truncated value (10**6 divides 10**8).
RFC_SECRET = base64.b32encode(b"12345678901234567890").decode("ascii")
RFC_VECTORS = [
    (59, "94287082"),
    (1111111109, "07081804"),
    (1111111111, "14050471"),
    (1234567890, "89005924"),
    (2000000000, "69279037"),
    (20000000000, "65353130"),
]
SECRET = "JBSWY3DPEHPK3PXPJBSWY3DPEHPK3PXP"
NOW = 1_700_000_000.0


# -- TOTP ------------------------------------------------------------------------


@pytest.mark.parametrize(("when", "code8"), RFC_VECTORS)
def test_rfc6238_vectors(when: int, code8: str) -> None:
    code = code8[-6:]
    assert totp.current_code(RFC_SECRET, when) == code
    assert pyotp.TOTP(RFC_SECRET).at(when) == code
    assert totp.match_timestep(RFC_SECRET, code, when) == when // 30


def test_rfc_vectors_include_leading_zeros_kept_as_strings() -> None:
    # 1111111109 -> "081804" and 1234567890 -> "005924": leading zeros are significant
    assert totp.current_code(RFC_SECRET, 1111111109) == "081804"
    assert totp.current_code(RFC_SECRET, 1234567890) == "005924"
    assert totp.match_timestep(RFC_SECRET, "005924", 1234567890) == 1234567890 // 30
    # the same number without its zeros is not a code
    with pytest.raises(InputError, match="too short"):
        totp.match_timestep(RFC_SECRET, "5924", 1234567890)


def test_matches_pyotp_over_many_times() -> None:
    reference = pyotp.TOTP(SECRET)
    for i in range(200):
        when = NOW + i * 37.5
        code = reference.at(int(when))
        assert totp.current_code(SECRET, when) == code
        assert totp.match_timestep(SECRET, code, when) == int(when) // 30
        assert reference.verify(code, for_time=int(when))


def _distinct_step_code(secret: str, step: int, others: range) -> str:
    code = totp.current_code(secret, step * 30)
    assert all(totp.current_code(secret, s * 30) != code for s in others if s != step)
    return code


@pytest.mark.parametrize("offset", [-1, 0, 1])
def test_window_of_one_step_accepted(offset: int) -> None:
    step = int(NOW) // 30
    code = _distinct_step_code(SECRET, step + offset, range(step - 3, step + 4))
    assert totp.match_timestep(SECRET, code, NOW) == step + offset


@pytest.mark.parametrize("offset", [-2, 2, -3, 3])
def test_two_or_more_steps_away_refused(offset: int) -> None:
    step = int(NOW) // 30
    code = _distinct_step_code(SECRET, step + offset, range(step - 3, step + 4))
    assert totp.match_timestep(SECRET, code, NOW) is None
    # ...but a wider window would take it, so the refusal is the window's doing
    assert totp.match_timestep(SECRET, code, NOW, window=abs(offset)) == step + offset


def test_window_zero_accepts_only_current_step() -> None:
    step = int(NOW) // 30
    previous = _distinct_step_code(SECRET, step - 1, range(step - 1, step + 1))
    assert totp.match_timestep(SECRET, previous, NOW, window=0) is None
    assert totp.match_timestep(SECRET, totp.current_code(SECRET, NOW), NOW, window=0) == step


def test_code_from_an_hour_ago_refused() -> None:
    old = totp.current_code(SECRET, NOW - 3600)
    current_window = {totp.current_code(SECRET, NOW + d * 30) for d in (-1, 0, 1)}
    assert old not in current_window
    assert totp.match_timestep(SECRET, old, NOW) is None


def test_current_step_returned_at_every_second_of_a_step() -> None:
    step = int(NOW) // 30
    for second in range(30):
        when = step * 30 + second
        assert totp.match_timestep(SECRET, totp.current_code(SECRET, when), when) == step


def test_boundaries_of_a_step() -> None:
    start = (int(NOW) // 30) * 30
    code = totp.current_code(SECRET, start)
    assert totp.current_code(SECRET, start + 29.999) == code
    assert totp.match_timestep(SECRET, code, start + 29.999) == start // 30
    # one step later the same code is still accepted, as the previous step
    assert totp.match_timestep(SECRET, code, start + 30) == start // 30


def test_near_epoch_does_not_go_negative() -> None:
    code = totp.current_code(SECRET, 0)
    assert totp.match_timestep(SECRET, code, 5) == 0


def test_leading_zero_code_found_by_search() -> None:
    when = NOW
    while not totp.current_code(SECRET, when).startswith("0"):
        when += 30
    code = totp.current_code(SECRET, when)
    assert len(code) == 6 and code[0] == "0"
    assert code == pyotp.TOTP(SECRET).at(int(when))
    assert totp.match_timestep(SECRET, code, when) == int(when) // 30
    assert totp.match_timestep(SECRET, f" {code[:3]} {code[3:]} ", when) == int(when) // 30
    with pytest.raises(InputError, match="too short"):
        totp.match_timestep(SECRET, str(int(code)), when)


def test_match_refuses_negative_window() -> None:
    with pytest.raises(ValueError, match="window"):
        totp.match_timestep(SECRET, "123456", NOW, window=-1)


def test_invalid_secret_is_a_store_error() -> None:
    with pytest.raises(StoreError, match="not valid base32"):
        totp.match_timestep("not base32!", "123456", NOW)
    with pytest.raises(StoreError, match="not valid base32"):
        totp.current_code("ABCDEFGH", NOW)  # 40 bits: below pyotp's minimum


def test_new_secret_is_160_bits_of_base32() -> None:
    secrets_seen = {totp.new_secret() for _ in range(50)}
    assert len(secrets_seen) == 50
    for secret in secrets_seen:
        assert re.fullmatch(r"[A-Z2-7]{32}", secret)
        assert len(base64.b32decode(secret)) == 20


def test_provisioning_uri() -> None:
    uri = totp.provisioning_uri(SECRET, "alice", "Example Git")
    parsed = urlparse(uri)
    assert parsed.scheme == "otpauth" and parsed.netloc == "totp"
    assert unquote(parsed.path) == "/Example Git:alice"
    query = parse_qs(parsed.query)
    assert query["secret"] == [SECRET]
    assert query["issuer"] == ["Example Git"]
    restored = pyotp.parse_uri(uri)
    assert isinstance(restored, pyotp.TOTP)
    assert restored.at(int(NOW)) == totp.current_code(SECRET, NOW)
    with pytest.raises(InputError, match="account"):
        totp.provisioning_uri(SECRET, "", "Example Git")


# -- normalize_code --------------------------------------------------------------


@pytest.mark.parametrize(
    ("typed", "expected"),
    [
        ("123456", "123456"),
        ("012345", "012345"),
        ("000000", "000000"),
        (" 123456\n", "123456"),
        ("123 456", "123456"),
        ("123-456", "123456"),
        ("\t12 34-56  ", "123456"),
        ("1 2 3 4 5 6", "123456"),
    ],
)
def test_normalize_accepts(typed: str, expected: str) -> None:
    assert totp.normalize_code(typed) == expected


@pytest.mark.parametrize(
    ("typed", "message"),
    [
        ("", "no code given"),
        ("   ", "no code given"),
        (" - ", "no code given"),
        ("12345", r"too short: 5 digits, expected 6"),
        ("0", r"too short: 1 digit, expected 6"),
        ("1234567", r"too long: 7 digits, expected 6"),
        ("123456789012", r"too long: 12 digits, expected 6"),
        ("12345a", r"only the digits 0-9; found 'a'"),
        ("abcdef", r"only the digits 0-9; found 'a'"),
        ("123.456", r"only the digits 0-9; found '\.'"),
        ("+123456", r"only the digits 0-9; found '\+'"),
        ("12345\x00", r"only the digits 0-9; found U\+0000"),
        ("123\t456", r"only the digits 0-9; found U\+0009"),
        ("١٢٣٤٥٦", r"only the digits 0-9; found U\+0661"),  # Arabic-Indic
        ("１２３４５６", r"only the digits 0-9; found U\+FF11"),  # fullwidth
        ("12345６", r"only the digits 0-9; found U\+FF16"),
        ("१२३४५६", r"only the digits 0-9; found U\+0967"),  # Devanagari
        ("12³456", r"only the digits 0-9; found U\+00B3"),  # superscript: isdigit() is True
        ("123\u2013456", r"only the digits 0-9; found U\+2013"),  # en dash
    ],
)
def test_normalize_refuses(typed: str, message: str) -> None:
    with pytest.raises(InputError, match=message) as info:
        totp.normalize_code(typed)
    assert "\n" not in info.value.message
    assert info.value.exit_code == 2


def test_normalize_never_echoes_control_characters() -> None:
    with pytest.raises(InputError) as info:
        totp.normalize_code("\x1b[31m123456")
    assert "\x1b" not in info.value.message
    assert "U+001B" in info.value.message


def test_normalize_refuses_non_text() -> None:
    with pytest.raises(InputError, match="must be text"):
        totp.normalize_code(123456)  # type: ignore[arg-type]


def test_match_timestep_normalizes_and_raises_for_bad_forms() -> None:
    code = totp.current_code(SECRET, NOW)
    assert totp.match_timestep(SECRET, f"{code[:3]}-{code[3:]}", NOW) == int(NOW) // 30
    with pytest.raises(InputError, match="only the digits"):
        totp.match_timestep(SECRET, "１２３４５６", NOW)
    with pytest.raises(InputError, match="no code given"):
        totp.match_timestep(SECRET, "", NOW)


# -- server key and secret encryption ---------------------------------------------


def test_create_server_key_is_0600_and_32_bytes(tmp_path: Path) -> None:
    path = tmp_path / "server.key"
    old = os.umask(0)  # even a permissive umask must not widen the mode
    try:
        totp.create_server_key(path)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(path.read_bytes()) == 32
    assert totp.load_server_key(path) == path.read_bytes()


def test_server_keys_are_random(tmp_path: Path) -> None:
    totp.create_server_key(tmp_path / "a")
    totp.create_server_key(tmp_path / "b")
    assert (tmp_path / "a").read_bytes() != (tmp_path / "b").read_bytes()


def test_create_refuses_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "server.key"
    totp.create_server_key(path)
    before = path.read_bytes()
    with pytest.raises(StoreError, match="already exists") as info:
        totp.create_server_key(path)
    assert info.value.hint
    assert path.read_bytes() == before


def test_create_refuses_symlink(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    link = tmp_path / "server.key"
    link.symlink_to(target)
    with pytest.raises(StoreError, match="already exists"):
        totp.create_server_key(link)
    assert not target.exists()


def test_create_in_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="does not exist") as info:
        totp.create_server_key(tmp_path / "nope" / "server.key")
    assert "gatekeeper init" in (info.value.hint or "")


def test_load_refuses_missing(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="does not exist") as info:
        totp.load_server_key(tmp_path / "server.key")
    assert "gatekeeper init" in (info.value.hint or "")
    assert info.value.exit_code == 4


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o610, 0o601])
def test_load_refuses_group_or_other_access(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "server.key"
    totp.create_server_key(path)
    path.chmod(mode)
    with pytest.raises(StoreError, match=f"mode {mode:04o}") as info:
        totp.load_server_key(path)
    assert info.value.hint == f"chmod 600 {path}"


def test_load_accepts_0400(tmp_path: Path) -> None:
    path = tmp_path / "server.key"
    totp.create_server_key(path)
    path.chmod(0o400)
    assert len(totp.load_server_key(path)) == 32


@pytest.mark.parametrize("size", [0, 16, 31, 33, 64])
def test_load_refuses_wrong_length(tmp_path: Path, size: int) -> None:
    path = tmp_path / "server.key"
    path.write_bytes(b"k" * size)
    path.chmod(0o600)
    with pytest.raises(StoreError, match="expected exactly 32") as info:
        totp.load_server_key(path)
    assert info.value.hint


def test_load_refuses_directory(tmp_path: Path) -> None:
    path = tmp_path / "server.key"
    path.mkdir(mode=0o700)
    with pytest.raises(StoreError):
        totp.load_server_key(path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_load_refuses_unreadable(tmp_path: Path) -> None:
    path = tmp_path / "server.key"
    totp.create_server_key(path)
    path.chmod(0o000)
    try:
        with pytest.raises(StoreError, match="permission denied"):
            totp.load_server_key(path)
    finally:
        path.chmod(0o600)


def test_load_refuses_unreadable_even_as_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "server.key"
    totp.create_server_key(path)

    def denied(*args: object, **kwargs: object) -> int:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "open", denied)
    with pytest.raises(StoreError, match="permission denied") as info:
        totp.load_server_key(path)
    assert info.value.hint


def test_encrypt_decrypt_round_trip() -> None:
    key = os.urandom(32)
    secret = totp.new_secret()
    blob = totp.encrypt_secret(key, 7, secret)
    assert isinstance(blob, bytes)
    assert secret.encode() not in blob
    assert len(blob) == 12 + len(secret) + 16
    assert totp.decrypt_secret(key, 7, blob) == secret
    assert totp.decrypt_secret(key, 7, memoryview(blob)) == secret  # type: ignore[arg-type]


def test_encryption_uses_a_fresh_nonce() -> None:
    key = os.urandom(32)
    blobs = {totp.encrypt_secret(key, 1, SECRET) for _ in range(20)}
    assert len(blobs) == 20
    assert len({blob[:12] for blob in blobs}) == 20


def test_tampered_ciphertext_refused() -> None:
    key = os.urandom(32)
    blob = bytearray(totp.encrypt_secret(key, 1, SECRET))
    for index in (0, 11, 12, len(blob) - 1):
        tampered = bytearray(blob)
        tampered[index] ^= 0x01
        with pytest.raises(StoreError, match="cannot decrypt the TOTP secret"):
            totp.decrypt_secret(key, 1, bytes(tampered))


def test_truncated_blob_refused() -> None:
    key = os.urandom(32)
    blob = totp.encrypt_secret(key, 1, SECRET)
    for cut in (0, 5, 27, len(blob) - 1):
        with pytest.raises(StoreError, match="cannot decrypt the TOTP secret"):
            totp.decrypt_secret(key, 1, blob[:cut])


def test_secret_copied_to_another_user_refused() -> None:
    key = os.urandom(32)
    blob = totp.encrypt_secret(key, 1, SECRET)
    for other in (2, 11, 10, 0, -1):
        with pytest.raises(StoreError, match="another user"):
            totp.decrypt_secret(key, other, blob)


def test_wrong_server_key_refused_with_hint() -> None:
    blob = totp.encrypt_secret(os.urandom(32), 1, SECRET)
    with pytest.raises(StoreError, match="cannot decrypt the TOTP secret") as info:
        totp.decrypt_secret(os.urandom(32), 1, blob)
    assert "server key" in (info.value.hint or "")


@pytest.mark.parametrize("bad", [b"", b"x" * 16, b"x" * 31, b"x" * 33])
def test_key_of_wrong_length_refused(bad: bytes) -> None:
    with pytest.raises(StoreError, match="32 bytes"):
        totp.encrypt_secret(bad, 1, SECRET)
    with pytest.raises(StoreError, match="32 bytes"):
        totp.decrypt_secret(bad, 1, b"\0" * 60)


def test_key_file_round_trip_with_secrets(tmp_path: Path) -> None:
    path = tmp_path / "server.key"
    totp.create_server_key(path)
    blob = totp.encrypt_secret(totp.load_server_key(path), 3, SECRET)
    assert totp.decrypt_secret(totp.load_server_key(path), 3, blob) == SECRET


# -- recovery codes --------------------------------------------------------------


def test_recovery_codes_shape_and_uniqueness() -> None:
    codes = totp.new_recovery_codes()
    assert len(codes) == 10
    assert len(set(codes)) == 10
    for code in codes:
        assert re.fullmatch(r"[0-9a-hjkmnp-tv-z]{5}-[0-9a-hjkmnp-tv-z]{5}", code)
        assert not set(code) & set("ilou")
        assert totp.looks_like_recovery_code(code)
    many = [c for _ in range(50) for c in totp.new_recovery_codes(20)]
    assert len(set(many)) == len(many)
    assert len(totp.new_recovery_codes(3)) == 3


def test_recovery_code_entropy() -> None:
    import math

    assert len(set(totp.RECOVERY_ALPHABET)) == len(totp.RECOVERY_ALPHABET) == 32
    assert 10 * math.log2(len(totp.RECOVERY_ALPHABET)) >= 50
    # every symbol of the alphabet shows up: the generator draws from all of it
    seen = set("".join(totp.new_recovery_codes(200)).replace("-", ""))
    assert seen == set(totp.RECOVERY_ALPHABET)


def test_hash_and_check_round_trip() -> None:
    code = totp.new_recovery_codes(1)[0]
    hashed = totp.hash_recovery_code(code)
    algo, n, r, p, salt, digest = hashed.split("$")
    assert (algo, n, r, p) == ("scrypt", str(2**14), "8", "1")
    assert len(base64.b64decode(salt)) == 16
    assert len(base64.b64decode(digest)) >= 16
    assert totp.check_recovery_code(code, hashed)
    # typed differently: upper case, spaces, no hyphen, surrounding whitespace
    assert totp.check_recovery_code(f"  {code.upper()}  ", hashed)
    assert totp.check_recovery_code(code.replace("-", ""), hashed)
    assert totp.check_recovery_code(code.replace("-", " "), hashed)
    # the same code hashes differently every time (random salt)
    assert totp.hash_recovery_code(code) != hashed


def test_recovery_code_typos_of_ambiguous_letters_accepted() -> None:
    hashed = totp.hash_recovery_code("a0b1c-d0e1f")
    assert totp.check_recovery_code("aOb1c-d0eIf", hashed)
    assert totp.check_recovery_code("a0bLc-doe1f", hashed)


def test_wrong_recovery_code_refused() -> None:
    code, other = totp.new_recovery_codes(2)
    hashed = totp.hash_recovery_code(code)
    assert not totp.check_recovery_code(other, hashed)
    assert not totp.check_recovery_code(code[:-1], hashed)
    assert not totp.check_recovery_code("", hashed)
    assert not totp.check_recovery_code("123456", hashed)


@pytest.mark.parametrize(
    "hashed",
    [
        "",
        "scrypt",
        "garbage",
        "scrypt$16384$8$1$",
        "pbkdf2$16384$8$1$c2FsdHNhbHRzYWx0c2FsdA==$ZGlnZXN0ZGlnZXN0ZGlnZXN0",
        "scrypt$x$8$1$c2FsdHNhbHRzYWx0c2FsdA==$ZGlnZXN0ZGlnZXN0ZGlnZXN0",
        "scrypt$16383$8$1$c2FsdHNhbHRzYWx0c2FsdA==$ZGlnZXN0ZGlnZXN0ZGlnZXN0",
        "scrypt$1$8$1$c2FsdHNhbHRzYWx0c2FsdA==$ZGlnZXN0ZGlnZXN0ZGlnZXN0",
        "scrypt$1073741824$8$1$c2FsdHNhbHRzYWx0c2FsdA==$ZGlnZXN0ZGlnZXN0ZGlnZXN0",
        "scrypt$16384$0$1$c2FsdHNhbHRzYWx0c2FsdA==$ZGlnZXN0ZGlnZXN0ZGlnZXN0",
        "scrypt$16384$8$-1$c2FsdHNhbHRzYWx0c2FsdA==$ZGlnZXN0ZGlnZXN0ZGlnZXN0",
        "scrypt$16384$8$1$not base64!$ZGlnZXN0ZGlnZXN0ZGlnZXN0",
        "scrypt$16384$8$1$c2FsdHNhbHRzYWx0c2FsdA==$not base64!",
        "scrypt$16384$8$1$$ZGlnZXN0ZGlnZXN0ZGlnZXN0",
        "scrypt$16384$8$1$c2FsdHNhbHRzYWx0c2FsdA==$",
        "scrypt$16384$8$1$c2FsdHNhbHRzYWx0c2FsdA==$ZGlnZXN0ZGlnZXN0ZGlnZXN0$extra",
        "scrypt$１６３８４$8$1$c2FsdHNhbHRzYWx0c2FsdA==$ZGlnZXN0ZGlnZXN0ZGlnZXN0",
    ],
)
def test_malformed_hash_is_false_not_an_exception(hashed: str) -> None:
    assert totp.check_recovery_code("abcde-fghjk", hashed) is False


def test_check_with_non_text_is_false() -> None:
    hashed = totp.hash_recovery_code("abcde-fghjk")
    assert totp.check_recovery_code(None, hashed) is False  # type: ignore[arg-type]
    assert totp.check_recovery_code("abcde-fghjk", None) is False  # type: ignore[arg-type]


def test_hash_refuses_empty_code() -> None:
    with pytest.raises(InputError, match="empty"):
        totp.hash_recovery_code(" - ")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("abcde-fghjk", True),
        ("ABCDE-FGHJK", True),
        ("abcdefghjk", True),
        (" abcde fghjk ", True),
        ("12345-6789a", True),
        ("123456", False),
        ("123 456", False),
        ("123-456", False),
        ("12345-67890", False),  # digits only: a mistyped TOTP code, not a recovery code
        ("abcde-fghj", False),
        ("abcde-fghjkm", False),
        ("abcde-fghj!", False),
        ("abcde-fghju", False),
        ("", False),
    ],
)
def test_looks_like_recovery_code(text: str, expected: bool) -> None:
    assert totp.looks_like_recovery_code(text) is expected


def test_totp_codes_never_look_like_recovery_codes() -> None:
    for i in range(100):
        code = totp.current_code(SECRET, NOW + 30 * i)
        assert not totp.looks_like_recovery_code(code)
        assert not totp.looks_like_recovery_code(f"{code[:3]} {code[3:]}")


# -- QR code ---------------------------------------------------------------------

URI = totp.provisioning_uri(SECRET, "alice", "Example Git")
ANSI = re.compile(r"\x1b\[[0-9;]*m")
HALF = {
    "\u2588": (True, True),
    "\u2580": (True, False),
    "\u2584": (False, True),
    " ": (False, False),
}


def _decode_half_blocks(text: str, ink_is_dark: bool = True) -> list[list[bool]]:
    rows: list[list[bool]] = []
    for line in text.split("\n"):
        pairs = [HALF[ch] for ch in line]
        rows.append([top == ink_is_dark for top, _ in pairs])
        rows.append([bottom == ink_is_dark for _, bottom in pairs])
    return rows


def _expected(data: str, border: int) -> list[list[bool]]:
    qr = segno.make(data, error="m", micro=False)
    size = 17 + 4 * int(qr.version)
    width = size + 2 * border
    rows = [[False] * width for _ in range(border)]
    rows += [[False] * border + [bool(b) for b in row] + [False] * border for row in qr.matrix]
    rows += [[False] * width for _ in range(border)]
    return rows


def test_qr_plain_dimensions_and_characters() -> None:
    text = totp.qr_text(URI, color=False)
    assert isinstance(text, str)
    assert not text.endswith("\n")
    lines = text.split("\n")
    qr = segno.make(URI, error="m", micro=False)
    size = 17 + 4 * int(qr.version)
    assert len(qr.matrix) == size
    assert len(lines) == (size + 8 + 1) // 2
    assert all(len(line) == size + 8 for line in lines)
    assert set(text) <= set(HALF) | {"\n"}
    assert {"\u2580", "\u2584", "\u2588"} <= set(text)
    # quiet zone: four blank columns each side and two blank lines on top
    assert all(line[:4] == line[-4:] == "    " for line in lines)
    assert lines[0].strip() == lines[1].strip() == ""


def test_qr_plain_renders_exactly_the_matrix() -> None:
    text = totp.qr_text(URI, color=False)
    decoded = _decode_half_blocks(text)
    expected = _expected(URI, 4)
    assert decoded[: len(expected)] == expected
    assert not any(any(row) for row in decoded[len(expected) :])  # padding row is light


def test_qr_inverted_draws_light_modules() -> None:
    plain = totp.qr_text(URI, color=False)
    inverted = totp.qr_text(URI, color=False, invert=True)
    assert inverted != plain
    expected = _expected(URI, 4)
    assert _decode_half_blocks(inverted, ink_is_dark=False)[: len(expected)] == expected


def test_qr_color_forces_black_on_white() -> None:
    text = totp.qr_text(URI)
    lines = text.split("\n")
    assert all(line.startswith("\x1b[30;107m") and line.endswith("\x1b[0m") for line in lines)
    stripped = ANSI.sub("", text)
    assert stripped == totp.qr_text(URI, color=False)


@pytest.mark.parametrize("border", [0, 1, 2, 4])
def test_qr_border(border: int) -> None:
    text = totp.qr_text(URI, color=False, border=border)
    expected = _expected(URI, border)
    decoded = _decode_half_blocks(text)
    assert decoded[: len(expected)] == expected
    assert all(len(line) == len(expected[0]) for line in text.split("\n"))


def test_qr_is_never_micro_and_grows_with_data() -> None:
    short = totp.qr_text("x", color=False)
    assert len(short.split("\n")[0]) == 21 + 8  # version 1, not a Micro QR
    long = totp.qr_text("otpauth://totp/" + "a" * 300, color=False)
    assert len(long.split("\n")[0]) > 21 + 8


def test_qr_does_not_print(capsys: pytest.CaptureFixture[str]) -> None:
    totp.qr_text(URI)
    assert capsys.readouterr() == ("", "")


# -- import weight ---------------------------------------------------------------


def test_importing_the_module_stays_light() -> None:
    script = (
        "import sys, gatekeeper.totp\n"
        "heavy = [m for m in ('pyotp', 'cryptography', 'segno', 'click', 'paramiko')"
        " if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == ""
