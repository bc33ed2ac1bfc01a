"""gatekeeper serve: the embedded SSH server, for a git box without an OpenSSH to configure.

    accept -> one thread per connection -> paramiko Transport (its own thread)
    -> publickey: identity only from a key whose signature we verified
    -> optional keyboard-interactive code (two_factor.keyboard_interactive)
    -> exec/shell -> `python -m gatekeeper.shell --config CONFIG KEY_ID`, pumped both ways

The server decides only *who* is connecting. *What* they may do is decided by the same
forced command that OpenSSH runs (`gatekeeper.shell`), spawned with an environment
built from scratch, so the decision, the messages and the audit records are the same
whichever SSH server carried the connection.

Identity (DESIGN.md, "an embedded server that records the key a client merely offered"):
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
    cMSG_USERAUTH_REQUEST,
)
from paramiko.message import Message
from paramiko.server import InteractiveQuery

from gatekeeper import decision, twofactor
from gatekeeper.errors import GatekeeperError, StoreError
from gatekeeper.policy import Policy, load_policy
from gatekeeper.shell import SAFE_PATH
from gatekeeper.store import ConnectionFacts, KeyRecord, Store

log = logging.getLogger("gatekeeper.server")

HOST_KEY_NAME = "ssh_host_ed25519_key"
CHUNK = 64 * 1024
MAX_COMMAND_BYTES = 4096
MAX_GIT_PROTOCOL_BYTES = 256
MAX_SESSIONS_PER_CONNECTION = 10
KBD_PROMPT = "Verification code: "


@dataclass(frozen=True)
class Limits:
    """The knobs that keep one client from hurting the others."""

    max_connections: int = 64
    """Connections served at once; more are accepted and closed at once."""
    max_unauthenticated_per_source: int | None = None
    """Connections one address may have before authenticating (None: half of the above),
    so one host cannot fill every slot with clients that never log in."""
    auth_timeout: float = 20.0
    """Seconds from accept to a completed authentication (and from there to a session)."""
    max_auth_tries: int = 6
    """Failed authentication attempts (offered keys included) before disconnecting."""
    session_start_timeout: float = 30.0
    """Seconds between opening a session channel and asking for a command."""
    stall_timeout: float = 600.0
    """Seconds a client may leave us unable to send (window closed) before we drop it."""
    grace: float = 10.0
    """On SIGTERM/SIGINT: seconds open sessions get to finish before they are closed."""


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

    class _StockAuthHandler:
        """The part of paramiko's (private) AuthHandler this module relies on; its type
        stubs leave these out. Checked against paramiko 3.4 to 5.1."""

        transport: paramiko.Transport
        auth_fail_count: int

        def __init__(self, transport: paramiko.Transport) -> None: ...
        def _disconnect_no_more_auth(self) -> None: ...
        def _parse_service_request(self, m: Message) -> None: ...
        def _parse_userauth_request(self, m: Message) -> None: ...
        def _parse_userauth_info_response(self, m: Message) -> None: ...
        def _send_auth_result(self, username: str, method: str, result: int) -> None: ...

else:
    _StockAuthHandler = AuthHandler


class _AuthHandler(_StockAuthHandler):
    """Stock server-side auth with two additions: the connection sees every publickey
    request before paramiko acts on it, and failed attempts are capped."""

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

    def _parse_userauth_info_response(self, m: Message) -> None:
        if not self.transport.initial_kex_done:
            self._disconnect_no_more_auth()
            return
        super()._parse_userauth_info_response(m)

    def _send_auth_result(self, username: str, method: str, result: int) -> None:
        super()._send_auth_result(username, method, result)
        if self.auth_fail_count >= self._conn.limits.max_auth_tries and self.transport.is_active():
            self._conn.note("too many authentication attempts")
            self._disconnect_no_more_auth()


def needs_verified(policy: Policy, facts: ConnectionFacts, now: float) -> bool:
    """Whether any repository this user can reach needs a verified session (then the
    in-band code is worth asking for; otherwise it would only be in the way)."""
    from gatekeeper.shell import user_facts
    from gatekeeper.usercmd import list_repositories

    ufacts = user_facts(facts)
    when = datetime.fromtimestamp(now, timezone.utc)
    for repo in list_repositories(policy.server.repositories):
        for action in ("read", "write"):
            verdict = decision.decide(policy, ufacts, repo, action, when)
            if verdict.reason != decision.NOT_AUTHORIZED and verdict.level == "verified":
                return True
    return False


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
    started: threading.Event = field(default_factory=threading.Event)


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
        self.needs_code = False
        self.second_factor = "-"
        self.code_error: str | None = None
        self.sessions: dict[int, Session] = {}
        self.lock = threading.Lock()
        self.events: list[str] = []
        self.started = time.monotonic()

    # -- helpers --

    @property
    def authenticated(self) -> bool:
        return self.transport is not None and self.transport.is_authenticated()

    @property
    def client_ip(self) -> str:
        return self.peer[0]

    def note(self, event: str) -> None:
        """Something for this connection's one log line."""
        with self.lock:
            if len(self.events) < 20:
                self.events.append(event)

    def _load(self) -> tuple[Policy, Store] | None:
        """The current policy and the store, opened once per connection; None: refuse."""
        if self.policy is None or self.store is None:
            try:
                self.policy = load_policy(self.server.config_path)
                settings = self.policy.server
                self.store = Store.open(settings.state_dir, settings.store)
            except GatekeeperError as exc:
                self.note(f"refused: {exc.message}")
                log.warning("connection %d: %s", self.number, " | ".join(exc.lines()))
                return None
        return self.policy, self.store

    def _user_ok(self, username: str) -> bool:
        loaded = self._load()
        if loaded is None:
            return False
        if username != loaded[0].server.user:
            self.note(f"wrong user {username[:64]!r}")
            return False
        return True

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
        if req is None or self.key is not None or not self._user_ok(username):
            # No request we parsed ourselves, or a key is already verified (the
            # second factor is pending): nothing here may change who this is.
            return AUTH_FAILED
        assert self.store is not None and self.transport is not None
        if req.username != username or key.asbytes() != req.key_blob:
            return AUTH_FAILED
        if req.algorithm.endswith("-cert-v01@openssh.com"):
            self.note("certificate refused")
            return AUTH_FAILED
        fingerprint = key_fingerprint(key)
        try:
            record = self.store.key_by_fingerprint(fingerprint)
        except GatekeeperError as exc:
            log.warning("connection %d: key lookup failed: %s", self.number, exc.message)
            return AUTH_FAILED
        if record is None:
            self.note(f"unknown key {fingerprint}")
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
        self.key = record
        self.needs_code = self._wants_code(record)
        return AUTH_PARTIALLY_SUCCESSFUL if self.needs_code else AUTH_SUCCESSFUL

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
        if self.key is None or not self.needs_code or not self._user_ok(username):
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
            self.code_error = " ".join(exc.lines())
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
        if sess is None or len(command) > MAX_COMMAND_BYTES or b"\0" in command:
            return False
        sess.command = _decode(command)
        sess.started.set()
        return True

    def check_channel_shell_request(self, channel: paramiko.Channel) -> bool:
        # No command: the forced command prints who you are and what you can reach.
        sess = self._session(channel)
        if sess is None:
            return False
        sess.started.set()
        return True

    def check_channel_pty_request(self, *args: Any) -> bool:
        self.note("pty refused")
        return False

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
            self._log_line()

    def _run(self) -> None:
        limits = self.limits
        deadline = self.started + limits.auth_timeout
        self.sock.settimeout(None)
        transport = paramiko.Transport(
            self.sock, default_window_size=4 * 1024 * 1024, default_max_packet_size=32768
        )
        self.transport = transport
        transport.banner_timeout = min(limits.auth_timeout, 15.0)
        transport.handshake_timeout = min(limits.auth_timeout, 15.0)
        transport.local_version = "SSH-2.0-gatekeeper"
        transport.add_server_key(self.server.host_key)
        # Our handler must be in place before the first key exchange creates a stock one.
        transport.auth_handler = cast(AuthHandler, _AuthHandler(transport, self))
        transport.start_server(event=threading.Event(), server=self)
        while not transport.is_authenticated():
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
            time.sleep(0.05)
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
            rc = self._run_forced_command(sess)
            self.note(f"{(sess.command or '(no command)')[:120]!r} exit {rc}")
        except Exception as exc:  # noqa: BLE001 - report on the connection's log line
            self.note(f"session error: {type(exc).__name__}: {exc}")
        finally:
            channel.close()
            with self.lock:
                self.sessions.pop(channel.get_id(), None)

    def _child_env(self, sess: Session) -> dict[str, str]:
        assert self.transport is not None
        server_ip, server_port = self.sock.getsockname()[:2]
        env = {
            "PATH": SAFE_PATH,
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

        pumps = [
            _thread(_pump_out, child.stdout, channel.sendall, kill),
            _thread(_pump_out, child.stderr, channel.sendall_stderr, kill),
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
        self._connections: dict[threading.Thread, Connection] = {}
        self._lock = threading.Lock()
        self._count = 0

    def bind(self) -> tuple[str, int]:
        """Open the listening socket (unless given one); return the address bound."""
        if self._listener is None:
            self._listener = listen(self.host, self.port)
        bound = self._listener.getsockname()
        return str(bound[0]), int(bound[1])

    def active(self) -> int:
        with self._lock:
            self._connections = {t: c for t, c in self._connections.items() if t.is_alive()}
            return len(self._connections)

    def unauthenticated_from(self, address: str) -> int:
        with self._lock:
            return sum(
                1
                for t, c in self._connections.items()
                if t.is_alive() and c.peer[0] == address and not c.authenticated
            )

    def serve_forever(self) -> None:
        """Accept until `stop()`; then give open sessions `grace` seconds and close them."""
        if self._listener is None:
            self.bind()
        assert self._listener is not None
        listener = self._listener
        with selectors.DefaultSelector() as sel:
            sel.register(listener, selectors.EVENT_READ)
            while not self.stopping.is_set():
                if not sel.select(timeout=0.2):
                    continue
                try:
                    sock, peer = listener.accept()
                except OSError:
                    continue
                self._accept(sock, peer)
        listener.close()
        self._drain()

    def _accept(self, sock: socket.socket, peer: Any) -> None:
        self._count += 1
        if self.active() >= self.limits.max_connections:
            log.warning(
                "connection %d from %s:%d: refused: %d connections open",
                self._count,
                peer[0],
                peer[1],
                self.limits.max_connections,
            )
            with contextlib.suppress(OSError):
                sock.close()
            return
        per_source = self.limits.max_unauthenticated_per_source
        if per_source is None:
            per_source = max(1, self.limits.max_connections // 2)
        if self.unauthenticated_from(str(peer[0])) >= per_source:
            log.warning(
                "connection %d from %s:%d: refused: %d connections from there are "
                "not authenticated yet",
                self._count,
                peer[0],
                peer[1],
                per_source,
            )
            with contextlib.suppress(OSError):
                sock.close()
            return
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = Connection(self, sock, (str(peer[0]), int(peer[1])), self._count)
        t = threading.Thread(
            target=conn.run, daemon=True, name=f"gatekeeper-connection-{self._count}"
        )
        with self._lock:
            self._connections[t] = conn
        t.start()

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
    state_dir = policy.server.state_dir
    host = host if host is not None else policy.server.listen_host
    port = port if port is not None else policy.server.listen_port
    listener = listen(host, port)
    try:
        if after_bind is not None:
            after_bind()
        # Refuse to start without a store (`gatekeeper init`) or while it is unreachable.
        Store.open(state_dir, policy.server.store).close()
        host_key = load_host_key(state_dir)
    except BaseException:
        listener.close()
        raise
    server = GatekeeperServer(config_path.absolute(), host_key, host, port, limits, listener)

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
        port_part = "" if public.port == 22 else f":{public.port}"
        echo(
            f"gatekeeper: clone with: git clone ssh://{public.user}@{public.host}{port_part}/"
            "REPOSITORY.git"
        )
        server.serve_forever()
    echo("gatekeeper: stopped")
    return 0
