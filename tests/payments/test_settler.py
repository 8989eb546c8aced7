"""Settler on a real Anvil: sends, receipt checks, the nonce manager under concurrency and
after someone else used the key, refused sends, refunds."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from payments import reasons
from payments.chain import Chain
from payments.eip3009 import sign_authorization
from payments.errors import SettlementFailed
from payments.localchain import LocalChain
from payments.networks import BASE
from payments.settler import GasSettings, SendRejected, Settler

from .conftest import USDC, Payer, authorization, new_key, requirement

pytestmark = pytest.mark.chain


async def test_submit_and_confirm_moves_exactly_the_amount(
    chain: Chain, settler: Settler, make_payer: Callable[..., Payer]
) -> None:
    payer = make_payer(usdc=USDC)
    req = requirement(settler.address, amount=250_000)
    auth = authorization(payer, req)
    sig = sign_authorization(payer.key, BASE.token_domain, auth)
    payee_before = await chain.balance_of(settler.address)
    recorded: list[str] = []

    async def record(tx: str) -> None:
        recorded.append(tx)

    tx = await settler.submit(auth, sig, before_send=record)
    assert recorded == [tx]
    receipt = await settler.confirm(tx, payer=payer.address, pay_to=settler.address, amount=250_000)
    assert receipt.succeeded
    assert await chain.balance_of(payer.address) == USDC - 250_000
    assert await chain.balance_of(settler.address) == payee_before + 250_000


async def test_confirm_rejects_wrong_transfer_and_reverts(
    chain: Chain, settler: Settler, make_payer: Callable[..., Payer]
) -> None:
    payer = make_payer(usdc=USDC)
    req = requirement(settler.address, amount=100_000)
    auth = authorization(payer, req)
    tx = await settler.submit(auth, sign_authorization(payer.key, BASE.token_domain, auth))
    with pytest.raises(SettlementFailed) as info:  # receipt fine, but not the amount we expect
        await settler.confirm(tx, payer=payer.address, pay_to=settler.address, amount=100_001)
    assert info.value.reason == reasons.TRANSFER_EVENT_MISMATCH

    # without the simulation nothing stops a doomed tx: it is mined and reverts
    broke = make_payer(usdc=0)
    auth = authorization(broke, req)
    tx = await settler.submit(auth, sign_authorization(broke.key, BASE.token_domain, auth))
    with pytest.raises(SettlementFailed) as info:
        await settler.confirm(tx, payer=broke.address, pay_to=settler.address, amount=100_000)
    assert info.value.reason == reasons.TRANSACTION_FAILED


async def test_nonce_resync_after_the_key_was_used_elsewhere(
    chain: Chain, settler_key: str, make_payer: Callable[..., Payer]
) -> None:
    ours = Settler(chain, settler_key)
    theirs = Settler(chain, settler_key)  # e.g. an operator script using the same hot key
    await ours.start()
    await theirs.start()
    payer = make_payer(usdc=USDC)
    req = requirement(ours.address, amount=10_000)
    for s in (theirs, ours):  # theirs takes the nonce ours has cached
        auth = authorization(payer, req)
        seen: list[str] = []

        async def record(tx: str, seen: list[str] = seen) -> None:
            seen.append(tx)

        tx = await s.submit(
            auth, sign_authorization(payer.key, BASE.token_domain, auth), before_send=record
        )
        await s.confirm(tx, payer=payer.address, pay_to=ours.address, amount=10_000)
        assert seen[-1] == tx
    assert len(seen) == 2  # ours was refused ("nonce too low"), resynced, re-signed, re-recorded
    assert await chain.balance_of(payer.address) == USDC - 20_000


async def test_concurrent_sends_from_one_key_never_collide(
    chain: Chain, settler: Settler, make_payer: Callable[..., Payer]
) -> None:
    payers = [make_payer(usdc=USDC) for _ in range(20)]
    req = requirement(settler.address, amount=1_000)

    async def one(payer: Payer) -> None:
        auth = authorization(payer, req)
        tx = await settler.submit(auth, sign_authorization(payer.key, BASE.token_domain, auth))
        await settler.confirm(tx, payer=payer.address, pay_to=settler.address, amount=1_000)

    await asyncio.gather(*(one(p) for p in payers))
    assert [await chain.balance_of(p.address) for p in payers] == [USDC - 1_000] * 20


async def test_refused_send_is_send_rejected_and_keeps_the_nonce(
    chain: Chain, make_payer: Callable[..., Payer], local_chain: object
) -> None:
    _, key = new_key()  # no ETH for gas
    poor = Settler(chain, key)
    await poor.start()
    payer = make_payer(usdc=USDC)
    auth = authorization(payer, requirement(poor.address))
    recorded: list[str] = []

    async def record(tx: str) -> None:
        recorded.append(tx)

    with pytest.raises(SendRejected):
        await poor.submit(
            auth, sign_authorization(payer.key, BASE.token_domain, auth), before_send=record
        )
    assert recorded and not await chain.transaction_known(recorded[-1])
    assert await chain.transaction_count(poor.address) == 0
    assert await chain.authorization_state(payer.address, auth.nonce) is False


async def test_refund_is_an_erc20_transfer_from_the_settler(
    chain: Chain, settler: Settler, make_payer: Callable[..., Payer]
) -> None:
    payer = make_payer(usdc=USDC)
    req = requirement(settler.address, amount=400_000)
    auth = authorization(payer, req)
    tx = await settler.submit(auth, sign_authorization(payer.key, BASE.token_domain, auth))
    await settler.confirm(tx, payer=payer.address, pay_to=settler.address, amount=400_000)
    refund_tx = await settler.refund(payer.address, 400_000)
    receipt = await settler.wait(refund_tx)
    settler.check_transfer(receipt, settler.address, payer.address, 400_000)
    assert await chain.balance_of(payer.address) == USDC


async def test_a_transaction_the_node_dropped_is_broadcast_again() -> None:
    # A chain that mines on an interval, so the tx can be dropped from its pool before a block.
    with LocalChain(block_time=1) as lc:
        address, key = new_key()
        lc.fund(address, eth_wei=10**19)
        payer = Payer(*new_key())
        lc.fund(payer.address, usdc=USDC)
        async with Chain(lc.rpc_url, BASE.usdc, request_timeout=5.0) as chain:
            settler = Settler(chain, key, gas=GasSettings(rebroadcast_after_s=0.3))
            await settler.start()
            req = requirement(settler.address, amount=100_000)
            auth = authorization(payer, req)
            tx = await settler.submit(auth, sign_authorization(payer.key, BASE.token_domain, auth))
            lc.rpc("anvil_dropTransaction", [tx])
            assert lc.rpc("eth_getTransactionByHash", [tx]) is None  # really gone
            receipt = await settler.confirm(
                tx, payer=payer.address, pay_to=req.pay_to, amount=100_000
            )
            assert receipt.succeeded and receipt.tx_hash == tx
            assert await chain.balance_of(payer.address) == USDC - 100_000


async def test_a_pool_that_lost_every_pending_transaction_gets_them_again_in_order() -> None:
    # The stall seen on Anvil: the node no longer offers the next nonce for mining, so every
    # later transaction waits behind it. Here the pool loses all of them at once.
    with LocalChain(block_time=1) as lc:
        address, key = new_key()
        lc.fund(address, eth_wei=10**19)
        payers = [Payer(*new_key()) for _ in range(5)]
        for payer in payers:
            lc.fund(payer.address, usdc=USDC)
        async with Chain(lc.rpc_url, BASE.usdc, request_timeout=5.0) as chain:
            settler = Settler(chain, key, gas=GasSettings(rebroadcast_after_s=0.3))
            await settler.start()
            req = requirement(settler.address, amount=100_000)
            auths = [authorization(payer, req) for payer in payers]
            txs = await asyncio.gather(
                *(
                    settler.submit(auth, sign_authorization(payer.key, BASE.token_domain, auth))
                    for payer, auth in zip(payers, auths, strict=True)
                )
            )
            for tx in txs:
                lc.rpc("anvil_dropTransaction", [tx])
            assert all(lc.rpc("eth_getTransactionByHash", [tx]) is None for tx in txs)
            receipts = await asyncio.gather(
                *(
                    settler.confirm(tx, payer=auth.from_, pay_to=req.pay_to, amount=100_000)
                    for tx, auth in zip(txs, auths, strict=True)
                )
            )
            assert [r.tx_hash for r in receipts] == list(txs)
            for payer in payers:
                assert await chain.balance_of(payer.address) == USDC - 100_000
            assert await chain.transaction_count(settler.address, "latest") == len(txs)
