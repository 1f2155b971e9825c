"""volmove serve: one host, no broker — the scheduler, the API and a worker in one process."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from volmove.cli.common import DockerOpt, RepoOpt, repo_url, run
from volmove.core.errors import UsageError
from volmove.core.ops import state_dir
from volmove.core.repository import default_host
from volmove.service.automation import AutomationConfig, load_schedules_file
from volmove.service.embedded import ServeConfig
from volmove.service.embedded import serve as serve_one_host
from volmove.service.metrics import Alerting


def _listen(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    if not port.isdigit():
        raise UsageError(f"invalid --listen {value!r}: use HOST:PORT")
    return host or "127.0.0.1", int(port)


def serve(
    repo: RepoOpt = None, docker: DockerOpt = None,
    listen: Annotated[str, typer.Option(envvar="VOLMOVE_SERVICE_LISTEN",
                                        help="HOST:PORT of the API and /metrics.")] = "127.0.0.1:8470",
    host: Annotated[str | None, typer.Option(envvar="VOLMOVE_HOST",
                                             help="This host's name in snapshots [default: the hostname].")] = None,
    state: Annotated[Path | None, typer.Option("--state-dir", envvar="VOLMOVE_STATE_DIR",
                                               help="Where the service database and job records live.")] = None,
    schedules: Annotated[Path | None, typer.Option(envvar="VOLMOVE_SCHEDULES",
                                                   help="TOML file of [[schedule]] tables.")] = None,
    webhook: Annotated[str | None, typer.Option(envvar="VOLMOVE_WEBHOOK",
                                                help="URL that receives a JSON POST when a job fails.")] = None,
    webhook_on_success: Annotated[bool, typer.Option(envvar="VOLMOVE_WEBHOOK_ON_SUCCESS",
                                                     help="Also notify when a job succeeds.")] = False,
    size_drop: Annotated[float, typer.Option(min=0.0, max=0.99, envvar="VOLMOVE_SIZE_DROP",
                                             help="Alert when a backup shrinks by this fraction; 0: never.")] = 0.5,
    capacity: Annotated[int, typer.Option(min=1, help="Jobs run at once.")] = 2,
    token: Annotated[str | None, typer.Option(envvar="VOLMOVE_SERVICE_TOKEN", hidden=True)] = None,
) -> None:
    """Run schedules, drills, metrics and the API for this host alone: no broker, nothing else to install.

    Other commands reach it with VOLMOVE_SERVICE=http://127.0.0.1:8470 (`volmove schedule`, `jobs`, `hosts`).
    """
    logging.getLogger().setLevel(logging.INFO)

    async def go() -> None:
        if schedules is not None:
            load_schedules_file(schedules)  # a bad file is a usage error now, not a crash later
        listen_host, port = _listen(listen)
        automation = AutomationConfig(schedules_file=schedules, webhook=webhook, notify_success=webhook_on_success,
                                      alerting=Alerting(size_drop=size_drop))
        cfg = ServeConfig(host=host or default_host(), repo=repo_url(repo), state_dir=state or state_dir(),
                          docker_url=docker, listen_host=listen_host, listen_port=port, token=token,
                          capacity=capacity, automation=automation)
        await serve_one_host(cfg)

    run(go, json_out=False)
