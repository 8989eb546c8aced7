"""Paid tasks through the real gateway: progress seen by polling and by SSE, refunds on chain
after a failure, webhooks, and a gateway killed mid-render that finishes the work on restart."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import av
import httpx
from standardwebhooks import Webhook
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tests.gateway.conftest import Gateway, new_key, start_gateway
from tests.gateway.paying import decode_challenge, v2_header
from tests.gateway.server import ServerThread, free_port
from tests.gateway.test_paid_flow import wait_terminal


async def pay(gateway: Gateway, payer: Any, body: dict[str, Any]) -> tuple[int, httpx.Response]:
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as http:
        challenge = await http.post("/generation/create", json=body)
        assert challenge.status_code == 402, challenge.text
        amount = int(
            decode_challenge(challenge.headers["payment-required"])["accepts"][0]["amount"]
        )
        header = v2_header(challenge.headers["payment-required"], payer.key)
        paid = await http.post(
            "/generation/create", json=body, headers={"PAYMENT-SIGNATURE": header}
        )
    assert paid.status_code == 202, paid.text
    return amount, paid


async def test_progress_rises_by_polling_and_sse_and_the_video_matches(
    gateway: Gateway, make_payer: Any, tmp_path: Path
) -> None:
    payer = make_payer()
    body = {"prompt": "a red fox running through snow", "templateData": {"duration": 4}}
    started = time.monotonic()
    _, paid = await pay(gateway, payer, body)
    task_id = paid.json()["taskId"]

    async def follow_sse() -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        async with (
            httpx.AsyncClient(base_url=gateway.url, timeout=60) as http,
            http.stream("GET", f"/generation/{task_id}/events") as stream,
        ):
            assert stream.headers["content-type"].startswith("text/event-stream")
            async for line in stream.aiter_lines():
                if line.startswith("data: "):
                    events.append(json.loads(line.removeprefix("data: ")))
        return events

    async def poll() -> list[int]:
        seen: list[int] = []
        async with httpx.AsyncClient(base_url=gateway.url) as http:
            for _ in range(600):
                status = (await http.get(f"/generation/{task_id}/status")).json()
                if status["status"] == "processing" and status["progress"] not in seen:
                    seen.append(status["progress"])
                if status["status"] in ("completed", "failed"):
                    break
                await asyncio.sleep(0.02)
        return seen

    events, polled = await asyncio.gather(follow_sse(), poll())
    status = await wait_terminal(gateway, task_id)
    elapsed = time.monotonic() - started
    assert status["status"] == "completed", status
    assert elapsed < 15, f"a 4 s render must finish before the seed client's 2nd poll: {elapsed}"

    sse_progress = [e["progress"] for e in events if e["status"] == "processing"]
    assert len(set(sse_progress)) >= 3, events
    assert sse_progress == sorted(sse_progress)
    assert events[-1]["status"] == "completed"
    assert len(polled) >= 2, polled
    assert polled == sorted(polled)

    generation = status["result"]["generation"]
    async with httpx.AsyncClient() as http:
        video = (await http.get(generation["video"]["url"])).content
        preview = (await http.get(generation["image"])).content
    path = tmp_path / "video.mp4"
    path.write_bytes(video)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        assert container.duration is not None
        assert abs(container.duration / 1_000_000 - 4.0) < 0.1
    (tmp_path / "preview.jpg").write_bytes(preview)
    with av.open(str(tmp_path / "preview.jpg")) as image:
        frame = next(image.decode(video=0))
        assert (frame.width, frame.height) == (
            generation["video"]["width"],
            generation["video"]["height"],
        )


async def test_failed_task_is_refunded_on_chain(
    local_chain: Any, make_payer: Any, tmp_path: Path
) -> None:
    # A real failure: the render of 20 s of video cannot finish inside a 1 s task timeout.
    gw = start_gateway(local_chain, tmp_path, task_timeout_seconds=1)
    try:
        payer = make_payer()
        before = local_chain.usdc_balance(payer.address)
        amount, paid = await pay(gw, payer, {"prompt": "slow", "templateData": {"duration": 20}})
        assert local_chain.usdc_balance(payer.address) == before - amount
        task_id = paid.json()["taskId"]
        status = await wait_terminal(gw, task_id)
        assert status["status"] == "failed"
        assert status["error"]["code"] == "timeout"
        deadline = time.monotonic() + 30
        while status.get("refund", {}).get("status") != "confirmed":
            assert time.monotonic() < deadline, status
            await asyncio.sleep(0.1)
            async with httpx.AsyncClient(base_url=gw.url) as http:
                r = await http.get(f"/generation/{task_id}/status")
            assert r.status_code == 500
            status = r.json()
        assert status["refund"]["amount"] == str(amount)
        assert status["refund"]["transaction"].startswith("0x")
        assert local_chain.usdc_balance(payer.address) == before
    finally:
        gw.server.stop()


async def test_webhook_is_delivered_signed(gateway: Gateway, make_payer: Any) -> None:
    received: list[tuple[dict[str, str], bytes]] = []

    async def hook(request: Request) -> Response:
        received.append((dict(request.headers), await request.body()))
        return Response(status_code=204)

    receiver = ServerThread(Starlette(routes=[Route("/hook", hook, methods=["POST"])]), free_port())
    receiver.start()
    try:
        body = {
            "prompt": "webhook please",
            "templateData": {"duration": 1},
            "webhook": f"{receiver.url}/hook",
        }
        _, paid = await pay(gateway, make_payer(), body)
        task_id = paid.json()["taskId"]
        secret = paid.json()["webhookSecret"]
        await wait_terminal(gateway, task_id)
        deadline = time.monotonic() + 20
        while not received:
            assert time.monotonic() < deadline, "no webhook delivery"
            await asyncio.sleep(0.05)
    finally:
        receiver.stop()
    headers, raw = received[0]
    event = Webhook(secret).verify(raw, headers)
    assert event["type"] == "generation.completed"
    assert event["data"]["taskId"] == task_id
    assert event["data"]["status"] == "completed"


def _serve(env: dict[str, str], port: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _wait_up(url: str, proc: subprocess.Popen[str], limit_s: float = 60) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise AssertionError("gateway did not come up")


async def test_gateway_killed_mid_render_finishes_the_task_after_restart(
    local_chain: Any, make_payer: Any, tmp_path: Path
) -> None:
    settler, key = new_key()
    local_chain.fund(settler, eth_wei=10**19)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "X402_RPC_URL": local_chain.rpc_url,
        "X402_SETTLER_KEY": key,
        "X402_DATABASE": str(tmp_path / "gw.db"),
        "X402_MEDIA_DIR": str(tmp_path / "media"),
        "X402_PUBLIC_BASE_URL": url,
        "X402_LOG_LEVEL": "WARNING",
    }
    proc = _serve(env, port)
    try:
        _wait_up(url, proc)
        gw = Gateway(url=url, pay_to=settler, settings=None, server=None)  # type: ignore[arg-type]
        payer = make_payer()
        before = local_chain.usdc_balance(payer.address)
        amount, paid = await pay(gw, payer, {"prompt": "long", "templateData": {"duration": 20}})
        task_id = paid.json()["taskId"]
        async with httpx.AsyncClient(base_url=url) as http:
            for _ in range(500):
                status = (await http.get(f"/generation/{task_id}/status")).json()
                if status["status"] == "processing" and status["progress"] > 5:
                    break
                await asyncio.sleep(0.02)
        assert status["status"] == "processing", status
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)

        proc = _serve(env, port)
        _wait_up(url, proc)
        final = await wait_terminal(gw, task_id, limit_s=90)
        assert final["status"] == "completed", final
        assert final["payment"]["amount"] == str(amount)
        assert local_chain.usdc_balance(payer.address) == before - amount  # charged once
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
