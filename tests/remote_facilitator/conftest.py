"""Real facilitators for the remote-facilitator tests, all on the session's Anvil:

- OURS: our facilitator service (``gateway.facilitator_app``: our verifier, settler key and
  ledger) served by uvicorn, guarded by a bearer token;
- OFFICIAL: the official x402 SDK's ``x402Facilitator`` with its ``FacilitatorWeb3Signer``,
  behind a small Starlette app speaking the standard HTTP API (the SDK ships the facilitator
  logic, not the HTTP face);
- STUB: a facilitator that answers what the test tells it (a refusal, an error status).

Each real facilitator sits behind a ``FaultProxy`` so a test can lose the answer to one
``/settle`` after the facilitator acted on it, or take the facilitator off the network.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.app import create_app
from gateway.facilitator_app import create_facilitator_app
from gateway.settings import Settings
from tests.fault_proxy import FaultProxy
from tests.gateway.conftest import ETH, new_key
from tests.gateway.server import ServerThread, free_port

TOKEN = "facilitator-test-token"


def official_facilitator_app(rpc_url: str, key: str) -> Starlette:
    """The official SDK's facilitator logic behind the standard HTTP API."""
    from x402 import x402Facilitator
    from x402.mechanisms.evm import FacilitatorWeb3Signer
    from x402.mechanisms.evm.exact import register_exact_evm_facilitator
    from x402.schemas import PaymentPayload, PaymentRequirements
    from x402.schemas.v1 import PaymentPayloadV1, PaymentRequirementsV1

    signer = FacilitatorWeb3Signer(private_key=key, rpc_url=rpc_url)
    facilitator = x402Facilitator()
    register_exact_evm_facilitator(facilitator, signer, networks="eip155:8453")

    def parse(body: dict[str, Any]) -> tuple[Any, Any]:
        if body["x402Version"] == 1:
            return (
                PaymentPayloadV1.model_validate(body["paymentPayload"]),
                PaymentRequirementsV1.model_validate(body["paymentRequirements"]),
            )
        return (
            PaymentPayload.model_validate(body["paymentPayload"]),
            PaymentRequirements.model_validate(body["paymentRequirements"]),
        )

    async def supported(request: Request) -> Response:
        answer = facilitator.get_supported()
        return JSONResponse(answer.model_dump(mode="json", by_alias=True, exclude_none=True))

    async def verify(request: Request) -> Response:
        payload, requirements = parse(await request.json())
        answer = await facilitator.verify(payload, requirements)
        return JSONResponse(answer.model_dump(mode="json", by_alias=True, exclude_none=True))

    async def settle(request: Request) -> Response:
        payload, requirements = parse(await request.json())
        answer = await facilitator.settle(payload, requirements)
        return JSONResponse(answer.model_dump(mode="json", by_alias=True, exclude_none=True))

    return Starlette(
        routes=[
            Route("/supported", supported, methods=["GET"]),
            Route("/verify", verify, methods=["POST"]),
            Route("/settle", settle, methods=["POST"]),
        ]
    )


@dataclass
class Stub:
    """A facilitator that says what it is told; it records the auth headers it saw."""

    verify: tuple[int, dict[str, Any]] = (200, {"isValid": True})
    settle: tuple[int, dict[str, Any]] = (
        200,
        {"success": False, "errorReason": "stub_refused", "transaction": "", "network": ""},
    )
    auth_seen: list[str | None] = field(default_factory=list)
    settles: int = 0

    def app(self) -> Starlette:
        async def supported(request: Request) -> Response:
            kinds = [{"x402Version": 2, "scheme": "exact", "network": "eip155:8453"}]
            return JSONResponse({"kinds": kinds})

        async def verify(request: Request) -> Response:
            self.auth_seen.append(request.headers.get("x-api-key"))
            status, body = self.verify
            return JSONResponse(body, status_code=status)

        async def settle(request: Request) -> Response:
            self.settles += 1
            status, body = self.settle
            return JSONResponse(body, status_code=status)

        return Starlette(
            routes=[
                Route("/supported", supported, methods=["GET"]),
                Route("/verify", verify, methods=["POST"]),
                Route("/settle", settle, methods=["POST"]),
            ]
        )


@dataclass
class Served:
    url: str
    proxy: FaultProxy
    server: ServerThread
    address: str  # the facilitator's settling account


def remote_settings(
    tmp: Path, rpc_url: str, facilitator_url: str, port: int, **extra: Any
) -> Settings:
    """A gateway in remote facilitator mode: NO settler key, an explicit pay_to."""
    pay_to, _ = new_key()
    values: dict[str, Any] = {
        "rpc_url": rpc_url,
        "pay_to": pay_to,
        "facilitator_url": facilitator_url,
        "facilitator_timeout_seconds": 5,
        "facilitator_retries": 3,
        "database": tmp / "gateway.db",
        "media_dir": tmp / "media",
        "public_base_url": f"http://127.0.0.1:{port}",
        "worker_concurrency": 1,
        "refusal_rate_per_payer": 0,  # the tests refuse one payer on purpose, more than once
        **extra,
    }
    return Settings(_env_file=None, **values)


@dataclass
class RemoteGateway:
    url: str
    pay_to: str
    settings: Settings
    server: ServerThread


def start_remote_gateway(
    local_chain: Any, tmp: Path, facilitator_url: str, **extra: Any
) -> RemoteGateway:
    port = free_port()
    settings = remote_settings(tmp, local_chain.rpc_url, facilitator_url, port, **extra)
    server = ServerThread(create_app(settings), port).start()
    assert settings.pay_to is not None
    return RemoteGateway(server.url, settings.pay_to, settings, server)


def _serve_behind_proxy(app: Any) -> tuple[ServerThread, FaultProxy]:
    server = ServerThread(app, free_port()).start()
    proxy = FaultProxy("127.0.0.1", server.port)
    proxy.start()
    return server, proxy


@pytest.fixture(scope="session")
def ours(local_chain: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    address, key = new_key()
    local_chain.fund(address, eth_wei=10 * ETH)
    settings = Settings(
        _env_file=None,
        rpc_url=local_chain.rpc_url,
        settler_key=SecretStr(key),
        database=tmp_path_factory.mktemp("ours-facilitator") / "facilitator.db",
        facilitator_token=SecretStr(TOKEN),
    )
    server, proxy = _serve_behind_proxy(create_facilitator_app(settings))
    try:
        yield Served(proxy.url, proxy, server, address)
    finally:
        proxy.stop()
        server.stop()


@pytest.fixture(scope="session")
def official(local_chain: Any) -> Iterator[Served]:
    address, key = new_key()
    local_chain.fund(address, eth_wei=10 * ETH)
    server, proxy = _serve_behind_proxy(official_facilitator_app(local_chain.rpc_url, key))
    try:
        yield Served(proxy.url, proxy, server, address)
    finally:
        proxy.stop()
        server.stop()
