"""Proxy mode end to end: a real upstream, the real gateway, real signatures, Anvil balances."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.proxy import verify_payer_headers
from payments import decode_settle_response
from payments.ledger import PaymentState, SqliteLedger
from payments.localchain import DevAccount
from tests.gateway.paying import decode_challenge, v1_header, v2_header
from tests.helpers import wait_balance
from tests.proxy.conftest import SECRET, Proxy, start_proxy
from tests.proxy.upstream import Upstream

UpstreamFixture = tuple[Upstream, str]


async def challenge(
    proxy: Proxy, path: str, body: Any, method: str = "POST"
) -> tuple[int, httpx.Response]:
    async with httpx.AsyncClient(base_url=proxy.url) as http:
        r = await http.request(method, path, json=body)
    assert r.status_code == 402, r.text
    offer = decode_challenge(r.headers["payment-required"])
    amount = int(offer["accepts"][0]["amount"])
    assert int(r.json()["accepts"][0]["maxAmountRequired"]) == amount
    return amount, r


async def test_paid_request_reaches_upstream_with_signed_payer_headers(
    proxy: Proxy, upstream: UpstreamFixture, funded_payer: Any, local_chain: Any
) -> None:
    recorder, _ = upstream
    payer: DevAccount = funded_payer()
    body = {"prompt": "hello", "max_tokens": 7}
    amount, r402 = await challenge(proxy, "/v1/echo", body)
    assert amount == 10_000 + 7 * 1_000  # 0.01 + 0.001 * max_tokens
    header = v2_header(r402.headers["payment-required"], payer.private_key)
    before = local_chain.usdc_balance(payer.address)
    spoofed = {
        "PAYMENT-SIGNATURE": header,
        "X-X402-Payer": "0x000000000000000000000000000000000000dEaD",
        "X-X402-Signature": "00" * 32,
        "X-X402-Amount": "999999999",
    }
    async with httpx.AsyncClient(base_url=proxy.url, timeout=30) as http:
        r = await http.post("/v1/echo?lang=en", json=body, headers=spoofed)

    assert r.status_code == 200, r.text
    assert r.json()["ok"] is True
    receipt = decode_settle_response(r.headers["payment-response"])  # ours, not the forged one
    assert receipt.success and receipt.payer == payer.address
    assert r.headers.get_list("payment-response") == [r.headers["payment-response"]]
    assert r.headers["x-upstream"] == "yes"
    assert "proxy-authenticate" not in r.headers
    assert local_chain.usdc_balance(payer.address) == before - amount

    seen = recorder.hits("/v1/echo")[-1]
    assert seen.query == "lang=en"
    assert seen.values("x-x402-payer") == [payer.address]  # the client's copies are gone
    assert seen.values("x-x402-amount") == [str(amount)]
    assert seen.header("x-x402-transaction") == receipt.transaction
    assert seen.header("x-x402-network") == "eip155:8453"
    assert seen.header("payment-signature") is None and seen.header("x-payment") is None
    assert seen.header("x-forwarded-for") == "127.0.0.1"
    assert seen.header("x-forwarded-proto") == "http"
    assert seen.header("x-forwarded-host") == proxy.url.removeprefix("http://")
    verified = verify_payer_headers(
        seen.as_mapping(), method="POST", path=seen.raw_path, secret=SECRET.encode()
    )
    assert verified is not None and verified.payer == payer.address
    assert verified.amount == amount
    # the HMAC binds the secret, the request and every value
    mapping = seen.as_mapping()
    assert verify_payer_headers(mapping, method="POST", path=seen.raw_path, secret=b"x") is None
    key = SECRET.encode()
    assert verify_payer_headers(mapping, method="POST", path="/v1/other", secret=key) is None
    assert verify_payer_headers(mapping, method="GET", path=seen.raw_path, secret=key) is None
    forged = {**mapping, "x-x402-amount": str(amount + 1)}
    assert verify_payer_headers(forged, method="POST", path=seen.raw_path, secret=key) is None
    stale = verify_payer_headers(
        mapping, method="POST", path=seen.raw_path, secret=SECRET.encode(), now=time.time() + 3600
    )
    assert stale is None

    # delivered: recorded in the ledger, so a restart will not refund it
    ledger = await SqliteLedger(proxy.settings.database).open()
    try:
        row = await ledger.get(verified.payment_id)
    finally:
        await ledger.close()
    assert row.state is PaymentState.SETTLED and row.task_id == "proxy:200"

    # the same authorization again buys nothing more: 409, not forwarded, not charged
    hits = len(recorder.hits("/v1/echo"))
    async with httpx.AsyncClient(base_url=proxy.url, timeout=30) as http:
        again = await http.post("/v1/echo", json=body, headers={"PAYMENT-SIGNATURE": header})
    assert again.status_code == 409 and again.json()["error"] == "payment_already_used"
    assert len(recorder.hits("/v1/echo")) == hits
    assert local_chain.usdc_balance(payer.address) == before - amount


async def test_v1_payment_and_templated_route(
    proxy: Proxy, upstream: UpstreamFixture, funded_payer: Any, local_chain: Any
) -> None:
    recorder, _ = upstream
    payer: DevAccount = funded_payer()
    amount, r402 = await challenge(proxy, "/v1/items/42", {})
    assert amount == 20_000
    assert r402.json()["accepts"][0]["resource"] == f"{proxy.url}/v1/items/42"
    before = local_chain.usdc_balance(payer.address)
    header = v1_header(r402.json(), payer.private_key)
    async with httpx.AsyncClient(base_url=proxy.url, timeout=30) as http:
        r = await http.post("/v1/items/42", json={}, headers={"X-PAYMENT": header})
    assert r.status_code == 200, r.text
    assert decode_settle_response(r.headers["x-payment-response"]).network == "base"
    assert recorder.hits("/v1/items/42")[-1].header("x-x402-payer") == payer.address
    assert local_chain.usdc_balance(payer.address) == before - amount


async def test_streaming_response_passes_through_chunk_by_chunk(
    proxy: Proxy, upstream: UpstreamFixture, funded_payer: Any
) -> None:
    recorder, _ = upstream
    payer: DevAccount = funded_payer()
    _, r402 = await challenge(proxy, "/v1/stream", {})
    header = v2_header(r402.headers["payment-required"], payer.private_key)
    received: list[bytes] = []
    async with (
        httpx.AsyncClient(base_url=proxy.url, timeout=30) as http,
        http.stream("POST", "/v1/stream", json={}, headers={"PAYMENT-SIGNATURE": header}) as r,
    ):
        assert r.status_code == 200
        assert "payment-response" in r.headers
        assert r.headers.get("content-length") is None  # not buffered into one body
        async for chunk in r.aiter_raw():
            received.append(chunk)
            if not recorder.release.is_set() and b"first" in b"".join(received):
                # the upstream holds the rest until now: the first chunk came through alone
                assert b"".join(received) == b"first\n"
                recorder.release.set()
    assert b"".join(received) == b"first\nsecond\nthird\n"


async def test_upstream_500_after_payment_is_refunded_on_chain(
    proxy: Proxy, upstream: UpstreamFixture, funded_payer: Any, local_chain: Any
) -> None:
    recorder, _ = upstream
    payer: DevAccount = funded_payer()
    amount, r402 = await challenge(proxy, "/v1/fail", {})
    header = v2_header(r402.headers["payment-required"], payer.private_key)
    before = local_chain.usdc_balance(payer.address)
    async with httpx.AsyncClient(base_url=proxy.url, timeout=30) as http:
        r = await http.post("/v1/fail", json={}, headers={"PAYMENT-SIGNATURE": header})
        assert r.status_code == 500
        assert r.json() == {"error": "upstream broke"}  # the upstream's answer, passed on
        assert decode_settle_response(r.headers["payment-response"]).success  # it was charged
        hits = len(recorder.hits("/v1/fail"))
        # at once, while the refund may still be on its way: already no longer usable
        early = await http.post("/v1/fail", json={}, headers={"PAYMENT-SIGNATURE": header})
        assert early.status_code == 409 and early.json()["error"] == "payment_refunded"
        await wait_balance(local_chain, payer.address, before)  # ... and given back
        again = await http.post("/v1/fail", json={}, headers={"PAYMENT-SIGNATURE": header})
    assert again.status_code == 409 and again.json()["error"] == "payment_refunded"
    assert len(recorder.hits("/v1/fail")) == hits  # a refunded payment buys nothing
    assert local_chain.usdc_balance(payer.address) == before
    assert amount > 0


async def test_answer_broken_off_mid_stream_is_refunded_on_chain(
    proxy: Proxy, upstream: UpstreamFixture, funded_payer: Any, local_chain: Any
) -> None:
    recorder, _ = upstream
    payer: DevAccount = funded_payer()
    amount, r402 = await challenge(proxy, "/v1/broken", {})
    header = v2_header(r402.headers["payment-required"], payer.private_key)
    before = local_chain.usdc_balance(payer.address)
    received: list[bytes] = []
    async with httpx.AsyncClient(base_url=proxy.url, timeout=30) as http:
        with pytest.raises(httpx.RemoteProtocolError):  # the cut is passed on, not hidden
            async with http.stream(
                "POST", "/v1/broken", json={}, headers={"PAYMENT-SIGNATURE": header}
            ) as r:
                assert r.status_code == 200
                assert decode_settle_response(r.headers["payment-response"]).success
                async for chunk in r.aiter_raw():
                    received.append(chunk)
        assert b"".join(received) == b"partial\n"
        await wait_balance(local_chain, payer.address, before)  # charged, then given back
        again = await http.post("/v1/broken", json={}, headers={"PAYMENT-SIGNATURE": header})
    assert again.status_code == 409 and again.json()["error"] == "payment_refunded"
    assert len(recorder.hits("/v1/broken")) == 1
    assert amount > 0


async def test_upstream_timeout_is_504_and_refunded(
    proxy: Proxy, funded_payer: Any, local_chain: Any
) -> None:
    payer: DevAccount = funded_payer()
    _, r402 = await challenge(proxy, "/v1/slow", {})
    header = v2_header(r402.headers["payment-required"], payer.private_key)
    before = local_chain.usdc_balance(payer.address)
    started = time.monotonic()
    async with httpx.AsyncClient(base_url=proxy.url, timeout=30) as http:
        r = await http.post("/v1/slow", json={}, headers={"PAYMENT-SIGNATURE": header})
    assert r.status_code == 504 and r.json()["error"] == "upstream_timeout"
    assert time.monotonic() - started < 2.4  # the 1 s proxy timeout, not the upstream's 2.5 s
    await wait_balance(local_chain, payer.address, before)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"max_tokens": 3}, "prompt"),  # schema: required
        ({"prompt": "x", "colour": "red"}, "colour"),  # schema: additionalProperties
        ({"prompt": "x", "max_tokens": 1000}, "max_tokens"),  # price rule: above max
        ({"prompt": "x", "max_tokens": "ten"}, "max_tokens"),  # schema: type
    ],
)
async def test_bad_body_is_400_with_field_errors_never_402(
    proxy: Proxy, upstream: UpstreamFixture, body: Any, field: str
) -> None:
    recorder, _ = upstream
    hits = len(recorder.seen)
    async with httpx.AsyncClient(base_url=proxy.url) as http:
        r = await http.post("/v1/echo", json=body)
        # even with a (well-formed) payment header attached, the body is refused first
        paid = await http.post("/v1/echo", json=body, headers={"PAYMENT-SIGNATURE": "e30="})
        garbage = await http.post(
            "/v1/echo", content=b"{not json", headers={"content-type": "application/json"}
        )
    assert r.status_code == 400, r.text
    assert "payment-required" not in r.headers
    assert field in [e["field"] for e in r.json()["errors"]]
    assert paid.status_code == 400
    assert garbage.status_code == 400 and garbage.json()["error"] == "invalid_json"
    assert len(recorder.seen) == hits


async def test_unpriced_route_passes_free_without_hop_by_hop_or_payment_headers(
    proxy: Proxy, upstream: UpstreamFixture
) -> None:
    recorder, _ = upstream
    headers = {
        "Connection": "keep-alive, X-Drop-Me",
        "X-Drop-Me": "1",
        "Keep-Alive": "timeout=5",
        "TE": "trailers",
        "Proxy-Authorization": "Basic Zm9vOmJhcg==",
        "X-Payment": "e30=",
        "Payment-Signature": "e30=",
        "X-X402-Payer": "0x000000000000000000000000000000000000dEaD",
        "X-Forwarded-For": "10.9.9.9",
        "X-Custom": "kept",
    }
    async with httpx.AsyncClient(base_url=proxy.url) as http:
        r = await http.get("/free/a%20b/c", params={"q": "1"}, headers=headers)
    assert r.status_code == 200, r.text
    assert "payment-response" not in r.headers  # the upstream's forged one is dropped too
    seen = recorder.hits("/free/a b/c")[-1]
    assert seen.raw_path == "/free/a%20b/c" and seen.query == "q=1"
    names = {name for name, _ in seen.headers}
    for dropped in (
        "x-drop-me",
        "keep-alive",
        "te",
        "proxy-authorization",
        "x-payment",
        "payment-signature",
        "x-x402-payer",
        "x-x402-signature",
    ):
        assert dropped not in names, dropped
    assert seen.header("x-custom") == "kept"
    assert seen.values("x-forwarded-for") == ["127.0.0.1"]  # not trusted: replaced
    assert seen.header("host") == recorder_host(upstream)


def recorder_host(upstream: UpstreamFixture) -> str:
    return upstream[1].removeprefix("http://")


async def test_refuse_mode_and_unreachable_upstream(
    local_chain: Any, tmp_path: Path, funded_payer: Any
) -> None:
    dead = f"http://127.0.0.1:{_dead_port()}"
    gw = start_proxy(local_chain, tmp_path, dead, proxy_unpriced="refuse")
    try:
        async with httpx.AsyncClient(base_url=gw.url, timeout=30) as http:
            r = await http.get("/free/x")
            assert r.status_code == 404 and r.json()["error"] == "route_not_priced"
            r = await http.get("/v1/echo")
            assert r.status_code == 405 and r.headers["allow"] == "POST"
            health = await http.get("/healthz")
            assert health.status_code == 200 and health.json()["mode"] == "proxy"

            payer: DevAccount = funded_payer()
            _, r402 = await challenge(gw, "/v1/echo", {"prompt": "x"})
            header = v2_header(r402.headers["payment-required"], payer.private_key)
            before = local_chain.usdc_balance(payer.address)
            r = await http.post(
                "/v1/echo", json={"prompt": "x"}, headers={"PAYMENT-SIGNATURE": header}
            )
            assert r.status_code == 502 and r.json()["error"] == "upstream_unreachable"
        await wait_balance(local_chain, payer.address, before)
    finally:
        gw.server.stop()


def _dead_port() -> int:
    from tests.helpers import free_port

    return free_port()  # nothing listens there
