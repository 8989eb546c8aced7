"""End to end: a real gateway under uvicorn, a real Anvil, real keys; balances read on chain."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from typing import Any

import httpx
import pytest
from eth_account import Account
from x402 import x402Client
from x402.http.clients import x402HttpxClient
from x402.mechanisms.evm.exact import register_exact_evm_client

from payments import decode_settle_response
from tests.fault_proxy import FaultProxy
from tests.gateway.conftest import Gateway, start_gateway
from tests.gateway.paying import decode_challenge, v1_header, v2_header

BODY = {"prompt": "a lighthouse at dawn, waves rolling in", "templateData": {"duration": 2}}


async def quote_of(gateway: Gateway, body: dict[str, Any]) -> tuple[int, httpx.Response]:
    async with httpx.AsyncClient(base_url=gateway.url) as http:
        r = await http.post("/generation/create", json=body)
    assert r.status_code == 402, r.text
    challenge = decode_challenge(r.headers["payment-required"])
    amount = int(challenge["accepts"][0]["amount"])
    assert int(r.json()["accepts"][0]["maxAmountRequired"]) == amount
    return amount, r


async def wait_terminal(
    gateway: Gateway | str, task_id: str, limit_s: float = 60
) -> dict[str, Any]:
    url = gateway if isinstance(gateway, str) else gateway.url
    deadline = time.monotonic() + limit_s
    async with httpx.AsyncClient(base_url=url) as http:
        while time.monotonic() < deadline:
            r = await http.get(f"/generation/{task_id}/status")
            body: dict[str, Any] = r.json()
            if body["status"] in ("completed", "failed"):
                return body
            assert r.status_code == 202
            await asyncio.sleep(0.2)
    raise AssertionError(f"task {task_id} did not finish in {limit_s}s")


async def test_official_client_pays_v2_and_the_task_completes(
    gateway: Gateway, make_payer: Any, local_chain: Any
) -> None:
    payer = make_payer()
    amount, _ = await quote_of(gateway, BODY)
    payer_before = local_chain.usdc_balance(payer.address)
    pay_to_before = local_chain.usdc_balance(gateway.pay_to)

    client = register_exact_evm_client(x402Client(), Account.from_key(payer.key))
    async with x402HttpxClient(client, base_url=gateway.url, timeout=30) as http:
        r = await http.post("/generation/create", json=BODY)

    assert r.status_code == 202, r.text
    task_id = r.json()["taskId"]
    assert r.headers["location"] == f"/generation/{task_id}/status"
    receipt = decode_settle_response(r.headers["payment-response"])
    assert receipt.success
    assert receipt.payer.lower() == payer.address.lower()
    assert receipt.transaction.startswith("0x") and len(receipt.transaction) == 66
    assert local_chain.usdc_balance(payer.address) == payer_before - amount
    assert local_chain.usdc_balance(gateway.pay_to) == pay_to_before + amount

    status = await wait_terminal(gateway, task_id)
    assert status["status"] == "completed", status
    assert status["payment"]["transaction"] == receipt.transaction
    assert status["payment"]["amount"] == str(amount)
    video_url = status["result"]["generation"]["video"]["url"]
    async with httpx.AsyncClient() as http:
        video = await http.get(video_url)
    assert video.status_code == 200
    assert video.content[4:8] == b"ftyp"  # an MP4 container


async def test_v1_client_pays_with_x_payment(
    gateway: Gateway, make_payer: Any, local_chain: Any
) -> None:
    payer = make_payer()
    amount, challenge = await quote_of(gateway, BODY)
    before = local_chain.usdc_balance(payer.address)
    header = v1_header(challenge.json(), payer.key)
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as http:
        r = await http.post("/generation/create", json=BODY, headers={"X-PAYMENT": header})
    assert r.status_code == 202, r.text
    assert "payment-response" not in r.headers
    receipt = decode_settle_response(r.headers["x-payment-response"])
    assert receipt.success and receipt.network == "base"
    assert local_chain.usdc_balance(payer.address) == before - amount


async def test_payment_for_a_cheaper_body_does_not_buy_a_dearer_one(
    gateway: Gateway, make_payer: Any, local_chain: Any
) -> None:
    payer = make_payer()
    cheap = {"prompt": "cheap", "templateData": {"duration": 1}}
    dear = {"prompt": "cheap", "templateData": {"duration": 10}}
    cheap_amount, cheap_challenge = await quote_of(gateway, cheap)
    dear_amount, _ = await quote_of(gateway, dear)
    assert dear_amount > cheap_amount
    header = v2_header(cheap_challenge.headers["payment-required"], payer.key)
    before = local_chain.usdc_balance(payer.address)
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as http:
        r = await http.post("/generation/create", json=dear, headers={"PAYMENT-SIGNATURE": header})
    assert r.status_code == 402
    challenge = decode_challenge(r.headers["payment-required"])
    assert challenge["error"].startswith("invalid")
    assert int(challenge["accepts"][0]["amount"]) == dear_amount  # the right price, again
    assert local_chain.usdc_balance(payer.address) == before


async def test_one_header_sent_twenty_times_charges_once(
    gateway: Gateway, make_payer: Any, local_chain: Any
) -> None:
    payer = make_payer()
    amount, challenge = await quote_of(gateway, BODY)
    header = v2_header(challenge.headers["payment-required"], payer.key)
    before = local_chain.usdc_balance(payer.address)

    async def send() -> httpx.Response:
        async with httpx.AsyncClient(base_url=gateway.url, timeout=60) as http:
            return await http.post(
                "/generation/create", json=BODY, headers={"PAYMENT-SIGNATURE": header}
            )

    responses = await asyncio.gather(*(send() for _ in range(20)))
    statuses = [r.status_code for r in responses]
    assert all(s in (202, 402) for s in statuses), statuses
    task_ids = {r.json()["taskId"] for r in responses if r.status_code == 202}
    assert len(task_ids) == 1, task_ids
    for r in responses:
        if r.status_code == 402:
            assert decode_challenge(r.headers["payment-required"])["error"]
    assert local_chain.usdc_balance(payer.address) == before - amount


async def test_rpc_down_is_503_with_retry_after_and_no_charge(
    local_chain: Any, make_payer: Any, tmp_path: Any
) -> None:
    host, port = local_chain.rpc_url.removeprefix("http://").split(":")
    proxy = FaultProxy(host, int(port)).start()
    gw = start_gateway(local_chain, tmp_path, rpc_url=proxy.url, rpc_timeout_seconds=2)
    try:
        payer = make_payer()
        amount, challenge = await quote_of(gw, BODY)
        header = v2_header(challenge.headers["payment-required"], payer.key)
        before = local_chain.usdc_balance(payer.address)
        proxy.cut()
        async with httpx.AsyncClient(base_url=gw.url, timeout=30) as http:
            r = await http.post(
                "/generation/create", json=BODY, headers={"PAYMENT-SIGNATURE": header}
            )
            assert r.status_code == 503, r.text
            assert int(r.headers["retry-after"]) > 0
            assert local_chain.usdc_balance(payer.address) == before

            proxy.restore()  # the same authorization goes through once the chain is back
            r = await http.post(
                "/generation/create", json=BODY, headers={"PAYMENT-SIGNATURE": header}
            )
            assert r.status_code == 202, r.text
        assert local_chain.usdc_balance(payer.address) == before - amount
    finally:
        gw.server.stop()
        proxy.stop()


def test_settle_response_header_is_base64_json(gateway: Gateway) -> None:
    # Shape check of an unpaid answer: both challenge forms and the caching/CORS headers.
    r = httpx.post(
        f"{gateway.url}/generation/create",
        json=BODY,
        headers={"Origin": "https://agent.example"},
    )
    assert r.status_code == 402
    assert r.headers["cache-control"] == "no-store"
    exposed = r.headers["access-control-expose-headers"].lower()
    for name in ("payment-required", "payment-response", "x-payment-response"):
        assert name in exposed
    v2 = json.loads(base64.b64decode(r.headers["payment-required"]))
    assert v2["x402Version"] == 2
    assert v2["resource"]["url"] == f"{gateway.url}/generation/create"
    assert v2["accepts"][0]["network"] == "eip155:8453"
    assert "bazaar" in v2["extensions"]
    v1 = r.json()
    assert v1["x402Version"] == 1
    req = v1["accepts"][0]
    assert req["network"] == "base"
    assert req["resource"] == f"{gateway.url}/generation/create"
    assert req["extra"] == {"name": "USD Coin", "version": "2"}
    assert "prompt" in req["outputSchema"]["input"]["bodyFields"]
    assert int(req["maxAmountRequired"]) <= 1_000_000  # the official clients' default cap


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": "x", "templateData": {"autoClank": True}}, "templateData.autoClank"),
        ({"prompt": "x", "templateData": {"duration": 0}}, "templateData.duration"),
        ({"prompt": "x", "templateData": {"duration": "4"}}, "templateData.duration"),
        ({"prompt": "x", "templateData": "{not json"}, "templateData"),
        ({"prompt": "x", "templateData": {"videoModel": "nope"}}, "templateData.videoModel"),
        ({"prompt": "x", "templateData": {"duration": 999}}, "templateData.duration"),
        ({"prompt": "x", "templateData": {"image": "ftp://x"}}, "templateData.image"),
    ],
)
def test_bad_bodies_are_400_before_any_payment(
    gateway: Gateway, body: dict[str, Any], field: str
) -> None:
    r = httpx.post(f"{gateway.url}/generation/create", json=body)
    assert r.status_code == 400, r.text
    assert "payment-required" not in r.headers
    fields = [e["field"] for e in r.json().get("errors", [])]
    assert any(f.startswith(field) for f in fields), r.json()


def test_template_data_as_json_string_is_accepted(gateway: Gateway) -> None:
    body = {"prompt": "x", "templateData": json.dumps({"duration": 3})}
    r = httpx.post(f"{gateway.url}/generation/create", json=body)
    assert r.status_code == 402


def test_non_json_and_oversize_bodies(gateway: Gateway) -> None:
    r = httpx.post(f"{gateway.url}/generation/create", content=b"not json")
    assert r.status_code == 400 and r.json()["error"] == "invalid_json"
    big = b"x" * (gateway.settings.max_body_bytes + 1)
    r = httpx.post(f"{gateway.url}/generation/create", content=big)
    assert r.status_code == 413


def test_status_of_unknown_task_is_404(gateway: Gateway) -> None:
    r = httpx.get(f"{gateway.url}/generation/nope/status")
    assert r.status_code == 404
    assert r.json()["status"] == "not_found"


def test_healthz_and_openapi(gateway: Gateway) -> None:
    assert httpx.get(f"{gateway.url}/healthz?deep=1").json()["status"] == "ok"
    doc = httpx.get(f"{gateway.url}/openapi.json").json()
    assert "/generation/create" in doc["paths"]


def _png_data_url(color: tuple[int, int, int]) -> str:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 48), color).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_image_inputs_are_checked_before_payment(gateway: Gateway) -> None:
    url = f"{gateway.url}/generation/create"
    plain = httpx.post(url, json={"prompt": "x", "templateData": {"duration": 2}})
    with_image = httpx.post(
        url,
        json={"prompt": "x", "templateData": {"duration": 2, "image": _png_data_url((9, 9, 9))}},
    )
    assert with_image.status_code == 402
    plain_amount = int(plain.json()["accepts"][0]["maxAmountRequired"])
    image_amount = int(with_image.json()["accepts"][0]["maxAmountRequired"])
    assert image_amount > plain_amount  # the image surcharge

    bad = httpx.post(
        url,
        json={"prompt": "x", "templateData": {"image": "data:image/png;base64,bm90IGEgcG5n"}},
    )
    assert bad.status_code == 400
    assert bad.json()["errors"][0]["field"] == "templateData.image"
    unresolvable = httpx.post(
        url, json={"prompt": "x", "webhook": "http://no-such-host.invalid/hook"}
    )
    assert unresolvable.status_code == 400
    assert unresolvable.json()["errors"][0]["field"] == "webhook"


async def test_paid_task_uses_the_data_url_image(
    gateway: Gateway, make_payer: Any, tmp_path: Any
) -> None:
    import av

    payer = make_payer()
    body = {"prompt": "red", "templateData": {"duration": 1, "image": _png_data_url((250, 10, 10))}}
    _, challenge = await quote_of(gateway, body)
    header = v2_header(challenge.headers["payment-required"], payer.key)
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as http:
        r = await http.post("/generation/create", json=body, headers={"PAYMENT-SIGNATURE": header})
    assert r.status_code == 202, r.text
    status = await wait_terminal(gateway, r.json()["taskId"])
    assert status["status"] == "completed"
    async with httpx.AsyncClient() as http:
        video = (await http.get(status["result"]["generation"]["video"]["url"])).content
    (tmp_path / "v.mp4").write_bytes(video)
    with av.open(str(tmp_path / "v.mp4")) as container:
        first = next(container.decode(video=0)).to_ndarray(format="rgb24")
    red, green = first[..., 0].mean(), first[..., 1].mean()
    assert red > 150 and green < 100, (red, green)  # the input image is the first frame


def test_resource_url_behind_a_trusted_proxy(local_chain: Any, tmp_path: Any) -> None:
    gw = start_gateway(local_chain, tmp_path, public_base_url=None, trust_forwarded_headers=True)
    try:
        r = httpx.post(
            f"{gw.url}/generation/create",
            json=BODY,
            headers={"X-Forwarded-Proto": "https", "X-Forwarded-Host": "api.example.com"},
        )
        assert r.json()["accepts"][0]["resource"] == "https://api.example.com/generation/create"
        direct = httpx.post(f"{gw.url}/generation/create", json=BODY)
        assert direct.json()["accepts"][0]["resource"] == f"{gw.url}/generation/create"
    finally:
        gw.server.stop()
    untrusted = start_gateway(local_chain, tmp_path / "u", public_base_url=None)
    try:
        r = httpx.post(
            f"{untrusted.url}/generation/create",
            json=BODY,
            headers={"X-Forwarded-Proto": "https", "X-Forwarded-Host": "evil.example"},
        )
        assert r.json()["accepts"][0]["resource"] == f"{untrusted.url}/generation/create"
    finally:
        untrusted.server.stop()


def test_cors_preflight_allows_the_payment_headers(gateway: Gateway) -> None:
    r = httpx.options(
        f"{gateway.url}/generation/create",
        headers={
            "Origin": "https://agent.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type,payment-signature,x-payment",
        },
    )
    assert r.status_code == 200
    allowed = r.headers["access-control-allow-headers"].lower()
    assert "payment-signature" in allowed and "x-payment" in allowed
