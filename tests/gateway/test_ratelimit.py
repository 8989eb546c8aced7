"""Rate limits on the 402 path: unpaid challenges per IP, refused payments per payer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from gateway.ratelimit import TokenBuckets
from tests.gateway.conftest import start_gateway
from tests.gateway.paying import v2_header

BODY = {"prompt": "rate", "templateData": {"duration": 1}}


def test_token_buckets_refill_at_their_rate() -> None:
    now = [0.0]
    buckets = TokenBuckets(rate=2.0, burst=2, clock=lambda: now[0])
    assert buckets.take("a") == 0.0
    assert buckets.take("a") == 0.0
    assert buckets.take("a") == 0.5  # empty: one token comes back in 1/rate s
    assert buckets.take("b") == 0.0  # keys are independent
    now[0] += 0.5
    assert buckets.peek("a") == 0.0
    assert buckets.take("a") == 0.0
    assert TokenBuckets.retry_after(0.01) == 1


def test_bounded_memory() -> None:
    buckets = TokenBuckets(rate=1.0, burst=1, max_keys=3)
    for key in "abcdef":
        buckets.take(key)
    assert buckets.peek("a") == 0.0  # evicted: starts full again
    assert buckets.peek("f") > 0


async def test_429_with_retry_after_on_the_402_path(
    local_chain: Any, make_payer: Any, tmp_path: Path
) -> None:
    gw = start_gateway(
        local_chain,
        tmp_path,
        challenge_rate_per_ip=0.1,
        challenge_burst_per_ip=3,
        refusal_rate_per_payer=0.1,
        refusal_burst_per_payer=2,
    )
    try:
        async with httpx.AsyncClient(base_url=gw.url, timeout=30) as http:
            statuses = [
                (await http.post("/generation/create", json=BODY)).status_code for _ in range(4)
            ]
            assert statuses == [402, 402, 402, 429]
            limited = await http.post("/generation/create", json=BODY)
            assert limited.status_code == 429
            assert int(limited.headers["retry-after"]) >= 1
            assert limited.json()["error"] == "rate_limited"
            # Invalid bodies are still told why (400), never hidden behind a 429.
            assert (await http.post("/generation/create", json={})).status_code == 400

        # Refused payments: a payer whose authorizations keep failing is shed before any RPC.
        gw2 = start_gateway(
            local_chain, tmp_path / "two", refusal_rate_per_payer=0.1, refusal_burst_per_payer=2
        )
        try:
            payer = make_payer(usdc=0)  # no funds: every attempt is refused by the simulation
            async with httpx.AsyncClient(base_url=gw2.url, timeout=30) as http:
                challenge = await http.post("/generation/create", json=BODY)
                codes = []
                for _ in range(3):
                    header = v2_header(challenge.headers["payment-required"], payer.key)
                    r = await http.post(
                        "/generation/create", json=BODY, headers={"PAYMENT-SIGNATURE": header}
                    )
                    codes.append(r.status_code)
            assert codes == [402, 402, 429]
        finally:
            gw2.server.stop()
    finally:
        gw.server.stop()


async def test_active_tasks_per_payer_are_bounded_before_payment(
    local_chain: Any, make_payer: Any, tmp_path: Path
) -> None:
    gw = start_gateway(local_chain, tmp_path, max_active_tasks_per_payer=1, worker_concurrency=1)
    try:
        payer = make_payer()
        slow = {"prompt": "slow", "templateData": {"duration": 20}}
        async with httpx.AsyncClient(base_url=gw.url, timeout=30) as http:
            challenge = await http.post("/generation/create", json=slow)
            first = await http.post(
                "/generation/create",
                json=slow,
                headers={
                    "PAYMENT-SIGNATURE": v2_header(challenge.headers["payment-required"], payer.key)
                },
            )
            assert first.status_code == 202
            before = local_chain.usdc_balance(payer.address)
            second = await http.post(
                "/generation/create",
                json=slow,
                headers={
                    "PAYMENT-SIGNATURE": v2_header(challenge.headers["payment-required"], payer.key)
                },
            )
        assert second.status_code == 429, second.text
        assert int(second.headers["retry-after"]) >= 1
        assert local_chain.usdc_balance(payer.address) == before  # refused before settling
    finally:
        gw.server.stop()
