"""A real gateway (uvicorn on a free port) on the session's Anvil, and real payers."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from eth_account import Account
from pydantic import SecretStr

from gateway.app import create_app
from gateway.settings import Settings
from tests.gateway.server import ServerThread, free_port

ETH = 10**18
USDC = 10**6


@dataclass(frozen=True)
class Payer:
    address: str
    key: str


@dataclass
class Gateway:
    url: str
    pay_to: str
    settings: Settings
    server: ServerThread


def new_key() -> tuple[str, str]:
    acct = Account.create()
    return acct.address, "0x" + bytes(acct.key).hex()


def gateway_settings(
    tmp: Path, rpc_url: str, settler_key: str, port: int, **extra: Any
) -> Settings:
    values: dict[str, Any] = {
        "rpc_url": rpc_url,
        "settler_key": SecretStr(settler_key),
        "database": tmp / "gateway.db",
        "media_dir": tmp / "media",
        "public_base_url": f"http://127.0.0.1:{port}",
        "allow_private_urls": True,
        **extra,
    }
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


def start_gateway(
    local_chain: Any, tmp: Path, *, rpc_url: str | None = None, **extra: Any
) -> Gateway:
    address, key = new_key()
    local_chain.fund(address, eth_wei=10 * ETH)
    port = free_port()
    settings = gateway_settings(tmp, rpc_url or local_chain.rpc_url, key, port, **extra)
    server = ServerThread(create_app(settings), port).start()
    return Gateway(url=server.url, pay_to=address, settings=settings, server=server)


@pytest.fixture(scope="module")
def gateway(local_chain: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gw = start_gateway(local_chain, tmp_path_factory.mktemp("gateway"))
    try:
        yield gw
    finally:
        gw.server.stop()


@pytest.fixture
def make_payer(local_chain: Any) -> Callable[..., Payer]:
    def make(usdc: int = 10 * USDC) -> Payer:
        address, key = new_key()
        if usdc:
            local_chain.fund(address, usdc=usdc)
        return Payer(address, key)

    return make
