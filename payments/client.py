"""The payer side of x402: pay any x402 server from httpx, inside a spend policy.

``Payer`` holds the key, the `SpendPolicy`, the running total and the receipts. Its transports
(`Payer.transport()` / `Payer.async_transport()`, or ready-made clients from `Payer.client()` /
`Payer.async_client()`) answer a ``402``: they choose an offer the policy accepts (v2
``PAYMENT-REQUIRED`` header preferred, v1 body as fallback), sign one EIP-3009 authorization and
send the request again with it.

Why a transport and not an ``httpx.Auth``: an auth flow never sees a transport error, and the one
thing a payer must do after a lost response is send the *same* signed authorization again (the
server answers a replay with the first outcome, or the token refuses the used nonce), never sign
a second one. The transport sees the error and retries with the same header.

Safety decisions:
- Every policy check runs before anything is signed: a refused offer raises `PaymentRefused`
  and no payment header ever leaves the client.
- The budget counts every *signed* authorization, settled or not, even one the server then
  refused (`PaymentRejected`): a signature is a spendable promise until its ``validBefore``, so
  it is committed the moment it exists.
- A signed payment whose outcome is unknown (connection lost, retries exhausted) stays pending
  for the same request (method, URL, body): asking again reuses it instead of paying twice.
- The EIP-712 chain id comes from our own `Network`, never from the server.
"""

from __future__ import annotations

import email.utils
import hashlib
import json
import logging
import math
import secrets
import threading
import time
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import anyio
import httpx
from eth_keys.datatypes import PrivateKey as _EthPrivateKey
from eth_utils.exceptions import ValidationError as _KeyValidationError
from pydantic import ValidationError

from .eip3009 import Authorization, TokenDomain, normalize_address, random_nonce, sign_authorization
from .errors import InvalidPayment, PaymentError
from .networks import BASE, Network
from .wire import (
    PaymentRequirementsV1,
    PaymentRequirementsV2,
    b64_json,
    decode_b64_json,
    decode_settle_response,
    exact_evm_payload,
    parse_uint256,
)

__all__ = [
    "RECEIPT_EXTENSION",
    "AsyncPayingTransport",
    "Offer",
    "Payer",
    "PayingTransport",
    "PaymentChallenge",
    "PaymentRefused",
    "PaymentRejected",
    "PaymentUnconfirmed",
    "Receipt",
    "SpendPolicy",
    "parse_challenge",
    "receipt_of",
]

log = logging.getLogger("x402.client")

RECEIPT_EXTENSION: Final = "x402_receipt"
V2_REQUIRED_HEADER: Final = "payment-required"
V2_PAYMENT_HEADER: Final = "PAYMENT-SIGNATURE"
V1_PAYMENT_HEADER: Final = "X-PAYMENT"
V2_RESPONSE_HEADER: Final = "payment-response"
V1_RESPONSE_HEADER: Final = "x-payment-response"
MAX_CHALLENGE_BODY: Final = 1024 * 1024
# validAfter a minute in the past: a server whose clock runs slightly behind ours still accepts.
VALID_AFTER_SKEW_S: Final = 60
# Do not resend an authorization that expires within this margin: the server could not settle it.
RESEND_MARGIN_S: Final = 6
_V2_FIELDS: Final = ("scheme", "network", "amount", "asset", "payTo", "maxTimeoutSeconds", "extra")
RETRY_STATUSES: Final = frozenset({429, 502, 503, 504})
MAX_RETRY_AFTER_S: Final = 5.0
SMALL_BODY: Final = 64 * 1024

# Refusal reasons (the client's own; the server's reasons are x402 strings).
UNSUPPORTED_SCHEME: Final = "unsupported_scheme"
NETWORK_NOT_ALLOWED: Final = "network_not_allowed"
ASSET_NOT_ALLOWED: Final = "asset_not_allowed"
PAY_TO_NOT_ALLOWED: Final = "pay_to_not_allowed"
AMOUNT_ABOVE_MAX: Final = "amount_above_max"
BUDGET_EXCEEDED: Final = "budget_exceeded"
DECLINED: Final = "declined_by_approver"
VERSION_NOT_ALLOWED: Final = "x402_version_not_allowed"
NO_OFFER: Final = "no_payment_offered"


