"""gatekeeper serve: the embedded SSH server (moved here from gatekeeper/server.py;
split by concern next)."""

from gatekeeper.server.connection import HOST_KEY_NAME, Limits, Startups, serve

__all__ = ["HOST_KEY_NAME", "Limits", "Startups", "serve"]
