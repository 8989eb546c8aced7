"""`/.well-known/x402` on both faces (the generation gateway and proxy mode): it validates
against the schema we publish, and each entry agrees with the live 402 for its example body
(v2 `accepts` and `extensions.bazaar`, v1 `outputSchema`)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest

from gateway.discovery import published_schema
from payments.amounts import parse_usdc
from tests.gateway.conftest import Gateway, start_gateway
from tests.gateway.paying import decode_challenge
from tests.helpers import free_port
from tests.proxy.conftest import Proxy, start_proxy

SCHEMA_FILE = Path(__file__).resolve().parents[2] / "gateway" / "discovery.schema.json"


@pytest.fixture(scope="module")
def generation(local_chain: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gw = start_gateway(local_chain, tmp_path_factory.mktemp("discovery-generation"))
    try:
        yield gw
    finally:
        gw.server.stop()


@pytest.fixture(scope="module")
def proxy(local_chain: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    # Only 402s are asked for here: the upstream is never called, so nothing listens there.
    dead = f"http://127.0.0.1:{free_port()}"
    gw = start_proxy(local_chain, tmp_path_factory.mktemp("discovery-proxy"), dead)
    try:
        yield gw
    finally:
        gw.server.stop()


async def fetch_document(url: str) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=url) as http:
        doc = await http.get("/.well-known/x402")
        schema = await http.get("/.well-known/x402.schema.json")
    assert doc.status_code == 200 and schema.status_code == 200
    assert schema.json() == published_schema() == json.loads(SCHEMA_FILE.read_text())
    jsonschema.Draft202012Validator.check_schema(schema.json())
    jsonschema.Draft202012Validator(schema.json()).validate(doc.json())
    document: dict[str, Any] = doc.json()
    return document


async def live_402(base: str, entry: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The 402 for the entry's example (a templated path gets a concrete segment)."""
    path = entry["path"].replace("{item}", "7")
    async with httpx.AsyncClient(base_url=base) as http:
        if entry["method"] in ("POST", "PUT", "PATCH"):
            r = await http.request(entry["method"], path, json=entry["input"]["example"])
        else:
            r = await http.request(entry["method"], path, params=entry["input"]["example"])
    assert r.status_code == 402, r.text
    v2: dict[str, Any] = decode_challenge(r.headers["payment-required"])
    v1: dict[str, Any] = r.json()
    return v2, v1


async def assert_agrees_with_402s(base: str, document: dict[str, Any]) -> int:
    compared = 0
    for entry in document["resources"]:
        bazaar = entry["extensions"]["bazaar"]
        jsonschema.validate(bazaar["info"], bazaar["schema"])  # as a facilitator would
        if entry["examplePrice"] is None:
            continue
        v2, v1 = await live_402(base, entry)
        assert v2["accepts"] == entry["accepts"]
        assert v2["extensions"]["bazaar"] == bazaar
        concrete = entry["resource"].replace("{item}", "7")  # a templated path's example
        assert v2["resource"] == {**entry["exampleResource"], "url": concrete}
        assert v2["resource"]["mimeType"] == entry["mimeType"]
        (accepted,) = v1["accepts"]
        assert accepted["outputSchema"] == entry["outputSchema"]
        assert accepted["description"] == entry["exampleResource"]["description"]
        assert accepted["maxAmountRequired"] == entry["examplePrice"]["amount"]
        assert parse_usdc(entry["examplePrice"]["usdc"]) == int(entry["examplePrice"]["amount"])
        assert entry["exampleResource"]["url"] == entry["resource"]
        assert accepted["resource"] == concrete
        payment = document["payment"]
        for offer in entry["accepts"]:
            assert offer["network"] == payment["network"]
            assert offer["asset"] == payment["asset"]
            assert offer["payTo"] == payment["payTo"]
        assert accepted["network"] == payment["networkV1"]
        compared += 1
    return compared


async def test_generation_gateway_discovery_matches_its_402s(generation: Gateway) -> None:
    document = await fetch_document(generation.url)
    assert document["payment"]["payTo"] == generation.pay_to
    (entry,) = document["resources"]
    assert (entry["method"], entry["path"]) == ("POST", "/generation/create")
    assert entry["resource"] == f"{generation.url}/generation/create"
    assert await assert_agrees_with_402s(generation.url, document) == 1
    # the published rule reproduces the example price
    rule = entry["price"]
    (default,) = [m for m in rule["byModel"].values() if m["default"]]
    duration = entry["input"]["example"]["templateData"]["duration"]
    expected = parse_usdc(default["base"]) + parse_usdc(default["perSecond"]) * duration
    assert int(entry["examplePrice"]["amount"]) == expected


async def test_proxy_discovery_matches_its_402s(proxy: Proxy) -> None:
    document = await fetch_document(proxy.url)
    listed = {(e["method"], e["path"]): e for e in document["resources"]}
    assert set(listed) == {
        ("POST", "/v1/echo"),
        ("POST", "/v1/items/{item}"),
        ("GET", "/v1/report"),
        ("POST", "/v1/stream"),
        ("POST", "/v1/fail"),
        ("POST", "/v1/broken"),
        ("POST", "/v1/slow"),
    }
    echo = listed[("POST", "/v1/echo")]
    assert echo["price"]["formula"] == "0.01 + 0.001 * max_tokens"
    assert echo["price"]["perField"] == [
        {
            "field": "max_tokens",
            "unitPrice": "0.001",
            "unitPriceAtomic": "1000",
            "min": 1,
            "max": 100,
            "default": 5,
        }
    ]
    assert echo["examplePrice"] == {"amount": "20000", "usdc": "0.02"}  # 0.01 + 10 * 0.001
    assert echo["output"]["schema"] == {"type": "object", "properties": {"ok": {"type": "boolean"}}}
    assert listed[("POST", "/v1/stream")]["examplePrice"] is None  # no input_example given
    # echo, the templated route and the GET route each agree with a live 402
    assert await assert_agrees_with_402s(proxy.url, document) == 3
