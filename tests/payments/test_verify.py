"""Ordered offline verification: every reason is produced by a really signed, crafted payment."""

from __future__ import annotations

import base64
import json
from dataclasses import replace
from typing import Any

import pytest
from eth_account import Account
from eth_utils.crypto import keccak

from payments import reasons
from payments.eip3009 import SECP256K1_N, Authorization, TokenDomain, sign_authorization
from payments.errors import InvalidPayment
from payments.networks import BASE, BASE_SEPOLIA, Network
from payments.requirements import Requirement
from payments.verify import Payment, match_requirement, verify_offline
from payments.wire import decode_payment_header, exact_evm_payload

NOW = 1_750_000_000
PAYER_KEY = keccak(text="payer-1")
PAYER = Account.from_key(PAYER_KEY).address
OTHER_KEY = keccak(text="someone-else")
PAY_TO = "0x209693Bc6afc0C5328bA36FaF03C514EF312287C"
ELSEWHERE = "0x70997970C51812dc3A010C7d01b50e0d17dc79C8"
REQ = Requirement(
    network=BASE, amount=10_000, pay_to=PAY_TO, resource_url="https://gw.example/generation"
)


def _auth(**changes: Any) -> Authorization:
    fields: dict[str, Any] = {
        "from_": PAYER,
        "to": PAY_TO,
        "value": 10_000,
        "valid_after": NOW - 600,
        "valid_before": NOW + 60,
        "nonce": b"\x42" * 32,
    }
    fields.update(changes)
    return Authorization(**fields)


def _header(
    version: int = 2,
    *,
    auth: Authorization | None = None,
    key: bytes = PAYER_KEY,
    domain: TokenDomain | None = None,
    signature: bytes | None = None,
    accepted: dict[str, Any] | None = None,
    **top: Any,
) -> str:
    auth = auth or _auth()
    if signature is None:
        signature = sign_authorization(key, domain or REQ.domain, auth)
    body: dict[str, Any]
    if version == 2:
        body = {
            "x402Version": 2,
            "resource": {"url": REQ.resource_url},
            "accepted": REQ.v2_dict() | (accepted or {}),
            "payload": exact_evm_payload(auth, signature),
            "extensions": {},
        }
    else:
        body = {
            "x402Version": 1,
            "scheme": "exact",
            "network": "base",
            "payload": exact_evm_payload(auth, signature),
        }
    body.update(top)
    return base64.b64encode(json.dumps(body).encode()).decode()


def _check(header: str, offered: list[Requirement] | None = None, **kw: Any) -> str | None:
    payment = match_requirement(decode_payment_header(header), offered or [REQ])
    return verify_offline(payment, now=kw.pop("now", NOW), **kw)


def _reason(header: str, offered: list[Requirement] | None = None, **kw: Any) -> InvalidPayment:
    with pytest.raises(InvalidPayment) as caught:
        _check(header, offered, **kw)
    assert caught.value.reason in reasons.ALL_REASONS
    return caught.value


# ------------------------------------------------------------------ happy paths


@pytest.mark.parametrize("version", [1, 2])
def test_valid_payment_returns_the_signer(version: int) -> None:
    assert _check(_header(version)) == PAYER


def test_payment_exposes_typed_values() -> None:
    payment = match_requirement(decode_payment_header(_header(2)), [REQ])
    assert payment.version == 2
    assert payment.requirement is REQ
    assert payment.payer == PAYER
    assert payment.network == "eip155:8453"
    assert payment.asset == BASE.usdc
    assert len(payment.signature) == 65
    assert payment.digest == payment.digest  # stable, 32 bytes
    assert len(payment.digest) == 32


# ------------------------------------------------------------------ v2 accepted matching

