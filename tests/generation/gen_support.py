"""Generation test helpers: real uvicorn servers on loopback, small render settings, images."""

from __future__ import annotations

import asyncio
import contextlib
import io
import socket
from collections.abc import AsyncIterator
from typing import Any

import uvicorn
from PIL import Image
from starlette.types import ASGIApp

from generation.backends.local import LocalSettings

# Worker tests render small frames: the pipeline is the same, the CPU bill is much smaller.
SMALL = LocalSettings(models=("local",), width=320, height=180)


def png_bytes(
    width: int = 160, height: int = 90, colour: tuple[int, int, int] = (30, 160, 220)
) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buf, "PNG")
    return buf.getvalue()


@contextlib.asynccontextmanager
async def serve(app: ASGIApp, *, ports: int = 1, **config: Any) -> AsyncIterator[list[int]]:
    """Serve `app` on `ports` fresh loopback sockets; yields the port numbers.

    Extra keyword arguments go to `uvicorn.Config` (e.g. `ssl_certfile`, `ssl_keyfile`).
    """
    sockets = []
    for _ in range(ports):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        sockets.append(sock)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off", **config))
    task = asyncio.create_task(server.serve(sockets=sockets))
    try:
        for _ in range(500):
            if server.started or task.done():
                break
            await asyncio.sleep(0.01)
        if not server.started:
            raise RuntimeError("uvicorn did not start")
        yield [s.getsockname()[1] for s in sockets]
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)
        for sock in sockets:
            sock.close()
