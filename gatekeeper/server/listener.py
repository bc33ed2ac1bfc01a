"""The listening socket and the connections it accepts: who is let in, who waits,
and a clean stop."""

from __future__ import annotations

import contextlib
import logging
import secrets
import selectors
import socket
import threading
import time
from pathlib import Path
from typing import Any

import paramiko

from gatekeeper import frontend
from gatekeeper.errors import GatekeeperError, Refused
from gatekeeper.server.connection import Connection
from gatekeeper.server.keys import KEYS_REFRESH_SECONDS, RememberedKeys
from gatekeeper.server.limits import Limits, Throttled

log = logging.getLogger("gatekeeper.server")  # one logger for the whole server


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
        self._refusals = Throttled()
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
