"""Proxy mode against a real upstream: both served by uvicorn on free 127.0.0.1 ports, the
gateway settling on the session's Anvil."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from gateway.proxy_app import create_proxy_app
from gateway.settings import Settings
from tests.gateway.conftest import ETH, gateway_settings, new_key
from tests.gateway.server import ServerThread, free_port
from tests.proxy.upstream import Upstream

SECRET = "proxy-test-secret"

ROUTES = """
[[route]]
method = "POST"
path = "/v1/echo"
description = "Echo, priced per token"
price = "0.01"
input_example = { prompt = "hi", max_tokens = 10 }
output_schema = { type = "object", properties = { ok = { type = "boolean" } } }

[route.input_schema]
type = "object"
required = ["prompt"]
additionalProperties = false
properties = { prompt = { type = "string", maxLength = 100 }, max_tokens = { type = "integer" } }

[[route.price_per]]
field = "max_tokens"
unit_price = "0.001"
min = 1
max = 100
default = 5

[[route]]
method = "POST"
path = "/v1/items/{item}"
description = "One item"
price = "0.02"
input_example = {}

[[route]]
method = "GET"
path = "/v1/report"
description = "The report"
price = "0.005"
input_schema = { type = "object", properties = { format = { type = "string" } } }
input_example = { format = "json" }

[[route]]
method = "POST"
path = "/v1/stream"
description = "A streamed answer"
mime_type = "text/plain"
price = "0.01"

[[route]]
method = "POST"
path = "/v1/fail"
description = "Always fails upstream"
price = "0.01"

[[route]]
method = "POST"
path = "/v1/broken"
description = "Breaks off mid-answer"
mime_type = "text/plain"
price = "0.01"

[[route]]
method = "POST"
path = "/v1/slow"
description = "Answers after the proxy timeout"
price = "0.01"
"""


@dataclass
class Proxy:
    url: str
    pay_to: str
    settings: Settings
    server: ServerThread


def proxy_settings(
    tmp: Path, rpc_url: str, key: str, port: int, upstream_url: str, **extra: Any
) -> Settings:
    routes = tmp / "routes.toml"
    routes.write_text(ROUTES)
    values: dict[str, Any] = {
        "proxy_upstream": upstream_url,
        "proxy_routes_file": routes,
        "proxy_secret": SecretStr(SECRET),
        "proxy_timeout_seconds": 1,
        "proxy_unpriced": "pass",
        **extra,
    }
    return gateway_settings(tmp, rpc_url, key, port, **values)


def start_proxy(local_chain: Any, tmp: Path, upstream_url: str, **extra: Any) -> Proxy:
    address, key = new_key()
    local_chain.fund(address, eth_wei=10 * ETH)
    port = free_port()
    settings = proxy_settings(tmp, local_chain.rpc_url, key, port, upstream_url, **extra)
    server = ServerThread(create_proxy_app(settings), port).start()
    return Proxy(
        url=server.url, pay_to=settings.pay_to or address, settings=settings, server=server
    )


@pytest.fixture(scope="module")
def upstream() -> Iterator[tuple[Upstream, str]]:
    recorder = Upstream()
    server = ServerThread(recorder.app(), free_port()).start()
    try:
        yield recorder, server.url
    finally:
        server.stop()


@pytest.fixture(scope="module")
def proxy(
    local_chain: Any, tmp_path_factory: pytest.TempPathFactory, upstream: tuple[Upstream, str]
) -> Iterator[Proxy]:
    gw = start_proxy(local_chain, tmp_path_factory.mktemp("proxy"), upstream[1])
    try:
        yield gw
    finally:
        gw.server.stop()
