"""Crash safety: the gateway SIGKILLs itself at each step of the paid path (dev-mode fault
injection, `X402_FAULT_KILL_AT`), is restarted without the fault, and must have reconciled
before it answers its first request:

- every payment that moved money on chain has a task that completes, or a refund;
- no authorization is settled twice (one Transfer payer -> payTo on chain, one ledger row);
- the ledger's net sum equals payTo's on-chain balance change;
- re-sending the same payment header afterwards never charges again and never gets a 5xx.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.faults import CHECKPOINTS, KILL_AT_ENV
from tests.reliability.facts import Recorder
from tests.reliability.harness import (
    BODY,
    USDC,
    GatewayProcess,
    Key,
    gateway_process,
    ledger_rows,
    ledger_totals,
    signed_payment,
    task_rows,
    wait_status,
)

TRANSFER_TOPIC = "0xddf252ad1be2c89b69c2b068fc378daa952ba7f163c4a11628f55a4df523b3ef"
SLOW_BODY = {"prompt": "a task that cannot finish in time", "templateData": {"duration": 20}}
UNRESOLVED = {"reserved", "submitted", "refund_submitted"}


def transfers(local_chain: Any, frm: str, to: str) -> int:
    """How many Transfer(frm -> to) events the token emitted (any block)."""
    logs = local_chain.rpc(
        "eth_getLogs",
        [
            {
                "address": local_chain.usdc_address,
                "fromBlock": "0x0",
                "toBlock": "latest",
                "topics": [TRANSFER_TOPIC, _word(frm), _word(to)],
            }
        ],
    )
    return len(logs)


def _word(address: str) -> str:
    return "0x" + "0" * 24 + address.lower().removeprefix("0x")


def _armed(local_chain: Any, tmp: Path, point: str) -> GatewayProcess:
    extra = {"X402_TASK_TIMEOUT_SECONDS": "1"} if point == "mid_refund" else {}
    return gateway_process(
        local_chain,
        tmp,
        X402_MODE="dev",
        X402_FAULT_INJECTION="true",
        X402_CHALLENGE_RATE_PER_IP="0",
        **extra,
    )


async def _pay_until_killed(gw: GatewayProcess, header: str, body: dict[str, Any]) -> int | None:
    """Send the paid request; the process dies before answering or (mid_render, mid_refund)
    after answering 202 while the work or refund goes on. Returns the status seen, if any."""
    try:
        async with httpx.AsyncClient(base_url=gw.url, timeout=60) as http:
            r = await http.post(
                "/generation/create", json=body, headers={"PAYMENT-SIGNATURE": header}
            )
    except httpx.TransportError:
        return None
    return r.status_code


@pytest.mark.parametrize("point", CHECKPOINTS)
async def test_sigkill_at_each_step_then_restart_resolves_every_payment(
    point: str, local_chain: Any, tmp_path: Path, make_payer: Any, facts: Recorder
) -> None:
    gw = _armed(local_chain, tmp_path, point)
    body = SLOW_BODY if point == "mid_refund" else BODY
    payer: Key = make_payer(usdc=5 * USDC)
    try:
        gw.start({KILL_AT_ENV: point}).wait_up()
        pay_to_before = local_chain.usdc_balance(gw.settler.address)
        payer_before = local_chain.usdc_balance(payer.address)
        amount, header = await signed_payment(gw.url, payer, body)

        seen = await _pay_until_killed(gw, header, body)
        code = gw.wait_dead(limit_s=60)
        assert code == -9, f"{point}: exited {code}, not SIGKILL\n{gw.output()[-3000:]}"
        assert f"SIGKILL at {point}" in gw.output()
        if point in ("mid_render", "mid_refund"):
            assert seen == 202, seen  # the payer got its task before the crash
        else:
            assert seen is None, seen  # died before answering
        died_with = {row["state"] for row in ledger_rows(gw.database)}

        gw.start().wait_up()  # no fault: reconciliation runs before the first answer
        rows = ledger_rows(gw.database)
        assert not {row["state"] for row in rows} & UNRESOLVED, rows  # resolved before serving
        assert len(rows) <= 1
        moved = transfers(local_chain, payer.address, gw.settler.address)
        assert moved <= 1, f"{point}: authorization settled {moved} times"

        outcome = "no charge"
        if moved:
            (row,) = rows
            if row["task_id"] is not None and row["state"] == "settled":
                final = await wait_status(gw.url, row["task_id"], {"completed"}, limit_s=60)
                assert final["payment"]["amount"] == str(amount)
                assert local_chain.usdc_balance(payer.address) == payer_before - amount
                outcome = "task completed"
            else:
                assert row["state"] == "refunded", row
                assert local_chain.usdc_balance(payer.address) == payer_before
                outcome = "refunded"
        else:
            assert local_chain.usdc_balance(payer.address) == payer_before
            # never broadcast: the reservation was released (or failed, if it cannot be retried)
            assert all(row["state"] in ("failed",) for row in rows), rows

        async with httpx.AsyncClient(base_url=gw.url, timeout=60) as http:
            again = await http.post(
                "/generation/create", json=body, headers={"PAYMENT-SIGNATURE": header}
            )
        assert again.status_code < 500, again.text
        # A retry of the same header after the restart: charged only if nothing was before.
        expected = moved + (1 if not moved and again.status_code == 202 else 0)
        assert transfers(local_chain, payer.address, gw.settler.address) == expected <= 1

        if point == "mid_refund":
            assert outcome == "refunded"
            assert len(task_rows(gw.database)) == 1
        if outcome == "refunded":
            assert local_chain.usdc_balance(payer.address) == payer_before  # refunded once
        totals = await ledger_totals(gw.database)
        assert local_chain.usdc_balance(gw.settler.address) - pay_to_before == totals.net
    finally:
        gw.stop()
    facts.record(
        "crash",
        point=point,
        killed=True,
        ledger_at_death=sorted(died_with),
        money_moved=bool(moved),
        outcome=outcome,
        settled_times=moved,
        retry_status=again.status_code,
        retry_charged=expected - moved,  # 1 only where the crash had moved nothing
        ledger_equals_chain=True,
    )


async def test_after_reserve_crash_the_same_header_still_pays(
    local_chain: Any, tmp_path: Path, make_payer: Any
) -> None:
    gw = _armed(local_chain, tmp_path, "after_reserve")
    payer: Key = make_payer(usdc=5 * USDC)
    try:
        gw.start({KILL_AT_ENV: "after_reserve"}).wait_up()
        amount, header = await signed_payment(gw.url, payer)
        before = local_chain.usdc_balance(payer.address)
        assert await _pay_until_killed(gw, header, BODY) is None
        gw.wait_dead(limit_s=60)
        gw.start().wait_up()
        async with httpx.AsyncClient(base_url=gw.url, timeout=60) as http:
            r = await http.post(
                "/generation/create", json=BODY, headers={"PAYMENT-SIGNATURE": header}
            )
        assert r.status_code == 202, r.text
        assert local_chain.usdc_balance(payer.address) == before - amount
    finally:
        gw.stop()