ONE_FIELD_CHANGES = [
    ("scheme", {"scheme": "upto"}, reasons.UNSUPPORTED_SCHEME),
    ("network", {"network": "eip155:84532"}, reasons.INVALID_NETWORK),
    ("network-v1-name", {"network": "base"}, reasons.INVALID_NETWORK),
    ("asset", {"asset": BASE_SEPOLIA.usdc}, reasons.ASSET_MISMATCH),
    ("asset-garbage", {"asset": "USDC"}, reasons.ASSET_MISMATCH),
    ("payTo", {"payTo": ELSEWHERE}, reasons.RECIPIENT_MISMATCH),
    ("amount-lower", {"amount": "9999"}, reasons.AUTHORIZATION_VALUE_MISMATCH),
    ("amount-higher", {"amount": "10001"}, reasons.AUTHORIZATION_VALUE_MISMATCH),
    ("amount-not-decimal", {"amount": "1e4"}, reasons.AUTHORIZATION_VALUE_MISMATCH),
    ("extra.name", {"extra": {"name": "USDC", "version": "2"}}, reasons.TOKEN_NAME_MISMATCH),
    (
        "extra.version",
        {"extra": {"name": "USD Coin", "version": "1"}},
        reasons.TOKEN_VERSION_MISMATCH,
    ),
    (
        "extra-additional-key",
        {"extra": {"name": "USD Coin", "version": "2", "x": 1}},
        reasons.INVALID_PAYMENT_REQUIREMENTS,
    ),
    ("extra-missing", {"extra": None}, reasons.TOKEN_NAME_MISMATCH),
    ("maxTimeoutSeconds", {"maxTimeoutSeconds": 61}, reasons.INVALID_PAYMENT_REQUIREMENTS),
]


@pytest.mark.parametrize(
    ("field", "change", "reason"), ONE_FIELD_CHANGES, ids=[c[0] for c in ONE_FIELD_CHANGES]
)
def test_v2_accepted_differing_in_one_field_is_refused(
    field: str, change: dict[str, Any], reason: str
) -> None:
    # The authorization itself is perfect: only the `accepted` echo is off.
    error = _reason(_header(2, accepted=change))
    assert error.reason == reason, field


def test_v2_accepted_addresses_compare_case_insensitively() -> None:
    change = {"asset": REQ.asset.lower(), "payTo": REQ.pay_to.upper().replace("0X", "0x")}
    assert _check(_header(2, accepted=change)) == PAYER


def test_v2_picks_the_offer_it_accepted() -> None:
    cheap = REQ
    sepolia = Requirement(
        network=BASE_SEPOLIA, amount=20_000, pay_to=PAY_TO, resource_url=REQ.resource_url
    )
    auth = _auth(value=20_000)
    header = _header(2, auth=auth, domain=sepolia.domain, accepted=sepolia.v2_dict(), resource=None)
    payment = match_requirement(decode_payment_header(header), [cheap, sepolia])
    assert payment.requirement is sepolia
    assert verify_offline(payment, now=NOW) == PAYER


def test_a_payment_quoted_for_a_cheaper_body_does_not_buy_a_dearer_one() -> None:
    dearer = replace(REQ, amount=50_000)
    error = _reason(_header(2), offered=[dearer])
    assert error.reason == reasons.AUTHORIZATION_VALUE_MISMATCH


# ------------------------------------------------------------------ v1 matching


def test_v1_scheme_and_network_are_matched() -> None:
    assert _reason(_header(1, scheme="upto")).reason == reasons.UNSUPPORTED_SCHEME
    assert _reason(_header(1, network="base-sepolia")).reason == reasons.INVALID_NETWORK
    assert _reason(_header(1, network="eip155:8453")).reason == reasons.INVALID_NETWORK


def test_v1_prefers_the_offer_matching_recipient_and_amount() -> None:
    other = replace(REQ, pay_to=ELSEWHERE, amount=77)
    payment = match_requirement(decode_payment_header(_header(1)), [other, REQ])
    assert payment.requirement is REQ
    fallback = match_requirement(decode_payment_header(_header(1)), [other])
    assert fallback.requirement is other
    assert _reason(_header(1), offered=[other]).reason == reasons.RECIPIENT_MISMATCH


# ------------------------------------------------------------------ authorization checks


