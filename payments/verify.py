"""Pure, ordered payment checks: match a decoded payment to an offer, then verify it offline.

No I/O and no clock: `now` (unix seconds) is injected. Checks run cheapest first and the first
failure raises `InvalidPayment` with the x402 reason:

`match_requirement(payload, offered)` picks the requirement the payment is for.
- v2: `accepted` must equal one offered requirement in every field. Candidates are narrowed
  field by field so the reason names the first field that differs: scheme
  (`unsupported_scheme`), network (`invalid_network`), asset (`..._asset_mismatch`), payTo
  (`..._recipient_mismatch`), amount (`..._authorization_value`), extra.name / extra.version
  (`..._token_name_mismatch` / `..._token_version_mismatch`), maxTimeoutSeconds or anything
  else in extra (`invalid_payment_requirements`). `resource` is not compared: nothing signed
  binds it, so it proves nothing.
- v1: scheme + network name; among several such offers the one whose payTo and amount match
  the authorization wins.

`verify_offline(payment, now=..., settle_margin_s=6)` then checks, in order: x402 version,
scheme, network, asset, recipient (`to == payTo`), exact amount (lower AND higher refused),
validAfter, validBefore (expired, or too close to settle: same reason, different detail), token
domain name/version, and finally the signature (ecrecover with coincurve).

Time rules mirror the token (FiatToken: `now > validAfter`, `now < validBefore`): a payment is
refused when `validAfter >= now` or `validBefore < now + settle_margin_s` (and `validBefore <=
now` is reported as expired). The margin keeps us from broadcasting an authorization that will
expire before it is mined.

`verify_offline` returns the recovered signer (== `from`) when the ECDSA signature is valid,
or None when it is not a valid ECDSA signature by `from` (wrong signer, not 65 bytes, high s,
bad v). None is a marker, not a verdict: if `from` has code the caller asks the wallet
(EIP-1271), otherwise it raises `InvalidPayment(INVALID_SIGNATURE)`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from . import reasons
from .eip3009 import Authorization, authorization_digest, normalize_address, recover_address
from .errors import InvalidPayment
from .requirements import Requirement
from .wire import PaymentPayloadV1, PaymentPayloadV2, PaymentRequirementsV2, to_authorization

__all__ = ["DEFAULT_SETTLE_MARGIN_S", "Payment", "match_requirement", "verify_offline"]

DEFAULT_SETTLE_MARGIN_S: Final = 6
_SCHEME_EXACT: Final = "exact"


@dataclass(frozen=True, slots=True)
class Payment:
    """A decoded payment bound to the offered requirement it claims to satisfy.

    `scheme`, `network` and `asset` are what the payment claims (v1 names the network, v2 its
    CAIP-2 id; v1 does not name the asset, so it is the requirement's: the signature's domain
    binds it). `signature` is kept byte-for-byte as sent (EIP-1271 wallets need it verbatim).
    """

    version: int
    scheme: str
    network: str
    asset: str
    requirement: Requirement
    authorization: Authorization
    signature: bytes

    @property
    def payer(self) -> str:
        """The authorization's `from` (checksummed)."""
        return self.authorization.from_

    @property
    def digest(self) -> bytes:
        """EIP-712 digest of the authorization under the requirement's token domain."""
        return authorization_digest(self.requirement.domain, self.authorization)


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 70 else text[:67] + "..."


def _narrow(
    candidates: list[Requirement],
    keep: Any,
    reason: str,
    detail: str,
) -> list[Requirement]:
    kept = [req for req in candidates if keep(req)]
    if not kept:
        raise InvalidPayment(reason, detail)
    return kept


def _address_or_none(text: str) -> str | None:
    try:
        return normalize_address(text)
    except (ValueError, TypeError):
        return None


def _uint_or_none(text: str) -> int | None:
    return int(text) if text.isascii() and text.isdigit() and len(text) <= 78 else None


def _match_v2(accepted: PaymentRequirementsV2, offered: Sequence[Requirement]) -> Requirement:
    cands = _narrow(
        list(offered),
        lambda r: r.scheme == accepted.scheme,
        reasons.UNSUPPORTED_SCHEME,
        f"scheme {_short(accepted.scheme)} is not offered for this request",
    )
    cands = _narrow(
        cands,
        lambda r: r.network.caip2 == accepted.network,
        reasons.INVALID_NETWORK,
        f"network {_short(accepted.network)} is not offered for this request",
    )
    asset = _address_or_none(accepted.asset)
    cands = _narrow(
        cands,
        lambda r: r.asset == asset,
        reasons.ASSET_MISMATCH,
        f"asset {_short(accepted.asset)} is not offered for this request",
    )
    pay_to = _address_or_none(accepted.pay_to)
    cands = _narrow(
        cands,
        lambda r: r.pay_to == pay_to,
        reasons.RECIPIENT_MISMATCH,
        f"payTo {_short(accepted.pay_to)} is not the recipient of this request",
    )
    amount = _uint_or_none(accepted.amount)
    cands = _narrow(
        cands,
        lambda r: r.amount == amount,
        reasons.AUTHORIZATION_VALUE_MISMATCH,
        f"accepted amount {_short(accepted.amount)} is not the price of this request "
        f"({' or '.join(str(r.amount) for r in cands)})",
    )
    extra = accepted.extra or {}
    cands = _narrow(
        cands,
        lambda r: r.token_name == extra.get("name"),
        reasons.TOKEN_NAME_MISMATCH,
        f"extra.name {_short(extra.get('name'))} is not the token's EIP-712 name",
    )
    cands = _narrow(
        cands,
        lambda r: r.token_version == extra.get("version"),
        reasons.TOKEN_VERSION_MISMATCH,
        f"extra.version {_short(extra.get('version'))} is not the token's EIP-712 version",
    )
    cands = _narrow(
        cands,
        lambda r: r.max_timeout_seconds == accepted.max_timeout_seconds and r.extra == extra,
        reasons.INVALID_PAYMENT_REQUIREMENTS,
        "accepted differs from every offered requirement (maxTimeoutSeconds or extra)",
    )
    return cands[0]


