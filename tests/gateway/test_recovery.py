"""Money owed back is not forgotten: a refund that could not be sent is sent at the next start,
or, without a restart, by the payment sweep once it can be."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx

from gateway.app import create_app
from tests.gateway.conftest import ETH, gateway_settings, new_key
from tests.gateway.paying import v2_header
from tests.gateway.server import ServerThread, free_port
from tests.gateway.test_paid_flow import wait_terminal
from tests.helpers import wait_balance


async def test_refund_the_settler_could_not_cover_is_sent_after_restart(
    local_chain: Any, make_payer: Any, tmp_path: Path
) -> None:
    # payTo is a cold wallet; the settler holds gas but no USDC, so the refund of a failed task
    # cannot be sent at first. The operator funds the settler and restarts: the payer is repaid.
    settler, key = new_key()
    local_chain.fund(settler, eth_wei=10 * ETH)
    cold, _ = new_key()
    port = free_port()
    settings = gateway_settings(
        tmp_path, local_chain.rpc_url, key, port, pay_to=cold, task_timeout_seconds=1
    )
    server = ServerThread(create_app(settings), port).start()
    payer = make_payer()
    before = local_chain.usdc_balance(payer.address)
    body = {"prompt": "too slow", "templateData": {"duration": 20}}
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            challenge = await http.post("/generation/create", json=body)
            header = v2_header(challenge.headers["payment-required"], payer.key)
            paid = await http.post(
                "/generation/create", json=body, headers={"PAYMENT-SIGNATURE": header}
            )
        assert paid.status_code == 202, paid.text
        task_id = paid.json()["taskId"]
        status = await wait_terminal(server.url, task_id)
        assert status["status"] == "failed"
        await asyncio.sleep(0.5)
        amount = int(status["payment"]["amount"])
        assert local_chain.usdc_balance(payer.address) == before - amount
        assert status["refund"]["status"] == "pending"
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
    settler, key = new_key()  # gas but no USDC: the refund cannot be sent when the task fails
    local_chain.fund(settler, eth_wei=10 * ETH)
    cold, _ = new_key()
    port = free_port()
    settings = gateway_settings(
        tmp_path,
        local_chain.rpc_url,
        key,
        port,
        pay_to=cold,
        task_timeout_seconds=1,
        payment_sweep_interval_seconds=1,
    )
    server = ServerThread(create_app(settings), port).start()
    payer = make_payer()
    before = local_chain.usdc_balance(payer.address)
    body = {"prompt": "too slow", "templateData": {"duration": 20}}
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            challenge = await http.post("/generation/create", json=body)
            header = v2_header(challenge.headers["payment-required"], payer.key)
            paid = await http.post(
                "/generation/create", json=body, headers={"PAYMENT-SIGNATURE": header}
            )
            assert paid.status_code == 202, paid.text
            task_id = paid.json()["taskId"]
            status = await wait_terminal(server.url, task_id)
            assert status["status"] == "failed"
            amount = int(status["payment"]["amount"])
            await asyncio.sleep(1.5)  # a sweep or more ran: still nothing to send it with
            assert local_chain.usdc_balance(payer.address) == before - amount
            r = await http.get(f"/generation/{task_id}/status")
            assert r.json()["refund"]["status"] == "pending"

            local_chain.fund(settler, usdc=amount)  # no restart
            await wait_balance(local_chain, payer.address, before, limit_s=30)
            r = await http.get(f"/generation/{task_id}/status")
            assert r.status_code == 500
            assert r.json()["refund"]["status"] == "confirmed"
    finally:
        server.stop()