@pytest.mark.parametrize("version", [1, 2])
def test_recipient_mismatch(version: int) -> None:
    error = _reason(_header(version, auth=_auth(to=ELSEWHERE)))
    assert error.reason == reasons.RECIPIENT_MISMATCH


@pytest.mark.parametrize(("value", "side"), [(9_999, "lower"), (10_001, "higher"), (0, "lower")])
@pytest.mark.parametrize("version", [1, 2])
def test_amount_must_be_exact(version: int, value: int, side: str) -> None:
    error = _reason(_header(version, auth=_auth(value=value)))
    assert error.reason == reasons.AUTHORIZATION_VALUE_MISMATCH
    assert side in error.detail


@pytest.mark.parametrize("valid_after", [NOW, NOW + 1, NOW + 3600, 2**256 - 1])
def test_not_yet_valid(valid_after: int) -> None:
    auth = _auth(valid_after=valid_after, valid_before=2**256 - 1)
    assert _reason(_header(2, auth=auth)).reason == reasons.VALID_AFTER_IN_FUTURE


def test_valid_after_just_past_is_fine() -> None:
    assert _check(_header(2, auth=_auth(valid_after=NOW - 1))) == PAYER
    assert _check(_header(2, auth=_auth(valid_after=0))) == PAYER


@pytest.mark.parametrize("valid_before", [0, NOW - 100, NOW - 1, NOW])
def test_expired(valid_before: int) -> None:
    auth = _auth(valid_after=0, valid_before=valid_before)
    error = _reason(_header(2, auth=auth))
    assert error.reason == reasons.VALID_BEFORE_EXPIRED
    assert "expired" in error.detail


@pytest.mark.parametrize("remaining", [1, 3, 5])
def test_too_close_to_settle_has_its_own_detail(remaining: int) -> None:
    error = _reason(_header(2, auth=_auth(valid_before=NOW + remaining)))
    assert error.reason == reasons.VALID_BEFORE_EXPIRED
    assert "too close to settle" in error.detail
    assert "expired" not in error.detail


def test_settle_margin_is_a_parameter() -> None:
    header = _header(2, auth=_auth(valid_before=NOW + 6))
    assert _check(header) == PAYER  # exactly the default 6 s margin
    assert _reason(header, settle_margin_s=7).reason == reasons.VALID_BEFORE_EXPIRED
    assert _check(_header(2, auth=_auth(valid_before=NOW + 1)), settle_margin_s=0) == PAYER


def test_token_domain_in_requirement_must_match_the_network() -> None:
    wrong_name = replace(REQ, token_name="USDC")
    wrong_version = replace(REQ, token_version="1")
    # v1 carries no `extra`, so only verify_offline can notice a misconfigured requirement.
    assert _reason(_header(1), [wrong_name]).reason == reasons.TOKEN_NAME_MISMATCH
    assert _reason(_header(1), [wrong_version]).reason == reasons.TOKEN_VERSION_MISMATCH


def test_custom_token_domain_is_allowed_for_a_custom_asset() -> None:
    custom_asset = "0x5FbDB2315678afecb367f032d93F642f64180aa3"
    req = Requirement(
        network=BASE,
        amount=10_000,
        pay_to=PAY_TO,
        resource_url=REQ.resource_url,
        asset=custom_asset,
        token_name="Test Dollar",
        token_version="7",
    )
    header = _header(1, domain=req.domain)
    assert _check(header, [req]) == PAYER


def test_verify_offline_rechecks_version_scheme_network_asset() -> None:
    payment = match_requirement(decode_payment_header(_header(2)), [REQ])
    cases = [
        (replace(payment, version=3), reasons.INVALID_X402_VERSION),
        (replace(payment, scheme="upto"), reasons.UNSUPPORTED_SCHEME),
        (replace(payment, network="base"), reasons.INVALID_NETWORK),  # v1 name in a v2 payment
        (replace(payment, asset=BASE_SEPOLIA.usdc), reasons.ASSET_MISMATCH),
        (
            replace(payment, requirement=replace(REQ, scheme="upto")),
            reasons.UNSUPPORTED_SCHEME,
        ),
    ]
    for bad, reason in cases:
        with pytest.raises(InvalidPayment) as caught:
            verify_offline(bad, now=NOW)
        assert caught.value.reason == reason


