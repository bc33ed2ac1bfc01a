"""Loading the policy on the per-connection path: `load_policy` hashes the file and
reads the compiled copy keyed by that hash (`compiled`), so yaml is imported only
when the file has changed; then one connection compiles it and the others wait for
its result (`_CompileLock`). Light standard-library modules only at the top (not
`re`, `json` or `hashlib`).
"""

from __future__ import annotations

import os

from gatekeeper import pathstr
from gatekeeper.errors import PolicyError
from gatekeeper.policy.compiled import COMPILED_FORMAT, dump_compiled, load_compiled
from gatekeeper.policy.model import Policy, file_digest

TYPE_CHECKING = False
if TYPE_CHECKING:
    from pathlib import Path

DEFAULT_CONFIG = "/etc/gatekeeper/config.yaml"


def default_config_path() -> Path:
    from pathlib import Path

    return Path(os.environ.get("GATEKEEPER_CONFIG") or DEFAULT_CONFIG)


def load_policy(
    path: str | os.PathLike[str] | None = None,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    use_cache: bool = True,
) -> Policy:
    """The policy at `path` (default: `default_config_path()`).

    This runs on every connection: it hashes the file and, when a compiled copy for
    that hash exists in the cache directory, returns it without importing yaml.
    Otherwise it compiles the file and caches the result (best effort). Paths are
    strings here, spelled as pathlib spells them (`pathstr`): no pathlib import.
    `use_cache=False`: neither read nor write the cache (root, before it becomes the
    state's owner, leaves no file of its own behind)."""
    if path is None:
        path = os.environ.get("GATEKEEPER_CONFIG") or DEFAULT_CONFIG
    path = pathstr.norm(path)
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        raise PolicyError(
            f"policy file not found: {path}",
            hint="set --config or GATEKEEPER_CONFIG, or create it from config/example.yaml",
        ) from None
    except PermissionError:
        raise PolicyError(
            f"cannot read policy file {path}: permission denied",
            hint="the policy must be readable by the account gatekeeper runs as "
            "(the git user): check its owner, group and mode, and its directories'.",
        ) from None
    except OSError as exc:
        raise PolicyError(
            f"cannot read policy file {path}: {exc.strerror or exc}",
            hint="--config or GATEKEEPER_CONFIG must name a readable YAML file.",
        ) from None
    digest = file_digest(data)
    source = pathstr.absolute(path)
    cache = _cache_file(cache_dir, digest) if use_cache else None
    if cache is not None:
        cached = _read_cache(cache, source, digest)
        if cached is not None:
            return cached
        # A policy edited in place (`policy install` compiles ahead): of the connections
        # that find no compiled copy, one compiles and the others wait for its result
        # instead of compiling it again each (a large policy's compile is costly in CPU
        # and memory: docs/performance.md).
        with _CompileLock(cache):
            cached = _read_cache(cache, source, digest)
            if cached is not None:
                return cached
            policy = _compile(data, path, source)
            _write_cache(cache, dump_compiled(policy))
            return policy
    return _compile(data, path, source)


def _compile(data: bytes, path: str, source: str) -> Policy:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PolicyError(
            f"policy file {path} is not UTF-8 text (byte {exc.start})",
            hint="save it as UTF-8.",
        ) from None
    import gc

    # The forced command runs with collection off (its launcher); a compile is the one
    # step that makes enough garbage to need it.
    gc.enable()
    from gatekeeper.policy.check import compile_policy_text  # yaml, re: only on a change

    return compile_policy_text(text, source)


COMPILE_WAIT_SECONDS = 60
"""How long a connection waits for another one's compile before compiling itself."""


class _CompileLock:
    """An exclusive flock on the cache directory itself (no lock file to leave behind),
    best effort: without a cache directory (or a file system without locks) every caller
    just compiles."""

    def __init__(self, cache: str) -> None:
        self.path = os.path.dirname(cache)
        self.fd: int | None = None

    def __enter__(self) -> None:
        import fcntl
        import time

        try:
            os.makedirs(self.path, mode=0o700, exist_ok=True)
            self.fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            return
        deadline = time.monotonic() + COMPILE_WAIT_SECONDS
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except OSError:
                if time.monotonic() >= deadline:
                    return  # compile without the lock rather than refuse
                time.sleep(0.02)

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            os.close(self.fd)  # releases the flock


def _cache_file(cache_dir: str | os.PathLike[str] | None, digest: str) -> str | None:
    if cache_dir is None:
        env = os.environ.get("GATEKEEPER_CACHE_DIR")
        home = os.environ.get("HOME")
        if env:
            cache_dir = env
        elif home:
            cache_dir = pathstr.join(pathstr.join(pathstr.norm(home), ".cache"), "gatekeeper")
        else:
            return None
    return pathstr.join(pathstr.norm(cache_dir), f"policy-{digest}.v{COMPILED_FORMAT}")


def _read_cache(cache: str, source: str, digest: str) -> Policy | None:
    """The cached policy, or None when it is missing, corrupt, compiled from this
    content at another path, or not a file this account wrote and alone can write."""
    try:
        with open(cache, "rb") as fh:
            st = os.fstat(fh.fileno())
            if st.st_uid != os.geteuid() or st.st_mode & 0o022:
                return None
            policy = load_compiled(fh.read())
    except (OSError, ValueError):
        return None
    if policy.sha256 != digest or policy.source != source:
        return None
    return policy


def _write_cache(path: str, data: bytes) -> None:
    """Write atomically (a temporary file in the same directory, then rename), mode
    0600. Any failure only means no cache: slower, still correct."""
    from gatekeeper.files import replace_file

    try:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        replace_file(path, data, mode=0o600, exact_mode=True)
    except OSError:
        pass