def match_requirement(
    payload: PaymentPayloadV1 | PaymentPayloadV2, offered: Sequence[Requirement]
) -> Payment:
    """Bind a decoded payment to the requirement it pays; InvalidPayment if none fits."""
    if isinstance(payload, PaymentPayloadV2):
        req = _match_v2(payload.accepted, offered)
        auth, signature = to_authorization(payload.payload)
        return Payment(
            version=2,
            scheme=payload.accepted.scheme,
            network=payload.accepted.network,
            asset=req.asset,
            requirement=req,
            authorization=auth,
            signature=signature,
        )
    cands = _narrow(
        list(offered),
        lambda r: r.scheme == payload.scheme,
        reasons.UNSUPPORTED_SCHEME,
        f"scheme {_short(payload.scheme)} is not offered for this request",
    )
    cands = _narrow(
        cands,
        lambda r: r.network.name == payload.network,
        reasons.INVALID_NETWORK,
        f"network {_short(payload.network)} is not offered for this request",
    )
    auth, signature = to_authorization(payload.payload)
    best = [r for r in cands if r.pay_to == auth.to and r.amount == auth.value]
    req = (best or cands)[0]
    return Payment(
        version=1,
        scheme=payload.scheme,
        network=payload.network,
        asset=req.asset,
        requirement=req,
        authorization=auth,
        signature=signature,
    )


def verify_offline(
    payment: Payment, *, now: int, settle_margin_s: int = DEFAULT_SETTLE_MARGIN_S
) -> str | None:
    """Ordered offline checks; the signer if the ECDSA signature is from `from`, else None."""
    req = payment.requirement
    auth = payment.authorization
    if payment.version not in (1, 2):
        raise InvalidPayment(reasons.INVALID_X402_VERSION, "x402Version must be 1 or 2")
    if payment.scheme != _SCHEME_EXACT or payment.scheme != req.scheme:
        raise InvalidPayment(
            reasons.UNSUPPORTED_SCHEME, f"scheme {_short(payment.scheme)} is not supported"
        )
    expected_network = req.network.caip2 if payment.version == 2 else req.network.name
    if payment.network != expected_network:
        raise InvalidPayment(
            reasons.INVALID_NETWORK,
            f"network {_short(payment.network)} is not {expected_network!r}",
        )
    if payment.asset != req.asset:
        raise InvalidPayment(reasons.ASSET_MISMATCH, f"asset must be {req.asset}")
    if auth.to != req.pay_to:
        raise InvalidPayment(
            reasons.RECIPIENT_MISMATCH, f"authorization.to must be the payTo {req.pay_to}"
        )
    if auth.value != req.amount:
        side = "lower" if auth.value < req.amount else "higher"
        raise InvalidPayment(
            reasons.AUTHORIZATION_VALUE_MISMATCH,
            f"authorization.value {auth.value} is {side} than the exact price {req.amount}",
        )
    if auth.valid_after >= now:
        raise InvalidPayment(
            reasons.VALID_AFTER_IN_FUTURE,
            f"authorization is not valid yet (validAfter {auth.valid_after} >= now {now})",
        )
    if auth.valid_before <= now:
        raise InvalidPayment(
            reasons.VALID_BEFORE_EXPIRED,
            f"authorization expired (validBefore {auth.valid_before} <= now {now})",
        )
    if auth.valid_before < now + settle_margin_s:
        raise InvalidPayment(
            reasons.VALID_BEFORE_EXPIRED,
            f"authorization expires in {auth.valid_before - now}s, too close to settle "
            f"(needs at least {settle_margin_s}s)",
        )
    network = req.network
    if req.asset == network.usdc:
        if req.token_name != network.token_name:
            raise InvalidPayment(
                reasons.TOKEN_NAME_MISMATCH,
                f"token name {req.token_name!r} is not {network.token_name!r}",
            )
        if req.token_version != network.token_version:
            raise InvalidPayment(
                reasons.TOKEN_VERSION_MISMATCH,
                f"token version {req.token_version!r} is not {network.token_version!r}",
            )
    recovered = recover_address(authorization_digest(req.domain, auth), payment.signature)
    if recovered is not None and recovered == bytes.fromhex(auth.from_[2:]):
        return auth.from_
    return None