# --------------------------------------------------------------------------- errors


class PaymentRefused(PaymentError):
    """The spend policy refused every offer; nothing was signed, nothing was sent."""

    def __init__(self, reason: str, detail: str, offer: Offer | None = None) -> None:
        self.reason = reason
        self.detail = detail
        self.offer = offer  # the offer that came closest (the cheapest of the preferred version)
        super().__init__(f"{reason}: {detail}")


class PaymentRejected(PaymentError):
    """The server answered our signed payment with another 402 (its x402 reason attached)."""

    def __init__(self, reason: str, detail: str, offer: Offer) -> None:
        self.reason = reason
        self.detail = detail
        self.offer = offer
        super().__init__(f"{reason}: {detail}" if detail and detail != reason else reason)


class PaymentUnconfirmed(PaymentError):
    """A signed payment was sent and no answer came back; it may or may not have settled.

    The authorization stays pending on the `Payer`: sending the same request again reuses it,
    so the server can answer with the first outcome and never charge twice."""

    def __init__(self, offer: Offer, nonce: bytes, valid_before: int, detail: str) -> None:
        self.offer = offer
        self.nonce = nonce
        self.valid_before = valid_before
        self.detail = detail
        super().__init__(
            f"payment of {offer.amount} to {offer.pay_to} unconfirmed "
            f"(nonce 0x{nonce.hex()}): {detail}"
        )


# --------------------------------------------------------------------------- values


@dataclass(frozen=True)
class Offer:
    """One payment requirement a server offered, with real types (amount int, checksummed
    addresses). ``raw`` is the entry exactly as received (echoed as ``accepted`` in v2)."""

    version: Literal[1, 2]
    scheme: str
    network: str  # as on the wire: "eip155:8453" (v2) or "base" (v1)
    amount: int
    asset: str
    pay_to: str
    max_timeout_seconds: int
    extra: Mapping[str, Any]
    resource: str
    description: str
    raw: Mapping[str, Any] = field(repr=False)


@dataclass(frozen=True)
class PaymentChallenge:
    """What a 402 response asked for, both protocol versions."""

    v2: tuple[Offer, ...]
    v1: tuple[Offer, ...]
    resource: Mapping[str, Any] | None  # v2 `resource` object, echoed in the payment
    extensions: Mapping[str, Any] | None  # v2 `extensions`, echoed in the payment
    error: str | None
    detail: str | None

    def offers(self, version: int) -> tuple[Offer, ...]:
        return self.v2 if version == 2 else self.v1 if version == 1 else ()


@dataclass(frozen=True)
class Receipt:
    """A settled payment as the server reported it (PAYMENT-RESPONSE / X-PAYMENT-RESPONSE)."""

    success: bool
    transaction: str | None  # None: the server sent no settlement header
    network: str
    payer: str
    amount: int
    asset: str
    pay_to: str
    resource: str
    version: int
    nonce: str  # 0x + 64 hex: the authorization nonce (authorizationState on chain)


