"""`gatekeeper serve`: the embedded SSH server (gatekeeper.server)."""

from __future__ import annotations

import sys

import click

from gatekeeper.cli.common import Context, pass_ctx


@click.command()
@click.option("--host", help="Address to listen on (default: server.listen_host).")
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    help="Port to listen on (default: server.listen_port; 0 picks a free one).",
)
@click.option(
    "--max-connections",
    type=click.IntRange(1),
    default=64,
    show_default=True,
    help="Authenticated connections served at once.",
)
@click.option(
    "--max-startups",
    default="128:30:512",
    show_default=True,
    metavar="START:RATE:FULL",
    help="Connections not authenticated yet: from START on, new ones are dropped with "
    "RATE percent chance, rising to all at FULL (sshd's MaxStartups).",
)
@click.option(
    "--auth-timeout",
    type=click.FloatRange(min=0.1),
    default=20.0,
    show_default=True,
    help="Seconds a client gets to connect and authenticate (sshd's LoginGraceTime).",
)
@pass_ctx
def serve(
    ctx: Context,
    host: str | None,
    port: int | None,
    max_connections: int,
    max_startups: str,
    auth_timeout: float,
) -> None:
    """Run the embedded SSH server until SIGTERM/SIGINT."""
    from gatekeeper import server

    try:
        startups = server.Startups.parse(max_startups)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--max-startups") from exc
    limits = server.Limits(
        max_connections=max_connections, max_startups=startups, auth_timeout=auth_timeout
    )
    ctx.switch_later = True
    sys.exit(
        server.serve(
            ctx.policy,
            ctx.config,
            host,
            port,
            limits,
            echo=lambda line: click.echo(line),
            after_bind=ctx.become_state_owner,
        )
    )
