"""gatekeeper serve: the embedded SSH server, for a git box without an OpenSSH to configure.

    accept -> one thread per connection -> paramiko Transport (its own thread)
    -> publickey: identity only from a key whose signature we verified
    -> optional keyboard-interactive code (two_factor.keyboard_interactive)
    -> exec/shell -> `python -m gatekeeper.shell --config CONFIG KEY_ID`, pumped both ways

The server decides only *who* is connecting. *What* they may do is decided by the same
forced command that OpenSSH runs (`gatekeeper.shell`), spawned with an environment
built from scratch, so the decision, the messages and the audit records are the same
whichever SSH server carried the connection. The server never imports it.

- `serve`: `gatekeeper serve` itself: logging, listening, the store check, signals;
- `listener`: the listening socket, who is let in or waits, and a clean stop;
- `connection`: one client connection, paramiko's callbacks and its own thread;
- `auth`: publickey and security-key authentication, and whether to ask for a code;
- `session`: one session channel and the forced command that answers it;
- `hostkey`: the server's host key; `keys`: the keys last read, for a server fault;
- `limits`: what keeps one client from hurting the others.
"""

from gatekeeper.server.hostkey import HOST_KEY_NAME, key_fingerprint, load_host_key
from gatekeeper.server.limits import Limits, Startups
from gatekeeper.server.listener import GatekeeperServer, listen
from gatekeeper.server.serve import serve

__all__ = [
    "HOST_KEY_NAME",
    "GatekeeperServer",
    "Limits",
    "Startups",
    "key_fingerprint",
    "listen",
    "load_host_key",
    "serve",
]
