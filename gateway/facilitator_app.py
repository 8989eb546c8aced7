"""`create_facilitator_app(settings)`: our own x402 facilitator service over HTTP.

Other x402 resource servers (any language, any SDK) verify and settle through it instead of a
hosted facilitator, on our verifier, settler, nonce manager and ledger:

- ``POST /verify``, ``POST /settle``: body ``{x402Version, paymentPayload, paymentRequirements}``
  (v1 or v2). A payment fault is a 200 answer in the standard shape (``isValid: false`` /
  ``success: false`` with the x402 reason): the official clients treat any other status as a
  transport error. A body that is not a JSON object of that envelope is a 400 in the same
  shape; above the size bound a 413. Chain or database down: 503 with ``Retry-After``, nothing
  settled, the caller may retry the same body.
- ``GET /supported``: the kinds we settle (v2 by CAIP-2 id, v1 by name) and the settler address.
- ``GET /healthz`` (``?deep=1`` also asks the chain).

With ``settings.facilitator_token`` set, ``/verify`` and ``/settle`` require
``Authorization: Bearer <token>`` (401 otherwise); ``/supported`` and ``/healthz`` stay open
because resource servers read them at start-up, often without credentials. Payloads and
signatures are never logged: only reasons, payer, amount and tx hash.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, Final

from eth_account import Account
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.errors import (
    HTTPProblem,
    PayloadTooLarge,
    ServiceUnavailable,
    exception_handlers,
)
from gateway.payment_services import PaymentServices, open_payments
from gateway.settings import Settings
from payments import reasons
from payments.facilitator import HANDED_OVER, Facilitator, FacilitatorRequest
from payments.wire import MAX_JSON_DEPTH, json_nesting_exceeds

__all__ = ["MAX_FACILITATOR_BODY_BYTES", "create_facilitator_app"]

log = logging.getLogger("x402.facilitator")

# A verify/settle body is a payment plus one requirement: a few KiB even with a bazaar echo.
MAX_FACILITATOR_BODY_BYTES: Final = 64 * 1024
_NO_STORE: Final = {"cache-control": "no-store"}


class _Unauthorized(HTTPProblem):
    status = 401
    reason = "unauthorized"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"www-authenticate": 'Bearer realm="x402-facilitator"'})


class _MalformedBody(Exception):
    """The request is not a facilitator envelope at all (answered 400)."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