@dataclass(frozen=True)
class SpendPolicy:
    """What this payer may pay. Every check runs before anything is signed.

    ``assets`` None means the canonical USDC of each allowed network. ``approve`` sees the chosen
    offer last (after every other check passed) and returns False to refuse it."""

    networks: tuple[Network, ...] = (BASE,)
    assets: frozenset[str] | None = None
    pay_to: frozenset[str] | None = None
    max_amount: int = 1_000_000  # atomic units per payment (1 USDC, like the official clients)
    budget: int | None = None  # atomic units over the payer's life
    approve: Callable[[Offer], bool] | None = None
    versions: tuple[int, ...] = (2, 1)  # in order of preference
    max_validity_seconds: int = 600

    def __post_init__(self) -> None:
        if self.max_amount < 0 or (self.budget is not None and self.budget < 0):
            raise ValueError("max_amount and budget must be >= 0")
        if not self.networks:
            raise ValueError("at least one network must be allowed")
        if not self.versions or any(v not in (1, 2) for v in self.versions):
            raise ValueError("versions must be a non-empty sequence of 1 and/or 2")
        if self.max_validity_seconds <= RESEND_MARGIN_S:
            raise ValueError(f"max_validity_seconds must be above {RESEND_MARGIN_S}")
        if self.assets is not None:
            object.__setattr__(self, "assets", frozenset(normalize_address(a) for a in self.assets))
        if self.pay_to is not None:
            object.__setattr__(self, "pay_to", frozenset(normalize_address(a) for a in self.pay_to))

    def network_of(self, offer: Offer) -> Network | None:
        for net in self.networks:
            if offer.network in (net.caip2, net.name):
                return net
        return None

    def check(self, offer: Offer, committed: int) -> tuple[str, str] | None:
        """(reason, detail) when the offer is refused, None when it is acceptable. Pure."""
        if offer.scheme != "exact":
            return UNSUPPORTED_SCHEME, f"scheme {offer.scheme!r} is not supported"
        net = self.network_of(offer)
        if net is None:
            return NETWORK_NOT_ALLOWED, f"network {offer.network!r} is not allowed"
        allowed_assets = self.assets if self.assets is not None else frozenset({net.usdc})
        if offer.asset not in allowed_assets:
            return ASSET_NOT_ALLOWED, f"asset {offer.asset} is not allowed on {offer.network}"
        if self.pay_to is not None and offer.pay_to not in self.pay_to:
            return PAY_TO_NOT_ALLOWED, f"recipient {offer.pay_to} is not on the allow-list"
        if offer.amount > self.max_amount:
            return (
                AMOUNT_ABOVE_MAX,
                f"amount {offer.amount} is above the per-payment maximum {self.max_amount}",
            )
        if self.budget is not None and committed + offer.amount > self.budget:
            left = max(0, self.budget - committed)
            return BUDGET_EXCEEDED, f"amount {offer.amount} is above the remaining budget {left}"
        return None


# --------------------------------------------------------------------------- parsing


def _header(headers: Mapping[str, str], name: str) -> str | None:
    if isinstance(headers, httpx.Headers):
        found: str | None = headers.get(name)
        return found
    for key, value in headers.items():
        if key.lower() == name:
            return value
    return None


def _offer_v2(entry: Any, resource: Mapping[str, Any] | None) -> Offer | None:
    if not isinstance(entry, dict):
        return None
    known = {k: entry[k] for k in _V2_FIELDS if k in entry}
    try:
        req = PaymentRequirementsV2.model_validate(known)
        return Offer(
            version=2,
            scheme=req.scheme,
            network=req.network,
            amount=parse_uint256(req.amount, "amount"),
            asset=normalize_address(req.asset),
            pay_to=normalize_address(req.pay_to),
            max_timeout_seconds=req.max_timeout_seconds,
            extra=dict(req.extra or {}),
            resource=str((resource or {}).get("url", "")),
            description=str((resource or {}).get("description") or ""),
            raw=dict(entry),
        )
    except (ValidationError, InvalidPayment, ValueError):
        return None  # an entry we cannot read (another scheme's shape): not an option for us


def _offer_v1(entry: Any) -> Offer | None:
    if not isinstance(entry, dict):
        return None
    try:
        req = PaymentRequirementsV1.model_validate(entry)
        return Offer(
            version=1,
            scheme=req.scheme,
            network=req.network,
            amount=parse_uint256(req.max_amount_required, "maxAmountRequired"),
            asset=normalize_address(req.asset),
            pay_to=normalize_address(req.pay_to),
            max_timeout_seconds=req.max_timeout_seconds,
            extra=dict(req.extra or {}),
            resource=req.resource,
            description=req.description,
            raw=dict(entry),
        )
    except (ValidationError, InvalidPayment, ValueError):
        return None


