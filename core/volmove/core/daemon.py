"""How volmove's long-running programs (the service, the worker) start and end."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from volmove.core.errors import VolmoveError

INTERRUPTED = 130


def run_daemon(prog: str, start: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run ``start()`` until it returns: Ctrl-C exits 130, a volmove error is one line
    with its exit code, a lone cancellation or exit inside a task group exits 0."""
    logging.basicConfig(level=os.environ.get("VOLMOVE_LOG", "INFO"),
                        format=f"{prog}: %(levelname)s: %(name)s: %(message)s")
    try:
        asyncio.run(start())
    except KeyboardInterrupt:
        sys.exit(INTERRUPTED)
    except BaseException as exc:
        err = _unwrap(exc)
        if isinstance(err, VolmoveError):
            sys.stderr.write(f"{prog}: error: {err.message}\n")
            sys.exit(err.exit_code)
        if isinstance(err, SystemExit | KeyboardInterrupt | asyncio.CancelledError):
            sys.exit(0)
        raise


def _unwrap(exc: BaseException) -> BaseException:
    """The one exception inside (nested) single-member exception groups."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc
