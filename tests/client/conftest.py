"""Session fixtures of the payer tests: our gateway and the official SDK server, both real
(uvicorn on free 127.0.0.1 ports, settling on the session's Anvil), and funded payer keys."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from gateway.app import create_app
from gateway.settings import Settings
from tests.client.servers import Recorder, official_app
from tests.gateway.conftest import ETH, USDC, gateway_settings, new_key
from tests.gateway.server import ServerThread, free_port


@dataclass(frozen=True)
class Key:
    address: str
    key: str


@dataclass
class Served:
    url: str
    port: int
    pay_to: str
    recorder: Recorder
    server: ServerThread
    settings: Settings | None = None


@pytest.fixture(scope="session")
def gateway(local_chain: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    settler, settler_key = new_key()
    local_chain.fund(settler, eth_wei=10 * ETH)
    port = free_port()
    settings = gateway_settings(
        tmp_path_factory.mktemp("client-gateway"), local_chain.rpc_url, settler_key, port
    )
    recorder = Recorder(create_app(settings))
    server = ServerThread(recorder, port).start()
    try:
        yield Served(server.url, port, settler, recorder, server, settings)
    finally:
        server.stop()


@pytest.fixture(scope="session")
def official(local_chain: Any) -> Iterator[Served]:
    facilitator, facilitator_key = new_key()
    local_chain.fund(facilitator, eth_wei=10 * ETH)
    pay_to, _ = new_key()
    recorder = Recorder(official_app(local_chain.rpc_url, facilitator_key, pay_to))
    port = free_port()
    server = ServerThread(recorder, port).start()
    try:
        yield Served(server.url, port, pay_to, recorder, server)
    finally:
        server.stop()


@pytest.fixture
def make_key(local_chain: Any) -> Callable[..., Key]:
    """A fresh payer key holding ``usdc`` atomic units of test USDC (and no ETH)."""

    def make(usdc: int = 10 * USDC) -> Key:
        address, key = new_key()
        if usdc:
            local_chain.fund(address, usdc=usdc)
        return Key(address, key)

    return make
