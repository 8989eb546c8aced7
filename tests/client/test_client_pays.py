"""The payer pays real servers on a real chain: our gateway (v2 and v1) and the official x402
SDK's FastAPI server with the official facilitator. Receipts are checked against the Transfer
logs of the settlement transactions on Anvil."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from payments import BASE, normalize_address
from payments.client import Payer, PaymentRejected, Receipt, SpendPolicy, receipt_of
from payments.eip3009 import keccak256
from tests.client.conftest import Key, Served
from tests.client.servers import OFFICIAL_PRICE

pytestmark = pytest.mark.chain

BODY = {"prompt": "a paper boat on a pond", "templateData": {"duration": 2}}
TRANSFER_TOPIC = "0x" + keccak256(b"Transfer(address,address,uint256)").hex()


def transfers(local_chain: Any, tx: str) -> list[tuple[str, str, int]]:
    """(from, to, value) of every USDC Transfer log in a mined transaction."""
    receipt = local_chain.rpc("eth_getTransactionReceipt", [tx])
    assert receipt is not None and int(receipt["status"], 16) == 1
    return [
        (
            normalize_address("0x" + log["topics"][1][-40:]),
            normalize_address("0x" + log["topics"][2][-40:]),
            int(log["data"], 16),
        )
        for log in receipt["logs"]
        if log["address"].lower() == BASE.usdc.lower() and log["topics"][0] == TRANSFER_TOPIC
    ]


def quote(url: str, body: dict[str, Any] = BODY) -> int:
    r = httpx.post(url + "/generation/create", json=body)
    assert r.status_code == 402, r.text
    return int(r.json()["accepts"][0]["maxAmountRequired"])


def assert_settled_on_chain(local_chain: Any, receipt: Receipt, payer: Key, pay_to: str) -> None:
    assert receipt.success and receipt.transaction is not None
    assert receipt.payer == payer.address
    assert transfers(local_chain, receipt.transaction) == [(payer.address, pay_to, receipt.amount)]


@pytest.mark.parametrize("version", [2, 1])
async def test_pays_our_gateway(
    version: int, gateway: Served, make_key: Callable[..., Key], local_chain: Any
) -> None:
    key = make_key()
    amount = quote(gateway.url)
    pay_to_before = local_chain.usdc_balance(gateway.pay_to)
    payer = Payer(key.key, SpendPolicy(versions=(version,)))
    mark = gateway.recorder.mark()

    async with payer.async_client(base_url=gateway.url) as http:
        r = await http.post("/generation/create", json=BODY)

    assert r.status_code == 202, r.text
    seen = gateway.recorder.since(mark)
    assert [s.paid for s in seen] == [False, True]
    if version == 2:
        assert seen[1].payment_signature is not None and seen[1].x_payment is None
        assert "payment-response" in r.headers
    else:
        assert seen[1].x_payment is not None and seen[1].payment_signature is None
        assert "x-payment-response" in r.headers
    receipt = receipt_of(r)
    assert receipt is not None and payer.receipts == (receipt,)
    assert receipt.version == version and receipt.amount == amount
    assert receipt.network == ("eip155:8453" if version == 2 else "base")
    assert receipt.pay_to == gateway.pay_to and receipt.asset == BASE.usdc
    assert_settled_on_chain(local_chain, receipt, key, gateway.pay_to)
    assert local_chain.usdc_balance(key.address) == 10_000_000 - amount
    assert local_chain.usdc_balance(gateway.pay_to) == pay_to_before + amount
    assert payer.committed == payer.total_paid == amount


def test_sync_client_pays_our_gateway(
    gateway: Served, make_key: Callable[..., Key], local_chain: Any
) -> None:
    key = make_key()
    amount = quote(gateway.url)
    payer = Payer(key.key)
    with payer.client(base_url=gateway.url) as http:
        r = http.post("/generation/create", json=BODY)
        status = http.get(f"/generation/{r.json()['taskId']}/status")
    assert r.status_code == 202, r.text
    assert status.status_code in (200, 202) and receipt_of(status) is None  # nothing paid twice
    receipt = receipt_of(r)
    assert receipt is not None and receipt.amount == amount
    assert_settled_on_chain(local_chain, receipt, key, gateway.pay_to)
    assert local_chain.usdc_balance(key.address) == 10_000_000 - amount
    with sqlite3.connect(gateway.settings.database) as db:  # type: ignore[union-attr]
        rows = db.execute(
            "SELECT tx_hash, amount FROM payments WHERE lower(payer) = ?", (key.address.lower(),)
        ).fetchall()
    assert rows == [(receipt.transaction, amount)]


@pytest.mark.parametrize("mode", ["async", "sync"])
async def test_pays_the_official_sdk_server(
    mode: str, official: Served, make_key: Callable[..., Key], local_chain: Any
) -> None:
    key = make_key()
    pay_to_before = local_chain.usdc_balance(official.pay_to)
    payer = Payer(key.key)
    mark = official.recorder.mark()

    if mode == "async":
        async with payer.async_client(base_url=official.url) as http:
            r = await http.get("/weather")
    else:
        with payer.client(base_url=official.url) as client:
            r = client.get("/weather")

    assert r.status_code == 200, r.text
    assert r.json()["weather"] == "sunny"
    assert [s.paid for s in official.recorder.since(mark)] == [False, True]
    receipt = receipt_of(r)
    assert receipt is not None and payer.receipts == (receipt,)
    assert receipt.version == 2 and receipt.network == "eip155:8453"
    assert receipt.amount == OFFICIAL_PRICE
    assert_settled_on_chain(local_chain, receipt, key, official.pay_to)
    assert local_chain.usdc_balance(key.address) == 10_000_000 - OFFICIAL_PRICE
    assert local_chain.usdc_balance(official.pay_to) == pay_to_before + OFFICIAL_PRICE


async def test_unpriced_routes_pass_through_unpaid(gateway: Served, make_key: Any) -> None:
    payer = Payer(make_key(usdc=0).key)
    async with payer.async_client(base_url=gateway.url) as http:
        r = await http.get("/healthz")
        bad = await http.post("/generation/create", json={"prompt": ""})
    assert r.status_code == 200 and receipt_of(r) is None
    assert bad.status_code == 400  # invalid body: refused before any price, nothing signed
    assert payer.committed == 0 and payer.receipts == ()


@pytest.mark.parametrize("server", ["gateway", "official"])
async def test_server_refusal_raises_payment_rejected_with_its_reason(
    server: str, request: pytest.FixtureRequest, make_key: Callable[..., Key]
) -> None:
    served: Served = request.getfixturevalue(server)
    key = make_key(usdc=0)  # a valid signature over money the payer does not have
    payer = Payer(key.key)
    mark = served.recorder.mark()
    async with payer.async_client(base_url=served.url) as http:
        with pytest.raises(PaymentRejected) as info:
            if server == "gateway":
                await http.post("/generation/create", json=BODY)
            else:
                await http.get("/weather")
    assert info.value.reason == "invalid_exact_evm_insufficient_balance"
    assert [s.paid for s in served.recorder.since(mark)] == [False, True]
    assert payer.receipts == () and payer.committed == info.value.offer.amount
