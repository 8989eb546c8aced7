"""Route handlers of the generation API. Paid routes run only after `PaymentMiddleware` settled."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from gateway.errors import BadRequest, PaymentRefunded, ServiceUnavailable, problem_response
from gateway.middleware import PAID_STATE_KEY, PaidRequest
from gateway.openapi import openapi_document
from gateway.quoting import GenerationQuote
from gateway.services import Services
from gateway.views import STATUS_CODES, task_view
from generation import FetchError, GenerationRequest, Task, TaskExists, TaskNotFound
from payments.ledger import PaymentState
from payments.processor import Settled

__all__ = ["create_generation", "healthz", "openapi", "task_events", "task_status"]

log = logging.getLogger("x402.gateway")

SSE_HEARTBEAT_SECONDS = 15.0
NO_STORE = {"cache-control": "no-store"}


def _services(request: Request) -> Services:
    services: Services = request.state.services
    return services


async def create_generation(request: Request) -> Response:
    services = _services(request)
    paid: PaidRequest = request.scope["state"][PAID_STATE_KEY]
    settled = paid.settled
    quote: GenerationQuote = paid.quote.request
    body = quote.body
    # One task per payment: the task id is the payment id (the store refuses a second one),
    # and concurrent replays of one authorization (and the payment sweep) serialise here.
    async with services.payment_work.hold(settled.payment_id):
        task = await _task_for_payment(services, settled, quote)
    content: dict[str, Any] = {"taskId": task.id}
    if body.webhook:
        content["webhookSecret"] = services.webhook_secret(task.id)
    return JSONResponse(
        content,
        status_code=202,
        headers={**NO_STORE, "location": f"/generation/{task.id}/status"},
    )


async def _task_for_payment(services: Services, settled: Settled, quote: GenerationQuote) -> Task:
    """The payment's task: the existing one (a replay), else a new one, linked and queued."""
    body = quote.body
    task = await services.tasks.get(settled.payment_id)
    if task is None and settled.replay:
        # A replay whose money may have gone back since (refunded after a crash, or by the
        # sweep after the processor read the row): the row as it is now, under the lock.
        row = await services.ledger.get(settled.payment_id)
        if row.state is not PaymentState.SETTLED:
            raise PaymentRefunded(
                "this authorization was settled and then refunded; sign a new payment"
            )
    if task is None:
        image = quote.image
        if image is None and body.templateData.image is not None:
            try:
                image = (await services.images.fetch(body.templateData.image)).data
            except FetchError as exc:
                # Paid, but the work cannot start: the money goes straight back.
                await services.processor.refund(settled.payment_id)
                raise BadRequest(
                    f"image input refused: {exc.message}; the payment was refunded",
                    reason="invalid_image",
                ) from exc
        try:
            task = await services.tasks.create(
                GenerationRequest(
                    prompt=body.prompt,
                    model=quote.model,
                    duration=body.templateData.duration,
                    image=image,
                    auto_enhance=body.templateData.autoEnhance,
                    template_data=body.templateData.model_dump(
                        exclude_none=True, exclude={"image"}
                    ),
                ),
                webhook_url=body.webhook,
                payment_ref=settled.payment_id,
                task_id=settled.payment_id,
            )
        except TaskExists:  # another replica or request created it first: the same answer
            existing = await services.tasks.get(settled.payment_id)
            assert existing is not None
            return existing
        await services.processor.link_task(settled.payment_id, task.id)
        services.task_started(task.id, settled.payer)
        services.workers.submit(task.id)
    return task


async def _get_task(services: Services, task_id: str) -> Task | None:
    if len(task_id) > 128:
        return None
    return await services.tasks.get(task_id)


def _not_found(task_id: str) -> JSONResponse:
    return JSONResponse(
        {"taskId": task_id[:128], "status": "not_found", "error": "task_not_found"},
        status_code=404,
        headers=NO_STORE,
    )


async def task_status(request: Request) -> Response:
    services = _services(request)
    task_id = request.path_params["task_id"]
    task = await _get_task(services, task_id)
    if task is None:
        return _not_found(task_id)
    headers = dict(NO_STORE)
    if not task.terminal:
        headers["retry-after"] = "1"
    return JSONResponse(
        await task_view(services, task), status_code=STATUS_CODES[task.state], headers=headers
    )


async def task_events(request: Request) -> Response:
    """Server-Sent Events: one `status` event per change of state, stage or progress."""
    services = _services(request)
    task_id = request.path_params["task_id"]
    task = await _get_task(services, task_id)
    if task is None:
        return _not_found(task_id)

    async def stream() -> AsyncIterator[bytes]:
        updates = services.workers.subscribe(task_id)
        async with contextlib.aclosing(updates):
            pending: asyncio.Future[Task] | None = None
            try:
                while True:
                    if pending is None:
                        pending = asyncio.ensure_future(anext(updates))
                    done, _ = await asyncio.wait({pending}, timeout=SSE_HEARTBEAT_SECONDS)
                    if not done:
                        yield b": keep-alive\n\n"
                        continue
                    try:
                        snapshot = pending.result()
                    except (StopAsyncIteration, TaskNotFound):
                        return
                    pending = None
                    view = await task_view(services, snapshot)
                    data = json.dumps(view, separators=(",", ":"))
                    yield f"event: status\nid: {snapshot.progress}\ndata: {data}\n\n".encode()
                    if snapshot.terminal:
                        return
            finally:
                if pending is not None and not pending.done():
                    pending.cancel()

    return StreamingResponse(
        stream(),
        media_type="text/event-stream",
        headers={**NO_STORE, "x-accel-buffering": "no"},
    )


async def healthz(request: Request) -> Response:
    services = _services(request)
    body: dict[str, Any] = {"status": "ok", "network": services.network.caip2}
    if request.query_params.get("deep"):
        try:
            await services.chain.chain_id()
        except Exception as exc:
            log.warning("health check: chain unreachable: %s", type(exc).__name__)
            return problem_response(
                ServiceUnavailable("chain unreachable", reason="chain_unreachable")
            )
    return JSONResponse(body, headers=NO_STORE)


async def openapi(request: Request) -> Response:
    services = _services(request)
    return JSONResponse(openapi_document(services.prices))