def parse_challenge(headers: Mapping[str, str], body: bytes) -> PaymentChallenge:
    """Read a 402 response: v2 offers from the PAYMENT-REQUIRED header, v1 offers from a JSON
    body with ``x402Version: 1``. Unreadable parts are skipped, never guessed."""
    v2: list[Offer] = []
    resource: Mapping[str, Any] | None = None
    extensions: Mapping[str, Any] | None = None
    error: str | None = None
    header = _header(headers, V2_REQUIRED_HEADER)
    if header:
        try:
            data = decode_b64_json(header, max_chars=64 * 1024)
        except InvalidPayment:
            data = None
        if isinstance(data, dict) and data.get("x402Version") == 2:
            raw_resource = data.get("resource")
            resource = dict(raw_resource) if isinstance(raw_resource, dict) else None
            raw_ext = data.get("extensions")
            extensions = dict(raw_ext) if isinstance(raw_ext, dict) and raw_ext else None
            error = data.get("error") if isinstance(data.get("error"), str) else None
            accepts = data.get("accepts")
            for entry in accepts if isinstance(accepts, list) else ():
                offer = _offer_v2(entry, resource)
                if offer is not None:
                    v2.append(offer)

    v1: list[Offer] = []
    detail: str | None = None
    if body and len(body) <= MAX_CHALLENGE_BODY:
        try:
            doc = json.loads(body)
        except (ValueError, RecursionError):
            doc = None
        if isinstance(doc, dict):
            if isinstance(doc.get("detail"), str):
                detail = doc["detail"]
            if error is None and isinstance(doc.get("error"), str):
                error = doc["error"]
            if doc.get("x402Version") == 1 and isinstance(doc.get("accepts"), list):
                for entry in doc["accepts"]:
                    offer = _offer_v1(entry)
                    if offer is not None:
                        v1.append(offer)
    return PaymentChallenge(tuple(v2), tuple(v1), resource, extensions, error, detail)


def receipt_of(response: httpx.Response) -> Receipt | None:
    """The receipt a paying transport attached to this response (None if nothing was paid)."""
    receipt = response.extensions.get(RECEIPT_EXTENSION)
    return receipt if isinstance(receipt, Receipt) else None


# --------------------------------------------------------------------------- the payer


@dataclass(frozen=True)
class _Signed:
    offer: Offer
    authorization: Authorization
    header_name: str
    header_value: str = field(repr=False)


# Actions the sans-I/O payment flow asks its driver (sync or async transport) to perform.
@dataclass(frozen=True)
class _Send:
    request: httpx.Request


@dataclass(frozen=True)
class _Read:
    response: httpx.Response


@dataclass(frozen=True)
class _Close:
    response: httpx.Response


@dataclass(frozen=True)
class _Sleep:
    seconds: float


_Action = _Send | _Read | _Close | _Sleep
_Flow = Generator[_Action, Any, httpx.Response]
_Key = tuple[str, str, bytes]


