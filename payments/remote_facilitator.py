"""A client of any x402 facilitator (``POST /verify``, ``POST /settle``, ``GET /supported``).

Remote facilitator mode lets the gateway run without a hot wallet: the facilitator holds the
key that sends ``transferWithAuthorization``; we keep the ledger, the offline checks and the
final word from the chain.

Request body (both protocol versions, the payment's own)::

    {"x402Version": 1|2, "paymentPayload": {...}, "paymentRequirements": {...}}

v2: ``paymentPayload = {x402Version, resource, accepted, payload}`` and the requirements are a
v2 ``accepts[]`` entry; v1: ``paymentPayload = {x402Version, scheme, network, payload}`` and a
v1 ``accepts[]`` entry. Answers: ``{isValid, invalidReason?, invalidMessage?, payer?}`` and
``{success, errorReason?, errorMessage?, transaction, network, payer?}``.

Retries (with exponential backoff, ``Retry-After`` honoured up to a cap) only where repeating
is safe or necessary: transport errors, 5xx and 429. Outcomes are typed so the caller can tell
what may have happened to the money:

- ``verify`` -> ``Verdict`` (valid or invalid with the facilitator's reason), or raises
  ``FacilitatorUnavailable`` (an ``InfrastructureError``): nothing moves on a verify.
- ``settle`` -> ``Settlement(transaction, payer)``, ``Refusal(reason)`` or
  ``Uncertain(maybe_reached)``. ``maybe_reached=False`` means no attempt can have been acted on
  (connection refused, 429, an HTTP-level rejection such as 401/404); ``True`` means one may
  have been (a timeout or a cut answer after the request went out, a 5xx). ``Refusal`` carries
  ``after_uncertain`` when an earlier attempt of the same call may have been acted on: then
  the refusal may just be "already settled by that attempt" and the chain must decide.

Never logs the auth header, signatures or payloads.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final, Literal

import httpx
from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic.alias_generators import to_camel

from payments import reasons
from payments.errors import InfrastructureError
from payments.verify import Payment
from payments.wire import exact_evm_payload

__all__ = [
    "FacilitatorUnavailable",
    "Refusal",
    "RemoteFacilitator",
    "SettleOutcome",
    "Settlement",
    "SupportedKind",
    "Uncertain",
    "Verdict",
    "parse_auth_header",
    "request_body",
]

log = logging.getLogger(__name__)

_HEADER_NAME: Final = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_MAX_RETRY_AFTER_S: Final = 5.0


class FacilitatorUnavailable(InfrastructureError):
    """The facilitator could not be asked (down, timing out, refusing our credentials)."""


@dataclass(frozen=True, slots=True)
class Verdict:
    is_valid: bool
    reason: str | None = None
    message: str | None = None
    payer: str | None = None


@dataclass(frozen=True, slots=True)
class Settlement:
    """The facilitator says it settled: ``transaction`` moved the money (check it on chain)."""

    transaction: str
    payer: str | None
    network: str


@dataclass(frozen=True, slots=True)
class Refusal:
    """The facilitator answered and did not settle."""

    reason: str
    message: str
    after_uncertain: bool = False


@dataclass(frozen=True, slots=True)
class Uncertain:
    """No answer. ``maybe_reached``: an attempt may have been acted on (money may move)."""

    detail: str
    maybe_reached: bool


SettleOutcome = Settlement | Refusal | Uncertain


@dataclass(frozen=True, slots=True)
class SupportedKind:
    x402_version: int
    scheme: str
    network: str


class _Answer(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")


class _VerifyAnswer(_Answer):
    is_valid: bool
    invalid_reason: str | None = None
    invalid_message: str | None = None
    payer: str | None = None


class _SettleAnswer(_Answer):
    success: bool
    error_reason: str | None = None
    error_message: str | None = None
    transaction: str = ""
    network: str = ""
    payer: str | None = None


class _KindAnswer(_Answer):
    x402_version: int
    scheme: str
    network: str


class _SupportedAnswer(_Answer):
    kinds: list[_KindAnswer]


def parse_auth_header(text: str) -> tuple[str, str]:
    """``"Name: value"`` -> ``("Name", "value")``; ValueError (without the value) otherwise."""
    name, sep, value = text.partition(":")
    name, value = name.strip(), value.strip()
    if not sep or _HEADER_NAME.fullmatch(name) is None or not value:
        raise ValueError('the facilitator auth header must look like "Name: value"')
    if any(ch in value for ch in "\r\n\0"):
        raise ValueError("the facilitator auth header value holds a control character")
    return name, value


def request_body(payment: Payment) -> dict[str, Any]:
    """The standard /verify and /settle body for ``payment``, in its own protocol version."""
    req = payment.requirement
    payload = exact_evm_payload(payment.authorization, payment.signature)
    if payment.version == 2:
        requirements = req.v2_dict()
        payment_payload: dict[str, Any] = {
            "x402Version": 2,
            "resource": {
                "url": req.resource_url,
                "description": req.description,
                "mimeType": req.mime_type,
            },
            "accepted": requirements,
            "payload": payload,
        }
    else:
        requirements = req.v1_dict()
        payment_payload = {
            "x402Version": 1,
            "scheme": payment.scheme,
            "network": payment.network,
            "payload": payload,
        }
    return {
        "x402Version": payment.version,
        "paymentPayload": payment_payload,
        "paymentRequirements": requirements,
    }


@dataclass(slots=True)
class _Tried:
    """What a retried call ended with: a response to read, or nothing."""

    response: httpx.Response | None
    maybe_reached: bool  # some attempt may have been acted on by the facilitator
    detail: str


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after", "")
    return min(float(value), _MAX_RETRY_AFTER_S) if value.isdigit() else None


def _json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


class RemoteFacilitator:
    """One facilitator at ``url``. Owns its ``httpx.AsyncClient`` (close with ``aclose``)
    unless one is passed in."""

    def __init__(
        self,
        url: str,
        *,
        auth_header: str | None = None,
        timeout_s: float = 30.0,
        retries: int = 3,
        backoff_s: float = 0.25,
        max_backoff_s: float = 2.0,
        client: httpx.AsyncClient | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if retries < 0:
            raise ValueError("retries must be >= 0")
        self.url = url.rstrip("/")
        self._headers = {"Accept": "application/json"}
        if auth_header is not None:
            name, value = parse_auth_header(auth_header)
            self._headers[name] = value
        self._retries = retries
        self._backoff_s = backoff_s
        self._max_backoff_s = max_backoff_s
        self._sleep = sleep
        self._owns_client = client is None
        self._client = client or httpx.AsyncClient(
            timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 5.0)),
            follow_redirects=True,
        )

    def __repr__(self) -> str:  # never show the auth header
        return f"RemoteFacilitator(url={self.url!r})"

    async def aclose(self) -> None:
        if self._owns_client:
            await self._client.aclose()

    # -- transport -------------------------------------------------------------------------------

    async def _call(
        self,
        method: Literal["GET", "POST"],
        path: str,
        body: dict[str, Any] | None = None,
        *,
        retries: int | None = None,
        timeout_s: float | None = None,
    ) -> _Tried:
        maybe_reached = False
        detail = ""
        delay = self._backoff_s
        attempts = (self._retries if retries is None else retries) + 1
        timeout: Any = httpx.USE_CLIENT_DEFAULT if timeout_s is None else timeout_s
        for attempt in range(attempts):
            if attempt:
                await self._sleep(delay)
                delay = min(delay * 2, self._max_backoff_s)
            try:
                response = await self._client.request(
                    method, self.url + path, json=body, headers=self._headers, timeout=timeout
                )
            except (
                httpx.ConnectError,
                httpx.ConnectTimeout,
                httpx.PoolTimeout,
                httpx.UnsupportedProtocol,
            ) as exc:
                detail = f"{path}: cannot connect ({type(exc).__name__})"
            except httpx.TransportError as exc:
                # the request (or part of it) went out: the facilitator may be acting on it
                maybe_reached = True
                detail = f"{path}: no answer ({type(exc).__name__})"
            else:
                status = response.status_code
                if status != 429 and status < 500:
                    return _Tried(response, maybe_reached, "")
                maybe_reached = maybe_reached or status != 429
                detail = f"{path}: HTTP {status}"
                wait = _retry_after(response)
                if wait is not None:
                    delay = max(delay, wait)
            log.warning(
                "facilitator %s attempt %d/%d failed: %s",
                self.url,
                attempt + 1,
                attempts,
                detail,
            )
        return _Tried(None, maybe_reached, detail)

    # -- API -------------------------------------------------------------------------------------

    async def supported(
        self, *, retries: int | None = None, timeout_s: float | None = None
    ) -> list[SupportedKind]:
        """The kinds the facilitator settles (``retries``/``timeout_s`` override the defaults,
        e.g. for a quick start-up probe)."""
        tried = await self._call("GET", "/supported", retries=retries, timeout_s=timeout_s)
        response = tried.response
        if response is None or not response.is_success:
            status = response.status_code if response is not None else None
            raise FacilitatorUnavailable(f"facilitator /supported failed: {tried.detail or status}")
        try:
            answer = _SupportedAnswer.model_validate(_json(response))
        except ValidationError:
            raise FacilitatorUnavailable("facilitator /supported answered no kinds") from None
        return [SupportedKind(k.x402_version, k.scheme, k.network) for k in answer.kinds]

    async def verify(self, payment: Payment) -> Verdict:
        tried = await self._call("POST", "/verify", request_body(payment))
        response = tried.response
        if response is None:
            raise FacilitatorUnavailable(f"facilitator unavailable: {tried.detail}")
        status = response.status_code
        try:
            answer = _VerifyAnswer.model_validate(_json(response))
        except ValidationError:
            log.error("facilitator /verify answered HTTP %d without a verdict", status)
            raise FacilitatorUnavailable(
                f"facilitator /verify answered HTTP {status} without a verdict"
            ) from None
        if answer.is_valid and not response.is_success:
            raise FacilitatorUnavailable(f"facilitator /verify answered HTTP {status}")
        return Verdict(
            is_valid=answer.is_valid,
            reason=None if answer.is_valid else answer.invalid_reason or reasons.INVALID_PAYLOAD,
            message=answer.invalid_message,
            payer=answer.payer,
        )

    async def settle(self, payment: Payment) -> SettleOutcome:
        tried = await self._call("POST", "/settle", request_body(payment))
        response = tried.response
        if response is None:
            return Uncertain(tried.detail, tried.maybe_reached)
        try:
            answer = _SettleAnswer.model_validate(_json(response))
        except ValidationError:
            if response.is_success:  # it took the call and said nothing we can read
                return Uncertain(f"/settle: unreadable answer (HTTP {response.status_code})", True)
            # rejected at the HTTP level (auth, route, body shape): nothing was settled
            log.error("facilitator /settle refused the call: HTTP %d", response.status_code)
            return Uncertain(f"/settle: HTTP {response.status_code}", tried.maybe_reached)
        if answer.success:
            if not response.is_success:
                return Uncertain(f"/settle: success with HTTP {response.status_code}", True)
            return Settlement(answer.transaction, answer.payer, answer.network)
        return Refusal(
            reason=answer.error_reason or reasons.UNEXPECTED_SETTLE_ERROR,
            message=answer.error_message or "the facilitator did not settle the payment",
            after_uncertain=tried.maybe_reached,
        )
