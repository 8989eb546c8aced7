"""PaymentProcessor end to end on a real Anvil: real keys, real signatures, balances on chain,
the ledger as the judge of idempotency, outages that must not charge, crash recovery."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from payments import reasons
from payments.chain import (
    SEL_TRANSFER_WITH_AUTHORIZATION_BYTES,
    SEL_TRANSFER_WITH_AUTHORIZATION_VRS,
    Chain,
)
from payments.eip3009 import sign_authorization
from payments.errors import InfrastructureError, InvalidPayment, SettlementFailed
from payments.ledger import NewPayment, PaymentState, SqliteLedger
from payments.networks import BASE
from payments.processor import PaymentProcessor
from payments.settler import Settler

from .conftest import USDC, Payer, authorization, header_for, new_key, requirement, signed_header

pytestmark = pytest.mark.chain


async def test_payment_is_verified_and_settled(
    processor: PaymentProcessor,
    chain: Chain,
    settler: Settler,
    ledger: SqliteLedger,
    make_payer: Callable[..., Payer],
) -> None:
    payer = make_payer(usdc=USDC)
    req = requirement(settler.address, amount=250_000)
    header, auth = signed_header(payer, req)
    payee_before = await chain.balance_of(settler.address)

    settled = await processor.pay(header, [req], version_hint=2)

    assert not settled.replay and settled.payer == payer.address and settled.amount == 250_000
    assert await chain.balance_of(payer.address) == USDC - 250_000
    assert await chain.balance_of(settler.address) == payee_before + 250_000
    row = await ledger.get(settled.payment_id)
    assert row.state is PaymentState.SETTLED and row.tx_hash == settled.tx_hash
    assert (row.payer, row.nonce, row.amount) == (payer.address, auth.nonce, 250_000)
    receipt = await chain.get_receipt(settled.tx_hash)
    assert receipt is not None and receipt.succeeded
    sent = await chain.rpc("eth_getTransactionByHash", [settled.tx_hash])
    assert sent["input"].startswith("0x" + SEL_TRANSFER_WITH_AUTHORIZATION_VRS.hex())
    assert sent["from"].lower() == settler.address.lower()
    response = settled.settle_response()
    assert (response.success, response.network, response.transaction) == (
        True,
        "eip155:8453",
        settled.tx_hash,
    )
    assert (await processor.link_task(settled.payment_id, "task-1")).task_id == "task-1"


async def test_v1_payment_settles(
    processor: PaymentProcessor, chain: Chain, settler: Settler, make_payer: Callable[..., Payer]
) -> None:
    payer = make_payer(usdc=USDC)
    req = requirement(settler.address, amount=10_000)
    header, _ = signed_header(payer, req, version=1)
    settled = await processor.pay(header, [req], version_hint=1)
    assert settled.version == 1 and settled.settle_response().network == "base"
    assert await chain.balance_of(payer.address) == USDC - 10_000


async def test_insufficient_balance_comes_from_the_simulation_and_reserves_nothing(
    processor: PaymentProcessor,
    settler: Settler,
    ledger: SqliteLedger,
    make_payer: Callable[..., Payer],
) -> None:
    payer = make_payer(usdc=100)
    req = requirement(settler.address, amount=250_000)
    header, _ = signed_header(payer, req)
    with pytest.raises(InvalidPayment) as info:
        await processor.pay(header, [req])
    assert info.value.reason == reasons.INSUFFICIENT_BALANCE
    assert await ledger.pending() == [] and (await ledger.totals()).received == 0


async def test_nonce_used_on_chain_comes_from_the_simulation(
    processor: PaymentProcessor,
    settler: Settler,
    ledger: SqliteLedger,
    make_payer: Callable[..., Payer],
) -> None:
    payer = make_payer(usdc=USDC)
    req = requirement(settler.address, amount=5_000)
    header, auth = signed_header(payer, req)
    # somebody else (not this gateway, not in its ledger) already used the authorization
    sig = sign_authorization(payer.key, BASE.token_domain, auth)
    tx = await settler.submit(auth, sig)
    await settler.confirm(tx, payer=payer.address, pay_to=settler.address, amount=5_000)
    with pytest.raises(InvalidPayment) as info:
        await processor.pay(header, [req])
    assert info.value.reason == reasons.NONCE_ALREADY_USED
    assert await ledger.get_by_key(8453, BASE.usdc, payer.address, auth.nonce) is None


async def test_same_authorization_sequentially_settles_once(
    processor: PaymentProcessor, chain: Chain, settler: Settler, make_payer: Callable[..., Payer]
) -> None:
    payer = make_payer(usdc=USDC)
    req = requirement(settler.address, amount=70_000)
    header, _ = signed_header(payer, req)
    first = await processor.pay(header, [req])
    await processor.link_task(first.payment_id, "t-1")
    second = await processor.pay(header, [req])
    third = await processor.pay(header, [req])
    for again in (second, third):
        assert again.replay and again.payment_id == first.payment_id
        assert again.tx_hash == first.tx_hash and again.task_id == "t-1"
    assert await chain.balance_of(payer.address) == USDC - 70_000


async def test_same_authorization_concurrently_settles_once(
    processor: PaymentProcessor,
    chain: Chain,
    settler: Settler,
    ledger: SqliteLedger,
    make_payer: Callable[..., Payer],
) -> None:
    payer = make_payer(usdc=USDC)
    req = requirement(settler.address, amount=90_000)
    header, auth = signed_header(payer, req)
    nonce_before = await chain.transaction_count(settler.address)
    results = await asyncio.gather(*(processor.pay(header, [req]) for _ in range(10)))
    assert sum(not r.replay for r in results) == 1
    assert len({r.payment_id for r in results}) == 1 and len({r.tx_hash for r in results}) == 1
    assert await chain.balance_of(payer.address) == USDC - 90_000
    assert await chain.transaction_count(settler.address) == nonce_before + 1  # one send
    assert (await ledger.totals()).received == 90_000
    # a v1 header carrying the same authorization is the same payment too
    v1 = header_for(auth, sign_authorization(payer.key, req.domain, auth), req, version=1)
    again = await processor.pay(v1, [req])
    assert again.replay and again.payment_id == results[0].payment_id and again.version == 1


async def test_replay_after_expiry_still_gets_the_outcome_but_needs_the_signature(
    chain: Chain, settler: Settler, ledger: SqliteLedger, make_payer: Callable[..., Payer]
) -> None:
    offset = [0.0]
    processor = PaymentProcessor(chain, settler, ledger, clock=lambda: time.time() + offset[0])
    payer = make_payer(usdc=USDC)
    req = requirement(settler.address, amount=1_000)
    header, auth = signed_header(payer, req)
    first = await processor.pay(header, [req])
    offset[0] = 3600.0  # an hour later the authorization has expired
    again = await processor.pay(header, [req])
    assert again.replay and again.tx_hash == first.tx_hash
    forged = header_for(auth, sign_authorization(new_key()[1], req.domain, auth), req)
    with pytest.raises(InvalidPayment) as info:
        await processor.pay(forged, [req])
    assert info.value.reason == reasons.VALID_BEFORE_EXPIRED  # no outcome leaked


async def test_a_failed_first_attempt_is_the_answer_to_its_replays(
    processor: PaymentProcessor,
    settler: Settler,
    ledger: SqliteLedger,
    make_payer: Callable[..., Payer],
) -> None:
    payer = make_payer(usdc=USDC)
    req = requirement(settler.address, amount=3_000)
    header, auth = signed_header(payer, req)
    # as left by a first attempt whose transaction reverted
    row, _ = await ledger.reserve(
        NewPayment(
            8453,
            BASE.usdc,
            payer.address,
            auth.nonce,
            3_000,
            settler.address,
            "eip155:8453",
            2,
            auth.valid_before,
        )
    )
    await ledger.mark_submitted(row.id, "0x" + "11" * 32)
    await ledger.mark_failed(row.id, reasons.TRANSACTION_FAILED)
    for _ in range(2):
        with pytest.raises(SettlementFailed) as info:
            await processor.pay(header, [req])
        assert info.value.reason == reasons.TRANSACTION_FAILED


async def test_fifty_payments_concurrently_from_one_settler_key(
    processor: PaymentProcessor,
    chain: Chain,
    settler: Settler,
    ledger: SqliteLedger,
    make_payer: Callable[..., Payer],
) -> None:
    req = requirement(settler.address, amount=20_000)
    payers = [make_payer(usdc=USDC) for _ in range(50)]
    headers = [signed_header(p, req)[0] for p in payers]
    payee_before = await chain.balance_of(settler.address)
    t0 = time.perf_counter()
    results = await asyncio.gather(*(processor.pay(h, [req]) for h in headers))
    wall = time.perf_counter() - t0
    print(f"\n50 concurrent payments settled from one key in {wall:.2f}s")
    assert len({r.tx_hash for r in results}) == 50 and not any(r.replay for r in results)
    assert [await chain.balance_of(p.address) for p in payers] == [USDC - 20_000] * 50
    assert await chain.balance_of(settler.address) - payee_before == 50 * 20_000
    assert (await ledger.totals()).net == 50 * 20_000  # ledger == chain


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_rpc_down_is_503_and_charges_nothing(
    chain: Chain,
    settler_key: str,
    ledger: SqliteLedger,
    make_payer: Callable[..., Payer],
) -> None:
    payer = make_payer(usdc=USDC)
    async with Chain(f"http://127.0.0.1:{_free_port()}", BASE.usdc, request_timeout=1) as down:
        settler = Settler(down, settler_key)
        processor = PaymentProcessor(down, settler, ledger)
        req = requirement(settler.address, amount=50_000)
        header, _ = signed_header(payer, req)
        with pytest.raises(InfrastructureError) as info:
            await processor.pay(header, [req])
        assert not isinstance(info.value, InvalidPayment)
    assert await ledger.pending() == [] and (await ledger.totals()).received == 0
    assert await chain.balance_of(payer.address) == USDC


class FlakyRpc:
    """A proxy to Anvil that can refuse a method or swallow its answer after forwarding it."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.refuse: set[str] = set()
        self.swallow: set[str] = set()
        self.methods: list[str] = []

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        method = (await request.json()).get("method")
        self.methods.append(method)
        if method in self.refuse:
            return web.Response(status=503, text="unavailable")
        async with (
            aiohttp.ClientSession() as s,
            s.post(self.upstream, data=body, headers={"Content-Type": "application/json"}) as r,
        ):
            answer = await r.read()
        if method in self.swallow:  # forwarded, but the answer is lost on the way back
            return web.Response(status=502, text="lost")
        return web.Response(body=answer, content_type="application/json")


