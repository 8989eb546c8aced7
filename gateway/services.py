"""The composition root's product: every long-lived resource, built and closed by the lifespan.

`open_services` is the only place that wires `payments` and `generation` together: it links
a task to its payment (task id = payment id, so a replayed authorization finds its task) and
subscribes to task outcomes to refund failed paid work and to send webhooks.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import os
import secrets
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.errors import BadRequest
from gateway.pricing import ModelPrice, PriceBook
from gateway.schemas import CreateGeneration
from gateway.settings import Settings
from generation import (
    AddressPolicy,
    Backend,
    FetchError,
    ImageFetcher,
    LocalBackend,
    LocalSettings,
    MediaStore,
    ModelRouter,
    SqliteTaskStore,
    Task,
    TaskState,
    UpstreamBackend,
    UpstreamSettings,
    WebhookSender,
    WorkerPool,
    event_type_for,
    guarded_client,
    resolve_target,
)
from payments import Network, get_network
from payments.chain import Chain
from payments.ledger import SqliteLedger
from payments.processor import PaymentProcessor
from payments.settler import Settler

__all__ = ["Services", "open_services", "resolve_network"]

log = logging.getLogger("x402.gateway")

LOCAL_MODEL_BACKEND = "local"


@dataclass
class Services:
    settings: Settings
    prices: PriceBook
    network: Network
    pay_to: str
    chain: Chain
    processor: PaymentProcessor
    ledger: SqliteLedger
    tasks: SqliteTaskStore
    workers: WorkerPool
    media: MediaStore
    images: ImageFetcher
    webhook_client: Any
    webhook_key: bytes
    policy: AddressPolicy
    upstream_enabled: bool
    creating: dict[str, asyncio.Lock] = field(default_factory=dict)

    def model_available(self, price: ModelPrice) -> bool:
        return price.backend == LOCAL_MODEL_BACKEND or self.upstream_enabled

    async def inspect_inputs(self, body: CreateGeneration) -> bytes | None:
        """Refuse unusable image/webhook inputs before payment: a data: image is decoded and
        checked in full (and kept); a URL must resolve to addresses the policy allows."""
        image: bytes | None = None
        problems: list[dict[str, str]] = []
        source = body.templateData.image
        if source is not None:
            try:
                if source[:5].lower() == "data:":
                    image = (await self.images.fetch(source)).data
                else:
                    await resolve_target(source, self.policy)
            except FetchError as exc:
                problems.append({"field": "templateData.image", "message": exc.message})
        if body.webhook is not None:
            try:
                await resolve_target(body.webhook, self.policy)
            except FetchError as exc:
                problems.append({"field": "webhook", "message": exc.message})
        if problems:
            raise BadRequest("unusable input URL", reason="invalid_input_url", errors=problems)
        return image

    def webhook_secret(self, task_id: str) -> str:
        """Per-task Standard Webhooks secret, derived so it survives restarts without storage."""
        digest = hmac.new(self.webhook_key, task_id.encode(), hashlib.sha256).digest()
        return "whsec_" + base64.b64encode(digest).decode("ascii")


def resolve_network(settings: Settings) -> Network:
    base = get_network(settings.network)
    if settings.asset is None and settings.chain_id is None:
        return base
    return Network(
        name=base.name,
        caip2=f"eip155:{settings.chain_id or base.chain_id}",
        chain_id=settings.chain_id or base.chain_id,
        usdc=settings.asset or base.usdc,
        token_name=settings.token_name or base.token_name,
        token_version=settings.token_version or base.token_version,
    )


@asynccontextmanager
async def open_services(
    settings: Settings,
    prices: PriceBook,
    *,
    settler_key: str,
    pay_to: str,
    clock: Callable[[], float],
) -> AsyncIterator[Services]:
    network = resolve_network(settings)
    settings.media_dir.mkdir(parents=True, exist_ok=True)
    settings.database.parent.mkdir(parents=True, exist_ok=True)
    policy = AddressPolicy(allow_private=settings.allow_private_urls)

    async with AsyncExitStack() as stack:
        chain = Chain(settings.rpc_url, network.usdc, request_timeout=settings.rpc_timeout_seconds)
        stack.push_async_callback(chain.close)
        ledger = await SqliteLedger(settings.database).open()
        stack.push_async_callback(ledger.close)
        settler = Settler(chain, settler_key)
        processor = PaymentProcessor(
            chain, settler, ledger, clock, settle_margin_s=settings.settle_margin_seconds
        )
        tasks = await SqliteTaskStore(settings.database).open()
        stack.push_async_callback(tasks.close)

        backends: list[Backend] = [
            LocalBackend(
                LocalSettings(
                    models=tuple(
                        m for m, p in prices.models.items() if p.backend == LOCAL_MODEL_BACKEND
                    )
                )
            )
        ]
        upstream_enabled = settings.upstream_base_url is not None
        if upstream_enabled:
            assert settings.upstream_base_url is not None
            upstream = UpstreamBackend(
                UpstreamSettings(
                    base_url=settings.upstream_base_url,
                    api_key=(
                        settings.upstream_api_key.get_secret_value()
                        if settings.upstream_api_key
                        else ""
                    ),
                    models={
                        m: p.upstream_model or m
                        for m, p in prices.models.items()
                        if p.backend == "upstream"
                    },
                )
            )
            stack.push_async_callback(upstream.aclose)
            backends.append(upstream)
        media = MediaStore(settings.media_dir, _public_media_base(settings))
        workers = WorkerPool(
            tasks,
            ModelRouter(backends),
            media,
            concurrency=settings.worker_concurrency,
            task_timeout=float(settings.task_timeout_seconds),
        )
        images = ImageFetcher(policy=policy)
        stack.push_async_callback(images.aclose)
        webhook_client = guarded_client(10.0)
        stack.push_async_callback(webhook_client.aclose)

        services = Services(
            settings=settings,
            prices=prices,
            network=network,
            pay_to=pay_to,
            chain=chain,
            processor=processor,
            ledger=ledger,
            tasks=tasks,
            workers=workers,
            media=media,
            images=images,
            webhook_client=webhook_client,
            webhook_key=_webhook_key(settings.database),
            policy=policy,
            upstream_enabled=upstream_enabled,
        )
        workers.add_listener(lambda task: _on_task_done(services, task))

        # Reconcile before serving: money first, then the work it paid for.
        await processor.start()
        report = await processor.reconcile()
        log.info("reconciled payments: %s", report)
        await workers.start(recover=True)
        stack.push_async_callback(workers.stop)
        stack.push_async_callback(processor.drain)
        yield services


async def _on_task_done(services: Services, task: Task) -> None:
    if task.state is TaskState.FAILED and task.payment_ref is not None:
        try:
            await services.processor.refund(task.payment_ref)
        except Exception:
            # Reconciliation at the next start retries; the status shows the refund as pending.
            log.exception(
                "refund of payment %s for failed task %s failed", task.payment_ref, task.id
            )
    if task.webhook_url:
        sender = WebhookSender(
            services.webhook_secret(task.id),
            policy=services.policy,
            client=services.webhook_client,
        )
        from gateway.views import task_view

        view = await task_view(services, task)
        result = await sender.deliver(
            task.webhook_url, event_type_for(task), view, message_id=f"msg_{task.id}"
        )
        if not result.delivered:
            log.info("webhook for task %s not delivered: %s", task.id, result.error)


def _public_media_base(settings: Settings) -> str:
    base = settings.public_base_url or "http://127.0.0.1:8402"
    return f"{base}/media"


def _webhook_key(database: Path) -> bytes:
    """A 32-byte key kept beside the database (0600), made on first start."""
    path = database.with_name(database.name + ".webhook-key")
    try:
        return bytes.fromhex(path.read_text().strip())
    except FileNotFoundError:
        key = secrets.token_bytes(32)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(key.hex())
        return key
