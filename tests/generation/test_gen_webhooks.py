"""Webhook deliveries to a real receiver, verified with the `standardwebhooks` library itself."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from standardwebhooks import Webhook, WebhookVerificationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from generation.backends.local import LocalBackend
from generation.errors import UnsafeAddress
from generation.media import MediaStore
from generation.models import GenerationRequest, Task
from generation.netguard import AddressPolicy
from generation.store import SqliteTaskStore
from generation.webhooks import (
    EVENT_COMPLETED,
    WebhookSender,
    WebhookSettings,
    event_type_for,
    generate_secret,
)
from generation.worker import WorkerPool
from tests.generation.gen_support import serve


class Receiver:
    """Answers with the scripted statuses in order (then 200) and records every attempt."""

    def __init__(self, statuses: list[int]) -> None:
        self.statuses = list(statuses)
        self.attempts: list[tuple[dict[str, str], bytes]] = []
        self.got = asyncio.Event()
        self.app = Starlette(routes=[Route("/hook", self.hook, methods=["POST"])])

    async def hook(self, request: Request) -> Response:
        self.attempts.append((dict(request.headers), await request.body()))
        status = self.statuses.pop(0) if self.statuses else 200
        if status == 200:
            self.got.set()
        return Response(status_code=status)


@contextlib.asynccontextmanager
async def _receiver(statuses: list[int]) -> AsyncIterator[tuple[Receiver, int]]:
    receiver = Receiver(statuses)
    async with serve(receiver.app) as (port,):
        yield receiver, port


class RecordingSleep:
    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)
        await asyncio.sleep(delay)


FAST = WebhookSettings(max_attempts=4, initial_backoff=0.02, max_backoff=0.05, timeout=5)


def _sender(secret: str, port: int, sleep: RecordingSleep | None = None) -> WebhookSender:
    return WebhookSender(
        secret,
        policy=AddressPolicy(allowed_endpoints=frozenset({("127.0.0.1", port)})),
        settings=FAST,
        sleep=sleep or RecordingSleep(),
    )


async def test_delivery_is_signed_per_standard_webhooks() -> None:
    secret = generate_secret()
    async with _receiver([]) as (receiver, port):
        sender = _sender(secret, port)
        try:
            result = await sender.deliver(
                f"http://127.0.0.1:{port}/hook",
                EVENT_COMPLETED,
                {"taskId": "t1", "status": "completed"},
                message_id="msg_t1_completed",
            )
        finally:
            await sender.aclose()
    assert result.delivered and result.attempts == 1 and result.status_code == 200
    ((headers, body),) = receiver.attempts
    payload = Webhook(secret).verify(body, headers)
    assert payload["type"] == "generation.completed"
    assert payload["data"] == {"taskId": "t1", "status": "completed"}
    assert headers["webhook-id"] == "msg_t1_completed"
    assert headers["content-type"] == "application/json"
    with pytest.raises(WebhookVerificationError):
        Webhook(generate_secret()).verify(body, headers)  # another secret does not verify


async def test_receiver_failing_twice_still_gets_it() -> None:
    secret = generate_secret()
    sleep = RecordingSleep()
    async with _receiver([500, 503]) as (receiver, port):
        sender = _sender(secret, port, sleep)
        try:
            result = await sender.deliver(
                f"http://127.0.0.1:{port}/hook", EVENT_COMPLETED, {"n": 1}, message_id="msg_retry"
            )
        finally:
            await sender.aclose()
    assert result.delivered and result.attempts == 3
    assert sleep.delays == [0.02, 0.04]  # exponential backoff between the attempts
    assert len(receiver.attempts) == 3
    for headers, body in receiver.attempts:
        assert headers["webhook-id"] == "msg_retry"  # same id: receivers can deduplicate
        assert Webhook(secret).verify(body, headers)["data"] == {"n": 1}


async def test_attempts_are_bounded_and_unsafe_urls_are_never_contacted() -> None:
    secret = generate_secret()
    sleep = RecordingSleep()
    async with _receiver([500] * 10) as (receiver, port):
        sender = _sender(secret, port, sleep)
        try:
            result = await sender.deliver(
                f"http://127.0.0.1:{port}/hook", EVENT_COMPLETED, {}, message_id="m"
            )
            assert not result.delivered and result.attempts == FAST.max_attempts
            assert result.status_code == 500 and len(receiver.attempts) == 4
            assert sleep.delays == [0.02, 0.04, 0.05]  # capped at max_backoff

            default_policy = WebhookSender(secret, settings=FAST)
            try:
                refused = await default_policy.deliver(
                    f"http://127.0.0.1:{port}/hook", EVENT_COMPLETED, {}, message_id="m2"
                )
                with pytest.raises(UnsafeAddress):
                    await default_policy.check_url(f"http://localhost:{port}/hook")
            finally:
                await default_policy.aclose()
        finally:
            await sender.aclose()
    assert not refused.delivered and refused.attempts == 1
    assert refused.error is not None and "not a public address" in refused.error
    assert len(receiver.attempts) == 4  # nothing more arrived


async def test_worker_listener_sends_the_webhook_for_a_finished_task(tmp_path: Path) -> None:
    """How the gateway is expected to wire it: a pool listener that delivers on completion."""
    secret = generate_secret()
    async with _receiver([503]) as (receiver, port), SqliteTaskStore(tmp_path / "t.db") as store:
        sender = _sender(secret, port)
        media = MediaStore(tmp_path / "media", "http://127.0.0.1:9/media")
        pool = WorkerPool(store, LocalBackend(), media)

        async def send(task: Task) -> None:
            assert task.webhook_url is not None
            await sender.deliver(
                task.webhook_url,
                event_type_for(task),
                {"taskId": task.id, "status": task.state.value, "progress": task.progress},
                message_id=f"{task.id}-{task.state.value}",
            )

        pool.add_listener(send)
        await pool.start()
        try:
            task = await pool.create(
                GenerationRequest(prompt="hook me", model="local", duration=1),
                webhook_url=f"http://127.0.0.1:{port}/hook",
            )
            async with asyncio.timeout(20):
                await receiver.got.wait()
        finally:
            await pool.stop()
            await sender.aclose()
    headers, body = receiver.attempts[-1]
    payload = Webhook(secret).verify(body, headers)
    assert payload["type"] == "generation.completed"
    assert payload["data"] == {"taskId": task.id, "status": "completed", "progress": 100}
    assert len(receiver.attempts) == 2


async def test_a_redirect_is_final_not_retried() -> None:
    hits: list[str] = []

    async def redirect(request: Request) -> Response:
        hits.append(request.url.path)
        return Response(status_code=302, headers={"location": "http://127.0.0.1:9/elsewhere"})

    app = Starlette(routes=[Route("/hook", redirect, methods=["POST"])])
    async with serve(app) as (port,):
        sender = WebhookSender(
            generate_secret(),
            policy=AddressPolicy(allow_private=True),
            settings=WebhookSettings(max_attempts=4, initial_backoff=0.01),
        )
        try:
            result = await sender.deliver(
                f"http://127.0.0.1:{port}/hook", "generation.completed", {}, message_id="msg_1"
            )
        finally:
            await sender.aclose()
    assert not result.delivered
    assert (result.attempts, result.status_code) == (1, 302)
    assert hits == ["/hook"]
