"""Facilitator API bodies (/verify, /settle, /supported) over the processor, on Anvil."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from payments import reasons
from payments.chain import Chain
from payments.facilitator import Facilitator
from payments.networks import BASE, BASE_SEPOLIA
from payments.processor import PaymentProcessor
from payments.settler import Settler
from payments.wire import decode_b64_json

from .conftest import USDC, Payer, requirement, signed_header

pytestmark = pytest.mark.chain


@pytest.fixture
def facilitator(processor: PaymentProcessor, settler: Settler) -> Facilitator:
    return Facilitator(processor, BASE, settler.address)


def body(header: str, requirements: dict[str, Any]) -> dict[str, Any]:
    payload = decode_b64_json(header)
    return {
        "x402Version": payload["x402Version"],
        "paymentPayload": payload,
        "paymentRequirements": requirements,
    }


def test_supported(facilitator: Facilitator, settler: Settler) -> None:
    supported = facilitator.supported().to_json()
    assert {(k["x402Version"], k["network"]) for k in supported["kinds"]} == {
        (2, "eip155:8453"),
        (1, "base"),
    }
    assert supported["signers"] == {"eip155:*": [settler.address]}
    json.dumps(supported)


@pytest.mark.parametrize("version", [2, 1])
async def test_verify_then_settle_is_idempotent(
    version: int,
    facilitator: Facilitator,
    chain: Chain,
    settler: Settler,
    make_payer: Callable[..., Payer],
) -> None:
    payer = make_payer(usdc=USDC)
    req = requirement(settler.address, amount=42_000)
    header, _ = signed_header(payer, req, version=version)
    wire_req = req.v2_dict() if version == 2 else req.v1_dict()
    verdict = await facilitator.verify(body(header, wire_req))
    assert verdict.to_json() == {"isValid": True, "payer": payer.address}

    first = await facilitator.settle(body(header, wire_req))
    assert first.success and first.payer == payer.address
    assert first.network == ("eip155:8453" if version == 2 else "base")
    again = await facilitator.settle(body(header, wire_req))  # a resource server retrying
    assert again.success and again.transaction == first.transaction
    assert await chain.balance_of(payer.address) == USDC - 42_000


async def test_payment_faults_are_answers(
    facilitator: Facilitator, settler: Settler, make_payer: Callable[..., Payer]
) -> None:
    poor = make_payer(usdc=1)
    req = requirement(settler.address, amount=42_000)
    header, _ = signed_header(poor, req)
    verdict = await facilitator.verify(body(header, req.v2_dict()))
    assert not verdict.is_valid and verdict.invalid_reason == reasons.INSUFFICIENT_BALANCE
    settled = await facilitator.settle(body(header, req.v2_dict()))
    assert not settled.success and settled.error_reason == reasons.INSUFFICIENT_BALANCE

    cheaper = requirement(settler.address, amount=41_000).v2_dict()  # payload accepted 42_000
    verdict = await facilitator.verify(body(header, cheaper))
    assert verdict.invalid_reason == reasons.AUTHORIZATION_VALUE_MISMATCH

    sepolia = requirement(settler.address, amount=42_000, network=BASE_SEPOLIA).v2_dict()
    verdict = await facilitator.verify(body(header, sepolia))
    assert verdict.invalid_reason == reasons.INVALID_NETWORK

    verdict = await facilitator.verify({"x402Version": 2, "paymentPayload": "nope"})
    assert verdict.invalid_reason == reasons.INVALID_PAYLOAD
