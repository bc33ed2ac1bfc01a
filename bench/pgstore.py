"""Section 7 of bench.py: the forced command's decision with the state in PostgreSQL.

Several front-ends sharing one PostgreSQL database pay, on every git connection, for
importing the driver and opening a connection (no pool lives across forced-command
processes). Measured in one interleaved run against the same decision on SQLite and
against `python -c pass`, with a throwaway PostgreSQL on loopback (password
authentication over TCP, as a front-end would use it), plus what the driver import
and a bare connect cost on their own.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import harness as h
from harness import Cmd

from bench import Context, Site, log, make_repo, pass_cmd

sys.path.insert(0, str(h.ROOT))
from testing.pgserver import PostgresServer, find_binaries, missing_reason

DRY_PG = "gatekeeper-shell -> exec, PostgreSQL store"
DRY_SOCK = "  the same over a unix socket (no SCRAM)"
DRY_SQLITE = "gatekeeper-shell -> exec, SQLite store"
IMPORT = "python -c 'import psycopg'"
CONNECT = "python: libpq connect (TCP, SCRAM), SELECT 1"
CONNECT_SOCK = "python: libpq connect (unix socket), SELECT 1"
BUDGET = 3.0


class PgSite(Site):
    """A site whose policy names a PostgreSQL store."""

    def __init__(self, ctx: Context, name: str, url: str) -> None:
        self.url = url
        super().__init__(ctx, name)

    def server_yaml(self) -> str:
        return super().server_yaml() + f"  store: {self.url}\n"


def ensure_driver(ctx: Context) -> None:
    probe = subprocess.run([str(ctx.python), "-c", "import psycopg"], capture_output=True)
    if probe.returncode != 0:
        log("installing psycopg[binary] into the benchmark virtualenv")
        # Without PYTHON* variables, so pip writes .pyc files as a real install does.
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
        h.run([str(ctx.python), "-m", "pip", "install", "-q", "psycopg[binary]>=3.1"], env=env)


def bench_postgres(ctx: Context) -> dict[str, Any]:
    if find_binaries() is None:
        ctx.table.row("PostgreSQL", None, f"not measured: {missing_reason()}")
        return {"skipped": missing_reason()}
    ensure_driver(ctx)
    sqlite_site = ctx.site()
    with PostgresServer() as server:
        server.create_database("bench")
        url = server.url_with_password_file("bench")
        log("setting up the same installation on PostgreSQL")
        site = PgSite(ctx, "site-pg", url)
        site.gk("init")
        site.gk("user", "add", "alice")
        site.gk("key", "add", "alice", f"{sqlite_site.key_path}.pub")
        site.key_path, site.key_id = sqlite_site.key_path, 1
        make_repo(site.repos / "bench" / "small.git", ctx.home)
        shell = str(ctx.bin / "gatekeeper-shell")
        dry_pg, dry_sqlite = site.dry_run_env(), sqlite_site.dry_run_env()
        # The superuser may log in through the socket without a password, as a
        # co-located database with peer authentication would let the git user.
        sock_url = f"postgresql://postgres@/bench?host={server.sockdir}&port={server.port}"
        sock_site = PgSite(ctx, "site-pg-socket", sock_url)
        sock_site.gk("init")
        sock_site.key_path, sock_site.key_id = site.key_path, site.key_id
        make_repo(sock_site.repos / "bench" / "small.git", ctx.home)
        dry_sock = sock_site.dry_run_env()

        def connect(url: str, password: str) -> str:
            return (
                "from gatekeeper.store import libpq\n"
                f"c = libpq.Connection({{'dbname': {url!r}, 'password': {password!r}}})\n"
                "c.execute('SELECT 1'); c.close()\n"
            )

        cmds = [
            pass_cmd(ctx, dry_sqlite),
            Cmd(
                DRY_SQLITE,
                [shell, "--config", str(sqlite_site.config), str(sqlite_site.key_id)],
                dry_sqlite,
            ),
            Cmd(DRY_PG, [shell, "--config", str(site.config), str(site.key_id)], dry_pg),
            Cmd(
                DRY_SOCK,
                [shell, "--config", str(sock_site.config), str(sock_site.key_id)],
                dry_sock,
            ),
            Cmd(IMPORT, [*ctx.interp, "-c", "import psycopg"], dry_pg),
            Cmd(
                CONNECT,
                [*ctx.interp, "-c", connect(server.url("bench"), server.password)],
                dry_pg,
            ),
            Cmd(CONNECT_SOCK, [*ctx.interp, "-c", connect(sock_url, "")], dry_pg),
        ]
        runs = ctx.runs(10, 40)
        log(f"{len(cmds)} commands x {runs} runs, interleaved")
        res = h.interleaved(cmds, runs, ctx.work)
        records = int(server.psql("SELECT count(*) FROM audit", db="bench").strip())
    base = res["python -c pass"]
    t = ctx.table
    t.header()
    t.row("python -c pass (bare interpreter start)", base, "1.00x")
    t.row(DRY_SQLITE, res[DRY_SQLITE], f"{h.ratio(res[DRY_SQLITE], base):.2f}x python -c pass")
    vs_sqlite = h.ratio(res[DRY_PG], res[DRY_SQLITE])
    vs_python = h.ratio(res[DRY_PG], base)
    t.row(DRY_PG, res[DRY_PG], f"{vs_python:.2f}x python -c pass, {vs_sqlite:.2f}x SQLite")
    by_socket = h.ratio(res[DRY_SOCK], base)
    t.row(DRY_SOCK, res[DRY_SOCK], f"{by_socket:.2f}x python -c pass")
    for name in (IMPORT, CONNECT, CONNECT_SOCK):
        t.row(name, res[name], f"+{res[name]['median_ms'] - base['median_ms']:.1f} ms")
    t.check(
        "every dry run was audited in PostgreSQL",
        records >= runs,
        f"{records} access records",
        failed="FAIL",
    )
    t.check(
        "PostgreSQL decision <= 3x python -c pass",
        vs_python <= BUDGET,
        f"{vs_python:.2f}x ({vs_sqlite:.2f}x the SQLite store)",
    )
    return {
        "runs": runs,
        "results": res,
        "ratio_vs_python": vs_python,
        "ratio_vs_sqlite": vs_sqlite,
        "ratio_socket_vs_python": by_socket,
        "audit_records": records,
    }
