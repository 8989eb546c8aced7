"""Run the real gateway under uvicorn on a free 127.0.0.1 port, in a thread of the test process."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

import uvicorn

from tests.helpers import free_port

__all__ = ["ServerThread", "free_port"]


@dataclass
class ServerThread:
    app: Any
    port: int

    def __post_init__(self) -> None:
        config = uvicorn.Config(
            self.app,
            host="127.0.0.1",
            port=self.port,
            log_level="warning",
            access_log=False,
            lifespan="on",
            proxy_headers=False,  # as `x402-gateway serve` without --proxy-headers
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name=f"uvicorn-{self.port}")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("gateway failed to start (see the log above)")
            if time.monotonic() > deadline:
                raise TimeoutError("gateway did not start in time")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        if self.thread.is_alive():  # a stuck shutdown must not hang the suite
            self.server.force_exit = True
            self.thread.join(timeout=10)
