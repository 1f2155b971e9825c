"""Create (or refill) a demo volume with a few kinds of files, for the quick start."""

from __future__ import annotations

import asyncio
import os
import sys

from volmove.core.docker import DockerClient, MountSpec


def fill(root: str) -> None:
    os.makedirs(f"{root}/app/config", exist_ok=True)
    with open(f"{root}/app/config/settings.json", "w") as f:
        f.write('{"name": "demo", "replicas": 3}\n')
    with open(f"{root}/app/data.log", "w") as f:
        f.writelines(f"{i} event happened at step {i * 7}\n" for i in range(200_000))
    with open(f"{root}/app/blob.bin", "wb") as f:
        f.write(os.urandom(8 << 20))
    os.makedirs(f"{root}/empty-dir", exist_ok=True)
    if not os.path.lexists(f"{root}/app/current"):
        os.symlink("config/settings.json", f"{root}/app/current")
    os.chown(f"{root}/app/data.log", 1000, 1000)
    os.chmod(f"{root}/app/config/settings.json", 0o640)


async def main(name: str) -> None:
    async with DockerClient.connect() as docker:
        if not await docker.volume_exists(name):
            await docker.create_volume(name, labels={"volmove.demo": "1"})
        async with docker.helper(MountSpec.volume(name), read_only=False) as helper:
            if helper.root is None:
                sys.exit("the demo needs a local Docker engine")
            await asyncio.to_thread(fill, str(helper.root))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "volmove-demo"))
