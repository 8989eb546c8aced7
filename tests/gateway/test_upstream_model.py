"""A paid task on the upstream (OpenAI-compatible videos API) model, through the real gateway.

The hosted provider cannot run here; `FakeVideosAPI` speaks its HTTP API for real on loopback
(with our embedded renderer behind it), so the gateway's upstream wiring is exercised end to end.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from tests.gateway.conftest import Gateway, start_gateway
from tests.gateway.paying import decode_challenge, v2_header
from tests.gateway.server import ServerThread, free_port
from tests.gateway.test_paid_flow import wait_terminal
from tests.generation.fake_videos_api import FakeVideosAPI


@pytest.fixture(scope="module")
def upstream_gateway(
    local_chain: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    api = FakeVideosAPI(tmp_path_factory.mktemp("provider"), api_key="sk-test")
    provider = ServerThread(api.app, free_port()).start()
    gw = start_gateway(
        local_chain,
        tmp_path_factory.mktemp("gw"),
        upstream_base_url=f"{provider.url}/v1",
        upstream_api_key=SecretStr("sk-test"),
    )
    try:
        yield gw
    finally:
        gw.server.stop()
        provider.stop()


async def _pay(gw: Gateway, payer: Any, body: dict[str, Any]) -> tuple[int, str]:
    async with httpx.AsyncClient(base_url=gw.url, timeout=30) as http:
        challenge = await http.post("/generation/create", json=body)
        assert challenge.status_code == 402, challenge.text
        amount = int(
            decode_challenge(challenge.headers["payment-required"])["accepts"][0]["amount"]
        )
        header = v2_header(challenge.headers["payment-required"], payer.key)
        r = await http.post("/generation/create", json=body, headers={"PAYMENT-SIGNATURE": header})
    assert r.status_code == 202, r.text
    return amount, r.json()["taskId"]


async def test_upstream_model_completes_and_is_rehosted(
    upstream_gateway: Gateway, make_payer: Any
) -> None:
    body = {"prompt": "a paper boat", "templateData": {"videoModel": "sora-2", "duration": 4}}
    _, task_id = await _pay(upstream_gateway, make_payer(), body)
    status = await wait_terminal(upstream_gateway, task_id, limit_s=120)
    assert status["status"] == "completed", status
    url = status["result"]["generation"]["video"]["url"]
    assert url.startswith(upstream_gateway.url + "/media/")  # served by us, not the provider
    async with httpx.AsyncClient() as http:
        video = await http.get(url)
    assert video.status_code == 200 and video.content[4:8] == b"ftyp"


async def test_upstream_failure_is_refunded(
    upstream_gateway: Gateway, make_payer: Any, local_chain: Any
) -> None:
    payer = make_payer()
    before = local_chain.usdc_balance(payer.address)
    body = {"prompt": "[fail] please", "templateData": {"videoModel": "sora-2", "duration": 4}}
    amount, task_id = await _pay(upstream_gateway, payer, body)
    status = await wait_terminal(upstream_gateway, task_id, limit_s=120)
    assert status["status"] == "failed"
    assert status["error"]["code"] == "backend_error"  # the provider reported the job failed
    assert "provider failed" in status["error"]["message"]
    for _ in range(100):
        if local_chain.usdc_balance(payer.address) == before:
            break
        await asyncio.sleep(0.1)
    assert local_chain.usdc_balance(payer.address) == before, amount


def test_upstream_model_is_refused_when_no_provider_is_configured(
    local_chain: Any, tmp_path: Path
) -> None:
    gw = start_gateway(local_chain, tmp_path)
    try:
        r = httpx.post(
            f"{gw.url}/generation/create",
            json={"prompt": "x", "templateData": {"videoModel": "sora-2", "duration": 4}},
        )
        assert r.status_code == 400
        assert r.json()["error"] == "model_unavailable"
    finally:
        gw.server.stop()
