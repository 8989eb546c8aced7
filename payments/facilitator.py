"""The x402 facilitator API bodies (``POST /verify``, ``POST /settle``, ``GET /supported``) on top
of the PaymentProcessor, framework-free: the gateway mounts them on routes.

Request body (both versions): ``{x402Version, paymentPayload, paymentRequirements}`` where the
payload and requirements are the v1 or v2 wire objects. A payment fault is an answer, not an
error (``isValid: false`` / ``success: false`` with the x402 reason); an ``InfrastructureError``
propagates so the route answers 503 and the resource server retries.

Settling through the facilitator goes through the same ledger as the gateway's own payments, so
a resource server that retries ``/settle`` gets the first outcome, never a second transfer.

The requirements come from a stranger (the resource server), so they are checked against what
this facilitator can settle before anything else: scheme ``exact``, our network (v1 by name,
v2 by CAIP-2 id), our token (``asset``) and its EIP-712 name/version. A v2 ``accepted`` must
equal ``paymentRequirements``; keys of ``extra`` beyond name/version are allowed when both
sides carry the same values (resource servers add their own), except a transfer method other
than EIP-3009.
"""

from __future__ import annotations

from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic.alias_generators import to_camel

from payments import reasons
from payments.eip3009 import normalize_address
from payments.errors import InvalidPayment, SettlementFailed
from payments.networks import Network
from payments.processor import PaymentProcessor
from payments.requirements import Requirement
from payments.verify import Payment, match_requirement
from payments.wire import (
    PaymentPayloadV1,
    PaymentPayloadV2,
    PaymentRequirementsV1,
    PaymentRequirementsV2,
    parse_uint256,
)

__all__ = [
    "HANDED_OVER",
    "Facilitator",
    "FacilitatorRequest",
    "FacilitatorSettleResponse",
    "SupportedKind",
    "SupportedResponse",
    "VerifyResponse",
]

# The ledger's "work" of a payment we settled for a resource server: the answer handed over.
# Linked so the row leaves the pending set that start-up and sweeps read.
HANDED_OVER: Final = "facilitator:settled"
_NO_RESOURCE: Final = "urn:x402:facilitator"
_SCHEME: Final = "exact"
_DOMAIN_KEYS: Final = frozenset({"name", "version"})
_TRANSFER_METHOD: Final = "assetTransferMethod"


class _Model(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, frozen=True)

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


class FacilitatorRequest(_Model):
    """Body of POST /verify and POST /settle (payload/requirements parsed per version later).

    Strict: an envelope that fails here is a malformed request (HTTP 400), not a payment fault.
    """

    model_config = ConfigDict(extra="ignore", strict=True)

    x402_version: int
    payment_payload: dict[str, Any]
    payment_requirements: dict[str, Any]


class VerifyResponse(_Model):
    is_valid: bool
    invalid_reason: str | None = None
    invalid_message: str | None = None
    payer: str | None = None


class FacilitatorSettleResponse(_Model):
    success: bool
    error_reason: str | None = None
    error_message: str | None = None
    transaction: str = ""
    network: str
    payer: str | None = None
    amount: str | None = None  # atomic units actually moved (success only)


class SupportedKind(_Model):
    x402_version: int
    scheme: str
    network: str
    extra: dict[str, Any] | None = None


class SupportedResponse(_Model):
    kinds: list[SupportedKind]
    extensions: list[str] = []
    signers: dict[str, list[str]] = {}


def _invalid_requirements(detail: str) -> InvalidPayment:
    return InvalidPayment(reasons.INVALID_PAYMENT_REQUIREMENTS, detail)


