"""MQTT topic names.

Everything a worker publishes lives under ``{prefix}/hosts/{host}/`` so a broker
ACL can confine each worker to its own host (``pattern write volmove/v1/hosts/%u/#``);
what the service sends a worker goes to ``{prefix}/cmd/{host}``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from volmove.core.fleet.protocol import ProtocolError

DEFAULT_PREFIX = "volmove/v1"
HOST_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
HOST_KINDS = ("status", "inventory", "events")


def check_host(name: str) -> str:
    """Host names become topic levels: no wildcards, slashes or empty names."""
    if not isinstance(name, str) or not HOST_RE.match(name):
        raise ProtocolError(f"invalid host name {name!r}: use letters, digits, '.', '_' or '-'")
    return name


@dataclass(frozen=True)
class Topics:
    prefix: str = DEFAULT_PREFIX

    def status(self, host: str) -> str:
        return f"{self.prefix}/hosts/{check_host(host)}/status"

    def inventory(self, host: str) -> str:
        return f"{self.prefix}/hosts/{check_host(host)}/inventory"

    def events(self, host: str) -> str:
        return f"{self.prefix}/hosts/{check_host(host)}/events"

    def cmd(self, host: str) -> str:
        return f"{self.prefix}/cmd/{check_host(host)}"

    def all_hosts(self, kind: str) -> str:
        return f"{self.prefix}/hosts/+/{kind}"

    def parse_host_topic(self, topic: str) -> tuple[str, str] | None:
        """``(host, kind)`` of a worker's topic, or None for anything else."""
        head = f"{self.prefix}/hosts/"
        if not topic.startswith(head):
            return None
        host, _, kind = topic[len(head):].partition("/")
        if kind not in HOST_KINDS or not HOST_RE.match(host):
            return None
        return host, kind
