"""The CLI loads only the command it runs, and every command still loads."""

from __future__ import annotations

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from volmove.cli.main import COMMANDS, build_app, command_named


@pytest.mark.parametrize(("argv", "expected"), [
    (["backup", "vol1"], "backup"),
    (["--help"], None),
    ([], None),
    (["bogus"], None),
    (["schedule", "ls"], "schedule"),
])
def test_command_named(argv: list[str], expected: str | None) -> None:
    assert command_named(argv) == expected


def test_every_command_registers() -> None:
    result = CliRunner().invoke(build_app(), ["--help"])
    assert result.exit_code == 0
    for name in COMMANDS:
        assert name in result.output


def test_running_backup_does_not_import_the_service() -> None:
    code = ("import sys; from volmove.cli.main import build_app; build_app(['backup']); "
            "print(sorted(m for m in sys.modules"
            " if m.startswith('volmove.service.') and m != 'volmove.service.client'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("delay", [0.1, 0.2, 0.3])  # after the interpreter itself started
def test_ctrl_c_while_starting_is_one_line_and_130(delay: float) -> None:
    import os
    import signal
    import time

    proc = subprocess.Popen([sys.executable, "-c", "from volmove.cli.main import main; main()", "backup", "v"],
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "DOCKER_HOST": "unix:///nonexistent"})
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    if proc.returncode == -signal.SIGINT:
        # It had finished (no Docker engine) and was exiting: the interpreter gives SIGINT back to
        # the default action as it shuts down, and the signal ended it there, after its one line.
        assert err.startswith("volmove: error: cannot reach the Docker engine"), err
        return
    assert proc.returncode in (130, 5), err  # 5: it got as far as finding no Docker engine
