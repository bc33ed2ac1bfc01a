"""One client connection, from the key exchange to its last session: paramiko's
callbacks (who may authenticate, which channels and requests are granted) and the
connection's own thread, which waits for authentication and serves each session by
running the forced command (`session`).

The callbacks run on paramiko's transport thread; `run` on the connection's own.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import threading
import time
from typing import Any, cast

import paramiko
from paramiko.auth_handler import AuthHandler
from paramiko.common import (
    AUTH_FAILED,
    AUTH_PARTIALLY_SUCCESSFUL,
    AUTH_SUCCESSFUL,
    OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED,
    OPEN_FAILED_RESOURCE_SHORTAGE,
    OPEN_SUCCEEDED,
)
from paramiko.message import Message
from paramiko.server import InteractiveQuery

from gatekeeper import frontend, seckey, sshcmd, twofactor
from gatekeeper.errors import GatekeeperError, InputError, Refused, StoreError, render
from gatekeeper.policy import Policy
from gatekeeper.server.auth import (
    GatekeeperAuthHandler,
    PublickeyRequest,
    SecurityKeyPKey,
    needs_verified,
    session_blob,
)
from gatekeeper.server.hostkey import key_fingerprint
from gatekeeper.server.limits import bound_packets
from gatekeeper.server.session import Session, run_forced_command
from gatekeeper.store import KeyRecord, Store

TYPE_CHECKING = False
if TYPE_CHECKING:
    # The listener makes connections; a connection only calls back into it.
    from gatekeeper.server.listener import GatekeeperServer

log = logging.getLogger("gatekeeper.server")  # one logger for the whole server

# A longer command is not handed over: UTF-8 spends at most 4 bytes on a character,
# so it is longer than the forced command takes (sshcmd.MAX_COMMAND_LENGTH).
MAX_COMMAND_BYTES = 4 * sshcmd.MAX_COMMAND_LENGTH
MAX_GIT_PROTOCOL_BYTES = 256
MAX_SESSIONS_PER_CONNECTION = 10
KBD_PROMPT = "Verification code: "


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

    def admit(self) -> bool:
        """Take one of the server's `max_connections` slots, now that this connection
        authenticated; False if every slot is taken."""
        return self.server.admit(self)

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
                session_blob(session_id, req), Message(req.signature)
            )
        except Exception:  # noqa: BLE001 - a malformed signature is a bad signature
            valid = False
        if not valid:
            self.note(f"bad signature for {fingerprint}")
            return AUTH_FAILED
        if isinstance(key, SecurityKeyPKey):
            assert session_id is not None
            factor = self._security_key_factor(key, record, session_blob(session_id, req), req)
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
        bound_packets(transport)
        transport.banner_timeout = min(limits.auth_timeout, 15.0)
        transport.handshake_timeout = min(limits.auth_timeout, 15.0)
        transport.local_version = "SSH-2.0-gatekeeper"
        transport.add_server_key(self.server.host_key)
        # Our handler must be in place before the first key exchange creates a stock one.
        transport.auth_handler = cast(AuthHandler, GatekeeperAuthHandler(transport, self))
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
        return run_forced_command(
            sess,
            argv,
            self._child_env(sess),
            self.transport,
            self.limits.stall_timeout,
            self.server.hard_stop,
        )

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
