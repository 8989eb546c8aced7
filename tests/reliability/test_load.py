"""Load: 200 concurrent payers against one real gateway (a subprocess) on loopback, bounded in
time. Each payer has its own connection and a few pre-signed payments; it pays them one after
the other, and one payer in five also re-sends a payment it already made (a replay must
answer the same task and charge nothing). Afterwards:

- zero 5xx (any status outside 202/402 fails the run),
- zero double charges: every payer's on-chain balance fell by exactly the sum of the
  authorizations that settled, one ledger row and one task per authorization,
- ledger totals == the on-chain balance change of payTo.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

from tests.gateway.paying import v2_header
from tests.reliability.facts import Recorder
from tests.reliability.harness import (
    BODY,
    USDC,
    Key,
    challenge_for,
    gateway_process,
    header_nonce,
    ledger_rows,
    ledger_totals,
    new_key,
    task_rows,
)

PAYERS = 200
PAYMENTS_PER_PAYER = 4
LOAD_SECONDS = 15.0


async def test_200_concurrent_payers(local_chain: Any, tmp_path: Path, facts: Recorder) -> None:
    payers = [new_key() for _ in range(PAYERS)]
    for payer in payers:
        local_chain.fund(payer.address, usdc=1 * USDC)
    gw = gateway_process(
        local_chain,
        tmp_path,
        X402_LOG_LEVEL="WARNING",
        X402_CHALLENGE_RATE_PER_IP="0",  # every payer shares 127.0.0.1
        X402_WORKER_CONCURRENCY="1",  # renders must not starve the paid path of the 2 cores
    )
    gw.start()
    statuses: Counter[int] = Counter()
    latencies: list[float] = []
    accepted: dict[str, set[str]] = {}  # nonce -> task ids answered for it
    replays = 0
    try:
        gw.wait_up()
        pay_to_before = local_chain.usdc_balance(gw.settler.address)
        async with httpx.AsyncClient(base_url=gw.url, timeout=30) as http:
            amount, challenge = await challenge_for(http, BODY)
        signed = {
            p.address: [v2_header(challenge, p.key) for _ in range(PAYMENTS_PER_PAYER)]
            for p in payers
        }
        deadline = time.monotonic() + LOAD_SECONDS

        async def run(index: int, payer: Key) -> None:
            nonlocal replays
            limits = httpx.Limits(max_connections=1)
            async with httpx.AsyncClient(base_url=gw.url, timeout=60, limits=limits) as http:
                sent: list[str] = []
                for header in signed[payer.address]:
                    if time.monotonic() > deadline:
                        return
                    plan = [header] + ([sent[-1]] if index % 5 == 0 and sent else [])
                    for value in plan:
                        started = time.monotonic()
                        r = await http.post(
                            "/generation/create", json=BODY, headers={"PAYMENT-SIGNATURE": value}
                        )
                        latencies.append(time.monotonic() - started)
                        statuses[r.status_code] += 1
                        if r.status_code == 202:
                            accepted.setdefault(header_nonce(value), set()).add(r.json()["taskId"])
                            replays += value is not header
                    sent.append(header)

        started = time.monotonic()
        await asyncio.gather(*(run(i, p) for i, p in enumerate(payers)))
        elapsed = time.monotonic() - started
    finally:
        gw.stop()

    assert set(statuses) <= {202}, statuses  # no 5xx, and no refusals of valid payments
    assert all(len(tasks) == 1 for tasks in accepted.values()), "a replay got another task"
    rows = ledger_rows(gw.database)
    assert all(row["state"] == "settled" for row in rows), Counter(r["state"] for r in rows)
    assert len(rows) == len(accepted)
    assert len({(r["payer"], r["nonce"]) for r in rows}) == len(rows)
    assert len(task_rows(gw.database)) == len(rows)
    by_payer = Counter(row["payer"] for row in rows)
    for payer in payers:
        charged = 1 * USDC - local_chain.usdc_balance(payer.address)
        assert charged == amount * by_payer[payer.address], payer.address
    totals = await ledger_totals(gw.database)
    assert totals.net == totals.received == amount * len(rows)
    assert local_chain.usdc_balance(gw.settler.address) - pay_to_before == totals.net
    ordered = sorted(latencies)
    facts.record(
        "load",
        payers=PAYERS,
        requests=sum(statuses.values()),
        payments=len(rows),
        replays=replays,
        seconds=round(elapsed, 1),
        per_second=round(sum(statuses.values()) / elapsed, 1),
        p50_ms=round(statistics.median(ordered) * 1000),
        p99_ms=round(ordered[int(len(ordered) * 0.99) - 1] * 1000),
        five_xx=0,
        double_charges=0,
        ledger_equals_chain=True,
    )
