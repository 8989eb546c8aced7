"""A real upstream HTTP API for proxy-mode tests (served by uvicorn in a thread), which notes
every request it receives, raw headers included, so a test can see exactly what was forwarded."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route


@dataclass(frozen=True)
class Seen:
    method: str
    path: str
    raw_path: str
    query: str
    headers: list[tuple[str, str]]
    body: bytes

    def values(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k == name.lower()]

    def header(self, name: str) -> str | None:
        found = self.values(name)
        return found[0] if found else None

    def as_mapping(self) -> dict[str, str]:
        return {k: v for k, v in self.headers}


@dataclass
class Upstream:
    seen: list[Seen] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)

    def hits(self, path: str) -> list[Seen]:
        return [s for s in self.seen if s.path == path]

    def app(self) -> Starlette:
        async def record(request: Request) -> Seen:
            seen = Seen(
                method=request.method,
                path=request.url.path,
                raw_path=request.scope["raw_path"].decode("latin-1"),
                query=request.url.query,
                headers=[
                    (k.decode("latin-1"), v.decode("latin-1")) for k, v in request.scope["headers"]
                ],
                body=await request.body(),
            )
            self.seen.append(seen)
            return seen

        async def echo(request: Request) -> Response:
            seen = await record(request)
            return JSONResponse(
                {"ok": True, "path": seen.path, "bodyBytes": len(seen.body)},
                headers={
                    # an upstream must not be able to forge our settlement header, and
                    # hop-by-hop fields stop at the proxy
                    "payment-response": "forged",
                    "proxy-authenticate": "Basic",
                    "x-upstream": "yes",
                },
            )

        async def stream(request: Request) -> Response:
            await record(request)
            self.release.clear()

            async def chunks() -> AsyncIterator[bytes]:
                yield b"first\n"
                # Hold the rest back until the test has seen the first chunk through the proxy:
                # a proxy that buffers would never deliver it (bounded wait).
                await anyio.to_thread.run_sync(self.release.wait, 10)
                yield b"second\n"
                yield b"third\n"

            return StreamingResponse(chunks(), media_type="text/plain")

        async def broken(request: Request) -> Response:
            await record(request)

            async def chunks() -> AsyncIterator[bytes]:
                yield b"partial\n"
                await anyio.sleep(0.2)
                # uvicorn cuts the connection when a started stream raises: no final chunk
                raise RuntimeError("the upstream died mid-answer (deliberate, for the test)")

            return StreamingResponse(chunks(), media_type="text/plain")

        async def fail(request: Request) -> Response:
            await record(request)
            return JSONResponse({"error": "upstream broke"}, status_code=500)

        async def slow(request: Request) -> Response:
            await record(request)
            await anyio.sleep(2.5)
            return JSONResponse({"late": True})

        return Starlette(
            routes=[
                Route("/v1/echo", echo, methods=["POST"]),
                Route("/v1/items/{item}", echo, methods=["POST"]),
                Route("/v1/report", echo, methods=["GET"]),
                Route("/v1/stream", stream, methods=["POST"]),
                Route("/v1/fail", fail, methods=["POST"]),
                Route("/v1/broken", broken, methods=["POST"]),
                Route("/v1/slow", slow, methods=["POST"]),
                Route("/free/{rest:path}", echo, methods=["GET", "POST"]),
            ]
        )