@pytest.fixture
async def flaky(local_chain: Any) -> AsyncIterator[tuple[FlakyRpc, str]]:
    proxy = FlakyRpc(local_chain.rpc_url)
    app = web.Application()
    app.router.add_post("/", proxy.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    port = _free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield proxy, f"http://127.0.0.1:{port}/"
    finally:
        await runner.cleanup()


async def test_uncertain_send_is_never_released(
    flaky: tuple[FlakyRpc, str],
    chain: Chain,
    settler_key: str,
    ledger: SqliteLedger,
    make_payer: Callable[..., Payer],
) -> None:
    proxy, url = flaky
    payer = make_payer(usdc=USDC)
    async with Chain(url, BASE.usdc, request_timeout=2, read_retries=1) as via_proxy:
        settler = Settler(via_proxy, settler_key)
        processor = PaymentProcessor(via_proxy, settler, ledger)
        await processor.start()
        req = requirement(settler.address, amount=40_000)
        header, auth = signed_header(payer, req)
        proxy.refuse = {"eth_sendRawTransaction"}  # HTTP 503 at the broadcast
        with pytest.raises(InfrastructureError):
            await processor.pay(header, [req])
        # an HTTP error cannot be told apart from an answer lost after forwarding, so the
        # reservation must NOT be released; the row waits for reconciliation
        rows = await ledger.pending()
        assert [r.state for r in rows] == [PaymentState.SUBMITTED]
        assert await chain.balance_of(payer.address) == USDC
        proxy.refuse = set()
        # the payer retries the same header: the row is resolved (tx unknown, authorization
        # unused, still valid) -> still undecided, so it is a 503 again, never a double charge
        with pytest.raises(InfrastructureError):
            await processor.pay(header, [req])
        assert await chain.authorization_state(payer.address, auth.nonce) is False


async def test_lost_send_answer_is_reconciled_from_the_receipt(
    flaky: tuple[FlakyRpc, str],
    chain: Chain,
    settler_key: str,
    ledger: SqliteLedger,
    make_payer: Callable[..., Payer],
) -> None:
    proxy, url = flaky
    payer = make_payer(usdc=USDC)
    async with Chain(url, BASE.usdc, request_timeout=2, read_retries=1) as via_proxy:
        settler = Settler(via_proxy, settler_key)
        processor = PaymentProcessor(via_proxy, settler, ledger)
        await processor.start()
        req = requirement(settler.address, amount=60_000)
        header, _ = signed_header(payer, req)
        proxy.swallow = {"eth_sendRawTransaction"}  # mined, but we never hear back
        with pytest.raises(InfrastructureError):
            await processor.pay(header, [req])
    [row] = await ledger.pending()
    assert row.state is PaymentState.SUBMITTED and row.tx_hash is not None
    assert await chain.balance_of(payer.address) == USDC - 60_000  # the money did move

    # restart: a new processor on a healthy RPC reconciles the row from its receipt
    restarted = PaymentProcessor(chain, Settler(chain, settler_key), ledger)
    report = await restarted.reconcile()
    assert report.settled == [row.id] and report.needs_task == [row.id]
    settled = await ledger.get(row.id)
    assert settled.state is PaymentState.SETTLED and settled.tx_hash == row.tx_hash
    # and the payer's retry now gets that outcome
    again = await restarted.pay(header, [req])
    assert again.replay and again.payment_id == row.id and again.tx_hash == row.tx_hash


async def test_refused_send_releases_the_reservation(
    chain: Chain, ledger: SqliteLedger, local_chain: Any, make_payer: Callable[..., Payer]
) -> None:
    address, key = new_key()  # a settler without gas money: the node refuses its tx
    settler = Settler(chain, key)
    processor = PaymentProcessor(chain, settler, ledger)
    payer = make_payer(usdc=USDC)
    req = requirement(address, amount=30_000)
    header, _ = signed_header(payer, req)
    with pytest.raises(InfrastructureError):
        await processor.pay(header, [req])
    assert await ledger.pending() == []  # released: nothing was broadcast
    local_chain.fund(address, eth_wei=10**18)
    settled = await processor.pay(header, [req])  # the same header now goes through
    assert not settled.replay and await chain.balance_of(payer.address) == USDC - 30_000


async def test_reconcile_releases_orphan_reservations(
    processor: PaymentProcessor,
    settler: Settler,
    ledger: SqliteLedger,
    make_payer: Callable[..., Payer],
) -> None:
    payer = make_payer(usdc=USDC)
    auth = authorization(payer, requirement(settler.address))
    row, _ = await ledger.reserve(
        NewPayment(
            8453,
            BASE.usdc,
            payer.address,
            auth.nonce,
            auth.value,
            settler.address,
            "eip155:8453",
            2,
            auth.valid_before,
        )
    )
    report = await processor.reconcile()
    # Never broadcast and unused on chain: the reservation is forgotten, so a retry can settle.
    assert report.released == [row.id] and report.failed == []
    assert await ledger.get_by_key(8453, BASE.usdc, payer.address, auth.nonce) is None


async def test_refund_returns_the_money_once(
    processor: PaymentProcessor,
    chain: Chain,
    settler: Settler,
    ledger: SqliteLedger,
    make_payer: Callable[..., Payer],
) -> None:
    payer = make_payer(usdc=USDC)
    req = requirement(settler.address, amount=333_000)
    header, _ = signed_header(payer, req)
    settled = await processor.pay(header, [req])
    assert await chain.balance_of(payer.address) == USDC - 333_000
    rows = await asyncio.gather(*(processor.refund(settled.payment_id) for _ in range(3)))
    assert {r.state for r in rows} == {PaymentState.REFUNDED}
    assert len({r.refund_tx for r in rows}) == 1
    assert await chain.balance_of(payer.address) == USDC  # refunded exactly once
    assert (await processor.refund(settled.payment_id)).state is PaymentState.REFUNDED
    assert (await ledger.totals()).net == 0
    replay = await processor.pay(header, [req])
    assert replay.replay and replay.state is PaymentState.REFUNDED


async def test_eip1271_contract_wallet_pays_through_the_bytes_overload(
    processor: PaymentProcessor,
    chain: Chain,
    settler: Settler,
    ledger: SqliteLedger,
    local_chain: Any,
) -> None:
    owner_address, owner_key = new_key()
    wallet = local_chain.deploy("TestWallet", owner_address)
    local_chain.fund(wallet, usdc=USDC)
    req = requirement(settler.address, amount=75_000)
    # the owner signs the EIP-712 digest of an authorization whose `from` is the wallet
    header, _ = signed_header(Payer(wallet, owner_key), req)
    verified = await processor.verify(header, [req])
    assert verified.contract_wallet and verified.payer == wallet
    settled = await processor.pay(header, [req])
    assert settled.payer == wallet and not settled.replay
    assert await chain.balance_of(wallet) == USDC - 75_000
    assert (await ledger.get(settled.payment_id)).state is PaymentState.SETTLED
    receipt = await chain.get_receipt(settled.tx_hash)
    assert receipt is not None and receipt.succeeded
    sent = await chain.rpc("eth_getTransactionByHash", [settled.tx_hash])
    assert sent["input"].startswith("0x" + SEL_TRANSFER_WITH_AUTHORIZATION_BYTES.hex())
    # a signature by anybody but the owner is refused by the wallet itself
    _, auth2 = signed_header(Payer(wallet, owner_key), req)
    stranger = header_for(auth2, sign_authorization(new_key()[1], req.domain, auth2), req)
    with pytest.raises(InvalidPayment) as info:
        await processor.pay(stranger, [req])
    assert info.value.reason == reasons.INVALID_SIGNATURE


async def test_round_trips_per_paid_request(
    flaky: tuple[FlakyRpc, str],
    settler_key: str,
    ledger: SqliteLedger,
    make_payer: Callable[..., Payer],
) -> None:
    """Warm caches: one simulation, one broadcast, mined-nonce polls and ONE receipt fetch
    (asked for only once the nonce count shows the tx mined). Nothing else per request."""
    proxy, url = flaky
    payers = [make_payer(usdc=USDC) for _ in range(5)]
    async with Chain(url, BASE.usdc) as via_proxy:
        settler = Settler(via_proxy, settler_key)
        processor = PaymentProcessor(via_proxy, settler, ledger)
        await processor.start()
        req = requirement(settler.address, amount=1_000)
        for payer in payers:
            header, _ = signed_header(payer, req)
            proxy.methods.clear()
            await processor.pay(header, [req])
            counts = {m: proxy.methods.count(m) for m in set(proxy.methods)}
            polls = counts.pop("eth_getTransactionCount")
            assert counts == {
                "eth_call": 1,
                "eth_sendRawTransaction": 1,
                "eth_getTransactionReceipt": 1,
            }, counts
            assert 1 <= polls <= 3, polls


async def test_refund_needs_usdc_on_the_settler_when_pay_to_is_elsewhere(
    processor: PaymentProcessor,
    chain: Chain,
    settler: Settler,
    ledger: SqliteLedger,
    local_chain: Any,
    make_payer: Callable[..., Payer],
) -> None:
    treasury, _ = new_key()  # payTo is not the settler: the money lands in another wallet
    payer = make_payer(usdc=USDC)
    req = requirement(treasury, amount=200_000)
    header, _ = signed_header(payer, req)
    settled = await processor.pay(header, [req])
    assert await chain.balance_of(treasury) == 200_000
    nonce_before = await chain.transaction_count(settler.address)
    with pytest.raises(InfrastructureError):  # settler holds no USDC: nothing is sent
        await processor.refund(settled.payment_id)
    assert await chain.transaction_count(settler.address) == nonce_before
    assert (await ledger.get(settled.payment_id)).state is PaymentState.SETTLED
    local_chain.fund(settler.address, usdc=200_000)  # the operator tops the settler up
    row = await processor.refund(settled.payment_id)
    assert row.state is PaymentState.REFUNDED
    assert await chain.balance_of(payer.address) == USDC
