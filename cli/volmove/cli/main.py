"""The volmove command line: one command per module, each a thin layer over volmove.core.

Only the module of the command being run is imported: importing all of them
(the service, the scheduler, the fleet client) cost ~0.2 s before any work,
which a quick incremental backup would feel.  ``--help`` and unknown names load
them all, so typer's help and error messages are the usual ones.

Everything but the standard library is imported inside ``main``, so that Ctrl-C
during start-up is one line and exit code 130, like Ctrl-C at any other time.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import typer

INTERRUPTED = 130

# name -> (module, attribute); a Typer attribute is a group of sub-commands.
COMMANDS: dict[str, tuple[str, str]] = {
    "init": ("volmove.cli.cmd_init", "init"),
    "backup": ("volmove.cli.cmd_backup", "backup"),
    "restore": ("volmove.cli.cmd_restore", "restore"),
    "snapshots": ("volmove.cli.cmd_snapshots", "snapshots"),
    "verify": ("volmove.cli.cmd_verify", "verify_cmd"),
    "volumes": ("volmove.cli.cmd_volumes", "volumes"),
    "compare": ("volmove.cli.cmd_compare", "compare"),
    "hosts": ("volmove.cli.cmd_hosts", "hosts"),
    "jobs": ("volmove.cli.cmd_jobs", "jobs"),
    "cancel": ("volmove.cli.cmd_cancel", "cancel"),
    "migrate": ("volmove.cli.cmd_migrate", "migrate"),
    "schedule": ("volmove.cli.cmd_schedule", "schedule_app"),
    "serve": ("volmove.cli.cmd_serve", "serve"),
    "forget": ("volmove.cli.cmd_forget", "forget"),
    "prune": ("volmove.cli.cmd_prune", "prune"),
}


def build_app(names: Sequence[str] = tuple(COMMANDS)) -> typer.Typer:
    import typer  # here, not above: see the module's docstring

    app = typer.Typer(
        name="volmove", help="Back up, migrate and recover Docker volumes.", no_args_is_help=True,
        pretty_exceptions_enable=False, add_completion=False,
    )

    @app.callback()
    def _root() -> None:
        """Back up, migrate and recover Docker volumes."""  # keeps one registered command a sub-command

    for name in names:
        module, attr = COMMANDS[name]
        target = getattr(importlib.import_module(module), attr)
        if isinstance(target, typer.Typer):
            app.add_typer(target, name=name)
        else:
            app.command(name)(target)
    return app


def command_named(argv: Sequence[str]) -> str | None:
    """The command the arguments name, if they name a known one first."""
    first = next((a for a in argv if not a.startswith("-")), None)
    return first if first in COMMANDS else None


def main() -> None:
    import logging

    logging.basicConfig(level=os.environ.get("VOLMOVE_LOG", "WARNING"), format="volmove: %(levelname)s: %(message)s")
    name = command_named(sys.argv[1:])
    try:
        app = build_app([name] if name else tuple(COMMANDS))
    except KeyboardInterrupt:
        sys.stderr.write("volmove: error: interrupted while starting; nothing was done\n")
        sys.exit(INTERRUPTED)
    app()
