"""Client side of the generation API, over plain HTTP: quote, create (paid), follow, download.

Used by `x402-gateway generate` and by agents. It only speaks HTTP to a gateway; paying is the
job of the httpx client handed in (`payments.client.Payer.async_client()`).

Following a task prefers the SSE stream (`GET /generation/{id}/events`) and falls back to
polling the status route at the pace the server asks for (`Retry-After`), so a proxy that
buffers or cuts event streams only makes it slower, never wrong.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import anyio
import httpx

from payments.client import PaymentChallenge, Receipt, parse_challenge, receipt_of

__all__ = [
    "CreatedTask",
    "GatewayError",
    "GenerationClient",
    "TaskUpdate",
    "build_body",
    "fetch_quote",
]

TERMINAL: Final = frozenset({"completed", "failed"})
MAX_DOWNLOAD_BYTES: Final = 2 * 1024**3
SSE_READ_TIMEOUT_S: Final = 45.0  # the gateway sends a keep-alive every 15 s


class GatewayError(Exception):
    """The gateway answered something other than what the step expects (status, reason)."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        self.status = status
        self.reason = reason
        self.message = message
        super().__init__(f"HTTP {status} {reason}: {message}")


@dataclass(frozen=True)
class TaskUpdate:
    """One view of a task, as the status route (and each SSE `status` event) shows it."""

    task_id: str
    status: str
    stage: str | None
    progress: int
    body: Mapping[str, Any]

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    @property
    def video_url(self) -> str | None:
        try:
            url = self.body["result"]["generation"]["video"]["url"]
        except (KeyError, TypeError):
            return None
        return url if isinstance(url, str) and url else None

    @property
    def error(self) -> str | None:
        err = self.body.get("error")
        if isinstance(err, Mapping):
            return f"{err.get('code', 'error')}: {err.get('message', '')}".rstrip(": ")
        return str(err) if err else None

    @property
    def refund(self) -> Mapping[str, Any] | None:
        refund = self.body.get("refund")
        return refund if isinstance(refund, Mapping) else None

    @classmethod
    def from_json(cls, data: Any) -> TaskUpdate:
        if not isinstance(data, dict) or not isinstance(data.get("taskId"), str):
            raise ValueError("not a task status object")
        progress = data.get("progress")
        stage = data.get("stage")
        return cls(
            task_id=data["taskId"],
            status=str(data.get("status")),
            stage=stage if isinstance(stage, str) else None,
            progress=progress
            if isinstance(progress, int) and not isinstance(progress, bool)
            else 0,
            body=data,
        )


@dataclass(frozen=True)
class CreatedTask:
    task_id: str
    receipt: Receipt | None
    status_url: str


def build_body(
    prompt: str,
    *,
    duration: int | None = None,
    model: str | None = None,
    image: str | None = None,
) -> dict[str, Any]:
    """The `POST /generation/create` body; options left out are the gateway's defaults."""
    template: dict[str, Any] = {}
    if duration is not None:
        template["duration"] = duration
    if model is not None:
        template["videoModel"] = model
    if image is not None:
        template["image"] = image
    body: dict[str, Any] = {"prompt": prompt}
    if template:
        body["templateData"] = template
    return body


def _problem(response: httpx.Response) -> GatewayError:
    reason, message = "http_error", response.reason_phrase
    with contextlib.suppress(ValueError):
        data = response.json()
        if isinstance(data, dict):
            reason = str(data.get("error") or reason)
            message = str(data.get("message") or data.get("detail") or message)
            errors = data.get("errors")
            if isinstance(errors, list) and errors:
                fields = "; ".join(
                    f"{e.get('field')}: {e.get('message')}" for e in errors if isinstance(e, dict)
                )
                message = f"{message} ({fields})"
    return GatewayError(response.status_code, reason, message)


async def fetch_quote(
    http: httpx.AsyncClient, base_url: str, body: Mapping[str, Any]
) -> PaymentChallenge:
    """Ask the price of a body without paying. ``http`` must be a plain (non-paying) client."""
    response = await http.post(_join(base_url, "/generation/create"), json=dict(body))
    if response.status_code != 402:
        raise _problem(response)
    return parse_challenge(response.headers, response.content)


def _join(base_url: str, path: str) -> str:
    return str(httpx.URL(base_url.rstrip("/") + "/").join(path.lstrip("/")))


