"""Money owed back is not forgotten: a refund that could not be sent is sent at the next start,
or, without a restart, by the payment sweep once it can be."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx

from gateway.app import create_app
from gateway.settings import Settings
from tests.gateway.conftest import ETH, gateway_settings, new_key
from tests.gateway.paying import v2_header
from tests.gateway.server import ServerThread, free_port
from tests.gateway.test_paid_flow import wait_terminal
from tests.helpers import wait_balance, wait_until

BODY = {"prompt": "too slow", "templateData": {"duration": 20}}  # outlives its 1 s timeout


def _unfunded_settler_gateway(
    local_chain: Any, tmp_path: Path, **extra: Any
) -> tuple[str, Settings, int]:
    """(settler, settings, port) of a gateway whose tasks time out after 1 s, paying a cold
    wallet, with a settler holding gas but no USDC: the refund of a failed task cannot be sent
    at first."""
    settler, key = new_key()
    local_chain.fund(settler, eth_wei=10 * ETH)
    cold, _ = new_key()
    port = free_port()
    settings = gateway_settings(
        tmp_path, local_chain.rpc_url, key, port, pay_to=cold, task_timeout_seconds=1, **extra
    )
    return settler, settings, port


async def _paid_task_that_fails(url: str, payer: Any) -> tuple[str, int]:
    """(task id, amount) of a paid task, once it has failed."""
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        challenge = await http.post("/generation/create", json=BODY)
        header = v2_header(challenge.headers["payment-required"], payer.key)
        paid = await http.post(
            "/generation/create", json=BODY, headers={"PAYMENT-SIGNATURE": header}
        )
    assert paid.status_code == 202, paid.text
    task_id = paid.json()["taskId"]
    status = await wait_terminal(url, task_id)
    assert status["status"] == "failed"
    return task_id, int(status["payment"]["amount"])


async def test_refund_the_settler_could_not_cover_is_sent_after_restart(
    local_chain: Any, make_payer: Any, tmp_path: Path
) -> None:
    # The operator funds the settler and restarts: the payer is repaid.
    settler, settings, port = _unfunded_settler_gateway(local_chain, tmp_path)
    server = ServerThread(create_app(settings), port).start()
    payer = make_payer()
    before = local_chain.usdc_balance(payer.address)
    try:
        task_id, amount = await _paid_task_that_fails(server.url, payer)
        await asyncio.sleep(0.5)
        assert local_chain.usdc_balance(payer.address) == before - amount
        async with httpx.AsyncClient() as http:
            r = await http.get(f"{server.url}/generation/{task_id}/status")
        assert r.json()["refund"]["status"] == "pending"
    finally:
        server.stop()

    local_chain.fund(settler, usdc=amount)
    server = ServerThread(create_app(settings), port).start()
    try:
        assert local_chain.usdc_balance(payer.address) == before  # refunded during start-up
        async with httpx.AsyncClient() as http:
            r = await http.get(f"{server.url}/generation/{task_id}/status")
        assert r.status_code == 500
        assert r.json()["refund"]["status"] == "confirmed"
    finally:
        server.stop()


async def test_refund_of_a_failed_task_is_sent_by_the_sweep_once_the_settler_can(
    local_chain: Any, make_payer: Any, tmp_path: Path
) -> None:
    settler, settings, port = _unfunded_settler_gateway(
        local_chain, tmp_path, payment_sweep_interval_seconds=1
    )
    server = ServerThread(create_app(settings), port).start()
    payer = make_payer()
    before = local_chain.usdc_balance(payer.address)
    try:
        task_id, amount = await _paid_task_that_fails(server.url, payer)
        await asyncio.sleep(1.5)  # a sweep or more ran: still nothing to send it with
        assert local_chain.usdc_balance(payer.address) == before - amount
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            r = await http.get(f"/generation/{task_id}/status")
            assert r.json()["refund"]["status"] == "pending"

            local_chain.fund(settler, usdc=amount)  # no restart
            await wait_balance(local_chain, payer.address, before, limit_s=30)

            async def status() -> httpx.Response:
                return await http.get(f"/generation/{task_id}/status")

            # the status says so once the ledger does, a moment after the refund's block
            r = await wait_until(status, lambda r: r.json()["refund"]["status"] == "confirmed")
        assert r.status_code == 500
    finally:
        server.stop()
