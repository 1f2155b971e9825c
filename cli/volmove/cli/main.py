"""The volmove command line: one command per module, each a thin layer over volmove.core."""

from __future__ import annotations

import logging
import os

import typer

from volmove.cli.cmd_backup import backup
from volmove.cli.cmd_cancel import cancel
from volmove.cli.cmd_compare import compare
from volmove.cli.cmd_forget import forget
from volmove.cli.cmd_hosts import hosts
from volmove.cli.cmd_init import init
from volmove.cli.cmd_jobs import jobs
from volmove.cli.cmd_migrate import migrate
from volmove.cli.cmd_prune import prune
from volmove.cli.cmd_restore import restore
from volmove.cli.cmd_schedule import schedule_app
from volmove.cli.cmd_serve import serve
from volmove.cli.cmd_snapshots import snapshots
from volmove.cli.cmd_verify import verify_cmd
from volmove.cli.cmd_volumes import volumes

app = typer.Typer(
    name="volmove", help="Back up, migrate and recover Docker volumes.", no_args_is_help=True,
    pretty_exceptions_enable=False, add_completion=False,
)
app.command()(init)
app.command()(backup)
app.command()(restore)
app.command()(snapshots)
app.command("verify")(verify_cmd)
app.command()(volumes)
app.command()(compare)
app.command()(hosts)
app.command()(jobs)
app.command()(cancel)
app.command()(migrate)
app.add_typer(schedule_app, name="schedule")
app.command()(serve)
app.command()(forget)
app.command()(prune)


def main() -> None:
    logging.basicConfig(level=os.environ.get("VOLMOVE_LOG", "WARNING"), format="volmove: %(levelname)s: %(message)s")
    app()