# ------------------------------------------------------------------ signature


def test_signature_by_someone_else_is_the_1271_marker() -> None:
    assert _check(_header(2, key=OTHER_KEY)) is None


def test_signature_over_another_domain_is_the_1271_marker() -> None:
    assert _check(_header(2, domain=BASE_SEPOLIA.token_domain)) is None
    other_chain = TokenDomain("USD Coin", "2", 1, BASE.usdc)
    assert _check(_header(1, domain=other_chain)) is None


def test_malformed_signatures_are_the_1271_marker() -> None:
    good = sign_authorization(PAYER_KEY, REQ.domain, _auth())
    s = int.from_bytes(good[32:64], "big")
    high_s = good[:32] + (SECP256K1_N - s).to_bytes(32, "big") + bytes([55 - good[64]])
    for signature in (
        high_s,
        good[:64] + b"\x1d",
        good[:64],
        good + b"\x00",
        b"\x01" * 300,
    ):  # e.g. a Safe / ERC-6492 blob: only the wallet can judge it
        assert _check(_header(2, signature=signature)) is None


def test_v_zero_one_signatures_are_accepted() -> None:
    good = sign_authorization(PAYER_KEY, REQ.domain, _auth())
    assert _check(_header(2, signature=good[:64] + bytes([good[64] - 27]))) == PAYER


def test_tampered_authorization_breaks_the_signature() -> None:
    signature = sign_authorization(PAYER_KEY, REQ.domain, _auth(nonce=b"\x01" * 32))
    assert _check(_header(2, signature=signature)) is None  # header carries nonce 0x42..


def test_from_is_not_trusted_without_the_signature() -> None:
    # Claims to be from the payer but is signed by someone else over the claimed fields.
    signature = sign_authorization(OTHER_KEY, REQ.domain, _auth())
    assert _check(_header(1, signature=signature)) is None


# ------------------------------------------------------------------ ordering


def test_cheapest_check_wins_when_everything_is_wrong() -> None:
    auth = _auth(to=ELSEWHERE, value=1, valid_after=NOW + 5, valid_before=NOW - 5)
    header = _header(2, auth=auth, key=OTHER_KEY)
    assert _reason(header).reason == reasons.RECIPIENT_MISMATCH
    header = _header(2, auth=_auth(value=1, valid_after=NOW + 5), key=OTHER_KEY)
    assert _reason(header).reason == reasons.AUTHORIZATION_VALUE_MISMATCH
    header = _header(2, auth=_auth(valid_after=NOW + 5, valid_before=NOW - 5), key=OTHER_KEY)
    assert _reason(header).reason == reasons.VALID_AFTER_IN_FUTURE
    header = _header(2, auth=_auth(valid_before=NOW - 5), key=OTHER_KEY)
    assert _reason(header).reason == reasons.VALID_BEFORE_EXPIRED
    header = _header(2, auth=_auth(), accepted={"network": "eip155:1"}, key=OTHER_KEY)
    assert _reason(header).reason == reasons.INVALID_NETWORK


def test_malformed_authorization_is_invalid_payload_at_match_time() -> None:
    body = json.loads(base64.b64decode(_header(2)))
    body["payload"]["authorization"]["nonce"] = "0x" + "ab" * 31
    header = base64.b64encode(json.dumps(body).encode()).decode()
    assert _reason(header).reason == reasons.INVALID_PAYLOAD


def test_custom_network_requirement() -> None:
    anvil = Network("anvil", "eip155:31337", 31337, BASE.usdc, "USD Coin", "2")
    req = Requirement(network=anvil, amount=10_000, pay_to=PAY_TO, resource_url="http://x/")
    header = _header(2, domain=req.domain, accepted=req.v2_dict())
    assert _check(header, [req]) == PAYER
    assert isinstance(match_requirement(decode_payment_header(header), [req]), Payment)
