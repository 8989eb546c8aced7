"""The one place that turns failures into HTTP responses.

    HTTPProblem                 a 4xx/5xx the gateway means to send, with a machine reason
      BadRequest (400)          invalid body, unknown model, unsupported option: before payment
      NotPriced (404)           proxy mode: a route the routes file does not sell (refused)
      MethodNotPriced (405)     proxy mode: the path is sold, under another method
      PaymentAlreadyUsed (409)  proxy mode: one payment buys one request; this one was served
      PaymentRefunded (409)     a replayed authorization whose money was already refunded
      PayloadTooLarge (413)     body or header above its bound
      TooManyRequests (429)     a rate limit on the 402 path; Retry-After
      UpstreamUnreachable (502) proxy mode: the upstream could not be reached (paid: refunded)
      ServiceUnavailable (503)  chain or database unreachable before money moved; Retry-After
      UpstreamTimeout (504)     proxy mode: the upstream did not answer in time (paid: refunded)

Payment faults are answered by the middleware with a 402 challenge that carries the x402 reason
string, so an agent always learns why and never pays blindly twice.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from payments import InfrastructureError

__all__ = [
    "BadRequest",
    "HTTPProblem",
    "MethodNotPriced",
    "NotPriced",
    "PayloadTooLarge",
    "PaymentAlreadyUsed",
    "PaymentRefunded",
    "ServiceUnavailable",
    "TooManyRequests",
    "UpstreamTimeout",
    "UpstreamUnreachable",
    "exception_handlers",
    "problem_response",
]

log = logging.getLogger("x402.gateway")

JSON_HEADERS = {"cache-control": "no-store"}


class HTTPProblem(Exception):
    status = 500
    reason = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        errors: Sequence[Mapping[str, str]] = (),
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason
        self.errors = list(errors)
        self.headers = dict(headers or {})


class BadRequest(HTTPProblem):
    status = 400
    reason = "invalid_request"


class NotPriced(HTTPProblem):
    status = 404
    reason = "route_not_priced"


class MethodNotPriced(HTTPProblem):
    status = 405
    reason = "method_not_priced"


class PaymentAlreadyUsed(HTTPProblem):
    status = 409
    reason = "payment_already_used"


class PaymentRefunded(HTTPProblem):
    status = 409
    reason = "payment_refunded"


class PayloadTooLarge(HTTPProblem):
    status = 413
    reason = "payload_too_large"


class TooManyRequests(HTTPProblem):
    status = 429
    reason = "rate_limited"

    def __init__(self, message: str, *, retry_after: int) -> None:
        super().__init__(message, headers={"retry-after": str(retry_after)})


class UpstreamUnreachable(HTTPProblem):
    status = 502
    reason = "upstream_unreachable"


class UpstreamTimeout(HTTPProblem):
    status = 504
    reason = "upstream_timeout"


class ServiceUnavailable(HTTPProblem):
    status = 503
    reason = "service_unavailable"

    def __init__(self, message: str, *, retry_after: int = 2, reason: str | None = None) -> None:
        super().__init__(message, reason=reason, headers={"retry-after": str(retry_after)})


def problem_response(problem: HTTPProblem) -> JSONResponse:
    body: dict[str, Any] = {"error": problem.reason, "message": problem.message}
    if problem.errors:
        body["errors"] = problem.errors
    return JSONResponse(
        body, status_code=problem.status, headers={**JSON_HEADERS, **problem.headers}
    )


Handler = Callable[[Request, Exception], Awaitable[Response]]


def exception_handlers(
    unavailable: str = "storage or chain unavailable; retry later",
) -> dict[type[Exception], Handler]:
    """Starlette's ``exception_handlers`` for every face of the product: an ``HTTPProblem`` as
    it means, an infrastructure fault that escaped a route as a 503 (never a 500)."""

    async def on_problem(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPProblem)
        return problem_response(exc)

    async def on_infrastructure(request: Request, exc: Exception) -> Response:
        log.warning("%s unavailable: %s", request.url.path, type(exc).__name__)
        return problem_response(ServiceUnavailable(unavailable))

    return {HTTPProblem: on_problem, InfrastructureError: on_infrastructure}
