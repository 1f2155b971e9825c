"""Process liveness on this host, for telling a dead owner's leftovers from a live one's."""

from __future__ import annotations

import os


def pid_exists(pid: int) -> bool:
    """True when a process with this pid exists here (signal 0 checks without sending)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, it is just not ours to signal
    return True
