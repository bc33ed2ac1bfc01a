"""gatekeeper: two-step verification as a condition of reaching Git repositories over SSH."""

__version__ = "0.1.0"
