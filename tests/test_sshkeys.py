"""gatekeeper.sshkeys against real keys made by ssh-keygen, and against bad input."""

from __future__ import annotations

import base64
import shutil
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gatekeeper.errors import InputError
from gatekeeper.sshkeys import (
    PublicKey,
    fingerprint_of_blob,
    parse_key_blob_b64,
    parse_public_key,
)

pytestmark = pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="needs ssh-keygen")

# name -> ssh-keygen arguments
KEY_SPECS: dict[str, list[str]] = {
    "ed25519": ["-t", "ed25519"],
    "rsa2048": ["-t", "rsa", "-b", "2048"],
    "rsa3072": ["-t", "rsa", "-b", "3072"],
    "rsa1024": ["-t", "rsa", "-b", "1024"],
    "ecdsa256": ["-t", "ecdsa", "-b", "256"],
    "ecdsa384": ["-t", "ecdsa", "-b", "384"],
    "ecdsa521": ["-t", "ecdsa", "-b", "521"],
    "dsa": ["-t", "dsa"],
}
GOOD = ["ed25519", "rsa2048", "rsa3072", "ecdsa256", "ecdsa384", "ecdsa521"]
EXPECTED_TYPE = {
    "ed25519": "ssh-ed25519",
    "rsa2048": "ssh-rsa",
    "rsa3072": "ssh-rsa",
    "ecdsa256": "ecdsa-sha2-nistp256",
    "ecdsa384": "ecdsa-sha2-nistp384",
    "ecdsa521": "ecdsa-sha2-nistp521",
}


@dataclass(frozen=True)
class Generated:
    pub_path: Path
    pub_text: str
    private_text: str
    bits: int
    fingerprint: str


def keygen_fingerprint(pub: Path) -> tuple[int, str]:
    """(bits, fingerprint) as `ssh-keygen -lf` prints them."""
    out = subprocess.run(
        ["ssh-keygen", "-lf", str(pub)], check=True, capture_output=True, text=True
    ).stdout.split()
    return int(out[0]), out[1]


