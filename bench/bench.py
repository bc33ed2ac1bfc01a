"""gatekeeper benchmarks: what the gate adds to every git connection, as ratios
measured in one run against the bare path (docs/design.md, "Performance budget").

    .venv/bin/python bench/bench.py [--quick] [--only NAME ...] [--json OUT] [--keep]

Sections (all by default, in this order):
  decision     gatekeeper-shell start -> the point it would exec git (GATEKEEPER_DRY_RUN=1)
               vs `python -c pass` and git-shell; the hot path's imports and phases
  keys         AuthorizedKeysCommand lookup at 100, 10,000 and 100,000 keys
  policy       10, 1,000 and 10,000 repository rules with 1,000 teams: warm decision
               and the one-time compile
  e2e          git ls-remote and clone through a real sshd on loopback, gatekeeper vs
               plain git-shell on the same sshd
  authkeys     git ls-remote through that sshd in authorized_keys mode with 100, 10,000
               and 100,000 keys in the file, vs AuthorizedKeysCommand mode
  concurrency  50 parallel clones and 20 parallel pushes through that sshd
  audit        verifying and querying 100,000 audit records
  postgres     the decision with the state in PostgreSQL vs SQLite (driver import, connect)

Every gatekeeper command measured runs from a non-editable install of the working tree
in bench/.venv-bench (rebuilt when the tree changes), with .pyc files and an environment
like sshd's (no PYTHON* variables). Results: a table on stdout and JSON in
bench/results/latest.json. Not part of the test suite: it reports, it does not fail on
a budget (exit 1 only when a section could not run).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import random
import re
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import defaultdict
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import harness as h
from harness import BenchError, Cmd

ROOT = h.ROOT
DEFAULT_JSON = h.BENCH_DIR / "results" / "latest.json"
SECTIONS = ("decision", "keys", "policy", "e2e", "authkeys", "concurrency", "audit", "postgres")
TITLES = {
    "decision": "1. Forced-command decision (gatekeeper-shell start -> exec git)",
    "keys": "2. AuthorizedKeysCommand key lookup",
    "policy": "3. Policy size (1,000 teams)",
    "e2e": "4. End to end through a real sshd on loopback",
    "authkeys": "4b. authorized_keys mode with many keys, vs AuthorizedKeysCommand",
    "concurrency": "5. Concurrency through the real sshd",
    "audit": "6. Audit log: 100,000 records",
    "postgres": "7. Shared PostgreSQL store (forced-command decision)",
}
HEAVY = ("click", "paramiko", "sqlite_utils", "cryptography", "pyotp", "yaml", "segno", "nacl")
BUDGET_DECISION = 3.0  # x python -c pass (docs/design.md); aim 2x
AIM_DECISION = 2.0
E2E_TARGET = 1.05  # over plain git-shell behind the same sshd, for every mode and workload
SSH_CONNECTION = "127.0.0.1 50000 127.0.0.1 22"
BASE_POLICY = """\
teams:
  dev:
    members: [alice]
