"""The official `x402` PyPI client pays our challenge, and our decoder + verifier accept it.

Off-chain only: the SDK reads our 402 (v2 header and v1 body), signs with a real key, and we
decode, match and verify its header; the recovered signer must be the SDK's account.
On-chain settlement of such payments is covered by the chain/processor tests.

The SDK stamps validAfter/validBefore from the wall clock, so `now` here is the real time
(injected, as everywhere; nothing is patched).
"""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import pytest
from eth_account import Account
from eth_utils.crypto import keccak
from x402 import x402Client, x402ClientSync
from x402.http import x402HTTPClientSync
from x402.http.utils import decode_payment_required_header, encode_payment_signature_header
from x402.mechanisms.evm.exact.register import register_exact_evm_client
from x402.schemas.v1 import PaymentRequiredV1 as SdkPaymentRequiredV1

from payments import reasons
from payments.errors import InvalidPayment
from payments.networks import BASE, BASE_SEPOLIA
from payments.requirements import Discovery, Requirement, build_payment_required
from payments.verify import match_requirement, verify_offline
from payments.wire import (
    PaymentPayloadV1,
    PaymentPayloadV2,
    SettleResponse,
    decode_payment_header,
    encode_b64_json,
)

ACCOUNT = Account.from_key(keccak(text="official-x402-client"))
PAY_TO = "0x209693Bc6afc0C5328bA36FaF03C514EF312287C"
DISCOVERY = Discovery(
    input_schema={
        "type": "object",
        "properties": {
            "model": {"type": "string", "enum": ["local-renderer"]},
            "prompt": {"type": "string", "minLength": 1, "maxLength": 4000},
            "seconds": {"type": "integer", "minimum": 1, "maximum": 20},
            "size": {"type": "string", "enum": ["320x180", "640x360", "1280x720"]},
        },
        "required": ["prompt"],
        "additionalProperties": False,
    },
    input_example={"model": "local-renderer", "prompt": "a red ball", "seconds": 4},
    output_schema={
        "type": "object",
        "properties": {"taskId": {"type": "string"}, "status": {"type": "string"}},
    },
    output_example={"taskId": "task_0123", "status": "queued"},
)


def _requirement(network: Any = BASE, amount: int = 250_000) -> Requirement:
    return Requirement(
        network=network,
        amount=amount,
        pay_to=PAY_TO,
        resource_url="http://127.0.0.1:8402/v1/videos",
        description="Generate a short video",
        discovery=DISCOVERY,
    )


def _sdk_client() -> x402HTTPClientSync:
    client = x402ClientSync()
    register_exact_evm_client(client, ACCOUNT)
    return x402HTTPClientSync(client)


def _verify(header: str, offered: list[Requirement], version: int) -> str | None:
    payload = decode_payment_header(header, version=version)  # type: ignore[arg-type]
    payment = match_requirement(payload, offered)
    return verify_offline(payment, now=int(time.time()))


def test_sdk_pays_our_v2_challenge() -> None:
    req = _requirement()
    challenge = build_payment_required([req], "PAYMENT-SIGNATURE header is required")
    headers, sdk_payload = _sdk_client().handle_402_response(
        {"PAYMENT-REQUIRED": challenge.header, "Content-Type": "application/json"},
        challenge.body,
        req.resource_url,
    )
    assert set(headers) == {"PAYMENT-SIGNATURE"}
    assert sdk_payload.x402_version == 2
    header = headers["PAYMENT-SIGNATURE"]
    decoded = decode_payment_header(header)
    assert isinstance(decoded, PaymentPayloadV2)
    # The SDK echoes our bazaar extension; it must fit in our header bound and be ignored.
    assert decoded.extensions is not None and "bazaar" in decoded.extensions
    assert _verify(header, [req], 2) == ACCOUNT.address