class GenerationClient:
    """Create, follow and download generations on one gateway through ``http``."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        base_url: str,
        *,
        poll_min_s: float = 0.2,
        poll_max_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.http = http
        self.base_url = base_url.rstrip("/")
        self.poll_min_s = poll_min_s
        self.poll_max_s = poll_max_s
        self._clock = clock

    def url(self, path: str) -> str:
        return _join(self.base_url, path)

    async def create(self, body: Mapping[str, Any]) -> CreatedTask:
        """POST the body (the paying client answers the 402) and return the new task."""
        response = await self.http.post(self.url("/generation/create"), json=dict(body))
        if response.status_code != 202:
            raise _problem(response)
        data = response.json()
        task_id = data.get("taskId") if isinstance(data, dict) else None
        if not isinstance(task_id, str) or not task_id:
            raise GatewayError(response.status_code, "invalid_response", "no taskId in the answer")
        location = response.headers.get("location") or f"/generation/{task_id}/status"
        return CreatedTask(task_id, receipt_of(response), self.url(location))

    async def status(self, task_id: str) -> tuple[TaskUpdate, float | None]:
        """The current view and the server's Retry-After (seconds) when it gave one."""
        response = await self.http.get(self.url(f"/generation/{task_id}/status"))
        if response.status_code not in (200, 202, 500):
            raise _problem(response)
        try:
            update = TaskUpdate.from_json(response.json())
        except ValueError as exc:
            raise GatewayError(response.status_code, "invalid_response", str(exc)) from None
        retry = response.headers.get("retry-after", "")
        return update, float(retry) if retry.strip().isdigit() else None

    async def follow(
        self,
        task_id: str,
        *,
        on_update: Callable[[TaskUpdate], None] | None = None,
        timeout_s: float = 900.0,
        use_sse: bool = True,
    ) -> TaskUpdate:
        """Follow a task to `completed` or `failed` and return that last view.

        Raises TimeoutError after ``timeout_s``. Calls ``on_update`` once per change."""
        deadline = self._clock() + timeout_s
        last: list[tuple[str, str | None, int]] = []

        def seen(update: TaskUpdate) -> None:
            key = (update.status, update.stage, update.progress)
            if not last or last[-1] != key:
                last.append(key)
                if on_update is not None:
                    on_update(update)

        if use_sse:
            with anyio.move_on_after(max(0.0, deadline - self._clock())):
                final = await self._follow_sse(task_id, seen)
                if final is not None:
                    return final
        while True:
            left = deadline - self._clock()
            if left <= 0:
                raise TimeoutError(f"task {task_id} not finished after {timeout_s:.0f} s")
            update, retry_after = await self.status(task_id)
            seen(update)
            if update.terminal:
                return update
            pause = retry_after if retry_after is not None else self.poll_min_s
            await anyio.sleep(min(max(pause, self.poll_min_s), self.poll_max_s, left))

    async def _follow_sse(
        self, task_id: str, seen: Callable[[TaskUpdate], None]
    ) -> TaskUpdate | None:
        """The terminal view from the event stream, or None to fall back to polling."""
        timeout = httpx.Timeout(10.0, read=SSE_READ_TIMEOUT_S)
        try:
            async with self.http.stream(
                "GET",
                self.url(f"/generation/{task_id}/events"),
                headers={"accept": "text/event-stream"},
                timeout=timeout,
            ) as response:
                content_type = response.headers.get("content-type", "")
                # Anything but an event stream (no such route, a proxy page, 404 for a task the
                # status route will explain): fall back to polling.
                if response.status_code != 200 or not content_type.startswith("text/event-stream"):
                    return None
                event, data = "message", list[str]()
                async for line in response.aiter_lines():
                    if line == "":
                        if data and event == "status":
                            update = _update_from_event("\n".join(data))
                            if update is not None:
                                seen(update)
                                if update.terminal:
                                    return update
                        event, data = "message", []
                    elif line.startswith(":"):
                        continue
                    else:
                        name, _, value = line.partition(":")
                        value = value[1:] if value.startswith(" ") else value
                        if name == "event":
                            event = value
                        elif name == "data":
                            data.append(value)
        except httpx.TransportError:
            return None  # the stream broke: polling picks up from the current state
        return None

    async def download(self, url: str, out: Path, *, max_bytes: int = MAX_DOWNLOAD_BYTES) -> int:
        """Stream ``url`` (absolute, or relative to the gateway) to ``out``; returns its size.

        Written to a temporary file beside ``out`` and renamed, so ``out`` is never partial."""
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.part")
        size = 0
        try:
            async with self.http.stream("GET", self.url(url)) as response:
                if response.status_code != 200:
                    await response.aread()
                    raise _problem(response)
                async with await anyio.open_file(tmp, "wb") as fh:
                    async for chunk in response.aiter_bytes():
                        size += len(chunk)
                        if size > max_bytes:
                            raise GatewayError(200, "too_large", f"result above {max_bytes} bytes")
                        await fh.write(chunk)
            os.replace(tmp, out)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        return size


def _update_from_event(data: str) -> TaskUpdate | None:
    try:
        return TaskUpdate.from_json(json.loads(data))
    except ValueError:
        return None