repositories:
  - match: bench/*
    read: [dev]
    write: [dev]
"""


def log(message: str) -> None:
    print(f"-- {message}", flush=True)


# -- a gatekeeper installation built with the benchmark venv's CLI ---------------------------


def git_env(home: Path) -> dict[str, str]:
    return h.clean_env(
        home,
        GIT_CONFIG_NOSYSTEM="1",
        GIT_AUTHOR_NAME="Bench",
        GIT_AUTHOR_EMAIL="bench@example.invalid",
        GIT_COMMITTER_NAME="Bench",
        GIT_COMMITTER_EMAIL="bench@example.invalid",
    )


def make_repo(bare: Path, home: Path, files: int = 20, commits: int = 3) -> None:
    """A small bare repository: `files` text files of about 2 KB, `commits` commits."""
    env = git_env(home)
    bare.parent.mkdir(parents=True, exist_ok=True)
    h.run(["git", "init", "-q", "--bare", "-b", "main", str(bare)], env=env)
    seed = bare.parent / f".seed-{bare.name}"
    h.run(["git", "init", "-q", "-b", "main", str(seed)], env=env)
    rng = random.Random(bare.name)
    words = ["gate", "keeper", "commit", "branch", "merge", "token", "policy", "audit", "key"]
    for c in range(commits):
        for f in range(files):
            text = " ".join(rng.choice(words) for _ in range(300))
            (seed / f"file{f:02d}.txt").write_text(f"{c}\n{text}\n")
        h.run(["git", "add", "-A"], env=env, cwd=seed)
        h.run(["git", "commit", "-q", "-m", f"commit {c}"], env=env, cwd=seed)
    h.run(["git", "push", "-q", str(bare), "main"], env=env, cwd=seed)
    shutil.rmtree(seed)


class Site:
    """Policy file, state directory, repositories root and compiled-policy cache."""

    def __init__(self, ctx: Context, name: str, body: str = BASE_POLICY) -> None:
        self.ctx = ctx
        self.base = ctx.work / name
        self.config = self.base / "config.yaml"
        self.repos = self.base / "repositories"
        self.state = self.base / "state"
        self.cache = self.base / "cache"
        self.repos.mkdir(parents=True)
        self.user = h.current_user()
        self.key_id = 0
        self.key_path = Path()
        self.write_policy(body)

    def server_yaml(self) -> str:
        return (
            "server:\n"
            "  host: 127.0.0.1\n"
            f"  user: {self.user}\n"
            f"  repositories: {self.repos}\n"
            f"  state_dir: {self.state}\n"
        )

    def write_policy(self, body: str, path: Path | None = None) -> Path:
        path = path or self.config
        path.write_text(self.server_yaml() + body)
        return path

    def env(self, **extra: str) -> dict[str, str]:
        return h.clean_env(
            self.ctx.home,
            GATEKEEPER_CONFIG=str(self.config),
            GATEKEEPER_CACHE_DIR=str(self.cache),
            **extra,
        )

    def gk(self, *args: str) -> str:
        return h.run([str(self.ctx.bin / "gatekeeper"), *args], env=self.env(), cwd=self.ctx.work)

    def add_user_with_key(self, name: str) -> tuple[Path, int]:
        self.gk("user", "add", name)
        private = self.ctx.work / "keys" / name
        private.parent.mkdir(exist_ok=True)
        h.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", str(private)])
        self.gk("key", "add", name, f"{private}.pub")
        rows = json.loads(self.gk("key", "list", name, "--json"))
        return private, int(rows[-1]["id"])

    @property
    def db(self) -> Path:
        return self.state / "gatekeeper.db"

    def dry_run_env(self, command: str = "git-upload-pack 'bench/small.git'") -> dict[str, str]:
        return self.env(
            SSH_CONNECTION=SSH_CONNECTION, SSH_ORIGINAL_COMMAND=command, GATEKEEPER_DRY_RUN="1"
        )


class Context:
    def __init__(self, work: Path, python: Path, quick: bool, table: h.Table) -> None:
        self.work = work
        self.python = python
        self.bin = python.parent
        self.quick = quick
        self.table = table
        self.home = work / "home"
        self.home.mkdir()
        self.interp = h.shebang(self.bin / "gatekeeper-shell")
        self._site: Site | None = None
        self._ssh: SshSite | None = None

    def runs(self, quick: int, full: int) -> int:
        return quick if self.quick else full

    def site(self) -> Site:
        """The base installation: user alice with a key, repository bench/small."""
        if self._site is None:
            log("setting up a gatekeeper installation (policy, store, alice, bench/small)")
            site = Site(self, "site")
            site.gk("init")
            site.key_path, site.key_id = site.add_user_with_key("alice")
            make_repo(site.repos / "bench" / "small.git", self.home)
            self._site = site
        return self._site

    def ssh(self) -> SshSite:
        if self._ssh is None:
            self._ssh = SshSite(self)
        return self._ssh

    def close(self) -> None:
        if self._ssh is not None:
            self._ssh.close()


def pass_cmd(ctx: Context, env: dict[str, str]) -> Cmd:
    """The bare interpreter start: the same interpreter and flags as gatekeeper-shell's #!."""
    return Cmd("python -c pass", [*ctx.interp, "-c", "pass"], env)


# -- 1. the forced-command decision -------------------------------------------------------

DRY = "gatekeeper-shell -> exec (dry run)"
GK_FULL = "gatekeeper-shell -> git-upload-pack (refs, v0)"
GIT_SHELL = "git-shell -> git-upload-pack (refs, v0)"
ADVERTISE = "git upload-pack --advertise-refs alone"
FLOOR = "python -c 'import sqlite3, json, hashlib'"
EDITABLE_NOBC = "dry run, gatekeeper without .pyc (recompiled)"
EDITABLE_BC = "dry run, editable .venv (its path finder)"


def bench_decision(ctx: Context) -> dict[str, Any]:
    site = ctx.site()
    shell = ctx.bin / "gatekeeper-shell"
    repo = site.repos / "bench" / "small.git"
    dry = site.dry_run_env()
    full = {k: v for k, v in dry.items() if k != "GATEKEEPER_DRY_RUN"}
    plain = h.clean_env(ctx.home)
    gk_args = ["--config", str(site.config), str(site.key_id)]
    git = shutil.which("git") or "/usr/bin/git"
    git_shell = shutil.which("git-shell") or "/usr/bin/git-shell"
    cmds = [
        pass_cmd(ctx, dry),
        Cmd(DRY, [str(shell), *gk_args], dry),
        Cmd(FLOOR, [*ctx.interp, "-c", "import sqlite3, json, hashlib"], dry),
        # "0000" (a flush packet) ends upload-pack cleanly right after the advertisement.
        Cmd(GK_FULL, [str(shell), *gk_args], full, stdin=b"0000"),
        Cmd(GIT_SHELL, [git_shell, "-c", f"git-upload-pack '{repo}'"], plain, stdin=b"0000"),
        Cmd(ADVERTISE, [git, "upload-pack", "--advertise-refs", str(repo)], plain),
    ]
    # What PYTHONDONTWRITEBYTECODE=1 costs when there are no (or only stale) .pyc files:
    # the same install, with gatekeeper's modules from a copy without __pycache__.
    nopyc = ctx.work / "no-pyc"
    shutil.copytree(
        ROOT / "gatekeeper", nopyc / "gatekeeper", ignore=shutil.ignore_patterns("__pycache__")
    )
    nopyc_env = {**dry, "PYTHONPATH": str(nopyc), "PYTHONDONTWRITEBYTECODE": "1"}
    cmds.append(Cmd(EDITABLE_NOBC, [str(shell), *gk_args], nopyc_env))
    dev_shell = ROOT / ".venv" / "bin" / "gatekeeper-shell"
    if dev_shell.exists():
        cmds.append(Cmd(EDITABLE_BC, [str(dev_shell), *gk_args], dry))
    runs = ctx.runs(15, 60)
    log(f"{len(cmds)} commands x {runs} runs, interleaved")
    res = h.interleaved(cmds, runs, ctx.work)
    base = res["python -c pass"]
    t = ctx.table
    t.header()
    t.row("python -c pass (bare interpreter start)", base, "1.00x")
    r = h.ratio(res[DRY], base)
    added = res[DRY]["median_ms"] - base["median_ms"]
    t.row(DRY, res[DRY], f"{r:.2f}x python -c pass (+{added:.1f} ms)")
    t.row(
        FLOOR,
        res[FLOOR],
        f"{h.ratio(res[FLOOR], base):.2f}x: a floor for a stdlib path that reads SQLite",
    )
    t.row(GIT_SHELL, res[GIT_SHELL], "baseline for the full path")
    t.row(GK_FULL, res[GK_FULL], f"{h.ratio(res[GK_FULL], res[GIT_SHELL]):.2f}x git-shell")
    t.row(ADVERTISE, res[ADVERTISE], "what git itself costs")
    for name in (EDITABLE_NOBC, EDITABLE_BC):
        if name in res:
            t.row(name, res[name], f"{h.ratio(res[name], base):.2f}x python -c pass")
    out: dict[str, Any] = {
        "runs": runs,
        "results": res,
        "ratio_dry_run_vs_python": r,
        "added_ms_vs_python": round(added, 3),
        "ratio_full_vs_git_shell": h.ratio(res[GK_FULL], res[GIT_SHELL]),
    }
    t.check(
        "decision <= 3x python -c pass",
        r <= BUDGET_DECISION,
        f"{r:.2f}x ({res[DRY]['median_ms']:.1f} vs {base['median_ms']:.1f} ms;"
        f" aim {AIM_DECISION:.0f}x)",
    )
    out["imports"] = import_profile(ctx, [str(shell), *gk_args], dry)
    out["stdlib_import_costs"] = stdlib_costs(ctx, dry)
    out["phases"] = hot_path_phases(ctx, site, dry)
    return out


STDLIB_IMPORTS = (
    "import re",
    "import json",
    "import pathlib",
    "import sqlite3",
    "import hashlib",
    "from _sha256 import sha256",
    "import datetime",
    "import shlex",
    "import sqlite3, json, hashlib",
)


def stdlib_costs(ctx: Context, env: dict[str, str]) -> dict[str, Any]:
    """What each standard-library import of the hot path costs a fresh interpreter (and
    what -S/-I save), measured like the rest: interleaved against `python -c pass`."""
    cmds = [pass_cmd(ctx, env)]
    cmds += [Cmd(code, [*ctx.interp, "-c", code], env) for code in STDLIB_IMPORTS]
    cmds.append(Cmd("python -I -S -c pass", [*ctx.interp, "-I", "-S", "-c", "pass"], env))
    runs = ctx.runs(10, 30)
    res = h.interleaved(cmds, runs, ctx.work)
    base = res["python -c pass"]["median_ms"]
    print(
        f"  what the hot path's standard-library imports cost a fresh interpreter"
        f" (each alone, {runs} interleaved runs; added to python -c pass):",
        flush=True,
    )
    out = {}
    for cmd in cmds[1:]:
        added = res[cmd.name]["median_ms"] - base
        out[cmd.name] = {**res[cmd.name], "added_ms": round(added, 3)}
        print(f"    {cmd.name:40} {added:+6.1f} ms", flush=True)
    return {"runs": runs, "python_pass_ms": base, "imports": out}


IMPORT_LINE = re.compile(r"^import time:\s+(\d+) \|\s+(\d+) \| (\s*)(\S.*)$")


def importtime(argv: list[str], env: dict[str, str], cwd: Path) -> list[tuple[str, int, int, int]]:
    result = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise BenchError(f"-X importtime run failed: {result.stderr[-1500:]}")
    rows = []
    for line in result.stderr.splitlines():
        m = IMPORT_LINE.match(line)
        if m:
            rows.append(
                (m.group(4).strip(), int(m.group(1)), int(m.group(2)), len(m.group(3)) // 2)
            )
    return rows


def import_profile(ctx: Context, gk_argv: list[str], env: dict[str, str]) -> dict[str, Any]:
    """Which modules the hot path imports (`python -X importtime`), medians over runs."""
    runs = ctx.runs(5, 15)
    selfs: dict[str, list[int]] = defaultdict(list)
    cums: dict[str, list[int]] = defaultdict(list)
    depth: dict[str, int] = {}
    order: list[str] = []
    baseline: set[str] = set()
    for _ in range(runs):
        for name, s, c, d in importtime([*ctx.interp, "-X", "importtime", *gk_argv], env, ctx.work):
            if name not in depth:
                order.append(name)
            selfs[name].append(s)
            cums[name].append(c)
            depth[name] = d
        for name, *_ in importtime([*ctx.interp, "-X", "importtime", "-c", "pass"], env, ctx.work):
            baseline.add(name)
    site_pkgs = {p.name.split(".")[0] for p in h.site_packages().iterdir()}
    modules: list[dict[str, Any]] = [
        {
            "module": name,
            "depth": depth[name],
            "self_ms": round(statistics.median(selfs[name]) / 1e3, 3),
            "cumulative_ms": round(statistics.median(cums[name]) / 1e3, 3),
            "beyond_bare_python": name not in baseline,
        }
        for name in order
    ]
    extra = [m for m in modules if m["beyond_bare_python"]]
    heavy = sorted({m["module"] for m in modules if m["module"].split(".")[0] in HEAVY})
    third = sorted(
        {
            m["module"].split(".")[0]
            for m in modules
            if m["beyond_bare_python"]
            and m["module"].split(".")[0] in site_pkgs
            and m["module"].split(".")[0] != "gatekeeper"
        }
    )
    top = sorted(modules, key=lambda m: -m["cumulative_ms"])[:15]
    top_self = sorted(extra, key=lambda m: -m["self_ms"])[:10]
    t = ctx.table
    print(
        f"  imports on the hot path (-X importtime, median of {runs}; the profiler inflates"
        " times): top 15 by cumulative time",
        flush=True,
    )
    for m in top:
        mark = "" if m["beyond_bare_python"] else "   (also in bare python)"
        print(
            f"    {'  ' * m['depth']}{m['module']:<{40 - 2 * m['depth']}}"
            f" {m['cumulative_ms']:>7.2f} ms cum {m['self_ms']:>6.2f} ms self{mark}",
            flush=True,
        )
    extra_self = sum(m["self_ms"] for m in extra)
    print(
        f"  {len(extra)} modules beyond bare python, {extra_self:.1f} ms self time in all;"
        " largest self times: " + ", ".join(f"{m['module']} {m['self_ms']:.1f}" for m in top_self),
        flush=True,
    )
    wrapper = [m for m in extra if m["depth"] == 0 and not m["module"].startswith("gatekeeper")]
    if wrapper:
        print(
            "  imported by the gatekeeper-shell script itself (a console-script wrapper),"
            " before gatekeeper: "
            + ", ".join(f"{m['module']} {m['cumulative_ms']:.1f} ms" for m in wrapper),
            flush=True,
        )
    gk_mods = [m["module"] for m in modules if m["module"].startswith("gatekeeper")]
    print(f"  gatekeeper modules: {', '.join(gk_mods)}", flush=True)
    print(f"  third-party packages imported: {', '.join(third) or 'none'}", flush=True)
    t.check(
        "hot path imports none of " + ", ".join(HEAVY[:6]),
        not heavy,
        "imported: " + ", ".join(heavy) if heavy else "none imported",
        failed="FAIL",
    )
    return {
        "runs": runs,
        "top15_cumulative": top,
        "top10_self_beyond_bare_python": top_self,
        "modules_beyond_bare_python": len(extra),
        "self_ms_beyond_bare_python": round(extra_self, 3),
        "imported_by_script_wrapper": [m["module"] for m in wrapper],
        "heavy_imported": heavy,
        "third_party": third,
        "gatekeeper_modules": gk_mods,
        "all": modules,
    }


POLICY_STEP = "policy: read file, hash, load compiled cache"
DECIDE_STEP = "decide()"


def phase_stats(
    ctx: Context, config: Path, key_id: int, env: dict[str, str], runs: int
) -> dict[str, dict[str, Any]]:
    """bench/phases.py in `runs` fresh processes: the time of each step of main()."""
    argv = [*ctx.interp, str(h.BENCH_DIR / "phases.py"), "--config", str(config), str(key_id)]
    samples: dict[str, list[float]] = defaultdict(list)
    for _ in range(runs):
        start = time.perf_counter()
        data = json.loads(h.run(argv, env=env, cwd=ctx.work))
        total = time.perf_counter() - start
        if data["rc"] != 0:
            raise BenchError(f"phases.py: gatekeeper-shell returned {data['rc']}")
        samples["whole process"].append(total)
        samples["  interpreter start + exit, driver"].append(
            total - data["import gatekeeper.shell"] - data["main()"]
        )
        samples["  import gatekeeper.shell"].append(data["import gatekeeper.shell"])
        samples["  main()"].append(data["main()"])
        steps = data["steps"]
        for label, seconds in steps.items():
            samples["    " + label].append(seconds)
        samples["    other (records, datetime, env, token)"].append(
            data["main()"] - sum(steps.values())
        )
    return {
        k.strip() if k.strip() in (POLICY_STEP, DECIDE_STEP) else k: h.summary(v)
        for k, v in samples.items()
    }


def import_summary(ctx: Context, argv: list[str], env: dict[str, str], runs: int) -> dict[str, Any]:
    """Total import time of a command, its heaviest top-level imports, heavy packages."""
    totals: list[int] = []
    bare: list[int] = []
    per: dict[str, list[int]] = defaultdict(list)
    heavy: set[str] = set()
    modules = 0
    for _ in range(runs):
        rows = importtime([*ctx.interp, "-X", "importtime", *argv], env, ctx.work)
        modules = len(rows)
        totals.append(sum(c for _, _, c, d in rows if d == 0))
        for name, _, cum, depth in rows:
            if depth == 0:
                per[name].append(cum)
            if name.split(".")[0] in HEAVY:
                heavy.add(name.split(".")[0])
        base = importtime([*ctx.interp, "-X", "importtime", "-c", "pass"], env, ctx.work)
        bare.append(sum(c for _, _, c, d in base if d == 0))
    top = sorted(((statistics.median(v) / 1e3, n) for n, v in per.items()), reverse=True)
    return {
        "runs": runs,
        "total_ms": round(statistics.median(totals) / 1e3, 3),
        "bare_python_ms": round(statistics.median(bare) / 1e3, 3),
        "modules": modules,
        "heavy": sorted(heavy),
        "top_level": [(n, round(ms, 3)) for ms, n in top[:10]],
    }


def hot_path_phases(ctx: Context, site: Site, env: dict[str, str]) -> dict[str, Any]:
    """Where one decision's time goes: bench/phases.py wraps each step of main()."""
    runs = ctx.runs(7, 21)
    stats = phase_stats(ctx, site.config, site.key_id, env, runs)
    print(
        f"  phases of one dry run (bench/phases.py, median of {runs} fresh processes;"
        " the parts are medians too, so they need not add up):",
        flush=True,
    )
    for label, s in stats.items():
        indent = "      " if label in (POLICY_STEP, DECIDE_STEP) else "  "
        ctx.table.row(indent + label, s)
    return {"runs": runs, "steps": stats}


# -- 2. AuthorizedKeysCommand lookup ---------------------------------------------------------

KEY_SIZES = (100, 10_000, 100_000)
DIRECT_ENTRY = (
    "import sys; from gatekeeper.authkeys import keys_command; sys.exit(keys_command(sys.argv[1:]))"
)


def synthetic_key(i: int) -> tuple[str, str]:
    """(base64 blob, SHA256 fingerprint) of a well-formed, made-up Ed25519 key."""
    raw = hashlib.sha256(b"gatekeeper-bench-key-%d" % i).digest()
    kind = b"ssh-ed25519"
    blob = len(kind).to_bytes(4, "big") + kind + len(raw).to_bytes(4, "big") + raw
    digest = base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
    return base64.b64encode(blob).decode(), "SHA256:" + digest


def fill_keys(db: Path, n: int, users: int = 1000) -> float:
    """Insert `n` synthetic keys for `users` users straight into the store, in one
    transaction; returns the seconds it took."""
    start = time.perf_counter()
    conn = sqlite3.connect(db, isolation_level=None, timeout=30)
    try:
        now = int(time.time())
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(
            "INSERT INTO users (name, created_at) VALUES (?, ?)",
            [(f"kuser{u:04d}", now) for u in range(min(users, n))],
        )
        ids = [r[0] for r in conn.execute("SELECT id FROM users WHERE name LIKE 'kuser%'")]
        rows = []
        for i in range(n):
            b64, fp = synthetic_key(i)
            rows.append((ids[i % len(ids)], fp, "ssh-ed25519", b64, 256, f"bench-{i}", now))
        conn.executemany(
            "INSERT INTO keys (user_id, fingerprint, key_type, blob, bits, comment, added_at)"
            " VALUES (?,?,?,?,?,?,?)",
            rows,
        )
        conn.execute("COMMIT")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()
    return time.perf_counter() - start


def bench_keys(ctx: Context) -> dict[str, Any]:
    from gatekeeper import authkeys
    from gatekeeper.store import Store

    sites: dict[int, Site] = {}
    fill: dict[int, float] = {}
    for n in KEY_SIZES:
        site = Site(ctx, f"keys-{n}")
        site.gk("init")
        fill[n] = fill_keys(site.db, n)
        sites[n] = site
    log("stores with " + ", ".join(f"{n:,} keys ({fill[n]:.1f} s)" for n in KEY_SIZES))
    login = h.current_user()
    gatekeeper = str(ctx.bin / "gatekeeper")
    cmds = [pass_cmd(ctx, sites[KEY_SIZES[0]].env())]
    for n, site in sites.items():
        b64, _ = synthetic_key(n // 2)
        args = [login, "ssh-ed25519", b64]
        cmds.append(
            Cmd(
                f"keys-command CLI, {n:,} keys",
                [gatekeeper, "--config", str(site.config), "keys-command", *args],
                site.env(),
            )
        )
        cmds.append(
            Cmd(
                f"authkeys.keys_command only, {n:,} keys",
                [*ctx.interp, "-c", DIRECT_ENTRY, "--config", str(site.config), *args],
                site.env(),
            )
        )
    big = sites[KEY_SIZES[-1]]
    unknown_b64, _ = synthetic_key(10**9)
    unknown = Cmd(
        f"keys-command CLI, unknown key, {KEY_SIZES[-1]:,} keys",
        [
            gatekeeper,
            "--config",
            str(big.config),
            "keys-command",
            login,
            "ssh-ed25519",
            unknown_b64,
        ],
        big.env(),
    )
    cmds.append(unknown)
    for cmd in cmds[1:]:
        out = h.check(cmd, ctx.work).stdout.decode()
        if cmd is unknown:
            if out.strip():
                raise BenchError(f"{cmd.name}: printed a line for an unknown key")
        elif not out.startswith('command="') or "restrict ssh-ed25519 " not in out:
            raise BenchError(f"{cmd.name}: unexpected output {out[:200]!r}")
    runs = ctx.runs(8, 30)
    log(f"{len(cmds)} commands x {runs} runs, interleaved")
    res = h.interleaved(cmds, runs, ctx.work)
    base = res["python -c pass"]
    t = ctx.table
    t.header()
    t.row("python -c pass", base, "1.00x")
    for cmd in cmds[1:]:
        t.row(cmd.name, res[cmd.name], f"{h.ratio(res[cmd.name], base):.2f}x python -c pass")

    # In process: the indexed query itself, and the whole lookup without interpreter start.
    inproc: dict[str, Any] = {}
    rng = random.Random(2)
    saved = os.environ.get("GATEKEEPER_CACHE_DIR")
    try:
        for n, site in sites.items():
            os.environ["GATEKEEPER_CACHE_DIR"] = str(site.cache)
            hits = [synthetic_key(rng.randrange(n))[1] for _ in range(ctx.runs(500, 2000))]
            misses = [synthetic_key(n + 10 + i)[1] for i in range(ctx.runs(500, 2000))]
            with Store.open(site.state) as store:
                sql = store._KEY_SELECT + " WHERE k.fingerprint = ?"
                plan = " | ".join(
                    r[3] for r in store.conn.execute("EXPLAIN QUERY PLAN " + sql, (hits[0],))
                )
                hit = _per_call(store.key_by_fingerprint, hits)
                miss = _per_call(store.key_by_fingerprint, misses)
            b64, _ = synthetic_key(n // 2)
            argv = ["--config", str(site.config), login, "ssh-ed25519", b64]
            whole = h.timed(lambda a=argv: authkeys.lookup_line(a), ctx.runs(50, 200))
            inproc[str(n)] = {"hit": hit, "miss": miss, "lookup_line": whole, "query_plan": plan}
    finally:
        if saved is None:
            os.environ.pop("GATEKEEPER_CACHE_DIR", None)
        else:
            os.environ["GATEKEEPER_CACHE_DIR"] = saved
    print("  in process (no interpreter start):", flush=True)
    for n in KEY_SIZES:
        d = inproc[str(n)]
        t.row(
            f"  key_by_fingerprint, {n:,} keys (hit / miss)",
            None,
            f"{d['hit']['median_us']:.1f} / {d['miss']['median_us']:.1f} us",
        )
        t.row(f"  authkeys.lookup_line, {n:,} keys", d["lookup_line"], "policy + store + query")
    print(f"  query plan: {inproc[str(KEY_SIZES[-1])]['query_plan']}", flush=True)
    cli_imports = import_summary(ctx, cmds[1].argv, cmds[1].env, ctx.runs(3, 7))
    print(
        f"  keys-command CLI imports (-X importtime): {cli_imports['total_ms']:.0f} ms"
        f" (bare python {cli_imports['bare_python_ms']:.0f} ms), {cli_imports['modules']} modules;"
        f" heavy: {', '.join(cli_imports['heavy']) or 'none'}; largest top-level: "
        + ", ".join(f"{m} {ms:.0f} ms" for m, ms in cli_imports["top_level"][:6]),
        flush=True,
    )
    small, large = KEY_SIZES[0], KEY_SIZES[-1]
    cli_ratio = h.ratio(
        res[f"keys-command CLI, {large:,} keys"], res[f"keys-command CLI, {small:,} keys"]
    )
    q_ratio = round(
        inproc[str(large)]["hit"]["median_us"] / inproc[str(small)]["hit"]["median_us"], 3
    )
    t.check(
        f"key lookup flat from {small:,} to {large:,} keys",
        cli_ratio <= 1.15 and "USING INDEX" in inproc[str(large)]["query_plan"],
        f"CLI {cli_ratio:.2f}x, query {q_ratio:.2f}x, plan uses an index:"
        f" {'yes' if 'USING INDEX' in inproc[str(large)]['query_plan'] else 'NO'}",
        failed="FAIL",
    )
    cli = res[f"keys-command CLI, {small:,} keys"]
    t.check(
        "keys-command CLI start (informational, no budget)",
        True,
        f"{h.ratio(cli, base):.2f}x python -c pass; sshd runs it for every key a client offers",
    )
    return {
        "runs": runs,
        "fill_seconds": {str(n): round(s, 3) for n, s in fill.items()},
        "results": res,
        "in_process": inproc,
        "cli_imports": cli_imports,
        "ratio_cli_largest_vs_smallest": cli_ratio,
        "ratio_query_largest_vs_smallest": q_ratio,
    }


def _per_call(fn: Callable[[str], Any], items: list[str]) -> dict[str, float]:
    times = []
    for item in items:
        start = time.perf_counter()
        fn(item)
        times.append(time.perf_counter() - start)
    return {
        "n": len(times),
        "median_us": round(statistics.median(times) * 1e6, 2),
        "p90_us": round(h.p90(times) * 1e6, 2),
    }


# -- 3. policy size --------------------------------------------------------------------------

POLICY_SIZES = (10, 1_000, 10_000)
TEAMS = 1_000


def generate_policy(rules: int, teams: int = TEAMS) -> str:
    """`teams` teams of 8 users (alice in three of them, level none) and `rules` rules:
    80% exact names, 15% `x/*`, 5% `x/**`, each readable by 2 teams and writable by 1,
    10% with require_2fa; the rule that lets alice at bench/small comes last."""
    rng = random.Random(rules)
    mine = {0, teams // 2, teams - 1}
    lines = ["teams:"]
    for t in range(teams):
        members = [f"user{u:05d}" for u in rng.sample(range(20_000), 8)]
        lines.append(f"  t{t:04d}:")
        if t in mine:
            members.append("alice")
        lines.append(f"    members: [{', '.join(members)}]")
        level = "none" if t in mine else rng.choice(("none", "enrolled", "verified"))
        if level != "none":
            lines.append(f"    require_2fa: {level}")
    lines.append("repositories:")
    for i in range(rules - 1):
        kind = rng.random()
        match = f"p{i:05d}/repo" if kind < 0.8 else f"g{i:05d}/*" if kind < 0.95 else f"d{i:05d}/**"
        read = ", ".join(f"t{x:04d}" for x in rng.sample(range(teams), 2))
        lines += [f"  - match: {match}", f"    read: [{read}]"]
        lines.append(f"    write: [t{rng.randrange(teams):04d}]")
        if rng.random() < 0.1:
            lines.append("    require_2fa: enrolled")
    lines += [
        "  - match: bench/*",
        f"    read: [t{teams // 2:04d}]",
        f"    write: [t{teams - 1:04d}]",
    ]
    return "\n".join(lines) + "\n"


def bench_policy(ctx: Context) -> dict[str, Any]:
    from gatekeeper.policy import check as policy

    site = ctx.site()
    shell = str(ctx.bin / "gatekeeper-shell")
    key = str(site.key_id)
    dry = site.dry_run_env()
    cmds = [
        pass_cmd(ctx, dry),
        Cmd(
            "site policy (1 rule, 1 team), warm cache",
            [shell, "--config", str(site.config), key],
            dry,
        ),
    ]
    sizes: dict[str, Any] = {}
    for n in POLICY_SIZES:
        text = site.server_yaml() + generate_policy(n)
        path = site.base / f"policy-{n}.yaml"
        path.write_text(text)
        entry: dict[str, Any] = {"rules": n, "teams": TEAMS, "policy_bytes": len(text.encode())}
        if not ctx.quick:
            entry["compile_in_process"] = h.timed(
                lambda t=text, p=path: policy.compile_policy_text(t, str(p)),
                1 if n >= 10_000 else 3,
            )
        # The first connection after a change compiles the YAML and writes the cache.
        first = []
        for i in range(ctx.runs(1, 3)):
            cache = ctx.work / f"policy-cache-{n}-{i}"
            env = {**dry, "GATEKEEPER_CACHE_DIR": str(cache)}
            log(f"{n:,} rules: first connection after a change ({i + 1})")
            start = time.perf_counter()
            h.run([shell, "--config", str(path), key], env=env, cwd=ctx.work)
            first.append(time.perf_counter() - start)
        entry["first_connection_after_change"] = h.summary(first)
        entry["compiled_cache_bytes"] = sum(f.stat().st_size for f in cache.glob("policy-*"))
        if n == max(POLICY_SIZES):
            entry["stampede"] = stampede(ctx, shell, path, key, dry, 50)
        warm = {**dry, "GATEKEEPER_CACHE_DIR": str(cache)}
        entry["phases"] = phase_stats(ctx, path, site.key_id, warm, ctx.runs(3, 9))
        entry["command"] = name = f"{n:,} rules, {TEAMS:,} teams, warm cache"
        cmds.append(Cmd(name, [shell, "--config", str(path), key], warm))
        sizes[str(n)] = entry
    runs = ctx.runs(8, 40)
    log(f"{len(cmds)} commands x {runs} runs, interleaved")
    res = h.interleaved(cmds, runs, ctx.work)
    base = res["python -c pass"]
    t = ctx.table
    t.header()
    t.row("python -c pass", base, "1.00x")
    for cmd in cmds[1:]:
        t.row(cmd.name, res[cmd.name], f"{h.ratio(res[cmd.name], base):.2f}x python -c pass")
    print(
        "  per size: first connection after a change (YAML compile + cache write) |"
        " per connection (fresh process): load compiled cache, decide()",
        flush=True,
    )
    worst = 0.0
    for n in POLICY_SIZES:
        d = sizes[str(n)]
        d["warm"] = res[d["command"]]
        d["ratio_vs_python"] = h.ratio(res[d["command"]], base)
        worst = max(worst, d["ratio_vs_python"])
        compile_note = (
            f"compile {d['compile_in_process']['median_ms']:.0f} ms in process, "
            if "compile_in_process" in d
            else ""
        )
        t.row(
            f"  {n:,} rules ({d['policy_bytes'] / 1024:.0f} KB YAML,"
            f" {d['compiled_cache_bytes'] / 1024:.0f} KB cache)",
            None,
            f"{compile_note}first run {d['first_connection_after_change']['median_ms']:.0f} ms |"
            f" cache {d['phases'][POLICY_STEP]['median_ms']:.1f} ms,"
            f" decide {d['phases'][DECIDE_STEP]['median_ms']:.1f} ms",
        )
    big = sizes[str(max(POLICY_SIZES))].get("stampede")
    if big:
        t.row(
            f"  {big['connections']} connections at once after an edit, "
            f"{max(POLICY_SIZES):,} rules",
            None,
            f"all done in {big['wall_s']:.1f} s, the slowest {big['slowest_s']:.1f} s "
            f"(one compile, the others wait for it); peak {big['peak_rss_mb']:.0f} MB a process",
        )
    t.check(
        f"decision within {BUDGET_DECISION:.0f}x python at every policy size (warm cache)",
        worst <= BUDGET_DECISION,
        f"worst {worst:.2f}x ("
        + ", ".join(f"{n:,} rules {sizes[str(n)]['ratio_vs_python']:.2f}x" for n in POLICY_SIZES)
        + ")",
    )
    return {"runs": runs, "results": res, "sizes": sizes}


def stampede(
    ctx: Context, shell: str, path: Path, key: str, dry: dict[str, str], count: int
) -> dict[str, Any]:
    """`count` forced commands at once against a policy nobody has compiled yet (an
    edit in place): how long until all have decided, and the largest process."""
    import resource

    cache = ctx.work / f"policy-cache-stampede-{time.monotonic_ns()}"
    env = {**dry, "GATEKEEPER_CACHE_DIR": str(cache)}
    log(f"{count} connections at once after an edit of {path.name}")
    start = time.perf_counter()
    procs = [
        subprocess.Popen([shell, "--config", str(path), key], env=env, cwd=ctx.work)
        for _ in range(count)
    ]
    ends = []
    for proc in procs:
        proc.wait(timeout=600)
        ends.append(time.perf_counter() - start)
    wall = time.perf_counter() - start
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {
        "connections": count,
        "wall_s": wall,
        "slowest_s": max(ends),
        "failed": sum(p.returncode != 0 for p in procs),
        "peak_rss_mb": peak_kb / 1024,
    }


# -- 4. end to end through a real sshd ---------------------------------------------------------


class SshSite:
    """One sshd on loopback serving the same user two ways: alice's key runs
    gatekeeper-shell (authorized_keys written by `gatekeeper authorized-keys`), a second
    key runs plain `git-shell -c "$SSH_ORIGINAL_COMMAND"` on an identical repository."""

    def __init__(self, ctx: Context) -> None:
        sys.path.insert(0, str(ROOT))
        from testing import sshd

        missing = [] if sshd.find_sshd() else ["sshd (openssh-server)"]
        missing += [t for t in ("ssh", "ssh-keygen", "git-shell") if shutil.which(t) is None]
        if missing:
            raise BenchError("needs " + ", ".join(missing) + " (scripts/test.sh installs them)")
        self.sshd = sshd
        self.ctx = ctx
        site = self.site = ctx.site()
        log("starting sshd on loopback (authorized_keys: gatekeeper-shell and git-shell keys)")
        self.plain_repo = ctx.work / "plain" / "small.git"
        h.run(
            [
                "git",
                "clone",
                "-q",
                "--bare",
                str(site.repos / "bench" / "small.git"),
                str(self.plain_repo),
            ],
            env=git_env(ctx.home),
        )
        try:
            site.gk("hooks", "install", "--all")
            self.hooks = "installed"
        except BenchError as exc:
            self.hooks = f"not installed: {str(exc).splitlines()[-1][:200]}"
            log(f"gatekeeper hooks {self.hooks}")
        plain_key, plain_pub = sshd.generate_user_key(ctx.work / "keys", "plain")
        noop_key, noop_pub = sshd.generate_user_key(ctx.work / "keys", "noop")
        auth = site.base / "authorized_keys"
        site.gk("authorized-keys", "--write", str(auth))
        with auth.open("a") as fh:
            fh.write(
                'command="git-shell -c \\"$SSH_ORIGINAL_COMMAND\\"",restrict '
                + sshd.public_key_line(plain_pub)
                + "\n"
            )
            fh.write('command="true",restrict ' + sshd.public_key_line(noop_pub) + "\n")
        # The account's HOME: an empty directory, as a git account's would be. sshd runs
        # forced commands through the login shell, and bash sources ~/.bashrc for ssh
        # commands: a developer's .bashrc (pyenv init...) would add the same large
        # constant to both sides and hide the ratio.
        self.account_home = ctx.work / "git-account-home"
        self.account_home.mkdir()
        self.extra_config = f"SetEnv HOME={self.account_home} GATEKEEPER_CACHE_DIR={site.cache}"
        self.server = sshd.SshServer(
            authorized_keys_file=auth, extra_config=self.extra_config, tmp_dir=ctx.work
        )
        self.server.start()
        self.gk = self.server.client(site.key_path)
        self.plain = self.server.client(plain_key)
        self.noop = self.server.client(noop_key)
        probe = self.noop.run("x")
        if probe.returncode != 0:
            raise BenchError(f"ssh with a no-op forced command failed: {probe.stderr[-500:]}")
        self.gk_url = self.gk.url("bench/small")
        self.plain_url = self.plain.url(str(self.plain_repo))
        a = self.git(self.gk, "ls-remote", self.gk_url)
        b = self.git(self.plain, "ls-remote", self.plain_url)
        if a.split() != b.split():
            raise BenchError(f"gatekeeper and git-shell advertise different refs:\n{a}\n{b}")
        self.kc_server: Any = None

    @staticmethod
    def git(client: Any, *args: str, cwd: Path | None = None, check: bool = True) -> str:
        result = subprocess.run(
            ["git", *args],
            env=client.git_env(),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=300,
        )
        if check and result.returncode != 0:
            raise BenchError(
                f"git {' '.join(args[:2])} failed ({result.returncode}): {result.stderr[-1500:]}"
            )
        return result.stdout

    def keys_command_server(self) -> tuple[Any, Any, Path]:
        """A second sshd in AuthorizedKeysCommand mode (for an informational row)."""
        if self.kc_server is None:
            site = self.site
            self.kc_calls = self.ctx.work / "keys-command-calls"
            wrapper = self.sshd.make_keys_command_wrapper(
                "#!/bin/sh\n"
                f"echo x >> {self.kc_calls}\n"
                f"GATEKEEPER_CACHE_DIR={site.cache}\nexport GATEKEEPER_CACHE_DIR\n"
                f'exec {self.ctx.bin / "gatekeeper"} --config {site.config} keys-command "$@"\n',
                name="bench-keys-command",
            )
            self.kc_server = self.sshd.SshServer(
                keys_command=[str(wrapper), "%u", "%t", "%k"],
                extra_config=self.extra_config,
                tmp_dir=self.ctx.work,
            )
            self.kc_server.start()
            self.kc_client = self.kc_server.client(site.key_path)
            self.git(self.kc_client, "ls-remote", self.kc_client.url("bench/small"))
        return self.kc_server, self.kc_client, self.kc_calls

    def keys_script_server(self) -> Any:
        """A third sshd whose AuthorizedKeysCommand is `gatekeeper keys-script`'s shell
        script (`%u %f`): the key index, no interpreter start."""
        if getattr(self, "ks_server", None) is None:
            site = self.site
            text = site.gk("keys-script")
            wrapper = self.sshd.make_keys_command_wrapper(text, name="bench-keys-script")
            self.ks_server = self.sshd.SshServer(
                keys_command=[str(wrapper), "%u", "%f"],
                extra_config=self.extra_config,
                tmp_dir=self.ctx.work,
            )
            self.ks_server.start()
            self.ks_client = self.ks_server.client(site.key_path)
            self.git(self.ks_client, "ls-remote", self.ks_client.url("bench/small"))
        return self.ks_client

    def close(self) -> None:
        self.server.stop()
        if self.kc_server is not None:
            self.kc_server.stop()
        if getattr(self, "ks_server", None) is not None:
            self.ks_server.stop()


def timed_tasks(
    tasks: dict[str, Callable[[], Path | None]], runs: int, warmup: int = 2, seed: int = 4
) -> dict[str, dict[str, Any]]:
    """Like harness.interleaved, for Python callables; a returned path is removed after
    timing (a clone's directory)."""
    rng = random.Random(seed)
    times: dict[str, list[float]] = {name: [] for name in tasks}
    for round_no in range(warmup + runs):
        names = list(tasks)
        rng.shuffle(names)
        for name in names:
            start = time.perf_counter()
            leftover = tasks[name]()
            elapsed = time.perf_counter() - start
            if leftover is not None:
                shutil.rmtree(leftover, ignore_errors=True)
            if round_no >= warmup:
                times[name].append(elapsed)
    return {name: h.summary(v) for name, v in times.items()}


def bench_e2e(ctx: Context) -> dict[str, Any]:
    ss = ctx.ssh()
    clones = ctx.work / "clones"
    clones.mkdir(exist_ok=True)
    counter = iter(range(10**9))

    def ls_remote(client: Any, url: str) -> Callable[[], None]:
        def task() -> None:
            ss.git(client, "ls-remote", url)

        return task

    def clone(client: Any, url: str) -> Callable[[], Path]:
        def task() -> Path:
            dest = clones / f"c{next(counter)}"
            ss.git(client, "clone", "-q", url, str(dest))
            return dest

        return task

    def noop() -> None:
        result = ss.noop.run("x")
        if result.returncode != 0:
            raise BenchError(f"ssh no-op failed: {result.stderr[-500:]}")

    runs = ctx.runs(10, 30)
    log(f"ls-remote: 2 x {runs} runs and ssh with a no-op forced command, interleaved")
    lsr = timed_tasks(
        {
            "gatekeeper": ls_remote(ss.gk, ss.gk_url),
            "git-shell": ls_remote(ss.plain, ss.plain_url),
            "ssh no-op": noop,
        },
        runs,
    )
    cruns = ctx.runs(8, 20)
    log(f"clone: 2 x {cruns} runs, interleaved")
    cl = timed_tasks(
        {"gatekeeper": clone(ss.gk, ss.gk_url), "git-shell": clone(ss.plain, ss.plain_url)}, cruns
    )
    pack = subprocess.run(
        ["git", "count-objects", "-vH"],
        cwd=ss.plain_repo,
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    t = ctx.table
    t.header()
    r_ls = h.ratio(lsr["gatekeeper"], lsr["git-shell"])
    r_cl = h.ratio(cl["gatekeeper"], cl["git-shell"])
    t.row("ssh, forced command `true` (the SSH floor)", lsr["ssh no-op"], "")
    t.row("git ls-remote via git-shell", lsr["git-shell"], "baseline")
    added = lsr["gatekeeper"]["median_ms"] - lsr["git-shell"]["median_ms"]
    t.row(
        "git ls-remote via gatekeeper",
        lsr["gatekeeper"],
        f"{r_ls:.2f}x git-shell (+{added:.0f} ms)",
    )
    t.row("git clone (20 files, 3 commits) via git-shell", cl["git-shell"], "baseline")
    added = cl["gatekeeper"]["median_ms"] - cl["git-shell"]["median_ms"]
    t.row("git clone via gatekeeper", cl["gatekeeper"], f"{r_cl:.2f}x git-shell (+{added:.0f} ms)")
    out: dict[str, Any] = {
        "runs": {"ls_remote": runs, "clone": cruns},
        "hooks": ss.hooks,
        "ls_remote": lsr,
        "clone": cl,
        "ratio_ls_remote": r_ls,
        "ratio_clone": r_cl,
        "repository": pack.strip().replace("\n", "; "),
    }
    t.check(f"ls-remote within {E2E_TARGET}x git-shell", r_ls <= E2E_TARGET, f"{r_ls:.2f}x")
    t.check(
        f"clone within {E2E_TARGET}x git-shell",
        r_cl <= E2E_TARGET,
        f"{r_cl:.2f}x (a clone also asks the forced command to re-check the read: fetchgate.py)",
    )
    # AuthorizedKeysCommand mode, on a second sshd: informational.
    try:
        _, kc_client, calls = ss.keys_command_server()
        calls.write_text("")
        kruns = ctx.runs(8, 20)
        kc = timed_tasks(
            {
                "keys-command mode": ls_remote(kc_client, kc_client.url("bench/small")),
                "gatekeeper": ls_remote(ss.gk, ss.gk_url),
                "git-shell": ls_remote(ss.plain, ss.plain_url),
            },
            kruns,
        )
        per_conn = len(calls.read_text().split()) / (kruns + 2)
        r_kc = h.ratio(kc["keys-command mode"], kc["git-shell"])
        t.row(
            "git ls-remote, AuthorizedKeysCommand mode",
            kc["keys-command mode"],
            f"{r_kc:.2f}x git-shell; {per_conn:.1f} keys-command runs per connection",
        )
        out["keys_command_mode"] = {
            "results": kc,
            "ratio_vs_git_shell": r_kc,
            "keys_command_runs_per_connection": per_conn,
        }
        t.check(
            f"ls-remote, AuthorizedKeysCommand mode, within {E2E_TARGET}x git-shell",
            r_kc <= E2E_TARGET,
            f"{r_kc:.2f}x ({per_conn:.1f} keys-command runs per connection)",
        )
    except (BenchError, ValueError, OSError, RuntimeError) as exc:
        out["keys_command_mode"] = {"error": str(exc)[:500]}
        t.row("AuthorizedKeysCommand mode", None, f"not measured: {str(exc)[:120]}")
    # The same through the shell AuthorizedKeysCommand (`gatekeeper keys-script`).
    try:
        ks_client = ss.keys_script_server()
        sruns = ctx.runs(8, 20)
        ks = timed_tasks(
            {
                "keys-script mode": ls_remote(ks_client, ks_client.url("bench/small")),
                "git-shell": ls_remote(ss.plain, ss.plain_url),
            },
            sruns,
        )
        r_ks = h.ratio(ks["keys-script mode"], ks["git-shell"])
        t.row(
            "git ls-remote, AuthorizedKeysCommand = keys-script (sh, key index)",
            ks["keys-script mode"],
            f"{r_ks:.2f}x git-shell",
        )
        out["keys_script_mode"] = {"results": ks, "ratio_vs_git_shell": r_ks}
        t.check(
            f"ls-remote, keys-script mode, within {E2E_TARGET}x git-shell",
            r_ks <= E2E_TARGET,
            f"{r_ks:.2f}x",
        )
    except (BenchError, ValueError, OSError, RuntimeError) as exc:
        out["keys_script_mode"] = {"error": str(exc)[:500]}
        t.row("keys-script mode", None, f"not measured: {str(exc)[:120]}")
    # A single push of one new commit, each side into its own repository.
    pruns = ctx.runs(8, 20)
    works = {}
    for name, client, url in (
        ("gatekeeper", ss.gk, ss.gk_url),
        ("git-shell", ss.plain, ss.plain_url),
    ):
        work = ctx.work / f"push-{name}"
        ss.git(client, "clone", "-q", url, str(work))
        works[name] = (client, work)

    def push(name: str) -> Callable[[], None]:
        client, work = works[name]

        def task() -> None:
            n = next(counter)
            (work / f"p{n}.txt").write_text(f"{n}\n")
            ss.git(client, "add", f"p{n}.txt", cwd=work)
            ss.git(client, "commit", "-qm", f"p{n}", cwd=work)
            ss.git(client, "push", "-q", "origin", "HEAD", cwd=work)

        return task

    log(f"push: 2 x {pruns} runs, interleaved (commit and push of one new file)")
    pu = timed_tasks({"gatekeeper": push("gatekeeper"), "git-shell": push("git-shell")}, pruns)
    r_pu = h.ratio(pu["gatekeeper"], pu["git-shell"])
    added = pu["gatekeeper"]["median_ms"] - pu["git-shell"]["median_ms"]
    t.row("commit + git push via git-shell", pu["git-shell"], "baseline")
    t.row(
        "commit + git push via gatekeeper (the push gate: pushgate.py)",
        pu["gatekeeper"],
        f"{r_pu:.2f}x git-shell (+{added:.0f} ms)",
    )
    out["push"] = {"results": pu, "ratio_vs_git_shell": r_pu}
    t.check(f"push within {E2E_TARGET}x git-shell", r_pu <= E2E_TARGET, f"{r_pu:.2f}x")
    return out


# -- 4b. authorized_keys mode with many keys ----------------------------------------------------

AK_SIZES = (100, 10_000, 100_000)


def bench_authkeys(ctx: Context) -> dict[str, Any]:
    """sshd reads authorized_keys on every connection, twice (once for the key a client
    offers, once for its signature), parsing each line up to the key; keys-command mode
    looks the key up by its fingerprint. Files of N lines as `gatekeeper authorized-keys`
    writes them (made-up keys), with alice's line in the middle or last (the newest key)."""
    from gatekeeper import authkeys

    ss = ctx.ssh()
    site = ss.site
    block = site.gk("authorized-keys")
    (alice_line,) = [line for line in block.splitlines() if "gatekeeper-shell" in line]
    shell = str(ctx.bin / "gatekeeper-shell")
    files: dict[str, Path] = {}
    for n in AK_SIZES:
        fake = []
        for i in range(n - 1):
            b64, fp = synthetic_key(i)
            fake.append(authkeys.key_line(10_000 + i, "ssh-ed25519", b64, site.config, shell, fp))
        for where, at in (("middle", (n - 1) // 2), ("last", n - 1)):
            lines = [*fake[:at], alice_line, *fake[at:]]
            path = ctx.work / f"authorized_keys-{n}-{where}"
            path.write_text(authkeys.render_block(lines))
            files[f"{n:,} keys, the key {where}"] = path
    log(f"sshd per file: {', '.join(files)}")
    servers = []
    tasks: dict[str, Callable[[], Path | None]] = {}

    def ls_remote(client: Any) -> Callable[[], None]:
        url = client.url("bench/small")

        def task() -> None:
            ss.git(client, "ls-remote", url)

        return task

    try:
        for name, path in files.items():
            server = ss.sshd.SshServer(
                authorized_keys_file=path, extra_config=ss.extra_config, tmp_dir=ctx.work
            )
            server.start()
            servers.append(server)
            client = server.client(site.key_path)
            ls_remote(client)()  # it works before it is timed
            tasks[f"authorized_keys, {name}"] = ls_remote(client)
        _, kc_client, _ = ss.keys_command_server()
        tasks["keys-command mode"] = ls_remote(kc_client)
        runs = ctx.runs(6, 15)
        log(f"git ls-remote: {len(tasks)} x {runs} runs, interleaved")
        res = timed_tasks(tasks, runs)
    finally:
        for server in servers:
            server.stop()
    t = ctx.table
    t.header()
    base = res[f"authorized_keys, {AK_SIZES[0]:,} keys, the key last"]
    for name, stats in res.items():
        added = stats["median_ms"] - base["median_ms"]
        t.row(f"git ls-remote, {name}", stats, f"{added:+.0f} ms vs {AK_SIZES[0]} keys")
    return {"runs": runs, "results": res}


# -- 5. concurrency --------------------------------------------------------------------------

CLONES = 50  # --quick: 20
PUSHES = 20  # --quick: 10
LOCKED = re.compile(r"database is locked|database is busy|locked by another process", re.I)


def burst(jobs: list[Callable[[], subprocess.CompletedProcess[str]]]) -> dict[str, Any]:
    """Start all jobs at once (a barrier); wall time from the first start to the last end."""
    barrier = threading.Barrier(len(jobs))
    results: list[Any] = [None] * len(jobs)

    def worker(i: int) -> None:
        barrier.wait()
        start = time.perf_counter()
        proc = jobs[i]()
        results[i] = (start, time.perf_counter(), proc.returncode, proc.stderr)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(jobs))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = max(r[1] for r in results) - min(r[0] for r in results)
    errors = [r[3] for r in results if r[2] != 0]
    stderr = "".join(r[3] for r in results)
    return {
        "jobs": len(jobs),
        "ok": len(jobs) - len(errors),
        "failed": len(errors),
        "wall_s": round(wall, 3),
        "per_s": round(len(jobs) / wall, 2),
        "median_job_ms": round(statistics.median(r[1] - r[0] for r in results) * 1e3, 1),
        "database_locked": len(LOCKED.findall(stderr)),
        "first_error": errors[0][-800:] if errors else None,
    }


def bench_concurrency(ctx: Context) -> dict[str, Any]:
    from gatekeeper.store import Store

    ss = ctx.ssh()
    site = ss.site
    with sqlite3.connect(f"file:{site.db}?mode=ro", uri=True) as conn:
        journal = conn.execute("PRAGMA journal_mode").fetchone()[0]
        seq0 = conn.execute("SELECT coalesce(max(seq), 0) FROM audit").fetchone()[0]
    work = ctx.work / "concurrency"
    work.mkdir()
    rounds = ctx.runs(1, 2)
    n_clones, n_pushes = ctx.runs(20, CLONES), ctx.runs(10, PUSHES)
    sides = {"gatekeeper": (ss.gk, ss.gk_url), "git-shell": (ss.plain, ss.plain_url)}
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {s: {"clone": [], "push": []} for s in sides}
    genv = git_env(ctx.home)

    def git_job(client: Any, args: list[str], cwd: Path | None = None) -> Callable[[], Any]:
        env = client.git_env()
        return lambda: subprocess.run(
            ["git", *args],
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=600,
        )

    for r in range(rounds):
        order = list(sides) if r % 2 == 0 else list(reversed(sides))
        for side in order:
            client, url = sides[side]
            dests = [work / f"clone-{side}-{r}-{i}" for i in range(n_clones)]
            log(f"round {r + 1}/{rounds}: {n_clones} parallel clones via {side}")
            res = burst([git_job(client, ["clone", "-q", url, str(d)]) for d in dests])
            runs[side]["clone"].append(res)
            for d in dests:
                shutil.rmtree(d, ignore_errors=True)
        prepared: dict[str, list[tuple[Path, str]]] = {}
        for side in order:
            prepared[side] = []
            for i in range(n_pushes):
                d = work / f"push-{side}-{r}-{i}"
                h.run(["git", "clone", "-q", str(ss.plain_repo), str(d)], env=genv)
                (d / f"push-{i}.txt").write_text(f"{side} {r} {i}\n")
                h.run(["git", "add", "-A"], env=genv, cwd=d)
                h.run(["git", "commit", "-q", "-m", f"push {r}-{i}"], env=genv, cwd=d)
                prepared[side].append((d, f"refs/heads/bench/{side}-{r}-{i}"))
        for side in order:
            client, url = sides[side]
            log(f"round {r + 1}/{rounds}: {n_pushes} parallel pushes via {side}")
            res = burst(
                [
                    git_job(client, ["push", "-q", url, f"HEAD:{ref}"], cwd=d)
                    for d, ref in prepared[side]
                ]
            )
            runs[side]["push"].append(res)
            for d, _ in prepared[side]:
                shutil.rmtree(d, ignore_errors=True)

    # Every allowed request must have its audit record; the chain must verify.
    with Store.open(site.state) as store:
        records = store.audit_records(after_seq=seq0)
        problems = store.verify_audit()
    reads = writes = refs = 0
    for rec in records:
        detail = json.loads(rec["detail"] or "{}")
        if rec["event"] == "access" and detail.get("allowed"):
            reads += rec["action"] == "read"
            writes += rec["action"] == "write"
        refs += rec["event"] == "ref-update"
    gk = runs["gatekeeper"]
    ok_clones = sum(x["ok"] for x in gk["clone"])
    ok_pushes = sum(x["ok"] for x in gk["push"])
    branches = subprocess.run(
        ["git", "for-each-ref", "--format=%(refname)", "refs/heads/bench/"],
        cwd=site.repos / "bench" / "small.git",
        capture_output=True,
        text=True,
        check=False,
    ).stdout.split()
    locked = sum(x["database_locked"] for s in runs.values() for k in s.values() for x in k)
    failed = sum(x["failed"] for x in gk["clone"] + gk["push"])
    expect_refs = ok_pushes if ss.hooks == "installed" else 0
    audit_ok = (
        reads == ok_clones == n_clones * rounds
        and writes == ok_pushes == n_pushes * rounds
        and refs == expect_refs
        and not problems
    )

    def med(side: str, kind: str, key: str) -> float:
        return float(statistics.median(x[key] for x in runs[side][kind]))

    t = ctx.table
    print(f"  {'':44} {'wall':>8} {'ops/s':>7} {'ok':>7} {'median job':>11}", flush=True)
    for kind, n in (("clone", n_clones), ("push", n_pushes)):
        for side in sides:
            label = f"{n} parallel {kind}{'es' if kind == 'push' else 's'} via {side}"
            print(
                f"  {label:44} {med(side, kind, 'wall_s'):>7.2f}s"
                f" {med(side, kind, 'per_s'):>7.1f}"
                f" {sum(x['ok'] for x in runs[side][kind]):>3}/{n * rounds:<3}"
                f" {med(side, kind, 'median_job_ms'):>9.0f}ms",
                flush=True,
            )
    thr = {
        kind: round(med("gatekeeper", kind, "per_s") / med("git-shell", kind, "per_s"), 3)
        for kind in ("clone", "push")
    }
    t.row(
        "throughput, gatekeeper / git-shell",
        None,
        f"clones {thr['clone']:.2f}x, pushes {thr['push']:.2f}x",
    )
    t.check("journal_mode is WAL", journal == "wal", journal, failed="FAIL")
    t.check(
        'no "database is locked"',
        locked == 0 and failed == 0,
        f"{locked} seen; {failed} failed requests",
        failed="FAIL",
    )
    t.check(
        "every audit record present, chain verifies",
        audit_ok,
        f"read {reads}/{n_clones * rounds}, write {writes}/{n_pushes * rounds},"
        f" ref-update {refs}/{expect_refs} (hooks {ss.hooks.split(':')[0]}),"
        f" chain problems {len(problems)}, pushed branches {len(branches)}",
        failed="FAIL",
    )
    return {
        "rounds": rounds,
        "journal_mode": journal,
        "runs": runs,
        "throughput_ratio": thr,
        "database_locked": locked,
        "failed_gatekeeper_requests": failed,
        "audit": {
            "read_records": reads,
            "write_records": writes,
            "ref_update_records": refs,
            "expected_reads": n_clones * rounds,
            "expected_writes": n_pushes * rounds,
            "chain_problems": [p.message for p in problems][:10],
            "complete": audit_ok,
        },
        "hooks": ss.hooks,
    }


# -- 6. audit --------------------------------------------------------------------------------

AUDIT_RECORDS = 100_000


def fill_audit(state: Path, n: int) -> tuple[int, float]:
    """Append synthetic records up to `n`, chained with gatekeeper.auditlog.chain.record_hash,
    in one transaction, and write the head file as the store would."""
    from gatekeeper.auditlog import chain as audit
    from gatekeeper.store import HEAD_NAME, utc_iso

    start = time.perf_counter()
    rng = random.Random(6)
    conn = sqlite3.connect(state / "gatekeeper.db", isolation_level=None, timeout=30)
    try:
        conn.execute("BEGIN IMMEDIATE")
        last = conn.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
        seq, prev = last if last else (0, audit.GENESIS)
        first_ts = time.time() - 100 * 86400
        step = 100 * 86400 / n
        rows = []
        for i in range(seq, n):
            kind = rng.random()
            user = f"user{rng.randrange(500):03d}"
            r = rng.randrange(2000)
            repo = f"team{r % 50:02d}/repo{r:04d}"
            record: dict[str, Any] = {f: None for f in audit.FIELDS}
            record.update(seq=i + 1, at=utc_iso(first_ts + i * step), user=user, client="10.0.0.1")
            if kind < 0.9:
                allowed = rng.random() < 0.95
                action = "read" if rng.random() < 0.8 else "write"
                record.update(
                    event="access",
                    key_fp=f"SHA256:{i:043d}",
                    repo=repo,
                    action=action,
                    reason="allowed" if allowed else "2fa-not-verified",
                    detail=json.dumps(
                        {
                            "verb": f"git-{'upload' if action == 'read' else 'receive'}-pack",
                            "level": "none",
                            "allowed": allowed,
                        },
                        sort_keys=True,
                    ),
                )
            elif kind < 0.95:
                record.update(
                    event="ref-update",
                    repo=repo,
                    action="write",
                    reason="allowed",
                    detail=json.dumps({"ref": "refs/heads/main"}),
                )
            elif kind < 0.98:
                record.update(event="2fa-verified", detail=json.dumps({"method": "totp"}))
            else:
                record.update(event="2fa-failure", detail=json.dumps({"what": "totp", "count": 1}))
            digest = audit.record_hash(prev, record)
            rows.append((*(record[f] for f in audit.FIELDS), prev, digest))
            prev = digest
        conn.executemany(
            "INSERT INTO audit (seq, at, event, actor, user, key_fp, repo, action, reason, client,"
            " detail, prev_hash, hash) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
            rows,
        )
        conn.execute("COMMIT")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()
    (state / HEAD_NAME).write_text(f"{n} {prev}\n")
    return len(rows), time.perf_counter() - start


def bench_audit(ctx: Context) -> dict[str, Any]:
    from gatekeeper.store import Store

    site = Site(ctx, "audit")
    site.gk("init")
    added, seconds = fill_audit(site.state, AUDIT_RECORDS)
    log(f"{added:,} chained records inserted in {seconds:.1f} s")
    t = ctx.table
    t.header()
    out: dict[str, Any] = {"records": AUDIT_RECORDS, "fill_seconds": round(seconds, 2)}
    with Store.open(site.state) as store:
        problems: list[Any] = []

        def verify() -> None:
            problems[:] = store.verify_audit()

        v = h.timed(verify, ctx.runs(1, 3))
        if problems:
            raise BenchError(f"the synthetic chain does not verify: {problems[0].message}")
        t.row(f"Store.verify_audit(), {AUDIT_RECORDS:,} records", v, "no problems")
        out["verify"] = v
        # Where verify's time goes: reading the rows, making dicts, hashing the chain.
        from gatekeeper.auditlog import chain as audit

        fetched: list[Any] = []
        dicts: list[Any] = []
        parts = {
            "fetch rows": h.timed(
                lambda: fetched.__setitem__(
                    slice(None), store.conn.execute("SELECT * FROM audit ORDER BY rowid").fetchall()
                ),
                1,
            ),
            "rows -> dicts": h.timed(
                lambda: dicts.__setitem__(slice(None), [dict(r) for r in fetched]), 1
            ),
            "verify_chain (JSON + SHA-256 per record)": h.timed(
                lambda: audit.verify_chain(dicts, store.read_head(), store.audit_anchor()), 1
            ),
        }
        for label, stats in parts.items():
            t.row(f"  {label}", stats)
        out["verify_parts"] = parts
        since = (datetime.now(timezone.utc) - timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%S")
        queries: dict[str, dict[str, Any]] = {
            "user = user042": {"user": "user042"},
            "repo = team42/repo0042": {"repo": "team42/repo0042"},
            "user, limit 50": {"user": "user042", "limit": 50},
            "reason = 2fa-not-verified": {"reason": "2fa-not-verified"},
            "event = 2fa-failure": {"event": "2fa-failure"},
            "since the last day": {"since": since},
            "after_seq (newest 100)": {"after_seq": AUDIT_RECORDS - 100},
            "everything": {},
        }
        columns = {"user": "user", "repo": "repo", "reason": "reason", "event": "event"}
        out["queries"] = {}
        for label, kwargs in queries.items():
            rows: list[Any] = []

            def query(kw: dict[str, Any] = kwargs, out: list[Any] = rows) -> None:
                out[:] = store.audit_records(**kw)

            stats = h.timed(query, ctx.runs(3, 7) if kwargs else ctx.runs(1, 3))
            where = ["seq > ?"] + [f"{columns[k]} = ?" for k in kwargs if k in columns]
            params: list[Any] = [kwargs.get("after_seq", 0)]
            params += [v for k, v in kwargs.items() if k in columns]
            if "since" in kwargs:
                where.append("at >= ?")
                params.append(kwargs["since"])
            sql = f"SELECT * FROM audit WHERE {' AND '.join(where)} ORDER BY seq"  # noqa: S608
            plan = " | ".join(r[3] for r in store.conn.execute("EXPLAIN QUERY PLAN " + sql, params))
            index = re.search(r"USING (?:COVERING )?INDEX \w+", plan)
            t.row(
                f"audit_records({label})",
                stats,
                f"{len(rows):,} rows; "
                + (
                    index.group(0).lower()
                    if index
                    else "primary-key range"
                    if "after_seq" in kwargs
                    else "no index: full scan"
                ),
            )
            out["queries"][label] = {**stats, "rows": len(rows), "plan": plan}
        appends = ctx.runs(50, 200)
        a = h.timed(
            lambda: store.audit(
                "access",
                user="user001",
                repo="bench/small",
                action="read",
                reason="allowed",
                client="127.0.0.1",
                detail={"allowed": True},
            ),
            appends,
        )
        t.row(
            f"Store.audit() append at {AUDIT_RECORDS:,} records", a, "one transaction + head file"
        )
        out["append"] = a
        after = store.verify_audit()
        out["verify_after_appends_problems"] = len(after)
    out["cli"] = audit_cli(ctx, site)
    t.check(
        f"verify {AUDIT_RECORDS:,} records (informational)",
        not after,
        f"{v['median_ms'] / 1e3:.2f} s, {len(after)} problems after {appends} appends",
        failed="FAIL",
    )
    return out


def audit_cli(ctx: Context, site: Site) -> dict[str, Any]:
    """The admin's commands on the same 100,000 records (`gatekeeper log ...`)."""
    gatekeeper = str(ctx.bin / "gatekeeper")
    env = site.env()
    try:
        h.run([gatekeeper, "log", "--help"], env=env, cwd=ctx.work)
    except BenchError:
        ctx.table.row("gatekeeper log ...", None, "not measured: no `log` command in this tree")
        return {"error": "no `log` command"}
    commands = {
        "gatekeeper log verify": ["log", "verify"],
        "gatekeeper log --user user042": ["log", "--user", "user042"],
        "gatekeeper log --since 1d": ["log", "--since", "1d"],
        "gatekeeper log --last 20": ["log", "--last", "20"],
    }
    out: dict[str, Any] = {}
    for label, args in commands.items():
        times = []
        for _ in range(ctx.runs(1, 3)):
            start = time.perf_counter()
            lines = h.run([gatekeeper, *args], env=env, cwd=ctx.work).count("\n")
            times.append(time.perf_counter() - start)
        out[label] = {**h.summary(times), "lines": lines}
        ctx.table.row(label, out[label], f"{lines:,} lines of output")
    return out


# -- main ------------------------------------------------------------------------------------

RUNNERS: dict[str, Callable[[Context], dict[str, Any]]] = {
    "decision": bench_decision,
    "keys": bench_keys,
    "policy": bench_policy,
    "e2e": bench_e2e,
    "authkeys": bench_authkeys,
    "concurrency": bench_concurrency,
    "audit": bench_audit,
    # Its own module (it starts a throwaway PostgreSQL); imported only when it runs.
    "postgres": lambda ctx: __import__("pgstore").bench_postgres(ctx),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="bench.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer runs (about a minute)")
    parser.add_argument(
        "--only", nargs="+", choices=SECTIONS, metavar="NAME", help="sections to run"
    )
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where to write the JSON")
    parser.add_argument("--keep", action="store_true", help="keep the temporary installation")
    args = parser.parse_args(argv)
    out_path = args.json.resolve()
    selected = [s for s in SECTIONS if not args.only or s in args.only]
    started = time.time()
    python = h.ensure_bench_venv(log)
    table = h.Table()
    info = h.machine(python)
    print(
        f"gatekeeper benchmarks{' (quick)' if args.quick else ''} on {info['description']}\n"
        f"  {info['python']}, {info['git']}, {info['openssh']}, SQLite {info['sqlite']};"
        f" gatekeeper {info['gatekeeper_commit']}\n"
        f"  load average at start: {', '.join(map(str, info['load_average_at_start']))}"
        " (other work on the machine makes absolute times noisy; compare ratios)",
        flush=True,
    )
    results: dict[str, Any] = {
        "machine": info,
        "quick": args.quick,
        "started": datetime.fromtimestamp(started, timezone.utc).isoformat(timespec="seconds"),
        "sections": {},
    }
    work = Path(tempfile.mkdtemp(prefix="gatekeeper-bench-"))
    ctx = Context(work, python, args.quick, table)
    failed = False
    try:
        for name in selected:
            table.section(TITLES[name])
            t0 = time.perf_counter()
            try:
                section = RUNNERS[name](ctx)
            except Exception as exc:  # report the section and go on
                failed = True
                traceback.print_exc()
                section = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
                first_line = section["error"].splitlines()[0][:200]
                table.check(f"{name} section ran", False, first_line, failed="FAIL")
            section["seconds"] = round(time.perf_counter() - t0, 1)
            results["sections"][name] = section
    finally:
        ctx.close()
        if args.keep:
            log(f"kept the installation in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    results["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    results["checks"] = table.checks
    results["seconds"] = round(time.time() - started, 1)
    h.write_json(out_path, results)
    table.final()
    print(f"\n{results['seconds']:.0f} s; JSON: {os.path.relpath(out_path)}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
