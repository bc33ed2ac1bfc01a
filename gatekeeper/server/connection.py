"""gatekeeper serve: the embedded SSH server, for a git box without an OpenSSH to configure.

    accept -> one thread per connection -> paramiko Transport (its own thread)
    -> publickey: identity only from a key whose signature we verified
    -> optional keyboard-interactive code (two_factor.keyboard_interactive)
    -> exec/shell -> `python -m gatekeeper.shell --config CONFIG KEY_ID`, pumped both ways

The server decides only *who* is connecting. *What* they may do is decided by the same
forced command that OpenSSH runs (`gatekeeper.shell`), spawned with an environment
built from scratch, so the decision, the messages and the audit records are the same
whichever SSH server carried the connection.

Identity (docs/design.md, "Security rules": identity comes only from the key that signed):
paramiko calls `check_auth_publickey` *before* it checks a signature, both for a
client's "would you accept this key?" query and for the signed request, with the same
kind of key object. So this module reads each publickey request itself (a small
`AuthHandler` subclass) and, for a signed request, verifies the signature over the
session blob (RFC 4252, section 7) before it records anyone. A query never records
anything, and once a key is verified the identity cannot change within the connection.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import os
import secrets
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from types import FrameType
from typing import IO, TYPE_CHECKING, Any, cast

import paramiko
from paramiko.auth_handler import AuthHandler
from paramiko.common import (
    AUTH_FAILED,
    AUTH_PARTIALLY_SUCCESSFUL,
    AUTH_SUCCESSFUL,
    OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED,
    OPEN_FAILED_RESOURCE_SHORTAGE,
    OPEN_SUCCEEDED,
    cMSG_DISCONNECT,
    cMSG_USERAUTH_REQUEST,
)
from paramiko.message import Message
from paramiko.server import InteractiveQuery

from gatekeeper import decision, frontend, logs, seckey, sshcmd, sshkeys, twofactor
from gatekeeper.errors import GatekeeperError, InputError, Refused, StoreError, render
from gatekeeper.policy import Policy
from gatekeeper.record import evolve
from gatekeeper.store import ConnectionFacts, KeyRecord, Store

log = logging.getLogger("gatekeeper.server")

HOST_KEY_NAME = "ssh_host_ed25519_key"
CHUNK = 64 * 1024
# A longer command is not handed over: UTF-8 spends at most 4 bytes on a character,
# so it is longer than the forced command takes (sshcmd.MAX_COMMAND_LENGTH).
MAX_COMMAND_BYTES = 4 * sshcmd.MAX_COMMAND_LENGTH
MAX_PACKET_BYTES = 256 * 1024  # what OpenSSH accepts; paramiko reads any length it is told
MAX_GIT_PROTOCOL_BYTES = 256
MAX_SESSIONS_PER_CONNECTION = 10
KBD_PROMPT = "Verification code: "
KEYS_REFRESH_SECONDS = 60.0
DISCONNECT_TOO_MANY_CONNECTIONS = 12  # RFC 4253, section 11.1
TOO_MANY_CONNECTIONS = "gatekeeper: too many connections right now; try again in a moment."


@dataclass(frozen=True)
class Startups:
    """OpenSSH's `MaxStartups start:rate:full`, for connections not authenticated yet:
    below `start` every one is served; from `start` on a new one is dropped with a
    probability of `rate` percent, rising linearly to 100% at `full`.

    OpenSSH's 10:30:100 suits its login grace time and a process per connection. Here a
    connection waits at most `auth_timeout` (a sixth of OpenSSH's default) and costs two
    threads, so the defaults are larger: `start` is above a hundred silent clients plus
    those logging in beside them, so such a flood costs no one a connection; `full`
    bounds what a bigger one can hold, and holding it takes `full / auth_timeout` new
    connections a second, some thirty times what OpenSSH's defaults take."""

    start: int = 128
    rate: int = 30
    full: int = 512

    def __post_init__(self) -> None:
        if not 1 <= self.start <= self.full or not 1 <= self.rate <= 100:
            raise ValueError(
                "max startups must be START:RATE:FULL with 1 <= START <= FULL and "
                "RATE a percentage from 1 to 100"
            )

    @classmethod
    def parse(cls, text: str) -> Startups:
        """`START:RATE:FULL`, or one number N (`N:100:N`, drop all from N on), as in
        sshd_config. Raises ValueError with what is wrong."""
        parts = text.split(":")
        if len(parts) not in (1, 3) or not all(p.isdigit() for p in parts):
            raise ValueError(f"expected START:RATE:FULL (like 128:30:512), not {text!r}")
        if len(parts) == 1:
            return cls(int(parts[0]), 100, int(parts[0]))
        return cls(int(parts[0]), int(parts[1]), int(parts[2]))

    def drop_percent(self, waiting: int) -> int:
        """The chance, in percent, that a new connection is dropped while `waiting`
        connections are not authenticated yet."""
        if waiting < self.start:
            return 0
        if waiting >= self.full:
            return 100
        return self.rate + (100 - self.rate) * (waiting - self.start) // (self.full - self.start)

    def __str__(self) -> str:
        return f"{self.start}:{self.rate}:{self.full}"


@dataclass(frozen=True)
class Limits:
    """The knobs that keep one client from hurting the others."""

    max_connections: int = 64
    """Authenticated connections served at once; while they are all taken a new
    connection is closed at once, and one that authenticates is told so and closed.
    Connections still logging in count against `max_startups` instead."""
    max_startups: Startups = field(default_factory=Startups)
    """Random early drop of connections that have not authenticated yet."""
    max_unauthenticated_per_source: int | None = None
    """Connections one address may have before authenticating (None: half of
    `max_startups.start`), so one host alone cannot make the others be dropped."""
    auth_timeout: float = 20.0
    """Seconds from accept to a completed authentication, the banner and key exchange
    included (OpenSSH's LoginGraceTime); also from there to a session."""
    max_auth_tries: int = 6
    """Failed authentication attempts (offered keys included) before disconnecting."""
    session_start_timeout: float = 30.0
    """Seconds between opening a session channel and asking for a command."""
    stall_timeout: float = 600.0
    """Seconds a client may leave us unable to send (window closed) before we drop it."""
    grace: float = 10.0
    """On SIGTERM/SIGINT: seconds open sessions get to finish before they are closed."""

    @property
    def per_source(self) -> int:
        if self.max_unauthenticated_per_source is not None:
            return self.max_unauthenticated_per_source
        return max(1, self.max_startups.start // 2)


# -- host key ----------------------------------------------------------------------


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


# -- authentication ----------------------------------------------------------------


@dataclass(frozen=True)
class PublickeyRequest:
    """One SSH_MSG_USERAUTH_REQUEST for "publickey", as the client sent it."""

    username: str
    service: str
    algorithm: str
    key_blob: bytes
    signature: bytes | None
    """None for a query ("would you accept this key?"), which proves nothing."""


def _peek_publickey(m: Message) -> PublickeyRequest | None:
    """Parse a publickey request without consuming `m` (paramiko reads it afterwards)."""
    try:
        copy = Message(m.get_remainder())
        username = copy.get_text()
        service = copy.get_text()
        if copy.get_text() != "publickey":
            return None
        signed = copy.get_boolean()
        algorithm = copy.get_text()
        blob = copy.get_binary()
        signature = copy.get_binary() if signed else None
    except Exception:  # noqa: BLE001 - a mangled request is simply not a publickey request
        return None
    return PublickeyRequest(username, service, algorithm, blob, signature)


if TYPE_CHECKING:

    class _Transport(paramiko.Transport):
        def _send_message(self, data: Message) -> None: ...

    class _StockAuthHandler:
        """The part of paramiko's (private) AuthHandler this module relies on; its type
        stubs leave these out. Checked against paramiko 3.4 to 5.1."""

        transport: _Transport
        auth_fail_count: int

        def __init__(self, transport: paramiko.Transport) -> None: ...
        def _disconnect_no_more_auth(self) -> None: ...
        def _parse_service_request(self, m: Message) -> None: ...
        def _parse_userauth_request(self, m: Message) -> None: ...
        def _parse_userauth_info_response(self, m: Message) -> None: ...
        def _generate_key_from_request(
            self, algorithm: str, keyblob: bytes
        ) -> paramiko.PKey | None: ...
        def _send_auth_result(self, username: str, method: str, result: int) -> None: ...

else:
    _StockAuthHandler = AuthHandler


class SecurityKeyPKey(paramiko.PKey):
    """A FIDO2 `sk-` public key for paramiko's server side, which has none: parsed and
    checked by `seckey` (PROTOCOL.u2f). `verify_ssh_sig` answers whether the signature
    is the key's; what its flags and counter assert is read with `assertion`."""

    def __init__(self, blob: bytes) -> None:
        self.public = seckey.parse_public_key(blob)

    def asbytes(self) -> bytes:
        return self.public.blob

    def get_name(self) -> str:
        return self.public.key_type

    def get_bits(self) -> int:
        return 256

    def can_sign(self) -> bool:
        return False

    def verify_ssh_sig(self, data: bytes, msg: Message) -> bool:
        try:
            self.assertion(data, msg.asbytes())
        except seckey.BadSignature:
            return False
        return True

    def assertion(self, data: bytes, signature: bytes) -> seckey.Assertion:
        return seckey.verify(self.public, data, signature)


class _AuthHandler(_StockAuthHandler):
    """Stock server-side auth with three additions: the connection sees every publickey
    request before paramiko acts on it, failed attempts are capped, and security keys
    (`sk-`, which paramiko does not know) are parsed by gatekeeper."""

    def __init__(self, transport: paramiko.Transport, conn: Connection) -> None:
        super().__init__(transport)
        self._conn = conn

    def _parse_service_request(self, m: Message) -> None:
        if not self.transport.initial_kex_done:
            self._disconnect_no_more_auth()
            return
        super()._parse_service_request(m)

    def _parse_userauth_request(self, m: Message) -> None:
        if not self.transport.initial_kex_done:
            self._disconnect_no_more_auth()
            return
        self._conn.current_request = _peek_publickey(m)
        try:
            super()._parse_userauth_request(m)
        finally:
            self._conn.current_request = None

    def _generate_key_from_request(self, algorithm: str, keyblob: bytes) -> paramiko.PKey | None:
        if sshkeys.is_security_key(algorithm):
            try:
                return SecurityKeyPKey(keyblob)
            except seckey.BadSignature as exc:
                self._conn.note(f"malformed security key: {exc}")
                return None
        return super()._generate_key_from_request(algorithm, keyblob)

    def _parse_userauth_info_response(self, m: Message) -> None:
        if not self.transport.initial_kex_done:
            self._disconnect_no_more_auth()
            return
        super()._parse_userauth_info_response(m)

    def _send_auth_result(self, username: str, method: str, result: int) -> None:
        if result == AUTH_SUCCESSFUL and not self._conn.server.admit(self._conn):
            # Said before the success it replaces: the client reads why, not a reset.
            self._conn.note(f"refused: {self._conn.limits.max_connections} connections open")
            self._disconnect(DISCONNECT_TOO_MANY_CONNECTIONS, TOO_MANY_CONNECTIONS)
            return
        super()._send_auth_result(username, method, result)
        if self.auth_fail_count >= self._conn.limits.max_auth_tries and self.transport.is_active():
            self._conn.note("too many authentication attempts")
            self._disconnect_no_more_auth()

    def _disconnect(self, code: int, text: str) -> None:
        m = Message()
        m.add_byte(cMSG_DISCONNECT)
        m.add_int(code)
        m.add_string(text)
        m.add_string("en")
        self.transport._send_message(m)
        self.transport.close()


def needs_verified(policy: Policy, facts: ConnectionFacts, now: float) -> bool:
    """Whether any repository this user can reach needs a verified session (then the
    in-band code is worth asking for; otherwise it would only be in the way)."""
    from gatekeeper.usercmd import list_repositories

    ufacts = frontend.user_facts(facts)
    when = datetime.fromtimestamp(now, timezone.utc)
    for repo in list_repositories(policy.server.repositories):
        for action in ("read", "write"):
            verdict = decision.decide(policy, ufacts, repo, action, when)
            if verdict.reason != decision.NOT_AUTHORIZED and verdict.level == "verified":
                return True
    return False


def _bound_packets(transport: paramiko.Transport) -> None:
    """Refuse a packet longer than MAX_PACKET_BYTES before reading it, not after: a
    client could otherwise make us hold as much as it cares to send, unauthenticated."""
    packetizer = transport.packetizer
    read_all = packetizer.read_all

    def bounded(n: int, check_rekey: bool = False) -> bytes:
        if n > MAX_PACKET_BYTES:
            raise paramiko.SSHException(f"a packet of {n} bytes (at most {MAX_PACKET_BYTES})")
        return read_all(n, check_rekey)

    packetizer.read_all = bounded  # type: ignore[method-assign]


def _session_blob(session_id: bytes, req: PublickeyRequest) -> bytes:
    """What the client signs for publickey authentication (RFC 4252, section 7)."""
    m = Message()
    m.add_string(session_id)
    m.add_byte(cMSG_USERAUTH_REQUEST)
    m.add_string(req.username)
    m.add_string(req.service)
    m.add_string("publickey")
    m.add_boolean(True)
    m.add_string(req.algorithm)
    m.add_string(req.key_blob)
    return m.asbytes()


# -- sessions ----------------------------------------------------------------------


@dataclass
class Session:
    """What one session channel asked for (filled in by the transport thread)."""

    channel: paramiko.Channel
    command: str | None = None
    git_protocol: str | None = None
    refusal: InputError | None = None
    """Set for a command that cannot be handed to the forced command whole: its
    refusal, in the forced command's words, is answered here."""
    started: threading.Event = field(default_factory=threading.Event)
    pty: bool = False
    """The client asked for a terminal (`ssh git@HOST` from one). None is allocated; the
    output gets the `\r\n` line ends a terminal in raw mode needs."""


def _decode(raw: bytes | str) -> str:
    return raw if isinstance(raw, str) else raw.decode("utf-8", "surrogateescape")


class Connection(paramiko.ServerInterface):
    """One client connection: authentication callbacks and its sessions."""

    def __init__(
        self,
        server: GatekeeperServer,
        sock: socket.socket,
        peer: tuple[str, int],
        number: int,
    ) -> None:
        self.server = server
        self.sock = sock
        self.peer = peer
        self.number = number
        self.limits = server.limits
        self.policy: Policy | None = None
        self.store: Store | None = None
        self.transport: paramiko.Transport | None = None
        self.current_request: PublickeyRequest | None = None
        self.key: KeyRecord | None = None
        """Set only once this key's signature was verified; never changed after."""
        self.fault: Refused | None = None
        """Set when the policy or the store could not be loaded: a remembered key may
        then log in, only to read this refusal (see `RememberedKeys`)."""
        self.needs_code = False
        self.second_factor = "-"
        self.factor: str | None = None
        """What the security key that signed proved (touch, touch+pin), checked here."""
        self.code_error: str | None = None
        self.sessions: dict[int, Session] = {}
        self.lock = threading.Lock()
        self.events: list[str] = []
        self.started = time.monotonic()
        self.admitted = threading.Event()
        """Set once authenticated and given one of the `max_connections` slots."""

    # -- helpers --

    @property
    def client_ip(self) -> str:
        return self.peer[0]

    def note(self, event: str) -> None:
        """Something for this connection's one log line."""
        with self.lock:
            if len(self.events) < 20:
                self.events.append(event)

    def _load(self) -> tuple[Policy, Store] | None:
        """The current policy and the store, opened once per connection; None: the
        server is at fault (`self.fault` says what to tell the client)."""
        if self.fault is not None:
            return None
        if self.policy is None or self.store is None:
            try:
                self.policy, self.store = frontend.load(
                    str(self.server.config_path), self.server.fault_seen, light=False
                )
            except Refused as exc:
                self._at_fault(exc)
                return None
            self.server.fault_cleared()
        return self.policy, self.store

    def _at_fault(self, refusal: Refused) -> None:
        self.fault = refusal
        self.note(f"server fault: {refusal.message}")

    def _find_key(self, username: str, fingerprint: str) -> KeyRecord | None:
        """The key with this fingerprint if `username` is the git account, from the
        store or, when the server is at fault, from the keys it last read."""
        loaded = self._load()
        if loaded is not None:
            policy, store = loaded
            if username != policy.server.user:
                self.note(f"wrong user {username[:64]!r}")
                return None
            try:
                record = store.key_by_fingerprint(fingerprint)
            except GatekeeperError as exc:
                self.server.fault_seen(f"key lookup failed: {' | '.join(exc.lines())}")
                self._at_fault(frontend.store_refusal())
            else:
                self.server.known.note(policy.server.user, fingerprint, record)
                if record is None:
                    self.note(f"unknown key {fingerprint}")
                return record
        record = self.server.known.find(username, fingerprint)
        if record is None:
            self.note(f"unknown key {fingerprint} (or wrong user {username[:64]!r})")
        return record

    # -- authentication callbacks (paramiko's transport thread) --

    def get_allowed_auths(self, username: str) -> str:
        if self.key is not None and self.needs_code:
            return "keyboard-interactive"
        return "publickey"

    def check_auth_none(self, username: str) -> int:
        return AUTH_FAILED

    def check_auth_password(self, username: str, password: str) -> int:
        return AUTH_FAILED

    def check_auth_publickey(self, username: str, key: paramiko.PKey) -> int:
        req = self.current_request
        if req is None or self.key is not None:
            # No request we parsed ourselves, or a key is already verified (the
            # second factor is pending): nothing here may change who this is.
            return AUTH_FAILED
        assert self.transport is not None
        if req.username != username or key.asbytes() != req.key_blob:
            return AUTH_FAILED
        if req.algorithm.endswith("-cert-v01@openssh.com"):
            self.note("certificate refused")
            return AUTH_FAILED
        fingerprint = key_fingerprint(key)
        record = self._find_key(username, fingerprint)
        if record is None:
            return AUTH_FAILED
        if req.signature is None:
            # A query: say the key would do (SSH_MSG_USERAUTH_PK_OK); record nothing.
            return AUTH_SUCCESSFUL
        session_id = self.transport.session_id
        try:
            valid = session_id is not None and key.verify_ssh_sig(
                _session_blob(session_id, req), Message(req.signature)
            )
        except Exception:  # noqa: BLE001 - a malformed signature is a bad signature
            valid = False
        if not valid:
            self.note(f"bad signature for {fingerprint}")
            return AUTH_FAILED
        if isinstance(key, SecurityKeyPKey):
            assert session_id is not None
            factor = self._security_key_factor(key, record, _session_blob(session_id, req), req)
            if factor is None:
                return AUTH_FAILED
            self.factor = factor
        self.key = record
        self.needs_code = self.fault is None and self._wants_code(record)
        return AUTH_PARTIALLY_SUCCESSFUL if self.needs_code else AUTH_SUCCESSFUL

    def _security_key_factor(
        self, key: SecurityKeyPKey, record: KeyRecord, data: bytes, req: PublickeyRequest
    ) -> str | None:
        """What sshd enforces for a security key, and one check beyond it: a touch on
        every signature, the PIN where the key is registered to need it, and a
        signature counter that grows (one that does not is a cloned authenticator:
        refused and audited). None refuses the signature."""
        assert req.signature is not None
        try:
            said = key.assertion(data, req.signature)
        except seckey.BadSignature:
            return None
        if not said.user_present:
            self.note(f"security key {record.fingerprint} signed without a touch")
            return None
        if record.verify_required and not said.user_verified:
            self.note(f"security key {record.fingerprint} signed without its PIN")
            return None
        if self.store is not None and self.fault is None:
            try:
                fresh = self.store.advance_sk_counter(record, said.counter, client=self.client_ip)
            except GatekeeperError as exc:
                self.server.fault_seen(f"security key counter: {' | '.join(exc.lines())}")
                return None
            if not fresh:
                self.note(
                    f"security key {record.fingerprint}: counter {said.counter} does not "
                    "grow (a cloned authenticator?)"
                )
                return None
        return "touch+pin" if said.user_verified and record.verify_required else "touch"

    def _wants_code(self, record: KeyRecord) -> bool:
        """Ask for a code in-band: enrolled, not locked, no current session for this key,
        and some repository the user can reach needs one."""
        assert self.policy is not None and self.store is not None
        if not self.policy.two_factor.keyboard_interactive:
            return False
        now = time.time()
        try:
            facts = self.store.connection_facts(record.id, now)
        except GatekeeperError:
            return False  # the forced command will refuse with the store's message
        if facts is None or not facts.enrolled or facts.locked_until is not None:
            return False
        if facts.verified_until is not None and facts.verified_until > now:
            self.second_factor = "session"
            return False
        return needs_verified(self.policy, facts, now)

    def _query(self) -> InteractiveQuery:
        assert self.key is not None
        lines = []
        if self.code_error:
            lines.append(self.code_error)
        lines.append(
            f"Two-step verification for {self.key.user}: enter the code from your "
            "authenticator app (or a recovery code),"
        )
        lines.append("or press Enter to go on without (repositories that need it will refuse).")
        return InteractiveQuery("gatekeeper", "\n".join(lines), (KBD_PROMPT, False))

    def check_auth_interactive(self, username: str, submethods: str) -> Any:
        if self.key is None or not self.needs_code or self.policy is None:
            return AUTH_FAILED
        if username != self.policy.server.user:
            self.note(f"wrong user {username[:64]!r}")
            return AUTH_FAILED
        return self._query()

    def check_auth_interactive_response(self, responses: list[str]) -> Any:
        if self.key is None or not self.needs_code:
            return AUTH_FAILED
        assert self.policy is not None and self.store is not None
        code = responses[0].strip() if len(responses) == 1 else None
        if code is None:
            return AUTH_FAILED
        if code == "":
            self.second_factor = "skipped"
            self.needs_code = False
            return AUTH_SUCCESSFUL
        try:
            twofactor.verify(self.store, self.policy, self.key, code, client=self.client_ip)
        except GatekeeperError as exc:
            shown = exc.for_client() if isinstance(exc, StoreError) else exc
            self.code_error = " ".join(shown.lines())
            self.note(f"code refused: {exc.message}")
            return AUTH_FAILED
        self.second_factor = "verified"
        self.needs_code = False
        return AUTH_SUCCESSFUL

    # -- channel callbacks (paramiko's transport thread) --

    def check_channel_request(self, kind: str, chanid: int) -> int:
        if kind != "session":
            self.note(f"refused channel {kind[:32]}")
            return OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED
        with self.lock:
            if len(self.sessions) >= MAX_SESSIONS_PER_CONNECTION:
                return OPEN_FAILED_RESOURCE_SHORTAGE
        return OPEN_SUCCEEDED

    def _session(self, channel: paramiko.Channel) -> Session | None:
        with self.lock:
            sess = self.sessions.get(channel.get_id())
            if sess is None:
                sess = self.sessions[channel.get_id()] = Session(channel)
        return None if sess.started.is_set() else sess

    def check_channel_env_request(
        self, channel: paramiko.Channel, name: bytes, value: bytes
    ) -> bool:
        sess = self._session(channel)
        if sess is None or _decode(name) != "GIT_PROTOCOL":
            return False
        text = _decode(value)
        if len(text) > MAX_GIT_PROTOCOL_BYTES or not text.isprintable():
            return False
        sess.git_protocol = text  # the forced command validates it again
        return True

    def check_channel_exec_request(self, channel: paramiko.Channel, command: bytes) -> bool:
        sess = self._session(channel)
        if sess is None:
            return False
        text = _decode(command)
        if len(command) > MAX_COMMAND_BYTES or "\0" in text:
            # No environment variable holds a NUL, and a long command need not be kept
            # whole: the same parser says what the forced command would, and only
            # what its audit record keeps is kept.
            try:
                sshcmd.parse_command(text)
            except InputError as exc:
                sess.refusal = exc
                text = text[: frontend.BAD_COMMAND_KEPT]
            else:
                text = text[:MAX_COMMAND_BYTES]  # only blanks parse: still blanks
        sess.command = text
        sess.started.set()
        return True

    def check_channel_shell_request(self, channel: paramiko.Channel) -> bool:
        # No command: the forced command prints who you are and what you can reach.
        sess = self._session(channel)
        if sess is None:
            return False
        sess.started.set()
        return True

    def check_channel_pty_request(self, channel: paramiko.Channel, *args: Any) -> bool:
        # Granted in name only, as users of other git hosts expect from `ssh git@HOST`
        # in a terminal: no terminal is made, nothing interactive runs, and refusing it
        # only put "PTY allocation request failed" before the answer.
        sess = self._session(channel)
        if sess is None:
            return False
        sess.pty = True
        return True

    def check_channel_subsystem_request(self, channel: paramiko.Channel, name: str) -> bool:
        self.note(f"subsystem {name[:32]} refused")
        return False

    def check_channel_x11_request(self, *args: Any) -> bool:
        return False

    def check_channel_forward_agent_request(self, channel: paramiko.Channel) -> bool:
        return False

    def check_channel_window_change_request(self, *args: Any) -> bool:
        return False

    def check_channel_direct_tcpip_request(self, chanid: int, origin: Any, dest: Any) -> int:
        return OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED

    def check_port_forward_request(self, address: str, port: int) -> bool:
        self.note("port forwarding refused")
        return False

    def check_global_request(self, kind: str, msg: Message) -> bool:
        return False

    # -- the connection's own thread --

    def run(self) -> None:
        try:
            self._run()
        except Exception as exc:  # noqa: BLE001 - one bad connection must not stop the server
            self.note(f"error: {type(exc).__name__}: {exc}")
        finally:
            if self.transport is not None:
                self.transport.close()
            with contextlib.suppress(OSError):
                self.sock.close()
            if self.store is not None:
                self.store.close()
            self.server.release(self)
            self._log_line()

    def _run(self) -> None:
        limits = self.limits
        deadline = self.started + limits.auth_timeout
        self.sock.settimeout(None)
        transport = paramiko.Transport(
            self.sock, default_window_size=4 * 1024 * 1024, default_max_packet_size=32768
        )
        self.transport = transport
        _bound_packets(transport)
        transport.banner_timeout = min(limits.auth_timeout, 15.0)
        transport.handshake_timeout = min(limits.auth_timeout, 15.0)
        transport.local_version = "SSH-2.0-gatekeeper"
        transport.add_server_key(self.server.host_key)
        # Our handler must be in place before the first key exchange creates a stock one.
        transport.auth_handler = cast(AuthHandler, _AuthHandler(transport, self))
        transport.start_server(event=threading.Event(), server=self)
        # A wait, not a poll: a flood of clients that never log in costs little.
        while not self.admitted.wait(0.25):
            if not transport.is_active():
                if self.key is not None and not self.needs_code:
                    self.note("closed without a session")
                    return
                exc = transport.get_exception()
                why = (str(exc) or type(exc).__name__) if exc else "by the client"
                self.note(f"closed before authenticating ({why})")
                return
            if self.server.stopping.is_set():
                return
            if time.monotonic() >= deadline:
                self.note(f"dropped: no authentication within {limits.auth_timeout:g}s")
                return
        threads: list[threading.Thread] = []
        idle_since = time.monotonic()
        while transport.is_active():
            if self.server.stopping.is_set() and not any(t.is_alive() for t in threads):
                return
            channel = transport.accept(timeout=0.2)
            if channel is None:
                threads = [t for t in threads if t.is_alive()]
                if threads:
                    idle_since = time.monotonic()
                elif time.monotonic() - idle_since > limits.auth_timeout:
                    self.note("dropped: no session")
                    return
                continue
            t = threading.Thread(
                target=self._serve_channel,
                args=(channel,),
                daemon=True,
                name=f"gatekeeper-session-{self.number}-{channel.get_id()}",
            )
            t.start()
            threads.append(t)
        for t in threads:
            t.join(timeout=5)

    def _serve_channel(self, channel: paramiko.Channel) -> None:
        with self.lock:
            sess = self.sessions.setdefault(channel.get_id(), Session(channel))
        try:
            deadline = time.monotonic() + self.limits.session_start_timeout
            while not sess.started.wait(0.1):
                if channel.closed:
                    return
                if time.monotonic() > deadline:
                    self.note("dropped: session without a command")
                    return
            if self.fault is not None:
                # Never the forced command: the key may be gone from the store by now.
                rc = self._answer(sess, render(self.fault), self.fault.exit_code)
            elif sess.refusal is not None:
                rc = self._refuse_command(sess, sess.refusal)
            else:
                rc = self._run_forced_command(sess)
            shown = sshcmd.redact(sess.command) if sess.command else "(no command)"
            self.note(f"{shown[:120]!r} exit {rc}")
        except Exception as exc:  # noqa: BLE001 - report on the connection's log line
            self.note(f"session error: {type(exc).__name__}: {exc}")
        finally:
            channel.close()
            with self.lock:
                self.sessions.pop(channel.get_id(), None)

    def _refuse_command(self, sess: Session, refusal: InputError) -> int:
        """Refuse as the forced command refuses a bad command: its record, its words
        and its exit code (a failed record refuses in the store's words instead)."""
        assert self.key is not None and self.store is not None
        error: GatekeeperError = refusal
        try:
            frontend.audit_bad_command(
                self.store, self.key, self.client_ip, sess.command, time.time()
            )
        except GatekeeperError as exc:
            error = exc
        return self._answer(sess, render(error), error.exit_code)

    def _answer(self, sess: Session, text: str, status: int) -> int:
        """End a session with `text` on stderr and `status`, running nothing."""
        channel = sess.channel
        channel.settimeout(self.limits.stall_timeout)
        with contextlib.suppress(OSError, EOFError, paramiko.SSHException):
            channel.sendall_stderr(text.encode("utf-8", "surrogateescape"))
            channel.shutdown_write()
            channel.send_exit_status(status)
        return status

    def _child_env(self, sess: Session) -> dict[str, str]:
        assert self.transport is not None
        server_ip, server_port = self.sock.getsockname()[:2]
        env = {
            "PATH": frontend.SAFE_PATH,
            "HOME": os.environ.get("HOME", "/"),
            "SSH_CONNECTION": f"{self.peer[0]} {self.peer[1]} {server_ip} {server_port}",
            "GATEKEEPER_CONFIG": str(self.server.config_path),
        }
        if sess.command is not None:
            env["SSH_ORIGINAL_COMMAND"] = sess.command
        if sess.git_protocol is not None:
            env["GIT_PROTOCOL"] = sess.git_protocol
        cache = os.environ.get("GATEKEEPER_CACHE_DIR")
        if cache:
            env["GATEKEEPER_CACHE_DIR"] = cache  # the admin's setting, never the client's
        return env

    def _run_forced_command(self, sess: Session) -> int:
        """Run gatekeeper.shell for this key, exactly as sshd's forced command would."""
        assert self.key is not None and self.transport is not None
        channel = sess.channel
        channel.settimeout(self.limits.stall_timeout)
        argv = [
            sys.executable,
            "-m",
            "gatekeeper.shell",
            "--config",
            str(self.server.config_path),
            # The port this client connected to, for the commands the messages show.
            "--port",
            str(self.sock.getsockname()[1]),
            # What this server enforced for the key that signed, as sshd's line options
            # do behind OpenSSH; the forced command caps it by the key's record.
            *(["--factor", self.factor] if self.factor else []),
            str(self.key.id),
        ]
        child = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=self._child_env(sess),
            cwd="/",
            close_fds=True,
            start_new_session=True,
            bufsize=0,
        )
        assert child.stdin is not None and child.stdout is not None and child.stderr is not None
        failed = threading.Event()

        def kill() -> None:
            failed.set()
            with contextlib.suppress(OSError):
                os.killpg(child.pid, signal.SIGKILL)

        send: Callable[[bytes], None] = channel.sendall
        send_stderr: Callable[[bytes], None] = channel.sendall_stderr
        if sess.pty:
            send, send_stderr = _crlf(send), _crlf(send_stderr)
        pumps = [
            _thread(_pump_out, child.stdout, send, kill),
            _thread(_pump_out, child.stderr, send_stderr, kill),
        ]
        feeder = _thread(_pump_in, channel, child.stdin, kill)
        transport = self.transport
        while True:
            try:
                rc = child.wait(timeout=0.2)
                break
            except subprocess.TimeoutExpired:
                if channel.closed or not transport.is_active():
                    kill()  # the client went away: stop git
                elif self.server.hard_stop.is_set():
                    kill()
        for t in pumps:
            t.join(timeout=10)
            if t.is_alive():
                kill()  # something the child left behind still holds the pipe
                t.join(timeout=5)
        status = rc if rc >= 0 else 128 - rc
        if not channel.closed and not failed.is_set():
            channel.shutdown_write()  # EOF: stdout and stderr are both done
            channel.send_exit_status(status)
        channel.close()
        feeder.join(timeout=5)
        return status

    def _log_line(self) -> None:
        who = f"{self.key.user} {self.key.fingerprint}" if self.key else "-"
        elapsed = time.monotonic() - self.started
        with self.lock:
            events = "; ".join(self.events)
        log.info(
            "connection %d from %s:%d: %s, 2fa=%s, %.2fs%s",
            self.number,
            self.peer[0],
            self.peer[1],
            who,
            self.second_factor,
            elapsed,
            f": {events}" if events else "",
        )


def _thread(target: Callable[..., None], *args: Any) -> threading.Thread:
    t = threading.Thread(target=target, args=args, daemon=True)
    t.start()
    return t


def _crlf(send: Callable[[bytes], None]) -> Callable[[bytes], None]:
    """`send` with the line ends a terminal in raw mode shows as lines."""

    def crlf(data: bytes) -> None:
        send(data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"))

    return crlf


def _pump_out(source: IO[bytes], send: Callable[[bytes], None], kill: Callable[[], None]) -> None:
    """Child stdout/stderr -> channel, one chunk at a time (send blocks on the window)."""
    fd = source.fileno()
    try:
        while True:
            data = os.read(fd, CHUNK)
            if not data:
                return
            try:
                send(data)
            except (OSError, EOFError, paramiko.SSHException):
                kill()  # the client is gone or stalled past the timeout
                return
    finally:
        source.close()


def _pump_in(channel: paramiko.Channel, sink: IO[bytes], kill: Callable[[], None]) -> None:
    """Channel -> child stdin until the client's EOF; a closed channel kills the child."""
    try:
        while True:
            try:
                data = channel.recv(CHUNK)
            except TimeoutError:
                continue  # a quiet client (git may be thinking); the window bounds memory
            if not data:
                if channel.closed and not channel.eof_received:
                    kill()
                return
            try:
                sink.write(data)
            except (BrokenPipeError, ValueError, OSError):
                return  # the child stopped reading (it exited or refused)
    finally:
        with contextlib.suppress(OSError, BrokenPipeError):
            sink.close()


# -- the listener ------------------------------------------------------------------


class RememberedKeys:
    """The keys the store last listed, and the git account the policy last named.

    When the policy or the store cannot be loaded, the owner of a key should learn that
    the server is at fault and what to tell an administrator, not read "Permission
    denied" as if the key were wrong. So a key remembered here may then log in (its
    signature checked as always), only to be answered with the forced command's
    refusal; nothing runs. Refreshed every KEYS_REFRESH_SECONDS and by every lookup; a
    key removed while the store cannot be read stays until it can, for that refusal
    only."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._user: str | None = None
        self._keys: dict[str, KeyRecord] = {}

    def replace(self, user: str, records: list[KeyRecord]) -> None:
        keys = {r.fingerprint: _slim(r) for r in records}
        with self._lock:
            self._user, self._keys = user, keys

    def note(self, user: str, fingerprint: str, record: KeyRecord | None) -> None:
        """What one lookup found (None: no such key any more)."""
        with self._lock:
            self._user = user
            if record is None:
                self._keys.pop(fingerprint, None)
            else:
                self._keys[fingerprint] = _slim(record)

    def find(self, user: str, fingerprint: str) -> KeyRecord | None:
        with self._lock:
            return self._keys.get(fingerprint) if user == self._user else None

    def __len__(self) -> int:
        with self._lock:
            return len(self._keys)


def _slim(record: KeyRecord) -> KeyRecord:
    # The fingerprint stands for the key: a large site need not keep every blob.
    return evolve(record, blob="", comment="")


class _Throttled:
    """Log lines about refused connections: of each kind the first at once, then at
    most one every `every` seconds with a count of those left out, so that a flood
    cannot fill the log."""

    def __init__(self, every: float = 10.0) -> None:
        self.every = every
        self._lock = threading.Lock()
        self._last: dict[str, float] = {}
        self._left_out: dict[str, int] = {}

    def log(self, kind: str, line: str) -> None:
        now = time.monotonic()
        with self._lock:
            last = self._last.get(kind)
            if last is not None and now - last < self.every:
                self._left_out[kind] = self._left_out.get(kind, 0) + 1
                return
            self._last[kind] = now
            left_out = self._left_out.pop(kind, 0)
        if left_out:
            log.warning("%s (and %d more like it since the last such line)", line, left_out)
        else:
            log.warning("%s", line)


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on (host, port)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise GatekeeperError(
            f"cannot listen on {host}:{port}: {exc.strerror}",
            hint="choose another --port, or stop what is using it (a port below 1024 needs "
            "root, which `gatekeeper serve` drops right after listening).",
        ) from exc
    sock.listen(128)
    return sock


class GatekeeperServer:
    """Listening socket, connection threads, and a clean stop."""

    def __init__(
        self,
        config_path: Path,
        host_key: paramiko.PKey,
        host: str,
        port: int,
        limits: Limits | None = None,
        listener: socket.socket | None = None,
    ) -> None:
        self.config_path = config_path
        self.host_key = host_key
        self.host = host
        self.port = port
        self.limits = limits or Limits()
        self.stopping = threading.Event()
        self.hard_stop = threading.Event()
        self._listener: socket.socket | None = listener  # `listen`ed already, or by bind()
        self._lock = threading.Lock()
        self._count = 0
        # Who holds what, under `_lock`: those still logging in (by address too) and
        # those admitted to one of the `max_connections` slots.
        self._waiting: set[Connection] = set()
        self._waiting_from: dict[str, int] = {}
        self._admitted: set[Connection] = set()
        self._refusals = _Throttled()
        self.known = RememberedKeys()
        self._faults_logged: set[str] = set()
        self._fault_lock = threading.Lock()

    def bind(self) -> tuple[str, int]:
        """Open the listening socket (unless given one); return the address bound."""
        if self._listener is None:
            self._listener = listen(self.host, self.port)
        bound = self._listener.getsockname()
        return str(bound[0]), int(bound[1])

    def active(self) -> int:
        with self._lock:
            return len(self._waiting) + len(self._admitted)

    def fault_seen(self, detail: str) -> None:
        """The policy or the store cannot be loaded: tell the admin once per fault,
        not once per connection."""
        with self._fault_lock:
            if detail in self._faults_logged or len(self._faults_logged) >= 20:
                return
            self._faults_logged.add(detail)
        log.warning("cannot serve anyone until this is fixed (known keys are told so): %s", detail)

    def fault_cleared(self) -> None:
        with self._fault_lock:
            if not self._faults_logged:
                return
            self._faults_logged.clear()
        log.warning("the policy and the store load again: serving as usual")

    def remember_keys(self) -> None:
        """Read every key and the git account again; keep the last ones on a fault."""
        try:
            policy, store = frontend.load(str(self.config_path), self.fault_seen, light=False)
        except Refused:
            return
        try:
            with store:
                records = store.list_keys()
        except GatekeeperError as exc:
            self.fault_seen(f"listing the keys failed: {' | '.join(exc.lines())}")
            return
        self.known.replace(policy.server.user, records)
        self.fault_cleared()

    def _remember_keys_forever(self) -> None:
        while not self.stopping.wait(KEYS_REFRESH_SECONDS):
            try:
                self.remember_keys()
            except Exception as exc:  # noqa: BLE001 - the next round tries again
                log.warning("reading the keys again failed: %s: %s", type(exc).__name__, exc)

    def admit(self, conn: Connection) -> bool:
        """Move a connection that just authenticated from the waiting ones to a slot;
        False if every slot is taken."""
        with self._lock:
            if conn in self._admitted:
                return True
            if len(self._admitted) >= self.limits.max_connections:
                return False
            self._forget_waiting(conn)
            self._admitted.add(conn)
        conn.admitted.set()
        return True

    def release(self, conn: Connection) -> None:
        with self._lock:
            self._forget_waiting(conn)
            self._admitted.discard(conn)

    def _forget_waiting(self, conn: Connection) -> None:
        if conn in self._waiting:
            self._waiting.discard(conn)
            left = self._waiting_from[conn.client_ip] - 1
            if left:
                self._waiting_from[conn.client_ip] = left
            else:
                del self._waiting_from[conn.client_ip]

    def serve_forever(self) -> None:
        """Accept until `stop()`; then give open sessions `grace` seconds and close them."""
        if self._listener is None:
            self.bind()
        assert self._listener is not None
        listener = self._listener
        threading.Thread(
            target=self._remember_keys_forever, daemon=True, name="gatekeeper-keys"
        ).start()
        with selectors.DefaultSelector() as sel:
            sel.register(listener, selectors.EVENT_READ)
            while not self.stopping.is_set():
                if not sel.select(timeout=0.2):
                    continue
                try:
                    sock, peer = listener.accept()
                except OSError as exc:
                    # Out of file descriptors, say: the backlog waits, we do not spin.
                    self._refusals.log("accept", f"cannot accept a connection: {exc.strerror}")
                    time.sleep(0.05)
                    continue
                self._accept(sock, peer)
        listener.close()
        self._drain()

    def _why_not(self, address: str) -> tuple[str, str] | None:
        """Why a new connection from `address` is not served (a kind and the words), or
        None to serve it. Called under `_lock`."""
        limits = self.limits
        if len(self._admitted) >= limits.max_connections:
            return "slots", f"{limits.max_connections} connections open"
        if self._waiting_from.get(address, 0) >= limits.per_source:
            return (
                "source",
                f"{limits.per_source} connections from there are not authenticated yet",
            )
        waiting = len(self._waiting)
        percent = limits.max_startups.drop_percent(waiting)
        if percent and secrets.randbelow(100) < percent:
            return (
                "startups",
                f"{waiting} connections are not authenticated yet "
                f"(max startups {limits.max_startups})",
            )
        return None

    def _accept(self, sock: socket.socket, peer: Any) -> None:
        self._count += 1
        address, port = str(peer[0]), int(peer[1])
        conn = Connection(self, sock, (address, port), self._count)
        with self._lock:
            why = self._why_not(address)
            if why is None:
                self._waiting.add(conn)
                self._waiting_from[address] = self._waiting_from.get(address, 0) + 1
        if why is not None:
            with contextlib.suppress(OSError):
                sock.close()
            kind, words = why
            self._refusals.log(
                kind, f"connection {self._count} from {address}:{port}: refused: {words}"
            )
            return
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            threading.Thread(
                target=conn.run, daemon=True, name=f"gatekeeper-connection-{self._count}"
            ).start()
        except RuntimeError as exc:  # no thread to be had: this one goes, the server stays
            self.release(conn)
            with contextlib.suppress(OSError):
                sock.close()
            self._refusals.log("threads", f"connection {self._count} from {address}:{port}: {exc}")

    def _drain(self) -> None:
        deadline = time.monotonic() + self.limits.grace
        while self.active() and time.monotonic() < deadline:
            time.sleep(0.1)
        if self.active():
            log.info(
                "closing %d connection(s) still open after %gs", self.active(), self.limits.grace
            )
            self.hard_stop.set()
            end = time.monotonic() + 5
            while self.active() and time.monotonic() < end:
                time.sleep(0.1)

    def stop(self) -> None:
        self.stopping.set()


@contextlib.contextmanager
def _signals(handler: Callable[[int, FrameType | None], None]) -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _raise_file_limit() -> None:
    """Take the hard limit on open files as the soft one: a waiting connection holds a
    socket and a session three pipes more, and the usual soft limit (1024) is below
    what the default limits allow; out of descriptors, no one could connect."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def serve(
    policy: Policy,
    config_path: Path,
    host: str | None = None,
    port: int | None = None,
    limits: Limits | None = None,
    echo: Callable[[str], None] = print,
    after_bind: Callable[[], None] | None = None,
) -> int:
    """`gatekeeper serve`: listen until SIGTERM/SIGINT; return the exit code (0).
    `after_bind` runs once the socket listens and before anything in the state is
    read or written: the CLI, run as root, becomes the state's owner there (so root
    may give it a port below 1024, and no file in the state becomes root's)."""
    if not logging.getLogger().handlers and not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s gatekeeper: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False
        # paramiko logs every client that hangs up early with a traceback; the
        # connection's own log line says what happened.
        logging.getLogger("paramiko").addHandler(logging.NullHandler())
        logging.getLogger("paramiko").propagate = False
    _raise_file_limit()
    state_dir = policy.server.state_dir
    logs.use_state_dir(str(state_dir))
    if not any(h.get_name() == logs.HANDLER_NAME for h in log.handlers):
        log.addHandler(logs.handler("gatekeeper-serve"))
    host = host if host is not None else policy.server.listen_host
    port = port if port is not None else policy.server.listen_port
    listener = listen(host, port)
    try:
        if after_bind is not None:
            after_bind()
        # Refuse to start without a store (`gatekeeper init`) or while it is unreachable.
        with Store.open(state_dir, policy.server.store) as store:
            keys = store.list_keys()
        host_key = load_host_key(state_dir)
    except BaseException:
        listener.close()
        raise
    server = GatekeeperServer(config_path.absolute(), host_key, host, port, limits, listener)
    server.known.replace(policy.server.user, keys)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if server.stopping.is_set():
            server.hard_stop.set()  # a second signal: do not wait for the grace period
        server.stop()

    # Handlers first: a signal that arrives right after the banner still stops cleanly.
    with _signals(on_signal):
        bound_host, bound_port = server.bind()
        echo(f"gatekeeper: listening on {bound_host}:{bound_port} as user {policy.server.user!r}")
        echo(f"gatekeeper: host key {key_fingerprint(host_key)} (ED25519)")
        public = policy.server
        port_part = "" if bound_port == 22 else f":{bound_port}"
        echo(
            f"gatekeeper: clone with: git clone ssh://{public.user}@{public.host}{port_part}/"
            "REPOSITORY.git"
        )
        server.serve_forever()
    echo("gatekeeper: stopped")
    return 0
