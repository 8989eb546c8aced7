"""The settler signs its transactions itself (pyrlp + libsecp256k1); the bytes must be exactly
what eth-account produces for the same transaction (both use RFC 6979 deterministic nonces)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

import pytest
from eth_account import Account

from payments.chain import Chain, RpcError
from payments.eip3009 import sign_authorization
from payments.networks import BASE
from payments.settler import SendRejected, Settler

from .conftest import USDC, Payer, authorization, requirement


def test_signed_transaction_matches_eth_account() -> None:
    account = Account.create()
    settler = Settler(
        Chain("http://127.0.0.1:9", "0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913"),
        bytes(account.key),
    )
    settler._chain_id = 8453
    for gas_price, nonce, data in (
        (1, 0, b""),
        (10**9, 7, b"\x01" * 292),
        (5 * 10**7, 300, b"\xaa"),
    ):
        settler._gas_price = gas_price
        tx_hash, raw = settler._sign(
            "0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913", data, 150_000, nonce
        )
        max_fee = gas_price * settler.gas.max_fee_multiplier + settler.gas.priority_fee_wei
        expected = account.sign_transaction(
            {
                "type": 2,
                "chainId": 8453,
                "nonce": nonce,
                "to": "0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913",
                "value": 0,
                "data": data,
                "gas": 150_000,
                "maxFeePerGas": max_fee,
                "maxPriorityFeePerGas": min(settler.gas.priority_fee_wei, max_fee),
            }
        )
        assert raw == bytes(expected.raw_transaction)
        assert tx_hash == "0x" + bytes(expected.hash).hex()


@pytest.mark.chain
async def test_a_failed_record_in_a_batch_leaves_no_nonce_gap(
    chain: Chain, settler: Settler, make_payer: Callable[..., Payer]
) -> None:
    """Concurrent submits are sent as one batch; one caller's `before_send` fails: it gets that
    error and nothing is sent for it, every other payment still lands (re-signed if needed)."""
    payers = [make_payer(usdc=USDC) for _ in range(8)]
    req = requirement(settler.address, amount=1_000)
    recorded: dict[int, list[str]] = {i: [] for i in range(8)}

    async def one(i: int, payer: Payer) -> str:
        async def record(tx: str) -> None:
            recorded[i].append(tx)
            if i == 2:
                raise RuntimeError("ledger down for this one")

        auth = authorization(payer, req)
        tx = await settler.submit(
            auth, sign_authorization(payer.key, BASE.token_domain, auth), before_send=record
        )
        await settler.confirm(tx, payer=payer.address, pay_to=settler.address, amount=1_000)
        assert recorded[i][-1] == tx
        return tx

    outcomes = await asyncio.gather(
        *(one(i, p) for i, p in enumerate(payers)), return_exceptions=True
    )
    assert isinstance(outcomes[2], RuntimeError)
    assert all(isinstance(o, str) for i, o in enumerate(outcomes) if i != 2)
    assert not await chain.transaction_known(recorded[2][-1])
    balances = [await chain.balance_of(p.address) for p in payers]
    assert balances == [USDC - 1_000 if i != 2 else USDC for i in range(8)]


@pytest.mark.chain
async def test_a_refusal_inside_a_batch_leaves_no_stuck_transactions(
    chain: Chain, settler: Settler, make_payer: Callable[..., Payer]
) -> None:
    """The node refuses the 2nd transaction of a batch while the later ones are already out,
    queued behind its nonce: the refused payment gets SendRejected, the later ones are mined
    once the settler fills the gap (nothing else is waiting, so with a 0-value transfer)."""
    payers = [make_payer(usdc=USDC) for _ in range(6)]
    req = requirement(settler.address, amount=1_000)
    real = chain.send_raw_many

    async def refuse_second(raws: Sequence[bytes]) -> list[str | RpcError]:
        if len(raws) < 3:
            return await real(raws)
        refused = RpcError("eth_sendRawTransaction", -32000, "refused for the test")
        return [*await real(raws[:1]), refused, *await real(raws[2:])]

    chain.send_raw_many = refuse_second  # type: ignore[method-assign]
    try:

        async def one(payer: Payer) -> str:
            auth = authorization(payer, req)
            tx = await settler.submit(auth, sign_authorization(payer.key, BASE.token_domain, auth))
            await settler.confirm(
                tx, payer=payer.address, pay_to=settler.address, amount=1_000, timeout_s=10
            )
            return tx

        outcomes = await asyncio.gather(*(one(p) for p in payers), return_exceptions=True)
    finally:
        del chain.send_raw_many
    assert isinstance(outcomes[1], SendRejected)
    assert all(isinstance(o, str) for i, o in enumerate(outcomes) if i != 1)
    balances = [await chain.balance_of(p.address) for p in payers]
    assert balances == [USDC if i == 1 else USDC - 1_000 for i in range(6)]
