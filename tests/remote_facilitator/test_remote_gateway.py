"""Our real gateway in remote facilitator mode (no settler key, but where a refund is sent)
against two real facilitators on the same Anvil: ours and the official SDK's. Payments are
signed for real and every balance is read on chain."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from payments import decode_settle_response
from payments.localchain import DevAccount
from tests.fault_proxy import FaultProxy
from tests.gateway.conftest import ETH, USDC, new_key
from tests.gateway.paying import decode_challenge, v1_header, v2_header
from tests.gateway.server import ServerThread, free_port
from tests.helpers import wait_balance

from .conftest import TOKEN, RemoteGateway, Served, Stub, start_remote_gateway

pytestmark = pytest.mark.chain

BODY = {"prompt": "paid through a remote facilitator", "templateData": {"duration": 1}}


@dataclass
class Setup:
    kind: str
    facilitator: Served
    gateway: RemoteGateway


@pytest.fixture(scope="module", params=["ours", "official"])
def setup(
    request: pytest.FixtureRequest, local_chain: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Setup]:
    served: Served = request.getfixturevalue(request.param)
    extra: dict[str, Any] = {}
    if request.param == "ours":  # our service wants its bearer token
        extra["facilitator_auth_header"] = SecretStr(f"Authorization: Bearer {TOKEN}")
    gateway = start_remote_gateway(
        local_chain, tmp_path_factory.mktemp(f"remote-{request.param}"), served.url, **extra
    )
    try:
        yield Setup(request.param, served, gateway)
    finally:
        served.proxy.restore()
        gateway.server.stop()


async def _challenge(url: str) -> tuple[int, str, dict[str, Any]]:
    async with httpx.AsyncClient(base_url=url) as http:
        r = await http.post("/generation/create", json=BODY)
    assert r.status_code == 402, r.text
    amount = int(decode_challenge(r.headers["payment-required"])["accepts"][0]["amount"])
    return amount, r.headers["payment-required"], r.json()


async def _signed(url: str, payer: DevAccount, version: int) -> tuple[int, str, str]:
    """(amount, header name, header value) for one fresh authorization."""
    amount, header, body = await _challenge(url)
    if version == 2:
        return amount, "PAYMENT-SIGNATURE", v2_header(header, payer.private_key)
    return amount, "X-PAYMENT", v1_header(body, payer.private_key)


async def _pay(url: str, name: str, value: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        return await http.post("/generation/create", json=BODY, headers={name: value})


def _tx_of(response: httpx.Response) -> str:
    header = response.headers.get("payment-response") or response.headers["x-payment-response"]
    receipt = decode_settle_response(header)
    assert receipt.success
    return receipt.transaction


def _sender(local_chain: Any, tx: str) -> str:
    found: dict[str, Any] = local_chain.rpc("eth_getTransactionByHash", [tx])
    return str(found["from"]).lower()


async def _lose_every_settle_answer(
    url: str, proxy: FaultProxy, payer: DevAccount, local_chain: Any
) -> tuple[int, str, str]:
    """Pay while every answer to /settle is cut (the facilitator acts on the first): the gateway
    answers 503 although the money moved. Returns (amount, header name, header value)."""
    amount, name, value = await _signed(url, payer, 2)
    proxy.swallowed = 0
    proxy.cut_on = b"POST /settle"
    try:
        lost = await _pay(url, name, value)  # every retry finds the proxy down
    finally:
        proxy.restore()
    assert lost.status_code == 503, lost.text
    assert proxy.swallowed == 1
    # the money moved (the facilitator acted) although the gateway could not know it yet
    assert local_chain.usdc_balance(payer.address) == USDC - amount
    return amount, name, value


@pytest.mark.parametrize("version", [2, 1])
async def test_settles_once_and_a_replay_is_free(
    setup: Setup, version: int, funded_payer: Callable[..., DevAccount], local_chain: Any
) -> None:
    payer = funded_payer(usdc=USDC, eth_wei=0)
    gw = setup.gateway
    amount, name, value = await _signed(gw.url, payer, version)
    pay_to_before = local_chain.usdc_balance(gw.pay_to)

    first = await _pay(gw.url, name, value)
    assert first.status_code == 202, first.text
    tx = _tx_of(first)
    assert _sender(local_chain, tx) == setup.facilitator.address.lower()  # it settled, not us
    assert local_chain.usdc_balance(payer.address) == USDC - amount
    assert local_chain.usdc_balance(gw.pay_to) == pay_to_before + amount

    again = await _pay(gw.url, name, value)
    assert again.status_code == 202, again.text
    assert _tx_of(again) == tx
    assert again.json()["taskId"] == first.json()["taskId"]
    assert local_chain.usdc_balance(payer.address) == USDC - amount


async def test_a_cut_settle_answer_is_retried_and_settles_once(
    setup: Setup, funded_payer: Callable[..., DevAccount], local_chain: Any
) -> None:
    payer = funded_payer(usdc=USDC, eth_wei=0)
    proxy = setup.facilitator.proxy
    amount, name, value = await _signed(setup.gateway.url, payer, 2)
    proxy.swallowed = 0
    proxy.cut_on = b"POST /settle"
    watcher = proxy.restore_after_cut()
    try:
        r = await _pay(setup.gateway.url, name, value)
    finally:
        watcher.join(timeout=15)
        proxy.restore()
    assert proxy.swallowed == 1  # the facilitator acted on a /settle whose answer was lost
    assert r.status_code == 202, r.text
    tx = _tx_of(r)
    assert local_chain.usdc_balance(payer.address) == USDC - amount

    again = await _pay(setup.gateway.url, name, value)
    assert again.status_code == 202 and _tx_of(again) == tx
    assert local_chain.usdc_balance(payer.address) == USDC - amount


async def test_lost_answers_give_503_and_the_same_header_then_settles_once(
    setup: Setup, funded_payer: Callable[..., DevAccount], local_chain: Any
) -> None:
    payer = funded_payer(usdc=USDC, eth_wei=0)
    amount, name, value = await _lose_every_settle_answer(
        setup.gateway.url, setup.facilitator.proxy, payer, local_chain
    )

    r = await _pay(setup.gateway.url, name, value)
    assert r.status_code == 202, r.text
    tx = _tx_of(r)
    assert local_chain.usdc_balance(payer.address) == USDC - amount
    again = await _pay(setup.gateway.url, name, value)
    assert again.status_code == 202 and _tx_of(again) == tx
    assert local_chain.usdc_balance(payer.address) == USDC - amount


async def test_facilitator_down_is_503_and_no_charge(
    setup: Setup, funded_payer: Callable[..., DevAccount], local_chain: Any
) -> None:
    payer = funded_payer(usdc=USDC, eth_wei=0)
    proxy = setup.facilitator.proxy
    amount, name, value = await _signed(setup.gateway.url, payer, 2)
    proxy.cut()
    try:
        down = await _pay(setup.gateway.url, name, value)
    finally:
        proxy.restore()
    assert down.status_code == 503, down.text
    assert "retry" in down.text.lower()
    assert local_chain.usdc_balance(payer.address) == USDC

    r = await _pay(setup.gateway.url, name, value)  # back up: the same header settles once
    assert r.status_code == 202, r.text
    assert local_chain.usdc_balance(payer.address) == USDC - amount


async def test_a_payment_the_facilitator_refuses_is_402_with_its_reason(
    setup: Setup, funded_payer: Callable[..., DevAccount], local_chain: Any
) -> None:
    amount, _, _ = await _challenge(setup.gateway.url)
    poor = funded_payer(usdc=amount - 1, eth_wei=0)
    _, name, value = await _signed(setup.gateway.url, poor, 2)
    r = await _pay(setup.gateway.url, name, value)
    assert r.status_code == 402, r.text
    assert "insufficient" in r.json()["error"] or "simulation" in r.json()["error"], r.json()
    assert local_chain.usdc_balance(poor.address) == amount - 1


# -- a facilitator that refuses to settle (stub) ---------------------------------------------


@pytest.fixture(scope="module")
def stubbed(
    local_chain: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Stub, RemoteGateway]]:
    stub = Stub()
    server = ServerThread(stub.app(), free_port()).start()
    gateway = start_remote_gateway(
        local_chain,
        tmp_path_factory.mktemp("remote-stub"),
        server.url,
        facilitator_auth_header=SecretStr("X-Api-Key: k-123"),
        facilitator_retries=1,
    )
    try:
        yield stub, gateway
    finally:
        gateway.server.stop()
        server.stop()


async def test_a_settle_refusal_is_402_with_its_reason_and_final(
    stubbed: tuple[Stub, RemoteGateway], funded_payer: Callable[..., DevAccount], local_chain: Any
) -> None:
    stub, gw = stubbed
    payer = funded_payer(usdc=USDC, eth_wei=0)
    _, name, value = await _signed(gw.url, payer, 2)
    stub.settle = (
        200,
        {"success": False, "errorReason": "invalid_exact_evm_payload_signature", "network": ""},
    )
    settles = stub.settles
    r = await _pay(gw.url, name, value)
    assert r.status_code == 402, r.text
    assert r.json()["error"] == "invalid_exact_evm_payload_signature"
    assert stub.auth_seen[-1] == "k-123"  # the configured auth header is sent
    again = await _pay(gw.url, name, value)  # failed(reason) in the ledger: same answer
    assert again.status_code == 402 and again.json()["error"] == r.json()["error"]
    assert stub.settles == settles + 1  # never asked twice
    assert local_chain.usdc_balance(payer.address) == USDC


async def test_a_facilitator_refusing_our_credentials_is_503(
    stubbed: tuple[Stub, RemoteGateway], funded_payer: Callable[..., DevAccount], local_chain: Any
) -> None:
    stub, gw = stubbed
    payer = funded_payer(usdc=USDC, eth_wei=0)
    _, name, value = await _signed(gw.url, payer, 1)
    stub.verify = (401, {"error": "unauthorized"})
    try:
        r = await _pay(gw.url, name, value)
    finally:
        stub.verify = (200, {"isValid": True})
    assert r.status_code == 503, r.text  # our misconfiguration, not the payer's fault
    assert local_chain.usdc_balance(payer.address) == USDC


async def test_a_lost_answer_nobody_retries_is_refunded_by_the_sweep(
    ours: Served,
    local_chain: Any,
    tmp_path: Path,
    funded_payer: Callable[..., DevAccount],
) -> None:
    # Remote mode with a settler key for refunds (payTo = the settler, so it holds the money).
    settler, key = new_key()
    local_chain.fund(settler, eth_wei=10 * ETH)
    gw = start_remote_gateway(
        local_chain,
        tmp_path,
        ours.url,
        facilitator_auth_header=SecretStr(f"Authorization: Bearer {TOKEN}"),
        settler_key=SecretStr(key),
        pay_to=settler,
        payment_sweep_interval_seconds=1,
        payment_sweep_idle_seconds=1,
    )
    payer = funded_payer(usdc=USDC, eth_wei=0)
    try:
        _, name, value = await _lose_every_settle_answer(gw.url, ours.proxy, payer, local_chain)
        # The payer never sends that header again: the sweep finds the transfer on chain, no
        # task for it, and sends the money back from the settler key.
        await wait_balance(local_chain, payer.address, USDC, limit_s=30)
        assert local_chain.usdc_balance(settler) == 0
        again = await _pay(gw.url, name, value)
        assert again.status_code == 409 and again.json()["error"] == "payment_refunded"
    finally:
        gw.server.stop()
