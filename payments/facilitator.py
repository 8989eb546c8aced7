"""The x402 facilitator API bodies (``POST /verify``, ``POST /settle``, ``GET /supported``) on top
of the PaymentProcessor, framework-free: the gateway mounts them on routes.

Request body (both versions): ``{x402Version, paymentPayload, paymentRequirements}`` where the
payload and requirements are the v1 or v2 wire objects. A payment fault is an answer, not an
error (``isValid: false`` / ``success: false`` with the x402 reason); an ``InfrastructureError``
propagates so the route answers 503 and the resource server retries.

Settling through the facilitator goes through the same ledger as the gateway's own payments, so
a resource server that retries ``/settle`` gets the first outcome, never a second transfer.
"""

from __future__ import annotations

from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic.alias_generators import to_camel

from payments import reasons
from payments.errors import InvalidPayment, SettlementFailed, UnknownNetworkError
from payments.networks import Network, get_network
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
    "Facilitator",
    "FacilitatorRequest",
    "FacilitatorSettleResponse",
    "SupportedKind",
    "SupportedResponse",
    "VerifyResponse",
]

_NO_RESOURCE: Final = "urn:x402:facilitator"


class _Model(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, frozen=True)

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


class FacilitatorRequest(_Model):
    """Body of POST /verify and POST /settle (payload/requirements parsed per version later)."""

    model_config = ConfigDict(extra="ignore")

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
    """Serves the facilitator API for the processor's network and token."""

    def __init__(self, processor: PaymentProcessor, network: Network, settler_address: str) -> None:
        self._processor = processor
        self._network = network
        self._settler_address = settler_address

    def supported(self) -> SupportedResponse:
        extra = {"name": self._network.token_name, "version": self._network.token_version}
        return SupportedResponse(
            kinds=[
                SupportedKind(
                    x402_version=2, scheme="exact", network=self._network.caip2, extra=extra
                ),
                SupportedKind(
                    x402_version=1, scheme="exact", network=self._network.name, extra=extra
                ),
            ],
            signers={"eip155:*": [self._settler_address]},
        )

    # -- request -> Payment ----------------------------------------------------------------------

    def _requirement(self, version: int, raw: dict[str, Any], resource: str) -> Requirement:
        try:
            if version == 2:
                v2 = PaymentRequirementsV2.model_validate(raw)
                network_id, amount_text = v2.network, v2.amount
                pay_to, asset, timeout, extra = (
                    v2.pay_to,
                    v2.asset,
                    v2.max_timeout_seconds,
                    v2.extra,
                )
            else:
                v1 = PaymentRequirementsV1.model_validate(raw)
                network_id, amount_text = v1.network, v1.max_amount_required
                pay_to, asset, timeout, extra = (
                    v1.pay_to,
                    v1.asset,
                    v1.max_timeout_seconds,
                    v1.extra,
                )
                resource = v1.resource or resource
        except ValidationError as exc:
            raise _invalid_requirements(
                f"paymentRequirements: {exc.error_count()} error(s)"
            ) from None
        try:
            network = get_network(network_id)
        except UnknownNetworkError:
            raise InvalidPayment(
                reasons.INVALID_NETWORK, f"unsupported network {network_id!r}"
            ) from None
        if network.chain_id != self._network.chain_id:
            raise InvalidPayment(
                reasons.INVALID_NETWORK, f"this facilitator settles {self._network.caip2}"
            )
        extra = extra or {}
        try:
            return Requirement(
                network=network,
                amount=parse_uint256(amount_text, "amount"),
                pay_to=pay_to,
                asset=asset,
                resource_url=resource or _NO_RESOURCE,
                max_timeout_seconds=timeout,
                token_name=str(extra.get("name") or ""),
                token_version=str(extra.get("version") or ""),
            )
        except (ValueError, TypeError) as exc:
            raise _invalid_requirements(str(exc)) from None

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
        requirement = self._requirement(version, request.payment_requirements, resource)
        return match_requirement(payload, [requirement])

    def _network_id(self, version: int) -> str:
        return self._network.caip2 if version == 2 else self._network.name

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
        version: Literal[1, 2] = 2
        payer: str | None = None
        try:
            payment = self._payment(body)
            version = 1 if payment.version == 1 else 2
            payer = payment.payer
            settled = await self._processor.settle_payment(payment)
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
        )
