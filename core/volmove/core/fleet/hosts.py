"""Host presence from retained status messages and Last Wills (pure).

A Will only says a connection ended; it is not fencing (a partitioned host may
still be working). Here it marks the host offline unless it belongs to an
older session than the one now online: a worker that reconnected must not be
shown offline by its previous connection's Will arriving late.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from volmove.core.fleet.protocol import Inventory, Status


@dataclass(frozen=True)
class HostState:
    name: str
    state: str = "unknown"  # online | offline | unknown (never heard of since we started)
    since: float = 0.0
    session: str = ""
    capacity: int = 0
    version: str = ""
    inventory: Inventory | None = None

    @property
    def online(self) -> bool:
        return self.state == "online"

    def as_dict(self, with_inventory: bool = True) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "name": self.name, "state": self.state, "since": self.since, "session": self.session,
            "capacity": self.capacity, "version": self.version,
            "volumes": len(self.inventory.volumes) if self.inventory else None,
            "inventory_time": self.inventory.time if self.inventory else None,
        }
        if with_inventory:
            doc["inventory"] = self.inventory.body()["volumes"] if self.inventory else None
        return doc


def apply_status(host: HostState, status: Status, now: float) -> tuple[HostState, bool]:
    """The host after a status message, and whether it just came online."""
    if status.state == "offline":
        if host.online and status.session != host.session:
            return host, False  # a stale Will of an earlier session
        if host.state == "offline":
            return host, False
        return replace(host, state="offline", since=now), False
    came_online = not host.online or status.session != host.session
    since = now if came_online else host.since
    return replace(host, state="online", since=since, session=status.session, capacity=status.capacity,
                   version=status.version), came_online


def apply_inventory(host: HostState, inventory: Inventory) -> HostState:
    if host.inventory is not None and inventory.time < host.inventory.time:
        return host  # an older one redelivered
    return replace(host, inventory=inventory)