class Payer:
    """A wallet key with a spend policy. Safe to share between threads and tasks.

    ``retries`` is how many times one signed payment is resent after a lost response or a
    429/502/503/504 (always the same authorization)."""

    def __init__(
        self,
        private_key: str | bytes,
        policy: SpendPolicy | None = None,
        *,
        retries: int = 2,
        retry_backoff: float = 0.25,
        clock: Callable[[], float] = time.time,
        rng: Callable[[int], bytes] = secrets.token_bytes,
    ) -> None:
        try:
            key = _EthPrivateKey(_key_bytes(private_key))
        except _KeyValidationError:
            raise ValueError("not a valid secp256k1 private key") from None
        self._key = key.to_bytes()
        self.address: str = normalize_address(key.public_key.to_checksum_address())
        self.policy = policy or SpendPolicy()
        self.retries = max(0, retries)
        self.retry_backoff = retry_backoff
        self._clock = clock
        self._rng = rng
        self._lock = threading.Lock()
        self._committed = 0
        self._receipts: list[Receipt] = []
        self._pending: dict[_Key, _Signed] = {}

    def __repr__(self) -> str:
        return f"Payer(address={self.address!r}, committed={self._committed})"

    # -- state ---------------------------------------------------------------------------------

    @property
    def committed(self) -> int:
        """Atomic units signed away so far (settled, pending or refused by the server)."""
        with self._lock:
            return self._committed

    @property
    def remaining_budget(self) -> int | None:
        if self.policy.budget is None:
            return None
        with self._lock:
            return max(0, self.policy.budget - self._committed)

    @property
    def receipts(self) -> tuple[Receipt, ...]:
        with self._lock:
            return tuple(self._receipts)

    @property
    def total_paid(self) -> int:
        """Sum of the amounts the servers reported as settled."""
        return sum(r.amount for r in self.receipts if r.success)

    # -- httpx plumbing ------------------------------------------------------------------------

    def transport(self, inner: httpx.BaseTransport | None = None) -> PayingTransport:
        return PayingTransport(self, inner)

    def async_transport(
        self, inner: httpx.AsyncBaseTransport | None = None
    ) -> AsyncPayingTransport:
        return AsyncPayingTransport(self, inner)

    def client(self, *, inner: httpx.BaseTransport | None = None, **kwargs: Any) -> httpx.Client:
        kwargs.setdefault("timeout", 60.0)
        return httpx.Client(transport=self.transport(inner), **kwargs)

    def async_client(
        self, *, inner: httpx.AsyncBaseTransport | None = None, **kwargs: Any
    ) -> httpx.AsyncClient:
        kwargs.setdefault("timeout", 60.0)
        return httpx.AsyncClient(transport=self.async_transport(inner), **kwargs)

    # -- decisions -----------------------------------------------------------------------------

    def choose(self, challenge: PaymentChallenge) -> Offer:
        """The cheapest acceptable offer of the most preferred version that has one.

        Raises `PaymentRefused` with the reason of the closest offer otherwise. Does not call
        the approver and reserves nothing."""
        first_refusal: tuple[str, str, Offer] | None = None
        any_offer = False
        with self._lock:
            committed = self._committed
        for version in self.policy.versions:
            offers = sorted(challenge.offers(version), key=lambda o: o.amount)
            any_offer = any_offer or bool(offers)
            for offer in offers:
                refusal = self.policy.check(offer, committed)
                if refusal is None:
                    return offer
                if first_refusal is None:
                    first_refusal = (*refusal, offer)
        if first_refusal is not None:
            raise PaymentRefused(*first_refusal)
        if not any_offer and (challenge.v1 or challenge.v2):
            offered = sorted({o.version for o in (*challenge.v1, *challenge.v2)})
            raise PaymentRefused(
                VERSION_NOT_ALLOWED,
                f"the server offers x402 v{offered}, allowed {self.policy.versions}",
            )
        raise PaymentRefused(NO_OFFER, challenge.error or "the 402 response carried no offer")

    def _authorize(self, key: _Key, challenge: PaymentChallenge) -> _Signed:
        offer = self.choose(challenge)
        with self._lock:
            pending = self._pending.get(key)
        if pending is not None and pending.offer.raw == offer.raw and self._usable(pending):
            log.info("resending pending payment (nonce 0x%s)", pending.authorization.nonce.hex())
            return pending
        if self.policy.approve is not None and not self.policy.approve(offer):
            raise PaymentRefused(DECLINED, "the approver declined this payment", offer)
        with self._lock:
            refusal = self.policy.check(offer, self._committed)  # budget may have moved
            if refusal is not None:
                raise PaymentRefused(*refusal, offer)
            self._committed += offer.amount
        signed = self._sign(offer, challenge)
        with self._lock:
            self._pending[key] = signed
        log.info(
            "signed x402 v%d payment: %d to %s on %s",
            offer.version,
            offer.amount,
            offer.pay_to,
            offer.network,
        )
        return signed

    def _usable(self, signed: _Signed) -> bool:
        return signed.authorization.valid_before - RESEND_MARGIN_S > self._clock()

    def _sign(self, offer: Offer, challenge: PaymentChallenge) -> _Signed:
        net = self.policy.network_of(offer)
        assert net is not None  # choose() checked it
        name = offer.extra.get("name")
        version = offer.extra.get("version")
        if not isinstance(name, str) or not isinstance(version, str):
            if offer.asset != net.usdc:
                raise PaymentRefused(
                    "invalid_payment_requirements",
                    "the offer names no EIP-712 token domain (extra.name/version)",
                    offer,
                )
            name, version = net.token_name, net.token_version
        domain = TokenDomain(name, version, net.chain_id, offer.asset)
        now = int(self._clock())
        validity = max(1, min(offer.max_timeout_seconds, self.policy.max_validity_seconds))
        auth = Authorization(
            from_=self.address,
            to=offer.pay_to,
            value=offer.amount,
            valid_after=max(0, now - VALID_AFTER_SKEW_S),
            valid_before=now + validity,
            nonce=random_nonce(self._rng),
        )
        signature = sign_authorization(self._key, domain, auth)
        payload = exact_evm_payload(auth, signature)
        message: dict[str, Any]
        if offer.version == 2:
            message = {"x402Version": 2}
            if challenge.resource is not None:
                message["resource"] = dict(challenge.resource)
            message["accepted"] = dict(offer.raw)
            message["payload"] = payload
            if challenge.extensions:
                message["extensions"] = dict(challenge.extensions)
            return _Signed(offer, auth, V2_PAYMENT_HEADER, b64_json(message))
        message = {
            "x402Version": 1,
            "scheme": offer.scheme,
            "network": offer.network,
            "payload": payload,
        }
        return _Signed(offer, auth, V1_PAYMENT_HEADER, b64_json(message))

    def _settled(self, key: _Key, signed: _Signed, response: httpx.Response) -> Receipt:
        name = V2_RESPONSE_HEADER if signed.offer.version == 2 else V1_RESPONSE_HEADER
        value = response.headers.get(name) or response.headers.get(
            V1_RESPONSE_HEADER if name == V2_RESPONSE_HEADER else V2_RESPONSE_HEADER
        )
        settle = None
        if value:
            try:
                settle = decode_settle_response(value)
            except InvalidPayment:
                log.warning("unreadable settlement header from %s", response.request.url)
        receipt = Receipt(
            success=settle.success if settle is not None else response.is_success,
            transaction=settle.transaction if settle is not None else None,
            network=settle.network if settle is not None else signed.offer.network,
            payer=(settle.payer if settle is not None and settle.payer else self.address),
            amount=signed.authorization.value,
            asset=signed.offer.asset,
            pay_to=signed.offer.pay_to,
            resource=signed.offer.resource or str(response.request.url),
            version=signed.offer.version,
            nonce="0x" + signed.authorization.nonce.hex(),
        )
        with self._lock:
            self._receipts.append(receipt)
            self._drop_pending(key, signed)
        log.info(
            "paid %d on %s, tx %s (HTTP %d)",
            receipt.amount,
            receipt.network,
            receipt.transaction,
            response.status_code,
        )
        return receipt

    def _forget(self, key: _Key, signed: _Signed) -> None:
        with self._lock:
            self._drop_pending(key, signed)

    def _drop_pending(self, key: _Key, signed: _Signed) -> None:
        # Only our own entry: a concurrent identical request may have stored its own since.
        if self._pending.get(key) is signed:
            del self._pending[key]

    # -- the flow (sans I/O; driven by the transports) -----------------------------------------

    def _flow(self, request: httpx.Request) -> _Flow:
        body = request.content
        key: _Key = (request.method, str(request.url), hashlib.sha256(body).digest())
        response: httpx.Response = yield _Send(request)
        if response.status_code != 402:
            return response
        yield _Read(response)
        challenge = parse_challenge(response.headers, response.content)
        yield _Close(response)
        signed = self._authorize(key, challenge)  # raises PaymentRefused before signing

        headers = httpx.Headers(request.headers)
        headers[signed.header_name] = signed.header_value
        paid = httpx.Request(
            request.method,
            request.url,
            headers=headers,
            content=body,
            extensions=request.extensions,
        )
        attempt = 0
        while True:
            try:
                response = yield _Send(paid)
                if _small_body(response):
                    # Read a small answer (the gateway's 202 {"taskId"}) here, so a body cut
                    # after the headers is a lost answer too, resent like any other.
                    yield _Read(response)
            except httpx.TransportError as exc:
                if attempt >= self.retries or not self._usable(signed):
                    raise PaymentUnconfirmed(
                        signed.offer,
                        signed.authorization.nonce,
                        signed.authorization.valid_before,
                        f"{type(exc).__name__}: {exc}",
                    ) from exc
                attempt += 1
                log.warning(
                    "lost the answer to a paid request (%s); resending the same "
                    "authorization (attempt %d)",
                    type(exc).__name__,
                    attempt,
                )
                yield _Sleep(self.retry_backoff * attempt)
                continue
            if (
                response.status_code in RETRY_STATUSES
                and attempt < self.retries
                and self._usable(signed)
            ):
                attempt += 1
                delay = _retry_after(response.headers.get("retry-after"), self._clock())
                yield _Close(response)
                yield _Sleep(max(delay, self.retry_backoff * attempt))
                continue
            break

        if response.status_code == 402:
            yield _Read(response)
            answer = parse_challenge(response.headers, response.content)
            reason = answer.error or "payment_rejected"
            settle_value = response.headers.get(V2_RESPONSE_HEADER) or response.headers.get(
                V1_RESPONSE_HEADER
            )
            if settle_value:
                try:
                    settle = decode_settle_response(settle_value)
                    reason = settle.error_reason or reason
                except InvalidPayment:
                    pass
            yield _Close(response)
            self._forget(key, signed)
            raise PaymentRejected(reason, answer.detail or "", signed.offer)
        settle_header = response.headers.get(V2_RESPONSE_HEADER) or response.headers.get(
            V1_RESPONSE_HEADER
        )
        if not response.is_success and not settle_header:
            # Not served and no word on settlement (429, 503 after the last retry, ...): keep
            # the authorization pending so asking again resends it rather than signing anew.
            return response
        response.extensions[RECEIPT_EXTENSION] = self._settled(key, signed, response)
        return response