class Facilitator:
    """Serves the facilitator API for the processor's network and token (``network.usdc``)."""

    def __init__(self, processor: PaymentProcessor, network: Network, settler_address: str) -> None:
        self._processor = processor
        self._network = network
        self._settler_address = settler_address
        self._asset = normalize_address(network.usdc)  # a configured override may be lowercase

    def supported(self) -> SupportedResponse:
        extra = {"name": self._network.token_name, "version": self._network.token_version}
        return SupportedResponse(
            kinds=[
                SupportedKind(
                    x402_version=2, scheme=_SCHEME, network=self._network.caip2, extra=extra
                ),
                SupportedKind(
                    x402_version=1, scheme=_SCHEME, network=self._network.name, extra=extra
                ),
            ],
            signers={"eip155:*": [self._settler_address]},
        )

    # -- request -> Payment ----------------------------------------------------------------------

    def _network_id(self, version: int) -> str:
        return self._network.caip2 if version == 2 else self._network.name

    def _requirement(
        self, version: int, raw: dict[str, Any], resource: str
    ) -> tuple[Requirement, dict[str, Any]]:
        """The requirement as a typed value (checked against what we settle), and its raw
        ``extra``."""
        wire: PaymentRequirementsV1 | PaymentRequirementsV2
        try:
            if version == 2:
                wire = PaymentRequirementsV2.model_validate(raw)
                amount_text = wire.amount
            else:
                wire = PaymentRequirementsV1.model_validate(raw)
                amount_text = wire.max_amount_required
                resource = wire.resource or resource
        except ValidationError as exc:
            raise _invalid_requirements(
                f"paymentRequirements: {exc.error_count()} error(s)"
            ) from None
        if wire.scheme != _SCHEME:
            raise InvalidPayment(
                reasons.UNSUPPORTED_SCHEME, f"this facilitator settles {_SCHEME!r}"
            )
        if wire.network != self._network_id(version):
            raise InvalidPayment(
                reasons.INVALID_NETWORK,
                f"this facilitator settles {self._network_id(version)!r} in x402 v{version}",
            )
        extra = dict(wire.extra or {})
        method = extra.get(_TRANSFER_METHOD, "eip3009")
        if method != "eip3009":
            raise InvalidPayment(
                reasons.UNSUPPORTED_SCHEME, f"{_TRANSFER_METHOD} {method!r} is not supported"
            )
        try:
            asset = normalize_address(wire.asset)
        except (ValueError, TypeError):
            raise _invalid_requirements("asset is not an address") from None
        if asset != self._asset:
            raise InvalidPayment(reasons.ASSET_MISMATCH, f"this facilitator settles {self._asset}")
        name, version_text = extra.get("name"), extra.get("version")
        if name is not None and name != self._network.token_name:
            raise InvalidPayment(reasons.TOKEN_NAME_MISMATCH, "extra.name is not the token's name")
        if version_text is not None and version_text != self._network.token_version:
            raise InvalidPayment(
                reasons.TOKEN_VERSION_MISMATCH, "extra.version is not the token's version"
            )
        try:
            requirement = Requirement(
                network=self._network,
                amount=parse_uint256(amount_text, "amount"),
                pay_to=wire.pay_to,
                asset=asset,
                resource_url=resource or _NO_RESOURCE,
                max_timeout_seconds=wire.max_timeout_seconds,
            )
        except InvalidPayment as exc:
            raise _invalid_requirements(exc.detail) from None
        except (ValueError, TypeError) as exc:
            raise _invalid_requirements(str(exc)) from None
        return requirement, extra

    def _payment(self, body: FacilitatorRequest | dict[str, Any]) -> Payment:
        try:
            request = (
                body
                if isinstance(body, FacilitatorRequest)
                else FacilitatorRequest.model_validate(body)
            )
        except ValidationError:
            raise InvalidPayment(
                reasons.INVALID_PAYLOAD,
                "body must carry x402Version, paymentPayload and paymentRequirements",
            ) from None
        version = request.x402_version
        if version not in (1, 2) or request.payment_payload.get("x402Version") != version:
            raise InvalidPayment(
                reasons.INVALID_X402_VERSION, "x402Version must be 1 or 2 and match"
            )
        model: type[PaymentPayloadV1 | PaymentPayloadV2]
        model = PaymentPayloadV1 if version == 1 else PaymentPayloadV2
        try:
            payload = model.model_validate(request.payment_payload)
        except ValidationError:
            raise InvalidPayment(reasons.INVALID_PAYLOAD, "paymentPayload is malformed") from None
        resource = ""
        if isinstance(payload, PaymentPayloadV2) and payload.resource is not None:
            resource = payload.resource.url
        requirement, extra = self._requirement(version, request.payment_requirements, resource)
        if isinstance(payload, PaymentPayloadV2):
            payload = _domain_extra_only(payload, extra)
        return match_requirement(payload, [requirement])

    # -- API -------------------------------------------------------------------------------------

    async def verify(self, body: FacilitatorRequest | dict[str, Any]) -> VerifyResponse:
        payer: str | None = None
        try:
            payment = self._payment(body)
            payer = payment.payer
            await self._processor.verify_payment(payment)
        except InvalidPayment as exc:
            return VerifyResponse(
                is_valid=False, invalid_reason=exc.reason, invalid_message=exc.detail, payer=payer
            )
        return VerifyResponse(is_valid=True, payer=payer)

    async def settle(self, body: FacilitatorRequest | dict[str, Any]) -> FacilitatorSettleResponse:
        version: Literal[1, 2] = 1 if _claimed_version(body) == 1 else 2
        payer: str | None = None
        try:
            payment = self._payment(body)
            payer = payment.payer
            settled = await self._processor.settle_payment(payment)
            if settled.task_id is None:
                await self._processor.link_task(settled.payment_id, HANDED_OVER)
        except (InvalidPayment, SettlementFailed) as exc:
            return FacilitatorSettleResponse(
                success=False,
                error_reason=exc.reason,
                error_message=exc.detail,
                network=self._network_id(version),
                payer=payer,
            )
        return FacilitatorSettleResponse(
            success=True,
            transaction=settled.tx_hash,
            network=self._network_id(version),
            payer=settled.payer,
            amount=str(settled.amount),
        )


def _claimed_version(body: FacilitatorRequest | dict[str, Any]) -> object:
    return body.x402_version if isinstance(body, FacilitatorRequest) else body.get("x402Version")


def _domain_extra_only(payload: PaymentPayloadV2, extra: dict[str, Any]) -> PaymentPayloadV2:
    """``accepted`` with the keys of ``extra`` we do not use taken out, once they are known to
    equal the requirement's (the match compares the token's name/version and nothing else)."""
    accepted_extra = payload.accepted.extra or {}
    foreign = (set(accepted_extra) | set(extra)) - _DOMAIN_KEYS
    if not foreign:
        return payload
    if any(accepted_extra.get(key) != extra.get(key) for key in foreign):
        raise _invalid_requirements("accepted.extra differs from paymentRequirements.extra")
    kept = {k: v for k, v in accepted_extra.items() if k in _DOMAIN_KEYS}
    accepted = payload.accepted.model_copy(update={"extra": kept})
    return payload.model_copy(update={"accepted": accepted})
