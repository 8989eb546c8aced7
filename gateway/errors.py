"""The one place that turns failures into HTTP responses.

    HTTPProblem                 a 4xx/5xx the gateway means to send, with a machine reason
      BadRequest (400)          invalid body, unknown model, unsupported option: before payment
      PaymentRefunded (409)     a replayed authorization whose money was already refunded
      PayloadTooLarge (413)     body or header above its bound
      TooManyRequests (429)     a rate limit on the 402 path; Retry-After
      ServiceUnavailable (503)  chain or database unreachable before money moved; Retry-After

Payment faults are answered by the middleware with a 402 challenge that carries the x402 reason
string, so an agent always learns why and never pays blindly twice.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from starlette.responses import JSONResponse

__all__ = [
    "BadRequest",
    "HTTPProblem",
    "PayloadTooLarge",
    "PaymentRefunded",
    "ServiceUnavailable",
    "TooManyRequests",
    "problem_response",
]

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
