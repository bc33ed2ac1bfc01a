"""Who is connecting: publickey authentication from a key whose signature was verified,
security keys (`sk-`, which paramiko does not know), and whether to ask for a code.

Identity (docs/design.md, "Security rules": identity comes only from the key that signed):
paramiko calls `check_auth_publickey` *before* it checks a signature, both for a
client's "would you accept this key?" query and for the signed request, with the same
kind of key object. So the server reads each publickey request itself (a small
`AuthHandler` subclass) and, for a signed request, verifies the signature over the
session blob (RFC 4252, section 7) before it records anyone. A query never records
anything, and once a key is verified the identity cannot change within the connection
(`connection.Connection.check_auth_publickey`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Protocol

import paramiko
from paramiko.auth_handler import AuthHandler
from paramiko.common import AUTH_SUCCESSFUL, cMSG_DISCONNECT, cMSG_USERAUTH_REQUEST
from paramiko.message import Message

from gatekeeper import decision, frontend, seckey, sshkeys
from gatekeeper.policy import Policy
from gatekeeper.server.limits import Limits
from gatekeeper.store import ConnectionFacts

DISCONNECT_TOO_MANY_CONNECTIONS = 12  # RFC 4253, section 11.1
TOO_MANY_CONNECTIONS = "gatekeeper: too many connections right now; try again in a moment."


class Authenticating(Protocol):
    """What the handler needs of the connection it authenticates
    (`connection.Connection`, which this module does not import)."""

    current_request: PublickeyRequest | None
    limits: Limits

    def note(self, event: str) -> None: ...
    def admit(self) -> bool: ...


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


class GatekeeperAuthHandler(_StockAuthHandler):
    """Stock server-side auth with three additions: the connection sees every publickey
    request before paramiko acts on it, failed attempts are capped, and security keys
    (`sk-`, which paramiko does not know) are parsed by gatekeeper."""

    def __init__(self, transport: paramiko.Transport, conn: Authenticating) -> None:
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
        if result == AUTH_SUCCESSFUL and not self._conn.admit():
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


def session_blob(session_id: bytes, req: PublickeyRequest) -> bytes:
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
