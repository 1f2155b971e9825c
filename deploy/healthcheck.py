#!/usr/bin/env python3
"""Container health of the volmove service and worker: healthy while this
network namespace holds an established TCP connection to the broker's port.

    volmove-healthcheck [BROKER_URL]      (default: $VOLMOVE_BROKER, as the programs)

The worker and the service each keep one MQTT connection open for as long as
they work, and drop it when they are stuck enough to stop answering the broker's
keepalive; a process that has lost the broker is not serving its host. Reads
/proc/net/tcp{,6}, so it needs nothing but the standard library. Exit status 0
healthy, 1 not connected, 2 bad URL.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from urllib.parse import urlsplit

ESTABLISHED = "01"
DEFAULT_URL = "mqtt://127.0.0.1:1883"  # the worker's and the service's default
DEFAULT_PORTS = {"mqtt": 1883, "tcp": 1883, "mqtts": 8883, "ssl": 8883, "tls": 8883}


def broker_port(url: str) -> int:
    parts = urlsplit(url)
    if parts.scheme not in DEFAULT_PORTS:
        raise ValueError(f"not an MQTT URL: {url!r} (use mqtts://host:port)")
    return parts.port or DEFAULT_PORTS[parts.scheme]


def connected_to(port: int, tables: tuple[str, ...] = ("/proc/net/tcp", "/proc/net/tcp6")) -> bool:
    """Any established connection whose remote end is ``port``."""
    for table in tables:
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 3 and fields[3] == ESTABLISHED and int(fields[2].rsplit(":", 1)[1], 16) == port:
                return True
    return False


def main(argv: list[str]) -> int:
    url = argv[1] if len(argv) > 1 else os.environ.get("VOLMOVE_BROKER") or DEFAULT_URL
    try:
        port = broker_port(url)
    except ValueError as exc:
        print(f"volmove-healthcheck: {exc}", file=sys.stderr)
        return 2
    if connected_to(port):
        return 0
    print(f"volmove-healthcheck: no connection to the broker on port {port}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
