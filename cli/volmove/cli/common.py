"""What every command shares: options, running a coroutine, errors, output, progress."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import sys
import traceback
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TypeVar

import typer

from volmove.core.errors import CancelledByUser, VolmoveError
from volmove.core.progress import Progress, ProgressFn, no_progress
from volmove.core.repository import Repository
from volmove.core.storage import open_storage

if TYPE_CHECKING:
    from rich.console import Console

T = TypeVar("T")
DEFAULT_REPO = "/var/lib/volmove/repo"
INTERNAL_ERROR = 70
INTERRUPTED = 130
# Ctrl-C lands either in the event loop or, through the cancel event, in the data-path thread.
INTERRUPTED_MESSAGE = "interrupted; nothing partial was committed"

RepoOpt = Annotated[str | None, typer.Option("--repo", "-r", envvar="VOLMOVE_REPO",
                                             help=f"Repository: /path, file:///path or s3://bucket/prefix "
                                                  f"[default: {DEFAULT_REPO}]")]
DockerOpt = Annotated[str | None, typer.Option("--docker", "-H", envvar="DOCKER_HOST",
                                               help="Docker engine URL [default: the local socket]")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]


class _Console:
    """A rich Console made on first use: importing rich costs every --json run ~30 ms."""

    def __init__(self, *, stderr: bool) -> None:
        self._stderr = stderr
        self._real: Console | None = None

    @property
    def real(self) -> Console:
        if self._real is None:
            from rich.console import Console

            self._real = Console(stderr=self._stderr)
        return self._real

    def print(self, *objects: Any, **kwargs: Any) -> None:
        self.real.print(*objects, **kwargs)


stderr = _Console(stderr=True)
stdout = _Console(stderr=False)


def repo_url(repo: str | None) -> str:
    return repo or DEFAULT_REPO


def open_repo(url: str | None, *, load_index: bool = True) -> Repository:
    storage = open_storage(repo_url(url))
    repo = Repository.open(storage)
    if load_index:
        repo.load_index()
    return repo


def run(make: Callable[[], Awaitable[T]], *, json_out: bool) -> T:
    """Run one command's coroutine; every failure becomes one line and an exit code."""
    # Everything imported so far lives until exit: keep it out of the cyclic collector's full
    # passes, which otherwise walk it again and again while a backup creates an entry per file.
    gc.freeze()
    try:
        return asyncio.run(_call(make))
    except CancelledByUser:
        fail(INTERRUPTED_MESSAGE, INTERRUPTED, "cancelled", json_out)
    except VolmoveError as exc:
        fail(exc.message, exc.exit_code, exc.kind, json_out)
    except KeyboardInterrupt:
        fail(INTERRUPTED_MESSAGE, INTERRUPTED, "cancelled", json_out)
    except Exception as exc:
        if os.environ.get("VOLMOVE_DEBUG"):
            traceback.print_exc()
        fail(f"internal error: {type(exc).__name__}: {exc}", INTERNAL_ERROR, "internal", json_out)


async def _call(make: Callable[[], Awaitable[T]]) -> T:
    return await make()


def fail(message: str, code: int, kind: str, json_out: bool) -> NoReturn:
    if json_out:
        print(json.dumps({"error": {"kind": kind, "message": message, "exit_code": code}}))
    else:
        # Plain write: one line, never wrapped or styled.
        sys.stderr.write(f"volmove: error: {' '.join(message.split())}\n")
    raise typer.Exit(code)


def emit_json(doc: Any) -> None:
    print(json.dumps(doc, indent=2, default=str))


def table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    from rich.table import Table  # imported when needed: a --json run never draws one

    t = Table(*columns, box=None, header_style="bold")
    for row in rows:
        t.add_row(*(str(c) for c in row))
    stdout.print(t)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


@contextmanager
def progress_bar(label: str, json_out: bool) -> Iterator[ProgressFn]:
    """A bar with bytes, rate and ETA on a terminal; silent otherwise."""
    if json_out or not sys.stderr.isatty():
        yield no_progress
        return
    # Imported only for a terminal: rich's progress machinery costs every --json run ~25 ms otherwise.
    from rich.progress import BarColumn, DownloadColumn, TextColumn, TimeRemainingColumn, TransferSpeedColumn
    from rich.progress import Progress as Bar

    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
               TimeRemainingColumn())
    with Bar(*columns, console=stderr.real, transient=True) as bar:
        task = bar.add_task(label, total=None)

        def update(p: Progress) -> None:
            bar.update(task, completed=p.bytes_done, total=p.bytes_total or None,
                       description=f"{label} ({p.files_done} files)")

        yield update

