"""The task helper against the real gateway: create (paid), follow by SSE or by polling at the
server's Retry-After, download the MP4."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.client_tasks import GatewayError, GenerationClient, TaskUpdate, build_body, fetch_quote
from payments.client import Payer
from tests.client.conftest import Key, Served

pytestmark = pytest.mark.chain


@pytest.mark.parametrize("use_sse", [True, False])
async def test_create_follow_download(
    use_sse: bool, gateway: Served, make_key: Callable[..., Key], tmp_path: Path, local_chain: Any
) -> None:
    key = make_key()
    body = build_body("a red balloon over a city", duration=2)
    async with httpx.AsyncClient() as plain:
        challenge = await fetch_quote(plain, gateway.url, body)
    amount = challenge.v2[0].amount
    assert challenge.v1[0].amount == amount

    payer = Payer(key.key)
    updates: list[TaskUpdate] = []
    async with payer.async_client() as http:
        client = GenerationClient(http, gateway.url, poll_min_s=0.05)
        created = await client.create(body)
        assert created.receipt is not None and created.receipt.amount == amount
        mark = gateway.recorder.mark()
        final = await client.follow(
            created.task_id, on_update=updates.append, timeout_s=60, use_sse=use_sse
        )
        video = final.video_url
        assert video is not None
        size = await client.download(video, tmp_path / "out" / "video.mp4")

    assert final.status == "completed" and final.terminal and final.progress == 100
    assert updates[-1] == final
    progress = [u.progress for u in updates]
    assert progress == sorted(progress)  # never goes backwards
    assert len({(u.status, u.stage, u.progress) for u in updates}) == len(updates)  # no repeats
    assert final.body["payment"]["transaction"] == created.receipt.transaction
    paths = [s.path for s in gateway.recorder.since(mark) if s.path.startswith("/generation/")]
    if use_sse:
        assert paths == [f"/generation/{created.task_id}/events"]
    else:
        assert paths and set(paths) == {f"/generation/{created.task_id}/status"}
    data = (tmp_path / "out" / "video.mp4").read_bytes()
    assert len(data) == size > 0 and data[4:8] == b"ftyp"
    assert not list((tmp_path / "out").glob(".*.part"))
    assert local_chain.usdc_balance(key.address) == 10_000_000 - amount


async def test_unknown_task_and_bad_body_are_gateway_errors(gateway: Served) -> None:
    async with httpx.AsyncClient() as plain:
        client = GenerationClient(plain, gateway.url)
        with pytest.raises(GatewayError) as info:
            await client.follow("no-such-task", timeout_s=5)
        assert info.value.status == 404
        with pytest.raises(GatewayError) as info:
            await fetch_quote(plain, gateway.url, {"prompt": "x", "templateData": {"duration": 0}})
        assert info.value.status == 400 and "templateData.duration" in info.value.message
