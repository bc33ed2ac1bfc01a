"""`gatekeeper`: the click group, its command groups, and `main()`, which renders
every expected failure (`errors.render`) with its exit code; never a traceback."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from gatekeeper.cli import audit, hooks, keys, policy, serve, store, twofa, users
from gatekeeper.cli.common import Context
from gatekeeper.errors import GatekeeperError, render
from gatekeeper.policy import default_config_path


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="GATEKEEPER_CONFIG",
    default=None,
    help="Policy file (default: $GATEKEEPER_CONFIG or /etc/gatekeeper/config.yaml).",
)
@click.version_option(package_name="gatekeeper")
@click.pass_context
def cli(ctx: click.Context, config: Path | None) -> None:
    """gatekeeper: two-step verification as a condition of reaching Git over SSH."""
    ctx.obj = Context((config or default_config_path()).absolute())


for command in (
    store.init,
    store.migrate,
    store.store_group,
    users.user,
    keys.key,
    keys.authorized_keys_cmd,
    keys.keys_script_cmd,
    keys.keys_command_cmd,
    twofa.twofa,
    policy.policy,
    policy.check,
    serve.serve,
    hooks.hooks_group,
    audit.audit_cmd,
    audit.log_cmd,
):
    cli.add_command(command)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        cli.main(args=args, prog_name="gatekeeper", standalone_mode=False)
    except GatekeeperError as exc:
        click.echo(render(exc, label="error: "), err=True, nl=False)
        return exc.exit_code
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 1
    except OSError as exc:
        # The last resort for a file problem no command foresaw: still one line, no traceback.
        where = f" ({exc.filename})" if exc.filename else ""
        error = GatekeeperError(
            f"{exc.strerror or exc}{where}",
            hint="check that file's owner, mode and file system; run gatekeeper as the git user.",
        )
        click.echo(render(error, label="error: "), err=True, nl=False)
        return 1
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except SystemExit as exc:
        return int(exc.code or 0) if not isinstance(exc.code, str) else 1
    return 0
