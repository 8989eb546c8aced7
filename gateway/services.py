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
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from gateway.errors import BadRequest, TooManyRequests
from gateway.faults import checkpoint_for
from gateway.payment_services import open_payments, payment_sweep
from gateway.pricing import ModelPrice, PriceBook
from gateway.schemas import CreateGeneration
from gateway.settings import Settings
from gateway.views import task_view
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
from payments import Network
from payments.chain import Chain
from payments.keyed_lock import KeyedLock
from payments.ledger import PaymentState, SqliteLedger
from payments.processor import PaymentProcessor

__all__ = ["Services", "open_services"]

log = logging.getLogger("x402.gateway")

LOCAL_MODEL_BACKEND = "local"
REFUND_SWEEP_SECONDS = 7 * 24 * 3600  # failed tasks this recent get their refund re-checked


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
    webhook_client: httpx.AsyncClient
    webhook_key: bytes
    policy: AddressPolicy
    upstream_enabled: bool
    # One decision at a time about a payment's work (its task, or its refund): a request, its
    # replays and the payment sweep serialise here.
    payment_work: KeyedLock = field(default_factory=KeyedLock)
    # Payments of failed tasks whose refund could not be sent yet: the payment sweep retries.
    refunds_owed: set[str] = field(default_factory=set)
    # Unfinished tasks per payer in this process (a soft limit; recovered tasks are not counted).
    active: Counter[str] = field(default_factory=Counter)
    task_payer: dict[str, str] = field(default_factory=dict)

    def admit(self, payer: str) -> None:
        limit = self.settings.max_active_tasks_per_payer
        if limit and self.active[payer] >= limit:
            raise TooManyRequests(
                f"this payer already has {limit} unfinished tasks; wait for one to finish",
                retry_after=5,
            )

    def task_started(self, task_id: str, payer: str) -> None:
        if task_id not in self.task_payer:
            self.task_payer[task_id] = payer
            self.active[payer] += 1

    def task_finished(self, task_id: str) -> None:
        payer = self.task_payer.pop(task_id, None)
        if payer is not None:
            self.active[payer] -= 1
            if self.active[payer] <= 0:
                del self.active[payer]

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


@asynccontextmanager
async def open_services(
    settings: Settings,
    prices: PriceBook,
    *,
    settler_key: str | None,
    pay_to: str,
    clock: Callable[[], float],
) -> AsyncIterator[Services]:
    settings.media_dir.mkdir(parents=True, exist_ok=True)
    policy = AddressPolicy(
        allow_private=settings.allow_private_urls, allowed_endpoints=settings.url_endpoints()
    )

    async with AsyncExitStack() as stack:
        money = await stack.enter_async_context(
            open_payments(settings, settler_key=settler_key, pay_to=pay_to, clock=clock)
        )
        processor = money.processor
        checkpoint = checkpoint_for(settings)
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
            checkpoint=checkpoint,
        )
        images = ImageFetcher(policy=policy)
        stack.push_async_callback(images.aclose)
        webhook_client = guarded_client(10.0)
        stack.push_async_callback(webhook_client.aclose)

        services = Services(
            settings=settings,
            prices=prices,
            network=money.network,
            pay_to=pay_to,
            chain=money.chain,
            processor=processor,
            ledger=money.ledger,
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

        # Reconciled before serving (open_payments): money first, then the work it paid for.
        log.info("reconciled payments: %s", money.reconciled)
        await _adopt_or_refund(services, money.reconciled.needs_task)
        await _refund_failed_tasks(services, since=clock() - REFUND_SWEEP_SECONDS)
        await workers.start(recover=True)
        stack.push_async_callback(workers.stop)
        pruner = asyncio.create_task(_prune_media(media, settings.media_retention_hours * 3600))
        stack.callback(pruner.cancel)
        await stack.enter_async_context(payment_sweep(money, lambda ids: _sweep(services, ids)))
        yield services


async def _adopt_or_refund(services: Services, payment_ids: list[str]) -> None:
    """Settled payments without a linked task (a crash between settle and accept, or a payer
    who never came back): link the task if it was created (task id = payment id), else give
    the money back. Each under the payment's lock, from its current row: a replay may have
    created the task meanwhile."""
    for payment_id in payment_ids:
        try:
            async with services.payment_work.hold(payment_id):
                row = await services.ledger.get(payment_id)
                if row.state is not PaymentState.SETTLED or row.task_id is not None:
                    continue
                task = await services.tasks.get(payment_id)
                if task is not None:
                    await services.processor.link_task(payment_id, task.id)
                else:
                    await services.processor.refund(payment_id)
        except Exception:
            log.exception("could not resolve settled payment %s; retried later", payment_id)


async def _sweep(services: Services, payment_ids: list[str]) -> None:
    """The payment sweep's part here: settled payments without a task, then the refunds of
    failed tasks that could not be sent when the task failed."""
    await _adopt_or_refund(services, payment_ids)
    for payment_id in sorted(services.refunds_owed):
        try:
            await services.processor.refund(payment_id)
        except Exception as exc:
            log.warning(
                "refund of payment %s still cannot be sent (%s); retried later", payment_id, exc
            )
        else:
            services.refunds_owed.discard(payment_id)


async def _refund_failed_tasks(services: Services, *, since: float) -> None:
    """A task can fail and the process die before its refund was sent: find those and refund
    (idempotent: a payment already refunded is left as it is)."""
    for task in await services.tasks.list_failed_since(since):
        if task.payment_ref is None:
            continue
        try:
            record = await services.ledger.get(task.payment_ref)
            if record.state is PaymentState.SETTLED:
                await services.processor.refund(task.payment_ref)
        except Exception:
            log.exception("refund sweep: payment %s left for the next start", task.payment_ref)


async def _on_task_done(services: Services, task: Task) -> None:
    services.task_finished(task.id)
    if task.state is TaskState.FAILED and task.payment_ref is not None:
        try:
            await services.processor.refund(task.payment_ref)
        except Exception:
            # The payment sweep retries (and a restart); the status shows the refund pending.
            services.refunds_owed.add(task.payment_ref)
            log.exception(
                "refund of payment %s for failed task %s failed", task.payment_ref, task.id
            )
    if task.webhook_url:
        sender = WebhookSender(
            services.webhook_secret(task.id),
            policy=services.policy,
            client=services.webhook_client,
        )
        view = await task_view(services, task)
        result = await sender.deliver(
            task.webhook_url, event_type_for(task), view, message_id=f"msg_{task.id}"
        )
        if not result.delivered:
            log.info("webhook for task %s not delivered: %s", task.id, result.error)


async def _prune_media(media: MediaStore, retention_s: int) -> None:
    """Delete rendered media past its retention, checking a few times per retention period."""
    interval = max(60.0, min(3600.0, retention_s / 4))
    while True:
        try:
            removed = await media.prune(retention_s)
            if removed:
                log.info("pruned media of %d tasks past retention", len(removed))
        except OSError as exc:
            log.warning("media prune failed: %s", exc)
        await asyncio.sleep(interval)


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