def create_facilitator_app(
    settings: Settings, *, clock: Callable[[], float] = time.time
) -> Starlette:
    settler_key = settings.load_settler_key()
    settler_address: str = Account.from_key(settler_key).address
    max_body = min(settings.max_body_bytes, MAX_FACILITATOR_BODY_BYTES)
    token = _token_bytes(settings)
    holder: dict[str, tuple[PaymentServices, Facilitator]] = {}

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if token is None and settings.mode != "dev":
            log.warning(
                "X402_FACILITATOR_TOKEN is not set: anyone who can reach this service can make "
                "it spend gas settling payments"
            )
        async with open_payments(
            settings, settler_key=settler_key, pay_to=settler_address, clock=clock
        ) as services:
            if services.reconciled.needs_task:
                # Settled before a crash: the resource server that asked owns the work (its
                # retry of /settle gets this outcome); handed over, so never looked at again.
                for payment_id in services.reconciled.needs_task:
                    await services.processor.link_task(payment_id, HANDED_OVER)
                log.info(
                    "reconciled %d settled payments (the resource servers deliver them)",
                    len(services.reconciled.needs_task),
                )
            facilitator = Facilitator(services.processor, services.network, settler_address)
            holder["live"] = (services, facilitator)
            log.info(
                "facilitator ready network=%s asset=%s settler=%s",
                services.network.caip2,
                services.network.usdc,
                settler_address,
            )
            try:
                yield
            finally:
                holder.clear()

    def live() -> tuple[PaymentServices, Facilitator]:
        try:
            return holder["live"]
        except KeyError:
            raise ServiceUnavailable("facilitator is not running") from None

    def authorize(request: Request) -> None:
        if token is None:
            return
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not value:
            raise _Unauthorized("this facilitator requires Authorization: Bearer <token>")
        if not hmac.compare_digest(value.strip().encode("utf-8"), token):
            raise _Unauthorized("bearer token refused")

    async def verify(request: Request) -> Response:
        authorize(request)
        _, facilitator = live()
        try:
            body = FacilitatorRequest.model_validate(await _read_json(request, max_body))
        except _MalformedBody as exc:
            return _bad_verify(exc.detail)
        except ValidationError as exc:
            return _bad_verify(_envelope_detail(exc))
        answer = await facilitator.verify(body)
        if not answer.is_valid:
            log.info("verify refused reason=%s payer=%s", answer.invalid_reason, answer.payer)
        return JSONResponse(answer.to_json(), headers=_NO_STORE)

    async def settle(request: Request) -> Response:
        authorize(request)
        services, facilitator = live()
        try:
            body = FacilitatorRequest.model_validate(await _read_json(request, max_body))
        except _MalformedBody as exc:
            return _bad_settle(exc.detail, services.network.caip2)
        except ValidationError as exc:
            return _bad_settle(_envelope_detail(exc), services.network.caip2)
        answer = await facilitator.settle(body)
        if answer.success:
            log.info(
                "settled payer=%s amount=%s tx=%s", answer.payer, answer.amount, answer.transaction
            )
        else:
            log.info("settle refused reason=%s payer=%s", answer.error_reason, answer.payer)
        return JSONResponse(answer.to_json(), headers=_NO_STORE)

    async def supported(request: Request) -> Response:
        _, facilitator = live()
        return JSONResponse(facilitator.supported().to_json(), headers=_NO_STORE)

    async def healthz(request: Request) -> Response:
        services, _ = live()
        if request.query_params.get("deep"):
            await services.chain.block_number()  # a live RPC call; InfrastructureError -> 503
        return JSONResponse(
            {"status": "ok", "network": services.network.caip2, "settler": settler_address},
            headers=_NO_STORE,
        )

    return Starlette(
        routes=[
            Route("/verify", verify, methods=["POST"]),
            Route("/settle", settle, methods=["POST"]),
            Route("/supported", supported, methods=["GET"]),
            Route("/healthz", healthz, methods=["GET"]),
        ],
        lifespan=lifespan,
        exception_handlers=exception_handlers("chain or ledger unavailable; retry later"),
    )


def _token_bytes(settings: Settings) -> bytes | None:
    if settings.facilitator_token is None:
        return None
    value = settings.facilitator_token.get_secret_value().strip()
    return value.encode("utf-8") if value else None


async def _read_json(request: Request, limit: int) -> Any:
    """The body parsed as JSON, bounded in size and depth; duplicate keys refused."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body above {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body above {limit} bytes")
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw:
        raise _MalformedBody("empty body; expected a JSON object")
    if json_nesting_exceeds(raw, MAX_JSON_DEPTH):
        raise _MalformedBody(f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        return json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)
    except UnicodeDecodeError:
        raise _MalformedBody("body is not UTF-8") from None
    except (ValueError, RecursionError):
        raise _MalformedBody("body is not valid JSON") from None


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise ValueError("duplicate key")  # two parsers could disagree on which one wins
    return obj


def _envelope_detail(exc: ValidationError) -> str:
    """Which envelope fields are wrong (names only: never the values, which carry signatures)."""
    where = sorted(
        {
            ".".join(str(part) for part in err["loc"]) or "body"
            for err in exc.errors(include_url=False, include_input=False)
        }
    )
    return (
        "body must be {x402Version: int, paymentPayload: object, paymentRequirements: object}; "
        f"wrong: {', '.join(where)}"
    )


def _bad_verify(detail: str) -> Response:
    body = {"isValid": False, "invalidReason": reasons.INVALID_PAYLOAD, "invalidMessage": detail}
    return JSONResponse(body, status_code=400, headers=_NO_STORE)


def _bad_settle(detail: str, network: str) -> Response:
    body = {
        "success": False,
        "errorReason": reasons.INVALID_PAYLOAD,
        "errorMessage": detail,
        "transaction": "",
        "network": network,
    }
    return JSONResponse(body, status_code=400, headers=_NO_STORE)
