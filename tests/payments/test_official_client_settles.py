"""Interop: payloads produced by the official `x402` PyPI client (v2, and the v1 fallback)
verify and settle through our PaymentProcessor on Anvil. The client is used as a black box:
it reads our 402 challenge and signs with a real key through its own signer."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
from eth_account import Account
from x402 import x402Client
from x402.http.utils import decode_payment_required_header, encode_payment_signature_header
from x402.mechanisms.evm.exact.register import register_exact_evm_client
from x402.schemas.v1 import PaymentRequiredV1

from payments.chain import Chain
from payments.ledger import PaymentState, SqliteLedger
from payments.processor import PaymentProcessor
from payments.requirements import build_payment_required
from payments.settler import Settler

from .conftest import USDC, Payer, requirement

pytestmark = pytest.mark.chain


def official_client(payer: Payer) -> x402Client:
    client = x402Client()
    register_exact_evm_client(client, Account.from_key(payer.key))
    return client


@pytest.mark.parametrize("version", [2, 1])
async def test_official_client_payload_verifies_and_settles(
    version: int,
    processor: PaymentProcessor,
    chain: Chain,
    settler: Settler,
    ledger: SqliteLedger,
    make_payer: Callable[..., Payer],
) -> None:
    payer = make_payer(usdc=USDC)
    req = requirement(settler.address, amount=250_000)  # 0.25 USDC, canonical Base USDC
    challenge = build_payment_required([req], "payment required")
    client = official_client(payer)

    if version == 2:
        payment_required = decode_payment_required_header(challenge.header)
    else:
        payment_required = PaymentRequiredV1.model_validate(json.loads(challenge.body))
    payload = await client.create_payment_payload(payment_required)
    assert payload.x402_version == version
    header = encode_payment_signature_header(payload)

    verified = await processor.verify(header, [req], version_hint=version)  # type: ignore[arg-type]
    assert verified.payer == payer.address and not verified.contract_wallet

    payee_before = await chain.balance_of(settler.address)
    settled = await processor.pay(header, [req], version_hint=version)  # type: ignore[arg-type]
    assert settled.version == version and not settled.replay
    assert await chain.balance_of(payer.address) == USDC - 250_000
    assert await chain.balance_of(settler.address) == payee_before + 250_000
    row = await ledger.get(settled.payment_id)
    assert row.state is PaymentState.SETTLED and row.tx_hash == settled.tx_hash
    expected_network = "eip155:8453" if version == 2 else "base"
    assert settled.settle_response().network == expected_network
