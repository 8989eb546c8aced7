"""`PaymentMiddleware`: pure ASGI x402 paywall for priced routes.

For a priced route it reads the body once (bounded), has the route validate and quote it, and
then either answers `402` with the challenge in both protocol versions, or verifies, reserves and
settles the payment before passing the request on with the body replayed. The settlement header
is added to the response by wrapping `send`; the response body is never buffered.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.errors import (
    HTTPProblem,
    PayloadTooLarge,
    ServiceUnavailable,
    TooManyRequests,
    problem_response,
)
from gateway.ratelimit import TokenBuckets
from payments import (
    InfrastructureError,
    InvalidPayment,
    Payment,
    Requirement,
    SettlementFailed,
    build_payment_required,
    encode_b64_json,
    reasons,
)
from payments.processor import Settled

__all__ = ["PAID_STATE_KEY", "PaidRequest", "PaymentMiddleware", "PricedRoute", "Quote"]

log = logging.getLogger("x402.gateway")

PAID_STATE_KEY = "x402.paid"
V2_HEADER = "payment-signature"
V1_HEADER = "x-payment"


@dataclass(frozen=True)
class Quote:
    amount: int
    request: Any  # the validated body, handed to the route as is


@dataclass(frozen=True)
class PaidRequest:
    quote: Quote
    settled: Settled


class PricedRoute(Protocol):
    method: str
    path: str
    description: str
    mime_type: str

    async def quote(self, body: bytes) -> Quote:
        """Validate the body and price it; raise `BadRequest` for work that cannot be done."""
        ...

    def requirements(self, quote: Quote, resource_url: str) -> Sequence[Requirement]: ...


class PaymentService(Protocol):
    def decode(
        self,
        header_value: str,
        offered: Sequence[Requirement],
        *,
        version_hint: Literal[1, 2] | None = None,
    ) -> Payment: ...

    async def settle_payment(self, payment: Payment) -> Settled: ...

    async def refund(self, payment_id: str) -> Any: ...


ServiceLookup = Callable[[Scope], PaymentService]
UrlBuilder = Callable[[Scope], str]


class PaymentMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        routes: Sequence[PricedRoute],
        service: ServiceLookup,
        resource_url: UrlBuilder,
        max_body_bytes: int,
        max_header_bytes: int,
        on_unaccepted: Callable[[Scope, PaidRequest], Awaitable[None]] | None = None,
        challenge_limit: TokenBuckets | None = None,
        refusal_limit: TokenBuckets | None = None,
        admit: Callable[[Scope, Payment], None] | None = None,
    ) -> None:
        self.app = app
        self.routes: Mapping[tuple[str, str], PricedRoute] = {(r.method, r.path): r for r in routes}
        self.service = service
        self.resource_url = resource_url
        self.max_body_bytes = max_body_bytes
        self.max_header_bytes = max_header_bytes
        self.on_unaccepted = on_unaccepted
        self.challenge_limit = challenge_limit
        self.refusal_limit = refusal_limit
        self.admit = admit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = self.routes.get((scope["method"], scope["path"]))
        if route is None:
            await self.app(scope, receive, send)
            return
        try:
            await self._handle(route, scope, receive, send)
        except HTTPProblem as problem:
            await problem_response(problem)(scope, receive, send)

    async def _handle(self, route: PricedRoute, scope: Scope, receive: Receive, send: Send) -> None:
        headers = _RequestHeaders(scope)
        body = await self._read_body(headers, receive)
        if body is None:
            return  # the client went away
        quote = await route.quote(body)
        resource = self.resource_url(scope)
        offered = route.requirements(quote, resource)

        header_name, header_value = headers.payment()
        if header_value is None:
            if self.challenge_limit is not None:
                wait = self.challenge_limit.take(_client_ip(scope))
                if wait:
                    raise _rate_limited(wait, "too many unpaid requests from this address")
            await self._challenge(offered, "payment required", scope, receive, send)
            return
        if len(header_value) > self.max_header_bytes:
            await self._challenge(
                offered,
                reasons.INVALID_PAYLOAD,
                scope,
                receive,
                send,
                detail=f"payment header above {self.max_header_bytes} bytes",
            )
            return
        service = self.service(scope)
        version: Literal[1, 2] = 2 if header_name == V2_HEADER else 1
        refused_key = _client_ip(scope)
        try:
            payment = service.decode(header_value, offered, version_hint=version)
            refused_key = payment.payer
            if self.refusal_limit is not None:
                wait = self.refusal_limit.peek(refused_key)
                if wait:
                    raise _rate_limited(wait, "too many refused payments from this payer")
            if self.admit is not None:
                self.admit(scope, payment)  # may refuse (e.g. 429) before any money moves
            settled = await service.settle_payment(payment)
        except (InvalidPayment, SettlementFailed) as exc:
            if self.refusal_limit is not None:
                self.refusal_limit.take(refused_key)
            log.info("payment refused: %s (%s)", exc.reason, exc.detail)
            await self._challenge(offered, exc.reason, scope, receive, send, detail=exc.detail)
            return
        except InfrastructureError as exc:
            log.warning("payment infrastructure fault: %s: %s", type(exc).__name__, exc)
            raise ServiceUnavailable(
                "the payment could not be completed now; retry with the same payment header "
                "(an authorization is never charged twice)"
            ) from exc

        paid = PaidRequest(quote=quote, settled=settled)
        scope.setdefault("state", {})[PAID_STATE_KEY] = paid
        response_header = b"payment-response" if header_name == V2_HEADER else b"x-payment-response"
        settle_value = encode_b64_json(settled.settle_response()).encode("ascii")
        status_seen = 0

        async def send_with_receipt(message: Message) -> None:
            nonlocal status_seen
            if message["type"] == "http.response.start":
                status_seen = message["status"]
                message = dict(message)
                message["headers"] = [*message.get("headers", []), (response_header, settle_value)]
            await send(message)

        try:
            await self.app(scope, _replay(body, receive), send_with_receipt)
        finally:
            if (status_seen == 0 or status_seen >= 500) and self.on_unaccepted is not None:
                # Paid but not accepted: the hook refunds. Never keep money for no work.
                try:
                    await self.on_unaccepted(scope, paid)
                except (InfrastructureError, HTTPProblem) as exc:
                    # the payment stays settled with nothing delivered: start-up
                    # reconciliation refunds it (or logs it as owed without a refund key)
                    log.warning(
                        "refund of unaccepted payment %s failed: %s",
                        settled.payment_id,
                        exc,
                    )

    async def _read_body(self, headers: _RequestHeaders, receive: Receive) -> bytes | None:
        declared = headers.content_length
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise PayloadTooLarge(f"request body above {self.max_body_bytes} bytes")
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise PayloadTooLarge(f"request body above {self.max_body_bytes} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _challenge(
        self,
        offered: Sequence[Requirement],
        error: str,
        scope: Scope,
        receive: Receive,
        send: Send,
        *,
        detail: str | None = None,
    ) -> None:
        challenge = build_payment_required(offered, error)
        body = challenge.body
        if detail:
            body = _json_bytes({**challenge.body_json(), "detail": detail})
        # Raw ASGI messages with the header bytes encoded once per challenge: this is the
        # whole cost of an unpaid request beyond the quote, so no Response object per request.
        await send(
            {
                "type": "http.response.start",
                "status": 402,
                "headers": [
                    (b"content-length", str(len(body)).encode("latin-1")),
                    (b"content-type", b"application/json"),
                    (b"payment-required", _header_bytes(challenge.header)),
                    (b"cache-control", b"no-store"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def _client_ip(scope: Scope) -> str:
    client = scope.get("client")
    return str(client[0]) if client else "unknown"


def _rate_limited(wait: float, message: str) -> HTTPProblem:
    return TooManyRequests(message, retry_after=TokenBuckets.retry_after(wait))


class _RequestHeaders:
    """The three request headers the paywall reads, found in one pass over the raw list (the
    first occurrence wins, as with Starlette's `Headers.get`)."""

    __slots__ = ("content_length", "v1", "v2")

    def __init__(self, scope: Scope) -> None:
        self.content_length: str | None = None
        self.v2: str | None = None
        self.v1: str | None = None
        for name, value in scope["headers"]:
            if name == b"content-length":
                if self.content_length is None:
                    self.content_length = value.decode("latin-1")
            elif name == b"payment-signature":
                if self.v2 is None:
                    self.v2 = value.decode("latin-1")
            elif name == b"x-payment" and self.v1 is None:
                self.v1 = value.decode("latin-1")

    def payment(self) -> tuple[str, str | None]:
        if self.v2 is not None:
            return V2_HEADER, self.v2
        return V1_HEADER, self.v1


@functools.lru_cache(maxsize=1024)
def _header_bytes(value: str) -> bytes:
    return value.encode("latin-1")


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def _json_bytes(value: Mapping[str, Any]) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode("utf-8")
