"""Progress reports: the data path calls a callback; the CLI draws a bar and
the worker publishes MQTT events from the same values."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Progress:
    phase: str  # "scan", "backup", "restore", "verify", "upload", "done"
    bytes_done: int = 0
    bytes_total: int = 0  # 0 when not known yet
    files_done: int = 0
    files_total: int = 0
    started: float = field(default_factory=time.monotonic)

    def rate(self, now: float | None = None) -> float:
        elapsed = (now if now is not None else time.monotonic()) - self.started
        return self.bytes_done / elapsed if elapsed > 0 else 0.0

    def eta(self, now: float | None = None) -> float | None:
        rate = self.rate(now)
        if not self.bytes_total or rate <= 0:
            return None
        return max(0.0, (self.bytes_total - self.bytes_done) / rate)

    def as_dict(self) -> dict[str, object]:
        return {
            "phase": self.phase,
            "bytes_done": self.bytes_done,
            "bytes_total": self.bytes_total,
            "files_done": self.files_done,
            "files_total": self.files_total,
            "rate": round(self.rate(), 1),
            "eta": self.eta(),
        }


ProgressFn = Callable[[Progress], None]


def no_progress(_: Progress) -> None:
    """The default callback."""