def test_sdk_pays_our_v1_body_when_it_only_sees_v1() -> None:
    req = _requirement()
    challenge = build_payment_required([req], "X-PAYMENT header is required")
    headers, sdk_payload = _sdk_client().handle_402_response(
        {"Content-Type": "application/json"}, challenge.body, req.resource_url
    )
    assert set(headers) == {"X-PAYMENT"}
    assert sdk_payload.x402_version == 1
    header = headers["X-PAYMENT"]
    assert isinstance(decode_payment_header(header), PaymentPayloadV1)
    assert _verify(header, [req], 1) == ACCOUNT.address


def test_sdk_parses_our_v1_body_model() -> None:
    challenge = build_payment_required([_requirement()])
    parsed = SdkPaymentRequiredV1.model_validate(json.loads(challenge.body))
    (entry,) = parsed.accepts
    assert entry.max_amount_required == "250000"
    assert entry.network == "base"
    assert entry.output_schema is not None
    assert entry.output_schema["input"]["bodyFields"]["prompt"]["required"] is True
    assert entry.extra == {"name": "USD Coin", "version": "2"}


def test_sdk_choice_among_several_offers_is_matched() -> None:
    offered = [_requirement(), _requirement(BASE_SEPOLIA, 260_000)]
    challenge = build_payment_required(offered)
    headers, _ = _sdk_client().handle_402_response(
        {"PAYMENT-REQUIRED": challenge.header}, None, offered[0].resource_url
    )
    payload = decode_payment_header(headers["PAYMENT-SIGNATURE"])
    payment = match_requirement(payload, offered)
    assert payment.requirement in offered
    assert payment.authorization.value == payment.requirement.amount
    assert verify_offline(payment, now=int(time.time())) == ACCOUNT.address


def test_sdk_payment_for_a_cheaper_quote_is_refused_for_a_dearer_body() -> None:
    cheap, dear = _requirement(amount=100_000), _requirement(amount=900_000)
    challenge = build_payment_required([cheap])
    headers, _ = _sdk_client().handle_402_response(
        {"PAYMENT-REQUIRED": challenge.header}, None, cheap.resource_url
    )
    with pytest.raises(InvalidPayment) as caught:
        _verify(headers["PAYMENT-SIGNATURE"], [dear], 2)
    assert caught.value.reason == reasons.AUTHORIZATION_VALUE_MISMATCH


def test_tampering_with_an_sdk_payment_breaks_its_signature() -> None:
    req = _requirement()
    sdk = x402ClientSync()
    register_exact_evm_client(sdk, ACCOUNT)
    payment_required = decode_payment_required_header(build_payment_required([req]).header)
    payload = sdk.create_payment_payload(payment_required)
    body = json.loads(base64.b64decode(encode_payment_signature_header(payload)))
    body["payload"]["authorization"]["validBefore"] = str(int(time.time()) + 3600)
    forged = base64.b64encode(json.dumps(body).encode()).decode()
    assert _verify(forged, [req], 2) is None  # not from `from`: caller refuses (EOA) / asks 1271


async def test_async_sdk_client_pays_too() -> None:
    req = _requirement()
    client = x402Client()
    register_exact_evm_client(client, ACCOUNT)
    payment_required = decode_payment_required_header(build_payment_required([req]).header)
    payload = await client.create_payment_payload(payment_required)
    header = encode_payment_signature_header(payload)
    assert _verify(header, [req], 2) == ACCOUNT.address


def test_sdk_reads_our_settlement_header() -> None:
    ours = SettleResponse(
        success=True, transaction="0x" + "ab" * 32, network="eip155:8453", payer=ACCOUNT.address
    )
    header = encode_b64_json(ours)
    sdk = _sdk_client()
    for name in ("PAYMENT-RESPONSE", "X-PAYMENT-RESPONSE"):

        def get_header(wanted: str, name: str = name) -> str | None:
            return header if wanted == name else None

        settled = sdk.get_payment_settle_response(get_header)
        assert settled.success is True
        assert settled.transaction == ours.transaction
        assert settled.network == "eip155:8453"
        assert settled.payer == ACCOUNT.address
