"""RPC faults between the real gateway and Anvil, injected by a TCP proxy.

Before settlement (node unreachable, or answering slower than the RPC timeout): 503 with
Retry-After, nothing charged, and the same header pays once when the node is back.
During settlement (the node took the transaction, the gateway never got the answer): money
moved, the gateway does not know it yet. It answers 503; then either a retry of the same header
or a restart (reconciliation before serving) resolves the payment to exactly one outcome, and
the ledger agrees with the chain.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx

from tests.fault_proxy import FaultProxy
from tests.helpers import wait_balance, wait_until
from tests.reliability.facts import Recorder
from tests.reliability.harness import (
    BODY,
    InProcessGateway,
    ledger_rows,
    ledger_totals,
    signed_payment,
    start_inprocess,
    task_rows,
)


async def _post(url: str, header: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        return await http.post(
            "/generation/create", json=BODY, headers={"PAYMENT-SIGNATURE": header}
        )


def _gateway(local_chain: Any, tmp: Path, proxy: FaultProxy, **extra: Any) -> InProcessGateway:
    return start_inprocess(local_chain, tmp, rpc_url=proxy.url, **extra)


async def _ledger_matches_chain(gw: InProcessGateway, local_chain: Any, pay_to_before: int) -> None:
    totals = await ledger_totals(gw.settings.database)
    assert local_chain.usdc_balance(gw.pay_to) - pay_to_before == totals.net, totals


async def _cut_mid_settlement(
    gw: InProcessGateway, proxy: FaultProxy, local_chain: Any, payer: Any
) -> tuple[int, str, int, int]:
    """Pay while the node's answer to the settlement's send is cut: the node takes the tx, the
    gateway answers 503. Returns (amount, header, payer's balance before, payTo's before) once
    the tx is mined (its block may come a moment after the 503)."""
    amount, header = await signed_payment(gw.url, payer)
    before = local_chain.usdc_balance(payer.address)
    pay_to_before = local_chain.usdc_balance(gw.pay_to)
    proxy.cut_on = b"eth_sendRawTransaction"
    r = await _post(gw.url, header)
    assert proxy.swallowed == 1
    assert r.status_code == 503, r.text
    await wait_balance(local_chain, payer.address, before - amount)  # the node took it
    return amount, header, before, pay_to_before


async def test_node_unreachable_before_settlement(
    local_chain: Any, tmp_path: Path, make_payer: Any, facts: Recorder
) -> None:
    proxy = FaultProxy.to(local_chain.rpc_url)
    gw = _gateway(local_chain, tmp_path, proxy, rpc_timeout_seconds=2)
    try:
        payer = make_payer()
        amount, header = await signed_payment(gw.url, payer)
        before = local_chain.usdc_balance(payer.address)
        pay_to_before = local_chain.usdc_balance(gw.pay_to)
        proxy.cut()
        started = time.monotonic()
        r = await _post(gw.url, header)
        took = time.monotonic() - started
        assert r.status_code == 503, r.text
        assert int(r.headers["retry-after"]) > 0
        assert local_chain.usdc_balance(payer.address) == before
        async with httpx.AsyncClient(base_url=gw.url) as http:
            assert (await http.get("/healthz")).status_code == 200  # alive, just degraded

        proxy.restore()
        r = await _post(gw.url, header)
        assert r.status_code == 202, r.text
        assert local_chain.usdc_balance(payer.address) == before - amount
        await _ledger_matches_chain(gw, local_chain, pay_to_before)
    finally:
        gw.stop()
        proxy.stop()
    facts.record(
        "fault",
        fault="RPC unreachable before settlement",
        status=503,
        charged=False,
        retry="paid once",
        answered_in_s=round(took, 2),
    )


async def test_node_slower_than_the_timeout(
    local_chain: Any, tmp_path: Path, make_payer: Any, facts: Recorder
) -> None:
    proxy = FaultProxy.to(local_chain.rpc_url)
    gw = _gateway(local_chain, tmp_path, proxy, rpc_timeout_seconds=1)
    try:
        payer = make_payer()
        amount, header = await signed_payment(gw.url, payer)
        before = local_chain.usdc_balance(payer.address)
        pay_to_before = local_chain.usdc_balance(gw.pay_to)
        proxy.delay_s = 1.5
        started = time.monotonic()
        r = await _post(gw.url, header)
        took = time.monotonic() - started
        assert r.status_code == 503, r.text
        assert int(r.headers["retry-after"]) > 0
        assert took < 10, f"a slow node must not hold the payer for {took:.1f} s"
        assert local_chain.usdc_balance(payer.address) == before

        proxy.restore()
        r = await _post(gw.url, header)
        assert r.status_code == 202, r.text
        assert local_chain.usdc_balance(payer.address) == before - amount
        await _ledger_matches_chain(gw, local_chain, pay_to_before)
    finally:
        gw.stop()
        proxy.stop()
    facts.record(
        "fault",
        fault="RPC slower than its timeout (1.5 s vs 1 s)",
        status=503,
        charged=False,
        retry="paid once",
        answered_in_s=round(took, 2),
    )


async def test_a_payer_who_never_retries_is_refunded_by_the_sweep(
    local_chain: Any, tmp_path: Path, make_payer: Any, facts: Recorder
) -> None:
    proxy = FaultProxy.to(local_chain.rpc_url)
    gw = _gateway(
        local_chain,
        tmp_path,
        proxy,
        rpc_timeout_seconds=2,
        payment_sweep_interval_seconds=1,
        payment_sweep_idle_seconds=2,
    )
    try:
        payer = make_payer()
        _, header, before, pay_to_before = await _cut_mid_settlement(gw, proxy, local_chain, payer)
        proxy.restore()
        # The payer never sends that header again: the sweep finds the transfer, no task for
        # it, and gives the money back, without a restart.
        await wait_balance(local_chain, payer.address, before, limit_s=30)

        async def rows_now() -> list[dict[str, Any]]:
            return ledger_rows(gw.settings.database)

        # the ledger says so a moment after the refund's block
        rows = await wait_until(rows_now, lambda rows: rows[0]["state"] == "refunded")
        assert [(row["state"], row["task_id"]) for row in rows] == [("refunded", None)]
        assert rows[0]["refund_tx"] is not None
        again = await _post(gw.url, header)
        assert again.status_code == 409 and again.json()["error"] == "payment_refunded"
        assert task_rows(gw.settings.database) == []
        await _ledger_matches_chain(gw, local_chain, pay_to_before)
    finally:
        gw.stop()
        proxy.stop()
    facts.record(
        "fault",
        fault="RPC cut mid-settlement, payer never retries",
        status=503,
        charged=True,
        outcome="refunded by the sweep while serving",
        settled_times=1,
    )


async def test_flap_during_settlement_resolved_by_retry(
    local_chain: Any, tmp_path: Path, make_payer: Any, facts: Recorder
) -> None:
    proxy = FaultProxy.to(local_chain.rpc_url)
    gw = _gateway(local_chain, tmp_path, proxy, rpc_timeout_seconds=2)
    try:
        payer = make_payer()
        amount, header, before, pay_to_before = await _cut_mid_settlement(
            gw, proxy, local_chain, payer
        )
        rows = ledger_rows(gw.settings.database)
        assert [row["state"] for row in rows] == ["submitted"]

        proxy.restore()
        answers = [await _post(gw.url, header) for _ in range(3)]
        assert [a.status_code for a in answers] == [202, 202, 202], [a.text for a in answers]
        assert len({a.json()["taskId"] for a in answers}) == 1
        assert local_chain.usdc_balance(payer.address) == before - amount  # once
        assert [row["state"] for row in ledger_rows(gw.settings.database)] == ["settled"]
        assert len(task_rows(gw.settings.database)) == 1
        await _ledger_matches_chain(gw, local_chain, pay_to_before)
    finally:
        gw.stop()
        proxy.stop()
    facts.record(
        "fault",
        fault="RPC cut mid-settlement, same header retried",
        status=503,
        charged=True,
        outcome="one task",
        settled_times=1,
    )


async def test_flap_during_settlement_resolved_by_restart(
    local_chain: Any, tmp_path: Path, make_payer: Any, facts: Recorder
) -> None:
    proxy = FaultProxy.to(local_chain.rpc_url)
    gw = _gateway(local_chain, tmp_path, proxy, rpc_timeout_seconds=2)
    restarted: InProcessGateway | None = None
    try:
        payer = make_payer()
        _, header, before, pay_to_before = await _cut_mid_settlement(gw, proxy, local_chain, payer)
        gw.stop()

        proxy.restore()
        restarted = _gateway(
            local_chain,
            tmp_path,
            proxy,
            rpc_timeout_seconds=2,
            settler=gw.settler,
            port=gw.server.port,
        )
        # Reconciled before serving: the payment settled, no task was ever created (the body
        # is not kept), so the money went back.
        rows = ledger_rows(gw.settings.database)
        assert [row["state"] for row in rows] == ["refunded"], rows
        assert local_chain.usdc_balance(payer.address) == before
        r = await _post(restarted.url, header)  # the same header cannot buy anything now
        assert 400 <= r.status_code < 500, r.text
        assert local_chain.usdc_balance(payer.address) == before
        assert task_rows(gw.settings.database) == []
        await _ledger_matches_chain(restarted, local_chain, pay_to_before)
    finally:
        gw.stop()
        if restarted is not None:
            restarted.stop()
        proxy.stop()
    facts.record(
        "fault",
        fault="RPC cut mid-settlement, gateway restarted",
        status=503,
        charged=True,
        outcome="refunded at start-up",
        settled_times=1,
        retry_status=r.status_code,
    )
