"""The processor in remote facilitator mode, in process, against real facilitators over HTTP:
no settler key, uncertain rows left by lost answers, start-up reconciliation, refusals that
are not final yet. The chain decides, and every balance is read from it."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from payments import reasons
from payments.chain import Chain
from payments.errors import InfrastructureError, SettlementFailed
from payments.ledger import PaymentState, SqliteLedger
from payments.localchain import DevAccount
from payments.networks import BASE
from payments.processor import PaymentProcessor
from payments.remote_facilitator import RemoteFacilitator
from payments.requirements import Requirement, build_payment_required
from payments.wire import decode_payment_header, to_authorization
from tests.gateway.conftest import USDC, new_key
from tests.gateway.paying import v2_header
from tests.gateway.server import ServerThread, free_port

from .conftest import TOKEN, Served, Stub

pytestmark = pytest.mark.chain

AMOUNT = 30_000


def _offer() -> list[Requirement]:
    pay_to, _ = new_key()
    return [
        Requirement(
            network=BASE, amount=AMOUNT, pay_to=pay_to, resource_url="http://127.0.0.1/paid"
        )
    ]


def _header(payer: DevAccount, offered: list[Requirement]) -> str:
    return v2_header(build_payment_required(offered).header, payer.private_key)


def _key_of(header: str) -> tuple[int, str, str, bytes]:
    auth, _ = to_authorization(decode_payment_header(header).payload)
    return (BASE.chain_id, BASE.usdc, auth.from_, auth.nonce)


@pytest.fixture
async def chain(local_chain: Any) -> AsyncIterator[Chain]:
    async with Chain(local_chain.rpc_url, BASE.usdc, request_timeout=5.0) as c:
        yield c


@pytest.fixture
async def ledger(tmp_path: Path) -> AsyncIterator[SqliteLedger]:
    async with SqliteLedger(tmp_path / "ledger.db") as led:
        yield led


@pytest.fixture(scope="module")
def stub() -> Iterator[tuple[Stub, str]]:
    fake = Stub()
    server = ServerThread(fake.app(), free_port()).start()
    try:
        yield fake, server.url
    finally:
        server.stop()


def _remote(url: str, **kw: Any) -> RemoteFacilitator:
    kw.setdefault("auth_header", f"Authorization: Bearer {TOKEN}")
    kw.setdefault("backoff_s", 0.05)
    return RemoteFacilitator(url, **kw)


async def _processor(
    chain: Chain, ledger: SqliteLedger, remote: RemoteFacilitator, **kw: Any
) -> PaymentProcessor:
    processor = PaymentProcessor(chain, None, ledger, facilitator=remote, **kw)
    await processor.start()
    return processor


async def test_no_settler_key_refund_is_refused_and_the_payment_stays_settled(
    ours: Served,
    chain: Chain,
    ledger: SqliteLedger,
    funded_payer: Callable[..., DevAccount],
    local_chain: Any,
) -> None:
    payer = funded_payer(usdc=USDC, eth_wei=0)
    offered = _offer()
    remote = _remote(ours.url)
    try:
        processor = await _processor(chain, ledger, remote)
        settled = await processor.pay(_header(payer, offered), offered)
        assert local_chain.usdc_balance(payer.address) == USDC - AMOUNT
        with pytest.raises(InfrastructureError, match="no settler key"):
            await processor.refund(settled.payment_id)
        row = await ledger.get(settled.payment_id)
        assert row.state is PaymentState.SETTLED and row.tx_hash == settled.tx_hash
        assert local_chain.usdc_balance(payer.address) == USDC - AMOUNT  # owed, logged
    finally:
        await remote.aclose()


async def test_reconcile_settles_a_row_whose_answer_was_lost(
    ours: Served,
    chain: Chain,
    ledger: SqliteLedger,
    funded_payer: Callable[..., DevAccount],
    local_chain: Any,
) -> None:
    payer = funded_payer(usdc=USDC, eth_wei=0)
    offered = _offer()
    header = _header(payer, offered)
    proxy = ours.proxy
    proxy.swallowed = 0
    proxy.cut_on = b"POST /settle"
    lost = _remote(ours.url, retries=0)
    try:
        crashed = await _processor(chain, ledger, lost)
        with pytest.raises(InfrastructureError):
            await crashed.pay(header, offered)
    finally:
        proxy.restore()
        await lost.aclose()
    row = await ledger.get_by_key(*_key_of(header))
    assert row is not None and row.state is PaymentState.RESERVED
    assert local_chain.usdc_balance(payer.address) == USDC - AMOUNT  # it moved all the same

    remote = _remote(ours.url)
    try:
        restarted = await _processor(chain, ledger, remote)
        report = await restarted.reconcile()
    finally:
        await remote.aclose()
    assert report.settled == [row.id] and report.needs_task == [row.id]
    done = await ledger.get(row.id)
    assert done.state is PaymentState.SETTLED and done.tx_hash is not None
    sender = local_chain.rpc("eth_getTransactionByHash", [done.tx_hash])["from"]
    assert sender.lower() == ours.address.lower()
    assert local_chain.usdc_balance(payer.address) == USDC - AMOUNT


async def test_a_facilitator_that_never_took_the_call_releases_the_reservation(
    stub: tuple[Stub, str],
    chain: Chain,
    ledger: SqliteLedger,
    funded_payer: Callable[..., DevAccount],
) -> None:
    fake, url = stub
    payer = funded_payer(usdc=USDC, eth_wei=0)
    offered = _offer()
    header = _header(payer, offered)
    fake.settle = (429, {"error": "slow down"})
    remote = _remote(url, retries=1)
    try:
        processor = await _processor(chain, ledger, remote)
        with pytest.raises(InfrastructureError, match="unavailable"):
            await processor.pay(header, offered)
    finally:
        await remote.aclose()
    assert await ledger.get_by_key(*_key_of(header)) is None  # free to retry as it is


async def test_a_refusal_after_an_uncertain_attempt_waits_for_the_chain(
    stub: tuple[Stub, str],
    chain: Chain,
    ledger: SqliteLedger,
    funded_payer: Callable[..., DevAccount],
    local_chain: Any,
) -> None:
    fake, url = stub
    payer = funded_payer(usdc=USDC, eth_wei=0)
    offered = _offer()
    header = _header(payer, offered)
    now = [time.time()]
    remote = _remote(url, retries=0)
    try:
        processor = await _processor(chain, ledger, remote, clock=lambda: now[0])
        fake.settle = (500, {"error": "boom"})  # may have acted: the row stays
        with pytest.raises(InfrastructureError, match="lost"):
            await processor.pay(header, offered)
        row = await ledger.get_by_key(*_key_of(header))
        assert row is not None and row.state is PaymentState.RESERVED

        # Now it refuses; an earlier attempt may still be mined, so not final before expiry.
        fake.settle = (200, {"success": False, "errorReason": reasons.INSUFFICIENT_BALANCE})
        with pytest.raises(InfrastructureError, match="not final"):
            await processor.pay(header, offered)
        assert (await ledger.get(row.id)).state is PaymentState.RESERVED
        report = await processor.reconcile()
        assert row.id in report.unresolved  # never released: the facilitator may still send

        now[0] = row.valid_before + 1  # expired and unused on chain: nothing can move now
        with pytest.raises(SettlementFailed) as refused:
            await processor.pay(header, offered)
        assert refused.value.reason == reasons.INSUFFICIENT_BALANCE
        assert (await ledger.get(row.id)).state is PaymentState.FAILED
    finally:
        await remote.aclose()
    assert local_chain.usdc_balance(payer.address) == USDC


async def test_reconcile_fails_an_expired_unused_row(
    stub: tuple[Stub, str],
    chain: Chain,
    ledger: SqliteLedger,
    funded_payer: Callable[..., DevAccount],
) -> None:
    fake, url = stub
    payer = funded_payer(usdc=USDC, eth_wei=0)
    offered = _offer()
    header = _header(payer, offered)
    now = [time.time()]
    remote = _remote(url, retries=0)
    try:
        processor = await _processor(chain, ledger, remote, clock=lambda: now[0])
        fake.settle = (502, {"error": "bad gateway"})
        with pytest.raises(InfrastructureError):
            await processor.pay(header, offered)
        row = await ledger.get_by_key(*_key_of(header))
        assert row is not None
        now[0] = row.valid_before + 1
        report = await processor.reconcile()
    finally:
        await remote.aclose()
    assert report.failed == [row.id]
    failed = await ledger.get(row.id)
    assert failed.state is PaymentState.FAILED and failed.reason == reasons.VALID_BEFORE_EXPIRED


async def test_a_facilitator_down_at_start_up_delays_nothing_and_charges_nothing(
    chain: Chain,
    ledger: SqliteLedger,
    funded_payer: Callable[..., DevAccount],
    local_chain: Any,
) -> None:
    payer = funded_payer(usdc=USDC, eth_wei=0)
    offered = _offer()
    header = _header(payer, offered)
    remote = _remote(f"http://127.0.0.1:{free_port()}", retries=2)  # nothing listens there
    try:
        started = time.monotonic()
        processor = await _processor(chain, ledger, remote)
        assert time.monotonic() - started < 2.0  # a start-up probe, not a wait
        with pytest.raises(InfrastructureError, match="unavailable"):
            await processor.pay(header, offered)
    finally:
        await remote.aclose()
    assert await ledger.get_by_key(*_key_of(header)) is None
    assert local_chain.usdc_balance(payer.address) == USDC
