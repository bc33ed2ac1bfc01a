"""`gatekeeper serve`: log set up, listen, drop root, check the store, serve until a
signal."""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType

from gatekeeper import logs
from gatekeeper.policy import Policy
from gatekeeper.server.hostkey import key_fingerprint, load_host_key
from gatekeeper.server.limits import Limits
from gatekeeper.server.listener import GatekeeperServer, listen
from gatekeeper.store import Store

log = logging.getLogger("gatekeeper.server")  # one logger for the whole server


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