@pytest.fixture(scope="session")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Generated]:
    """Every key type, generated once per session, in parallel."""
    d = tmp_path_factory.mktemp("keys")
    procs = {
        name: subprocess.Popen(
            ["ssh-keygen", "-q", *args, "-N", "", "-C", f"test {name}", "-f", str(d / name)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for name, args in KEY_SPECS.items()
    }
    made: dict[str, Generated] = {}
    for name, proc in procs.items():
        if proc.wait() != 0:
            continue  # e.g. an ssh-keygen built without DSA
        pub = d / f"{name}.pub"
        bits, fp = keygen_fingerprint(pub)
        made[name] = Generated(
            pub, pub.read_text(), (d / name).read_text(), bits=bits, fingerprint=fp
        )
    return made


def ssh_string(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def ssh_mpint(value: int) -> bytes:
    raw = value.to_bytes((value.bit_length() + 8) // 8, "big") if value else b""
    return ssh_string(raw)


def b64(blob: bytes) -> str:
    return base64.b64encode(blob).decode()


def fields(blob: bytes) -> list[bytes]:
    out, pos = [], 0
    while pos < len(blob):
        (n,) = struct.unpack_from(">I", blob, pos)
        out.append(blob[pos + 4 : pos + 4 + n])
        pos += 4 + n
    return out


def refused(text: str) -> InputError:
    with pytest.raises(InputError) as info:
        parse_public_key(text)
    err = info.value
    assert err.hint, "every refusal carries a hint"
    assert "\n" not in err.message and "\n" not in err.hint
    return err


# --- real keys ---------------------------------------------------------------


@pytest.mark.parametrize("name", GOOD)
def test_real_key_matches_ssh_keygen(keys: dict[str, Generated], name: str) -> None:
    gen = keys[name]
    key = parse_public_key(gen.pub_text)
    key_type, data, comment = gen.pub_text.split(None, 2)
    assert key.key_type == key_type == EXPECTED_TYPE[name]
    assert key.fingerprint == gen.fingerprint
    assert key.bits == gen.bits
    assert key.comment == comment.strip() == f"test {name}"
    assert key.blob_b64 == data
    assert key.openssh_line() == f"{key_type} {data}"
    assert fingerprint_of_blob(key.blob) == gen.fingerprint
    # the AuthorizedKeysCommand form (%t %k) gives the same key, without a comment
    same = parse_key_blob_b64(key_type, data)
    assert (same.key_type, same.blob, same.bits, same.comment) == (
        key.key_type,
        key.blob,
        key.bits,
        "",
    )
    # and the line we write back parses to the same key
    assert parse_public_key(key.openssh_line()).blob == key.blob


def test_whitespace_crlf_and_missing_comment_are_fine(keys: dict[str, Generated]) -> None:
    key_type, data, _ = keys["ed25519"].pub_text.split(None, 2)
    for text in (
        f"  {key_type} {data}  \r\n",
        f"\n\n{key_type}\t{data}\n",
        f"# my laptop\n{key_type} {data} me@laptop\n",
    ):
        key = parse_public_key(text)
        assert key.fingerprint == keys["ed25519"].fingerprint
    assert parse_public_key(f"{key_type} {data}").comment == ""
    assert parse_public_key(f"{key_type} {data} a  b c").comment == "a  b c"


def test_security_key_types(keys: dict[str, Generated], tmp_path: Path) -> None:
    """sk-* keys (FIDO) can't be generated without hardware: build them from real points."""
    ed = fields(parse_public_key(keys["ed25519"].pub_text).blob)
    ec = fields(parse_public_key(keys["ecdsa256"].pub_text).blob)
    cases = {
        "sk-ssh-ed25519@openssh.com": ssh_string(b"sk-ssh-ed25519@openssh.com")
        + ssh_string(ed[1])
        + ssh_string(b"ssh:"),
        "sk-ecdsa-sha2-nistp256@openssh.com": ssh_string(b"sk-ecdsa-sha2-nistp256@openssh.com")
        + ssh_string(b"nistp256")
        + ssh_string(ec[2])
        + ssh_string(b"ssh:"),
    }
    for key_type, blob in cases.items():
        pub = tmp_path / "sk.pub"
        pub.write_text(f"{key_type} {b64(blob)} yubikey\n")
        bits, fp = keygen_fingerprint(pub)
        key = parse_public_key(pub.read_text())
        assert (key.key_type, key.fingerprint, key.bits, key.comment) == (
            key_type,
            fp,
            bits,
            "yubikey",
        )
        assert parse_key_blob_b64(key_type, b64(blob)).fingerprint == fp
        # the application string is part of the key: without it the blob is truncated
        with pytest.raises(InputError, match="truncated"):
            parse_key_blob_b64(key_type, b64(blob[: -len(ssh_string(b"ssh:"))]))


# --- weak keys -----------------------------------------------------------------


def test_rsa_1024_refused_with_size_and_advice(keys: dict[str, Generated]) -> None:
    err = refused(keys["rsa1024"].pub_text)
    assert "1024" in err.message and "2048" in err.message
    assert "ssh-keygen -t ed25519" in (err.hint or "")
    key_type, data, _ = keys["rsa1024"].pub_text.split(None, 2)
    with pytest.raises(InputError, match="1024"):
        parse_key_blob_b64(key_type, data)


def dsa_line(keys: dict[str, Generated]) -> str:
    if "dsa" in keys:
        return keys["dsa"].pub_text
    # ssh-keygen without DSA support: a structurally plausible ssh-dss blob by hand
    blob = ssh_string(b"ssh-dss") + b"".join(ssh_mpint(v) for v in (2**1023 + 1, 7, 5, 3))
    return f"ssh-dss {b64(blob)} old key"


def test_dsa_refused(keys: dict[str, Generated]) -> None:
    err = refused(dsa_line(keys))
    assert "DSA" in err.message and "ssh-dss" in err.message
    assert "ssh-keygen -t ed25519" in (err.hint or "")
    _, data, *_ = dsa_line(keys).split()
    with pytest.raises(InputError, match="DSA"):
        parse_key_blob_b64("ssh-dss", data)


# --- bad input -----------------------------------------------------------------


@pytest.mark.parametrize("text", ["", "   ", "\n\n", "# just a comment\n"])
def test_empty(text: str) -> None:
    assert "no public key" in refused(text).message


@pytest.mark.parametrize(
    "text",
    [
        "hello world",
        "hello",
        "AAAAC3NzaC1lZDI1NTE5AAAAI",
        "https://example.com/key.pub",
        "\x00\x1b",
    ],
)
def test_garbage(text: str) -> None:
    err = refused(text)
    assert "not an OpenSSH public key" in err.message
    assert "ssh-ed25519" in (err.hint or "")


@pytest.mark.parametrize("data", ["AAAA$$$$", "AAAAC3Nz aC1l", "AAAA-_xx", "AAAA==AA"])
def test_bad_base64(data: str) -> None:
    err = refused(f"ssh-ed25519 {data}")
    if " " in data:  # the second half becomes the comment; the first is just short
        assert "truncated" in err.message
    else:
        assert "base64" in err.message


def test_base64_of_something_else() -> None:
    err = refused(f"ssh-ed25519 {b64(b'just some text, not a key')}")
    assert "not SSH key data" in err.message


@pytest.mark.parametrize("name", ["ed25519", "rsa2048", "ecdsa384"])
def test_truncated(keys: dict[str, Generated], name: str) -> None:
    key_type, data, _ = keys[name].pub_text.split(None, 2)
    for cut in sorted({8, 13, len(data) // 2, len(data) // 2 + 1, len(data) - 5}):
        err = refused(f"{key_type} {data[:cut]} me@host")
        assert "truncated" in err.message, (cut, err.message)
        assert ".pub" in (err.hint or "")
    with pytest.raises(InputError, match="truncated"):
        parse_key_blob_b64(key_type, data[: len(data) // 2])
    err = refused(key_type)
    assert "no key data" in err.message


def test_type_mismatch(keys: dict[str, Generated]) -> None:
    _, data, _ = keys["ed25519"].pub_text.split(None, 2)
    err = refused(f"ssh-rsa {data} me@host")
    assert "mismatch" in err.message
    assert "ssh-rsa" in err.message and "ssh-ed25519" in err.message
    with pytest.raises(InputError, match="mismatch"):
        parse_key_blob_b64("ecdsa-sha2-nistp256", data)


@pytest.mark.parametrize(
    "text",
    [
        "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n",
        "-----BEGIN RSA PRIVATE KEY-----\nMIIEow...\n-----END RSA PRIVATE KEY-----",
        "-----BEGIN PRIVATE KEY-----\nMIIE\n-----END PRIVATE KEY-----\n",
        "BEGIN OPENSSH PRIVATE KEY",
        "PuTTY-User-Key-File-3: ssh-ed25519\nEncryption: none\n",
    ],
)
def test_private_key_text(text: str) -> None:
    err = refused(text)
    assert "private key" in err.message and "never share it" in err.message
    assert ".pub" in err.message


@pytest.mark.parametrize("name", ["ed25519", "rsa2048"])
def test_real_private_key_file(keys: dict[str, Generated], name: str) -> None:
    err = refused(keys[name].private_text)
    assert "this is a private key; never share it" in err.message


def test_rfc4716_putty_public_key(keys: dict[str, Generated]) -> None:
    rfc4716 = subprocess.run(
        ["ssh-keygen", "-e", "-f", str(keys["ed25519"].pub_path)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert "---- BEGIN SSH2 PUBLIC KEY ----" in rfc4716
    err = refused(rfc4716)
    assert "RFC 4716" in err.message
    assert "ssh-keygen -i -f" in (err.hint or "")


def test_pem_public_key(keys: dict[str, Generated]) -> None:
    pem = subprocess.run(
        ["ssh-keygen", "-e", "-m", "PKCS8", "-f", str(keys["rsa2048"].pub_path)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    err = refused(pem)
    assert "PEM" in err.message
    assert "ssh-keygen -i -m PKCS8" in (err.hint or "")


def test_two_keys(keys: dict[str, Generated]) -> None:
    a, b = keys["ed25519"].pub_text.strip(), keys["rsa2048"].pub_text.strip()
    for text in (f"{a}\n{b}\n", f"{a}\n\n{a}", f"{a} {b}", f"{a}, {b}", f"{a}\r\n{b}"):
        err = refused(text)
        assert "more than one public key" in err.message
    # pasted with no separator at all: the second key lands inside the base64
    key_type, data, _ = a.split(None, 2)
    err = refused(f"{key_type} {data}{b}")
    assert "more than one public key" in err.message


def test_key_wrapped_over_lines(keys: dict[str, Generated]) -> None:
    key_type, data, _ = keys["rsa2048"].pub_text.split(None, 2)
    err = refused(f"{key_type} {data[:200]}\n{data[200:]}\n")
    assert "one line" in err.message
    assert "join" in (err.hint or "")


@pytest.mark.parametrize(
    "options",
    [
        "restrict",
        'command="/usr/bin/gatekeeper-shell user-1",restrict',
        'no-pty,from="10.0.0.0/8,192.168.1.1" environment="A=b c"',
    ],
)
def test_authorized_keys_options_refused(keys: dict[str, Generated], options: str) -> None:
    for name in ("ed25519", "ecdsa256"):
        err = refused(f"{options} {keys[name].pub_text}")
        assert "options" in err.message
        assert "authorized_keys" in err.message


def test_unsupported_and_certificate_types(keys: dict[str, Generated]) -> None:
    blob = ssh_string(b"ssh-foo") + ssh_string(b"x" * 32)
    err = refused(f"ssh-foo {b64(blob)} me")
    assert "unsupported key type" in err.message and "ssh-foo" in err.message
    assert "ssh-ed25519" in (err.hint or "")
    cert_type = "ssh-ed25519-cert-v01@openssh.com"
    err = refused(f"{cert_type} {b64(ssh_string(cert_type.encode()) + b'x')} me")
    assert "certificates" in err.message
    with pytest.raises(InputError, match="unsupported"):
        parse_key_blob_b64("ssh-foo", b64(blob))
    with pytest.raises(InputError, match="not an SSH key type"):
        parse_key_blob_b64("ssh ed25519\x1b", "AAAA")
    with pytest.raises(InputError, match="no public key"):
        parse_key_blob_b64("", "")


def test_structural_damage(keys: dict[str, Generated]) -> None:
    ed = fields(parse_public_key(keys["ed25519"].pub_text).blob)
    ec = fields(parse_public_key(keys["ecdsa256"].pub_text).blob)
    rsa = fields(parse_public_key(keys["rsa2048"].pub_text).blob)
    point = bytearray(ec[2])
    point[-1] ^= 1
    bad = {
        "unexpected bytes": ("ssh-ed25519", ssh_string(b"ssh-ed25519") + ssh_string(ed[1]) + b"\0"),
        "32 bytes": ("ssh-ed25519", ssh_string(b"ssh-ed25519") + ssh_string(ed[1][:31])),
        "curve name": (
            "ecdsa-sha2-nistp256",
            ssh_string(b"ecdsa-sha2-nistp256") + ssh_string(b"nistp384") + ssh_string(ec[2]),
        ),
        "point size": (
            "ecdsa-sha2-nistp256",
            ssh_string(b"ecdsa-sha2-nistp256") + ssh_string(b"nistp256") + ssh_string(ec[2][:-1]),
        ),
        "not on the nistp256 curve": (
            "ecdsa-sha2-nistp256",
            ssh_string(b"ecdsa-sha2-nistp256") + ssh_string(b"nistp256") + ssh_string(bytes(point)),
        ),
        "negative": ("ssh-rsa", ssh_string(b"ssh-rsa") + ssh_string(rsa[1]) + ssh_string(b"\xff")),
        "leading zero": (
            "ssh-rsa",
            ssh_string(b"ssh-rsa") + ssh_string(b"\0" + rsa[1]) + ssh_string(rsa[2]),
        ),
        "exponent": ("ssh-rsa", ssh_string(b"ssh-rsa") + ssh_mpint(2) + ssh_string(rsa[2])),
        "modulus": ("ssh-rsa", ssh_string(b"ssh-rsa") + ssh_string(rsa[1]) + ssh_mpint(2**2048)),
    }
    for expected, (key_type, blob) in bad.items():
        err = refused(f"{key_type} {b64(blob)}")
        assert "damaged" in err.message and expected in err.message, err.message
    # RSA with e but no n is truncated, not accepted
    err = refused(f"ssh-rsa {b64(ssh_string(b'ssh-rsa') + ssh_string(rsa[1]))}")
    assert "truncated" in err.message


def test_oversized_input() -> None:
    assert "too long" in refused("ssh-ed25519 " + "A" * 70_000).message


# --- comments ------------------------------------------------------------------


def test_comment_control_characters_replaced(keys: dict[str, Generated]) -> None:
    key_type, data, _ = keys["ed25519"].pub_text.split(None, 2)
    key = parse_public_key(f"{key_type} {data} \x1b[31mred\x07\tbell\u202eevil\x7f \r\n")
    assert key.comment.isprintable()
    assert key.comment == "?[31mred? bell?evil?"
    odd = parse_public_key(f"{key_type} {data} a\x1eb\x85c\u2028d\u00a0e")
    assert odd.comment == "a b c d e"  # separators become spaces, not lines
    long = parse_public_key(f"{key_type} {data} {'x' * 500}")
    assert long.comment == "x" * 200
    assert isinstance(long, PublicKey)


def test_messages_do_not_echo_control_characters() -> None:
    blob = ssh_string(b"ssh-\x1b[2Jfoo") + ssh_string(b"x")
    err = refused(f"ssh-rsa {b64(blob)}")
    assert "\x1b" not in err.message


# --- robustness and hot-path hygiene ------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.text(max_size=300),
        st.builds(
            lambda t, d, c: f"{t} {d} {c}",
            st.sampled_from(["ssh-ed25519", "ssh-rsa", "ecdsa-sha2-nistp521", "ssh-dss", "x"]),
            st.binary(max_size=120).map(lambda b: base64.b64encode(b).decode()),
            st.text(max_size=20),
        ),
    )
)
def test_never_anything_but_input_error(text: str) -> None:
    try:
        key = parse_public_key(text)
    except InputError as err:
        assert err.message and err.hint
    else:
        assert key.fingerprint.startswith("SHA256:")


def test_imports_only_the_standard_library() -> None:
    code = (
        "import sys, gatekeeper.sshkeys as m\n"
        "bad = {'cryptography', 'paramiko', 'click', 'pyotp', 'sqlite_utils', 'yaml'}\n"
        "print(sorted(bad & {n.split('.')[0] for n in sys.modules}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True
    ).stdout
    assert out.strip() == "[]"
