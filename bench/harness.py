"""Timing, statistics, the benchmark's own virtualenv, machine facts and the table.

Helpers for bench.py; nothing here knows about gatekeeper's sections.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import random
import re
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = ROOT / "bench"
VENV = BENCH_DIR / ".venv-bench"
STAMP = VENV / "gatekeeper-source.sha256"
SAFE_PATH = "/usr/local/bin:/usr/bin:/bin"


class BenchError(Exception):
    """A benchmark could not run as intended (a command failed, a check did not hold)."""


# -- statistics ------------------------------------------------------------------------


def p90(values: Sequence[float]) -> float:
    if len(values) < 2:
        return values[0]
    return statistics.quantiles(values, n=10, method="inclusive")[8]


def summary(values: Sequence[float]) -> dict[str, float | int]:
    """Median, p90, min, mean of seconds, in milliseconds."""
    return {
        "n": len(values),
        "median_ms": round(statistics.median(values) * 1e3, 3),
        "p90_ms": round(p90(values) * 1e3, 3),
        "min_ms": round(min(values) * 1e3, 3),
        "mean_ms": round(statistics.fmean(values) * 1e3, 3),
    }


def ratio(a: dict[str, Any], b: dict[str, Any], key: str = "median_ms") -> float:
    return round(a[key] / b[key], 3) if b[key] else float("inf")


# -- running commands ------------------------------------------------------------------


@dataclass
class Cmd:
    """One candidate command of an interleaved measurement."""

    name: str
    argv: list[str]
    env: dict[str, str]
    stdin: bytes = b""
    expect_rc: int = 0
    expect_quiet: bool = True  # nothing on stderr
    _stdin_path: str = field(default="/dev/null", repr=False)


def clean_env(home: Path, **extra: str) -> dict[str, str]:
    """An environment like the one sshd gives a forced command: no PYTHON* variables
    (so no PYTHONDONTWRITEBYTECODE: a real install has and uses .pyc files)."""
    env = {"PATH": SAFE_PATH, "HOME": str(home), "LANG": "C.UTF-8", "USER": current_user()}
    env.update(extra)
    return env


def current_user() -> str:
    import pwd

    return pwd.getpwuid(os.geteuid()).pw_name


def check(cmd: Cmd, cwd: Path) -> subprocess.CompletedProcess[bytes]:
    """Run once with output captured; raise unless it did what the measurement assumes."""
    result = subprocess.run(
        cmd.argv, input=cmd.stdin, env=cmd.env, cwd=cwd, capture_output=True, timeout=300
    )
    if result.returncode != cmd.expect_rc or (cmd.expect_quiet and result.stderr.strip()):
        raise BenchError(
            f"{cmd.name}: exit {result.returncode} (expected {cmd.expect_rc}); stderr:\n"
            + result.stderr.decode(errors="replace")[-2000:]
        )
    return result


def spawn_once(cmd: Cmd) -> tuple[float, float, int]:
    """(wall seconds, child CPU seconds, exit code) of one run, output discarded."""
    actions = [
        (os.POSIX_SPAWN_OPEN, 0, cmd._stdin_path, os.O_RDONLY, 0),
        (os.POSIX_SPAWN_OPEN, 1, "/dev/null", os.O_WRONLY, 0),
        (os.POSIX_SPAWN_OPEN, 2, "/dev/null", os.O_WRONLY, 0),
    ]
    start = time.perf_counter()
    pid = os.posix_spawn(cmd.argv[0], cmd.argv, cmd.env, file_actions=actions)
    _, status, usage = os.wait4(pid, 0)
    wall = time.perf_counter() - start
    return wall, usage.ru_utime + usage.ru_stime, os.waitstatus_to_exitcode(status)


def interleaved(
    cmds: Sequence[Cmd], runs: int, cwd: Path, *, warmup: int = 3, seed: int = 8
) -> dict[str, dict[str, Any]]:
    """Run every command `runs` times, in a fresh random order each round, so drift
    (CPU frequency, page cache, a neighbour's load) hits all of them alike."""
    tmp = Path(tempfile.mkdtemp(prefix="stdin-", dir=cwd))
    for i, cmd in enumerate(cmds):
        check(cmd, cwd)
        if cmd.stdin:
            path = tmp / f"{i}"
            path.write_bytes(cmd.stdin)
            cmd._stdin_path = str(path)
    walls: dict[str, list[float]] = {c.name: [] for c in cmds}
    cpus: dict[str, list[float]] = {c.name: [] for c in cmds}
    rng = random.Random(seed)
    old = os.getcwd()
    os.chdir(cwd)  # posix_spawn has no cwd argument before Python 3.13
    try:
        for round_no in range(warmup + runs):
            order = list(cmds)
            rng.shuffle(order)
            for cmd in order:
                wall, cpu, rc = spawn_once(cmd)
                if rc != cmd.expect_rc:
                    raise BenchError(f"{cmd.name}: exit {rc} in round {round_no}")
                if round_no >= warmup:
                    walls[cmd.name].append(wall)
                    cpus[cmd.name].append(cpu)
    finally:
        os.chdir(old)
        shutil.rmtree(tmp, ignore_errors=True)
    out = {}
    for cmd in cmds:
        stats = summary(walls[cmd.name])
        stats["cpu_median_ms"] = round(statistics.median(cpus[cmd.name]) * 1e3, 3)
        out[cmd.name] = stats
    return out


def timed(fn: Any, repeat: int) -> dict[str, float | int]:
    """Call `fn()` `repeat` times in this process; the summary of its durations."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return summary(times)


def run(
    argv: Sequence[str],
    *,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    input: bytes | None = None,
    timeout: float = 600,
) -> str:
    result = subprocess.run(
        list(argv), env=env, cwd=cwd, input=input, capture_output=True, timeout=timeout
    )
    if result.returncode != 0:
        raise BenchError(
            f"{' '.join(map(str, argv[:4]))} ... failed ({result.returncode}):\n"
            + (result.stdout + result.stderr).decode(errors="replace")[-3000:]
        )
    return result.stdout.decode()


# -- the benchmark's own, non-editable virtualenv ------------------------------------------


def source_digest() -> str:
    """What the benchmark venv was built from: the package and its metadata."""
    h = hashlib.sha256()
    files = [ROOT / "pyproject.toml"]
    files += sorted(
        p
        for tree in ("gatekeeper", "hooks")
        for p in (ROOT / tree).rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and not p.name.endswith(".pyc")
    )
    for path in files:
        h.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def venv_python() -> Path:
    return VENV / "bin" / "python"


def ensure_bench_venv(log: Any) -> Path:
    """A virtualenv with gatekeeper installed like a real install (`pip install` of a
    snapshot of the working tree, which compiles .pyc files), rebuilt when the tree
    changes. The project's .venv is an editable install: its path finder and, with
    PYTHONDONTWRITEBYTECODE=1, recompiling every module on every run would be
    measured instead of gatekeeper."""
    base = getattr(sys, "_base_executable", sys.executable)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    fresh = False
    if not venv_python().exists():
        log("building the benchmark virtualenv (once; about half a minute)")
        run([base, "-m", "venv", str(VENV)], env=env)
        fresh = True
    digest = source_digest()
    if not fresh and STAMP.exists() and STAMP.read_text().strip() == digest:
        return venv_python()
    log("installing the working tree into the benchmark virtualenv (pip install, non-editable)")
    with tempfile.TemporaryDirectory(prefix="gatekeeper-src-") as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        shutil.copy2(ROOT / "pyproject.toml", src)
        shutil.copy2(ROOT / "README.md", src)
        for tree in ("gatekeeper", "hooks"):  # hooks/: the shell programs, package data
            shutil.copytree(
                ROOT / tree, src / tree, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
            )
        pip = [str(venv_python()), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
        if not fresh and _has_dependencies():
            pip += ["--no-deps", "--force-reinstall"]
        run([*pip, str(src)], env=env, cwd=Path(tmp))
    pyc = site_packages() / "gatekeeper" / "__pycache__"
    if not any(pyc.glob("shell.*.pyc")):
        run([str(venv_python()), "-m", "compileall", "-q", str(site_packages())], env=env)
    STAMP.write_text(digest + "\n")
    return venv_python()


def site_packages() -> Path:
    return next((VENV / "lib").glob("python3*/site-packages"))


def _has_dependencies() -> bool:
    sp = site_packages()
    return all((sp / name).exists() for name in ("click", "yaml", "pyotp", "cryptography"))


def shebang(script: Path) -> list[str]:
    """The interpreter and flags a console script runs with."""
    first = script.read_bytes().split(b"\n", 1)[0].decode()
    if not first.startswith("#!"):
        raise BenchError(f"{script.name} has no #! line")
    return first[2:].split()


# -- the machine ---------------------------------------------------------------------------


def _version(argv: list[str]) -> str:
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except OSError:
        return "missing"
    return (result.stdout or result.stderr).strip().splitlines()[0]


def machine(python: Path) -> dict[str, Any]:
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)
    virtual = bool(re.search(r"^flags\s*:.*\bhypervisor\b", cpuinfo, re.M))
    meminfo = Path("/proc/meminfo").read_text() if Path("/proc/meminfo").exists() else ""
    mem = re.search(r"^MemTotal:\s+(\d+) kB", meminfo, re.M)
    cores = os.cpu_count() or 0
    arch = platform.machine()
    cpu = re.sub(r"\s+", " ", model.group(1)).strip() if model else "unknown CPU"
    py = _version([str(python), "-VV"]).replace("\n", " ")
    py = re.sub(r"\s*\(.*", "", py) if py.startswith("Python") else py
    ssh = _version(["ssh", "-V"])
    sshd_path = next(
        (p for p in ("/usr/sbin/sshd", "/usr/local/sbin/sshd") if Path(p).exists()), ""
    )
    commit = _version(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    dirty = subprocess.run(
        ["git", "-C", str(ROOT), "status", "--porcelain", "--", "gatekeeper", "hooks"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    return {
        "description": f"a {cores}-core {arch} {'VM' if virtual else 'machine'} ({cpu})",
        "cpu": cpu,
        "cores": cores,
        "arch": arch,
        "virtualized": virtual,
        "memory_gib": round(int(mem.group(1)) / 2**20, 1) if mem else None,
        "kernel": platform.release(),
        "python": py,
        "git": _version(["git", "--version"]),
        "openssh": ssh,
        "sshd_present": bool(sshd_path),
        "sqlite": sqlite3.sqlite_version,
        "gatekeeper_commit": commit + ("+uncommitted changes" if dirty else ""),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


# -- output ----------------------------------------------------------------------------------


class Table:
    """Rows printed as each section finishes, and kept for the final summary."""

    def __init__(self) -> None:
        self.checks: list[dict[str, Any]] = []

    @staticmethod
    def section(title: str) -> None:
        print(f"\n== {title}", flush=True)

    @staticmethod
    def header() -> None:
        print(f"  {'':52} {'median':>9} {'p90':>9}  {'ratio / note'}", flush=True)

    @staticmethod
    def row(label: str, stats: dict[str, Any] | None = None, note: str = "") -> None:
        if stats is None:
            print(f"  {label:52} {'':>9} {'':>9}  {note}", flush=True)
            return
        print(
            f"  {label:52} {stats['median_ms']:>7.1f}ms {stats['p90_ms']:>7.1f}ms  {note}",
            flush=True,
        )

    def check(self, name: str, ok: bool, detail: str, failed: str = "OVER") -> dict[str, Any]:
        """A budget or correctness line: "ok", else `failed` ("OVER" budget, "FAIL")."""
        entry = {"check": name, "ok": ok, "status": "ok" if ok else failed, "detail": detail}
        self.checks.append(entry)
        print(f"  [{entry['status']}] {name}: {detail}", flush=True)
        return entry

    def final(self) -> None:
        print("\n== Summary", flush=True)
        for c in self.checks:
            print(f"  [{c['status']}] {c['check']}: {c['detail']}")


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def fmt_ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms"


def flatten(items: Iterable[Iterable[Any]]) -> list[Any]:
    return [x for xs in items for x in xs]
