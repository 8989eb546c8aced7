"""A response lost after the gateway settled is recovered with the SAME authorization: the
gateway answers the replay with the first outcome, so there is one charge and one task.

The connection is really cut: a TCP proxy between client and gateway closes both sockets
instead of forwarding the answer that carries the settlement header."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from payments.client import Payer, PaymentUnconfirmed, receipt_of
from tests.client.conftest import Key, Served
from tests.client.servers import CuttingProxy
from tests.client.test_client_pays import transfers
from tests.fault_proxy import FaultProxy
from tests.gateway.conftest import start_gateway

pytestmark = pytest.mark.chain

BODY = {"prompt": "a lantern drifting down a river", "templateData": {"duration": 2}}


@pytest.fixture
def proxy(gateway: Served) -> Iterator[CuttingProxy]:
    p = CuttingProxy(gateway.port)
    try:
        yield p
    finally:
        p.stop()


def quote(url: str) -> int:
    r = httpx.post(url + "/generation/create", json=BODY)
    assert r.status_code == 402, r.text
    return int(r.json()["accepts"][0]["maxAmountRequired"])


def ledger_and_tasks(gateway: Served, payer: str) -> tuple[list[tuple[Any, ...]], int]:
    assert gateway.settings is not None
    with sqlite3.connect(gateway.settings.database) as db:
        payments = db.execute(
            "SELECT id, tx_hash, task_id FROM payments WHERE lower(payer) = ?", (payer.lower(),)
        ).fetchall()
        tasks = db.execute(
            "SELECT count(*) FROM tasks WHERE payment_ref IN "
            "(SELECT id FROM payments WHERE lower(payer) = ?)",
            (payer.lower(),),
        ).fetchone()[0]
    return payments, tasks


@pytest.mark.parametrize("cut", ["whole answer", "body only"])
async def test_lost_response_is_resent_with_the_same_authorization(
    cut: str,
    gateway: Served,
    proxy: CuttingProxy,
    make_key: Callable[..., Key],
    local_chain: Any,
) -> None:
    key = make_key()
    amount = quote(gateway.url)
    proxy.drop = 1
    proxy.keep_headers = cut == "body only"
    payer = Payer(key.key, retry_backoff=0.05)

    async with payer.async_client(base_url=proxy.url) as http:
        r = await http.post("/generation/create", json=BODY)

    assert proxy.dropped == 1  # the first answer (after settlement) never reached the client
    assert r.status_code == 202, r.text
    assert len(proxy.payment_headers) == 2
    assert proxy.payment_headers[0] == proxy.payment_headers[1]  # same authorization resent
    receipt = receipt_of(r)
    assert receipt is not None and payer.receipts == (receipt,)
    assert payer.committed == amount
    assert local_chain.usdc_balance(key.address) == 10_000_000 - amount  # one charge
    assert receipt.transaction is not None
    assert transfers(local_chain, receipt.transaction) == [(key.address, gateway.pay_to, amount)]
    payments, tasks = ledger_and_tasks(gateway, key.address)
    assert len(payments) == 1 and tasks == 1  # one payment row, one task
    assert payments[0][1] == receipt.transaction and payments[0][2] == r.json()["taskId"]


def test_unconfirmed_payment_is_reused_for_the_same_request(
    gateway: Served, proxy: CuttingProxy, make_key: Callable[..., Key], local_chain: Any
) -> None:
    """Every resend lost: the client says so (PaymentUnconfirmed) and keeps the authorization;
    asking again for the same request sends that authorization, not a new one."""
    key = make_key()
    amount = quote(gateway.url)
    proxy.drop = 2
    payer = Payer(key.key, retries=1, retry_backoff=0.05)

    with payer.client(base_url=proxy.url) as http:
        with pytest.raises(PaymentUnconfirmed) as info:
            http.post("/generation/create", json=BODY)
        assert info.value.offer.amount == amount
        assert payer.receipts == () and payer.committed == amount
        # Settled server-side already (the answers were lost, not the payment).
        assert local_chain.usdc_balance(key.address) == 10_000_000 - amount

        again = http.post("/generation/create", json=BODY)

    assert again.status_code == 202, again.text
    assert proxy.dropped == 2
    assert len(proxy.payment_headers) == 3 and len(set(proxy.payment_headers)) == 1
    receipt = receipt_of(again)
    assert receipt is not None and receipt.nonce == "0x" + info.value.nonce.hex()
    assert payer.committed == amount  # the reused authorization is not counted twice
    assert local_chain.usdc_balance(key.address) == 10_000_000 - amount
    payments, tasks = ledger_and_tasks(gateway, key.address)
    assert len(payments) == 1 and tasks == 1


async def test_503_is_retried_with_the_same_authorization(
    local_chain: Any, make_key: Callable[..., Key], tmp_path: Path
) -> None:
    """The gateway's RPC is down when the payment arrives: 503 + Retry-After, nothing charged.
    The client waits as told and resends the same authorization; by then the RPC is back."""
    rpc = FaultProxy("127.0.0.1", int(local_chain.rpc_url.rsplit(":", 1)[1])).start()
    gw = start_gateway(local_chain, tmp_path, rpc_url=rpc.url)
    seen: list[tuple[int, str | None]] = []

    class Watch(httpx.AsyncBaseTransport):
        """Notes each answer; brings the RPC back once the client has seen the 503."""

        def __init__(self) -> None:
            self.inner = httpx.AsyncHTTPTransport()

        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            response = await self.inner.handle_async_request(request)
            seen.append((response.status_code, request.headers.get("payment-signature")))
            if response.status_code == 503:
                rpc.restore()
            return response

        async def aclose(self) -> None:
            await self.inner.aclose()

    try:
        key = make_key()
        amount = quote(gw.url)
        rpc.cut()
        payer = Payer(key.key, retry_backoff=0.05)
        async with payer.async_client(inner=Watch(), base_url=gw.url) as http:
            r = await http.post("/generation/create", json=BODY)
    finally:
        gw.server.stop()
        rpc.stop()

    assert r.status_code == 202, r.text
    assert [status for status, _ in seen] == [402, 503, 202]
    assert seen[1][1] is not None and seen[1][1] == seen[2][1]  # the same authorization
    assert len(payer.receipts) == 1 and payer.committed == amount
    assert local_chain.usdc_balance(key.address) == 10_000_000 - amount