def _small_body(response: httpx.Response) -> bool:
    length = response.headers.get("content-length", "")
    return length.isdigit() and int(length) <= SMALL_BODY


def _retry_after(value: str | None, now: float) -> float:
    if not value:
        return 0.0
    seconds: float
    if value.strip().isdigit():
        seconds = float(value.strip())
    else:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return 0.0
        seconds = when.timestamp() - now
    if math.isnan(seconds):
        return 0.0
    return min(MAX_RETRY_AFTER_S, max(0.0, seconds))


def _key_bytes(private_key: str | bytes) -> bytes:
    if isinstance(private_key, str):
        text = private_key.strip()
        text = text[2:] if text[:2] in ("0x", "0X") else text
        try:
            raw = bytes.fromhex(text)
        except ValueError:
            raise ValueError("private key is not hex") from None
    else:
        raw = bytes(private_key)
    if len(raw) != 32:
        raise ValueError("private key must be 32 bytes")
    return raw


# --------------------------------------------------------------------------- transports


class PayingTransport(httpx.BaseTransport):
    """Sync transport that pays 402s through a `Payer`, around an inner transport."""

    def __init__(self, payer: Payer, inner: httpx.BaseTransport | None = None) -> None:
        self.payer = payer
        self._inner = inner or httpx.HTTPTransport()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        request.read()  # the body is sent twice (unpaid, then paid): it must be replayable
        flow = self.payer._flow(request)
        result: Any = None
        error: BaseException | None = None
        while True:
            try:
                action = flow.throw(error) if error is not None else flow.send(result)
            except StopIteration as stop:
                response: httpx.Response = stop.value
                return response
            result, error = None, None
            if isinstance(action, _Send):
                try:
                    result = self._inner.handle_request(action.request)
                except httpx.TransportError as exc:
                    error = exc
            elif isinstance(action, _Read):
                try:
                    action.response.read()
                except httpx.TransportError as exc:
                    action.response.close()
                    error = exc
            elif isinstance(action, _Close):
                action.response.close()
            else:
                time.sleep(action.seconds)

    def close(self) -> None:
        self._inner.close()


class AsyncPayingTransport(httpx.AsyncBaseTransport):
    """Async transport that pays 402s through a `Payer`, around an inner transport."""

    def __init__(self, payer: Payer, inner: httpx.AsyncBaseTransport | None = None) -> None:
        self.payer = payer
        self._inner = inner or httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        await request.aread()
        flow = self.payer._flow(request)
        result: Any = None
        error: BaseException | None = None
        while True:
            try:
                action = flow.throw(error) if error is not None else flow.send(result)
            except StopIteration as stop:
                response: httpx.Response = stop.value
                return response
            result, error = None, None
            if isinstance(action, _Send):
                try:
                    result = await self._inner.handle_async_request(action.request)
                except httpx.TransportError as exc:
                    error = exc
            elif isinstance(action, _Read):
                try:
                    await action.response.aread()
                except httpx.TransportError as exc:
                    await action.response.aclose()
                    error = exc
            elif isinstance(action, _Close):
                await action.response.aclose()
            else:
                await anyio.sleep(action.seconds)

    async def aclose(self) -> None:
        await self._inner.aclose()
