"""The three HTTP servers the benchmarks compare, each run alone in its own process:

    python -m bench.servers gateway  CONFIG.json   # our gateway (gateway.app.create_app)
    python -m bench.servers official CONFIG.json   # the official x402 SDK's FastAPI middleware
    python -m bench.servers ceiling  CONFIG.json   # bare Starlette: one static 402, nothing else

All three run under the same uvicorn settings (one worker, uvloop, httptools, no access log), so
the figures differ only by what the application does per request.

The gateway's rate limits are set so high that they never refuse (all load comes from one
loopback address), and its generation workers are stopped once it has started: the benchmark
measures the path to the 202 (payment settled, task row stored and linked), not video rendering,
which would otherwise take both cores of the benchmark machine. The official SDK's endpoint does
no work either: it answers 202 with a fresh taskId.
"""

from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path
from typing import Any

import uvicorn
from pydantic import BaseModel
from starlette.types import ASGIApp, Message, Receive, Scope, Send

UVICORN_SETTINGS: dict[str, Any] = {
    "host": "127.0.0.1",
    "loop": "uvloop",
    "http": "httptools",
    "log_level": "warning",
    "access_log": False,
    "lifespan": "on",
}


class GenerationBody(BaseModel):
    """The official endpoint validates the same JSON body (at module level: FastAPI resolves the
    annotation by name)."""

    prompt: str
    templateData: dict[str, Any] = {}


def _serve(app: Any, port: int) -> None:
    uvicorn.run(app, port=port, **UVICORN_SETTINGS)


class _PauseWorkers:
    """ASGI wrapper: once the gateway's lifespan has started, stop its generation workers."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return

        async def send_after_pause(message: Message) -> None:
            if message["type"] == "lifespan.startup.complete":
                services = scope["state"]["services"]
                await services.workers.stop()
            await send(message)

        await self.app(scope, receive, send_after_pause)


def gateway_app(config: dict[str, Any]) -> ASGIApp:
    from pydantic import SecretStr

    from gateway.app import create_app
    from gateway.settings import Settings

    tmp = Path(config["tmp"])
    settings = Settings(
        rpc_url=config["rpc_url"],
        settler_key=SecretStr(config["settler_key"]),
        database=tmp / "gateway.db",
        media_dir=tmp / "media",
        public_base_url=f"http://127.0.0.1:{config['port']}",
        # All load comes from one loopback address and a few payers: keep the limiters in the
        # path (their cost is measured) but set so high that they never refuse.
        challenge_rate_per_ip=1e9,
        challenge_burst_per_ip=10**9,
        max_active_tasks_per_payer=10**9,
        _env_file=None,
    )
    return _PauseWorkers(create_app(settings))


def official_app(config: dict[str, Any]) -> ASGIApp:
    """The reference: the SDK's FastAPI middleware, its in-process facilitator, its web3 signer."""
    from fastapi import FastAPI
    from x402 import x402Facilitator, x402ResourceServer
    from x402.http import PaymentOption, RouteConfig
    from x402.http.middleware.fastapi import PaymentMiddlewareASGI
    from x402.mechanisms.evm import FacilitatorWeb3Signer
    from x402.mechanisms.evm.exact import (
        register_exact_evm_facilitator,
        register_exact_evm_server,
    )

    network = "eip155:8453"
    signer = FacilitatorWeb3Signer(private_key=config["settler_key"], rpc_url=config["rpc_url"])
    facilitator = x402Facilitator()
    register_exact_evm_facilitator(facilitator, signer, networks=network)
    server = x402ResourceServer(facilitator)
    register_exact_evm_server(server, network)
    routes = {
        "POST /generation/create": RouteConfig(
            accepts=PaymentOption(
                scheme="exact", pay_to=signer.address, price=config["price"], network=network
            ),
            description="Generate a video from a prompt",
            mime_type="application/json",
        )
    }

    app = FastAPI()
    app.add_middleware(PaymentMiddlewareASGI, routes=routes, server=server)

    @app.post("/generation/create", status_code=202)
    async def create(body: GenerationBody) -> dict[str, str]:
        return {"taskId": uuid.uuid4().hex}

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app


def ceiling_app(config: dict[str, Any]) -> ASGIApp:
    """The most any Starlette app can do here: the same 402 bytes, no work at all."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    body = config["body"].encode()
    headers = config["headers"]

    async def challenge(request: Request) -> Response:
        return Response(body, status_code=402, media_type="application/json", headers=headers)

    async def healthz(request: Request) -> Response:
        return Response(b'{"status":"ok"}', media_type="application/json")

    return Starlette(
        routes=[
            Route("/generation/create", challenge, methods=["POST"]),
            Route("/healthz", healthz, methods=["GET"]),
        ]
    )


APPS = {"gateway": gateway_app, "official": official_app, "ceiling": ceiling_app}


def main() -> None:
    kind, config_path = sys.argv[1], sys.argv[2]
    config = json.loads(Path(config_path).read_text())
    _serve(APPS[kind](config), int(config["port"]))


if __name__ == "__main__":
    main()
