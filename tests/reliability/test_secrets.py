"""Secrets never leave the gateway: a full run at DEBUG, grepped for the settler key, every
payment signature (whole and as r/s words) and every raw payment header.

The gateway runs as a subprocess (`x402-gateway serve`, settings from X402_* env, the key in
X402_SETTLER_KEY) and everything it prints is captured. The run covers the paths that log the
most: v2 and v1 payments, a replay, a refused signature, an RPC outage (503), a task that fails
and is refunded on chain, SSE, polling and a webhook. Every response (headers and bodies) and
every webhook delivery is searched too.
"""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tests.fault_proxy import FaultProxy
from tests.gateway.paying import v1_header, v2_header
from tests.gateway.server import ServerThread, free_port
from tests.reliability.facts import Recorder
from tests.reliability.harness import gateway_process, wait_status


class Transcript:
    """Every byte the outside world saw from the gateway."""

    def __init__(self) -> None:
        self.parts: list[str] = []

    def response(self, r: httpx.Response) -> httpx.Response:
        self.parts.append(f"{r.status_code} {json.dumps(dict(r.headers))}\n{r.text}")
        return r

    def text(self) -> str:
        return "\n".join(self.parts)


def needles_of(header: str) -> list[str]:
    payload = json.loads(base64.b64decode(header))
    sig = payload["payload"]["signature"].removeprefix("0x")
    return [header, sig, sig[:64], sig[64:128]]


async def test_no_key_signature_or_payment_header_in_any_output(
    local_chain: Any, tmp_path: Path, make_payer: Any, facts: Recorder
) -> None:
    hooks: list[bytes] = []

    async def hook(request: Request) -> Response:
        hooks.append(await request.body())
        return Response(status_code=204)

    receiver = ServerThread(Starlette(routes=[Route("/hook", hook, methods=["POST"])]), free_port())
    receiver.start()
    proxy = FaultProxy.to(local_chain.rpc_url)
    gw = gateway_process(
        local_chain,
        tmp_path,
        rpc_url=proxy.url,
        X402_LOG_LEVEL="DEBUG",
        X402_TASK_TIMEOUT_SECONDS="2",
        X402_RPC_TIMEOUT_SECONDS="2",
        X402_ALLOW_PRIVATE_URLS="true",
    )
    seen = Transcript()
    headers_sent: list[str] = []
    payer = make_payer()
    other = make_payer()
    try:
        gw.start().wait_up()
        async with httpx.AsyncClient(base_url=gw.url, timeout=60) as http:

            async def challenge(body: dict[str, Any]) -> httpx.Response:
                r = seen.response(await http.post("/generation/create", json=body))
                assert r.status_code == 402
                return r

            async def pay(body: dict[str, Any], name: str, value: str) -> httpx.Response:
                headers_sent.append(value)
                return seen.response(
                    await http.post("/generation/create", json=body, headers={name: value})
                )

            ok_body = {
                "prompt": "a quiet harbour",
                "templateData": {"duration": 1},
                "webhook": f"{receiver.url}/hook",
            }
            c = await challenge(ok_body)
            v2 = v2_header(c.headers["payment-required"], payer.key)
            paid = await pay(ok_body, "PAYMENT-SIGNATURE", v2)
            assert paid.status_code == 202, paid.text
            task_id = paid.json()["taskId"]
            replay = await pay(ok_body, "PAYMENT-SIGNATURE", v2)
            assert replay.status_code == 202 and replay.json()["taskId"] == task_id
            async with http.stream("GET", f"/generation/{task_id}/events") as events:
                seen.parts.append(str(dict(events.headers)))
                async for line in events.aiter_lines():
                    seen.parts.append(line)
            seen.parts.append(json.dumps(await wait_status(gw.url, task_id, {"completed"})))
            seen.response(await http.get(f"/generation/{task_id}/status"))

            c = await challenge(ok_body)
            v1 = v1_header(c.json(), other.key)
            assert (await pay(ok_body, "X-PAYMENT", v1)).status_code == 202

            c = await challenge(ok_body)
            forged = json.loads(
                base64.b64decode(v2_header(c.headers["payment-required"], payer.key))
            )
            sig = forged["payload"]["signature"]
            forged["payload"]["signature"] = sig[:-2] + ("1c" if sig.endswith("1b") else "1b")
            bad = base64.b64encode(json.dumps(forged).encode()).decode()
            refused = await pay(ok_body, "PAYMENT-SIGNATURE", bad)
            assert refused.status_code == 402

            c = await challenge(ok_body)
            down = v2_header(c.headers["payment-required"], payer.key)
            proxy.cut()
            assert (await pay(ok_body, "PAYMENT-SIGNATURE", down)).status_code == 503
            proxy.restore()

            slow_body = {"prompt": "a very long take", "templateData": {"duration": 20}}
            c = await challenge(slow_body)
            failing = await pay(
                slow_body, "PAYMENT-SIGNATURE", v2_header(c.headers["payment-required"], payer.key)
            )
            assert failing.status_code == 202, failing.text
            final = await wait_status(gw.url, failing.json()["taskId"], {"failed"}, refund=True)
            seen.parts.append(json.dumps(final))
            seen.response(await http.get(f"/generation/{failing.json()['taskId']}/status"))
            for _ in range(100):
                if hooks:
                    break
                await asyncio.sleep(0.05)
    finally:
        gw.stop()
        receiver.stop()
        proxy.stop()

    log = gw.output()
    assert "DEBUG" in log and "settled payment=" in log, log[-3000:]  # the capture is real
    assert "refunded payment=" in log
    assert hooks, "the webhook was delivered"
    haystacks = {
        "gateway output": log,
        "responses": seen.text(),
        "webhooks": b"\n".join(hooks).decode("utf-8", "replace"),
    }
    key = gw.settler.key.removeprefix("0x")
    needles = {"settler key": [key, key.upper()]}
    for i, header in enumerate(headers_sent):
        needles[f"payment header {i}"] = needles_of(header)
    leaks = [
        f"{name} in {where}"
        for where, text in haystacks.items()
        for name, values in needles.items()
        for value in values
        if value and (value in text or value.lower() in text.lower())
    ]
    assert not leaks, leaks
    facts.record(
        "secrets",
        bytes_scanned=sum(len(t) for t in haystacks.values()),
        log_lines=log.count("\n"),
        needles=sum(len(v) for v in needles.values()),
        headers=len(headers_sent),
        found=0,
    )
