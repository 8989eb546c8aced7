"""What happens to paid requests left undelivered: a delivered one is recorded and kept; one
that was paid but never answered (here: its refund could not be sent) is refunded during
start-up, or, without a restart, by the payment sweep."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.proxy_app import create_proxy_app
from payments.localchain import DevAccount
from tests.gateway.conftest import ETH, new_key
from tests.gateway.paying import v2_header
from tests.gateway.server import ServerThread, free_port
from tests.helpers import wait_balance
from tests.proxy.conftest import Proxy, proxy_settings
from tests.proxy.test_proxy import UpstreamFixture, challenge


def _unfunded_settler(local_chain: Any) -> tuple[str, str]:
    """(address, key) of a settler with gas but no USDC: its first refund cannot be sent."""
    settler, key = new_key()
    local_chain.fund(settler, eth_wei=10 * ETH)
    return settler, key


async def _one_delivered_one_failed(gw: Proxy, payer: DevAccount) -> tuple[int, int]:
    """Pay for a request the upstream answers and one it fails (500): (kept, failed) amounts."""
    async with httpx.AsyncClient(base_url=gw.url, timeout=30) as http:
        kept, r402 = await challenge(gw, "/v1/echo", {"prompt": "kept"})
        header = v2_header(r402.headers["payment-required"], payer.private_key)
        ok = await http.post(
            "/v1/echo", json={"prompt": "kept"}, headers={"PAYMENT-SIGNATURE": header}
        )
        assert ok.status_code == 200
        failed_amount, r402 = await challenge(gw, "/v1/fail", {})
        header = v2_header(r402.headers["payment-required"], payer.private_key)
        failed = await http.post("/v1/fail", json={}, headers={"PAYMENT-SIGNATURE": header})
        assert failed.status_code == 500
    return kept, failed_amount


async def test_only_undelivered_payments_are_refunded_at_start_up(
    local_chain: Any, tmp_path: Path, funded_payer: Any, upstream: UpstreamFixture
) -> None:
    # payTo is a cold wallet and the settler holds gas but no USDC: the refund after the
    # upstream's 500 cannot be sent at first. The operator funds the settler and restarts.
    settler, key = _unfunded_settler(local_chain)
    cold, _ = new_key()
    port = free_port()
    settings = proxy_settings(tmp_path, local_chain.rpc_url, key, port, upstream[1], pay_to=cold)
    payer: DevAccount = funded_payer()
    before = local_chain.usdc_balance(payer.address)
    server = ServerThread(create_proxy_app(settings), port).start()
    try:
        gw = Proxy(url=server.url, pay_to=cold, settings=settings, server=server)
        delivered_amount, failed_amount = await _one_delivered_one_failed(gw, payer)
    finally:
        server.stop()
    charged = before - delivered_amount - failed_amount
    assert local_chain.usdc_balance(payer.address) == charged  # the refund could not go out

    local_chain.fund(settler, usdc=failed_amount + delivered_amount)
    server = ServerThread(create_proxy_app(settings), port).start()
    try:
        # refunded during start-up: the failed request only, never the delivered one
        await wait_balance(local_chain, payer.address, charged + failed_amount, limit_s=5)
        assert local_chain.usdc_balance(settler) == delivered_amount
    finally:
        server.stop()


@contextmanager
def _sweeping_proxy(
    local_chain: Any, tmp_path: Path, upstream: UpstreamFixture
) -> Iterator[tuple[Proxy, str]]:
    """(proxy, its settler) with an unfunded settler and a payment sweep every second."""
    settler, key = _unfunded_settler(local_chain)
    cold, _ = new_key()
    port = free_port()
    settings = proxy_settings(
        tmp_path,
        local_chain.rpc_url,
        key,
        port,
        upstream[1],
        pay_to=cold,
        payment_sweep_interval_seconds=1,
        payment_sweep_idle_seconds=1,
    )
    server = ServerThread(create_proxy_app(settings), port).start()
    try:
        yield Proxy(url=server.url, pay_to=cold, settings=settings, server=server), settler
    finally:
        server.stop()


async def test_a_refund_that_failed_is_sent_by_the_sweep_without_a_restart(
    local_chain: Any, tmp_path: Path, funded_payer: Any, upstream: UpstreamFixture
) -> None:
    payer: DevAccount = funded_payer()
    before = local_chain.usdc_balance(payer.address)
    with _sweeping_proxy(local_chain, tmp_path, upstream) as (gw, settler):
        kept, lost = await _one_delivered_one_failed(gw, payer)
        assert local_chain.usdc_balance(payer.address) == before - kept - lost  # not yet back

        local_chain.fund(settler, usdc=lost + kept)  # the operator funds the settler; no restart
        await wait_balance(local_chain, payer.address, before - kept, limit_s=30)
        assert local_chain.usdc_balance(settler) == kept  # the delivered payment stays paid


async def test_a_broken_stream_whose_refund_failed_is_refunded_by_the_sweep(
    local_chain: Any, tmp_path: Path, funded_payer: Any, upstream: UpstreamFixture
) -> None:
    payer: DevAccount = funded_payer()
    before = local_chain.usdc_balance(payer.address)
    with _sweeping_proxy(local_chain, tmp_path, upstream) as (gw, settler):
        amount, r402 = await challenge(gw, "/v1/broken", {})
        header = v2_header(r402.headers["payment-required"], payer.private_key)
        async with httpx.AsyncClient(base_url=gw.url, timeout=30) as http:
            with pytest.raises(httpx.RemoteProtocolError):  # the answer broke off
                await http.post("/v1/broken", json={}, headers={"PAYMENT-SIGNATURE": header})
        await asyncio.sleep(1.5)  # the refund was tried and failed; a sweep or more ran
        assert local_chain.usdc_balance(payer.address) == before - amount

        local_chain.fund(settler, usdc=amount)  # no restart
        await wait_balance(local_chain, payer.address, before, limit_s=30)
