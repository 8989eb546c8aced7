"""Signed webhook deliveries per the Standard Webhooks spec (signing by PyPI `standardwebhooks`).

One delivery = one `webhook-id`, kept across retries so receivers can deduplicate; each attempt is
signed afresh with its own `webhook-timestamp` (receivers reject stale timestamps). Attempts use
the same address rules as image fetches, re-checked per attempt, and never follow redirects.
Other non-2xx answers and transport errors are retried with exponential backoff, a bounded
number of times; a refused address and a redirect (3xx) are final.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
from standardwebhooks import Webhook

from generation.errors import FetchError, UnsafeAddress
from generation.models import Clock, Task, TaskState
from generation.netguard import (
    AddressPolicy,
    Target,
    guarded_client,
    resolve_target,
    send_pinned,
)

__all__ = [
    "EVENT_COMPLETED",
    "EVENT_FAILED",
    "DeliveryResult",
    "WebhookSender",
    "WebhookSettings",
    "event_type_for",
    "generate_secret",
]

log = logging.getLogger(__name__)

EVENT_COMPLETED = "generation.completed"
EVENT_FAILED = "generation.failed"


def generate_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode("ascii")


def event_type_for(task: Task) -> str:
    if task.state is TaskState.COMPLETED:
        return EVENT_COMPLETED
    if task.state is TaskState.FAILED:
        return EVENT_FAILED
    raise ValueError(f"task {task.id} is {task.state}; webhooks are sent for terminal tasks only")


@dataclass(frozen=True)
class WebhookSettings:
    max_attempts: int = 5
    initial_backoff: float = 1.0
    max_backoff: float = 60.0
    timeout: float = 10.0

    def backoff(self, attempt: int) -> float:
        """Delay after failed attempt number `attempt` (1-based)."""
        return float(min(self.max_backoff, self.initial_backoff * 2 ** (attempt - 1)))


@dataclass(frozen=True)
class DeliveryResult:
    delivered: bool
    attempts: int
    status_code: int | None
    error: str | None


class WebhookSender:
    def __init__(
        self,
        secret: str,
        *,
        policy: AddressPolicy | None = None,
        settings: WebhookSettings | None = None,
        client: httpx.AsyncClient | None = None,
        clock: Clock = time.time,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._signer = Webhook(secret)
        self._policy = policy or AddressPolicy()
        self._settings = settings or WebhookSettings()
        self._own_client = client is None
        self._client = client or guarded_client(self._settings.timeout)
        self._clock = clock
        self._sleep = sleep

    async def aclose(self) -> None:
        if self._own_client:
            await self._client.aclose()

    async def check_url(self, url: str) -> None:
        """Validate a webhook URL when a task is created (it is checked again on every attempt)."""
        await resolve_target(url, self._policy)

    async def deliver(
        self, url: str, event_type: str, data: Mapping[str, Any], *, message_id: str
    ) -> DeliveryResult:
        body = json.dumps(
            {
                "type": event_type,
                "timestamp": datetime.fromtimestamp(self._clock(), UTC).isoformat(),
                "data": data,
            },
            separators=(",", ":"),
        )
        status: int | None = None
        error: str | None = None
        attempts = self._settings.max_attempts
        for attempt in range(1, attempts + 1):
            try:
                target = await resolve_target(url, self._policy)
            except UnsafeAddress as exc:
                return DeliveryResult(False, attempt, None, exc.message)
            except FetchError as exc:
                status, error = None, exc.message
            else:
                status, error = await self._attempt(target, message_id, body)
                if error is None:
                    return DeliveryResult(True, attempt, status, None)
                if status is not None and 300 <= status < 400:
                    # Redirects are never followed (they could lead anywhere), so resending
                    # cannot succeed: final, like a refused address.
                    return DeliveryResult(False, attempt, status, error)
            log.info("webhook %s attempt %d failed: %s", message_id, attempt, error)
            if attempt < attempts:
                await self._sleep(self._settings.backoff(attempt))
        return DeliveryResult(False, attempts, status, error)

    async def _attempt(
        self, target: Target, message_id: str, body: str
    ) -> tuple[int | None, str | None]:
        sent_at = int(self._clock())
        signature = self._signer.sign(message_id, datetime.fromtimestamp(sent_at, UTC), body)
        headers = {
            "content-type": "application/json",
            "webhook-id": message_id,
            "webhook-timestamp": str(sent_at),
            "webhook-signature": signature,
        }
        try:
            # Streamed and closed unread: a receiver's answer body is never worth downloading.
            response = await send_pinned(
                self._client,
                "POST",
                target,
                headers=headers,
                content=body.encode("utf-8"),
                stream=True,
            )
            await response.aclose()
        except httpx.HTTPError as exc:
            return None, f"transport error: {type(exc).__name__}"
        if 200 <= response.status_code < 300:
            return response.status_code, None
        return response.status_code, f"receiver answered {response.status_code}"
