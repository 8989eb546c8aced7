"""SqliteLedger: the unique key, the state machine, reconciliation queries, scale."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from payments.errors import InfrastructureError
from payments.ledger import (
    PENDING_SQL,
    IllegalTransition,
    NewPayment,
    PaymentState,
    SqliteLedger,
    UnknownPayment,
)

USDC = "0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913"
PAYER = "0x70997970C51812dc3A010C7d01b50e0d17dc79C8"
PAY_TO = "0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266"
TX_A = "0x" + "aa" * 32
TX_B = "0x" + "bb" * 32


def new_payment(nonce: bytes | None = None, amount: int = 250_000, **kw: object) -> NewPayment:
    fields: dict[str, object] = {
        "chain_id": 8453,
        "asset": USDC,
        "payer": PAYER,
        "nonce": nonce if nonce is not None else os.urandom(32),
        "amount": amount,
        "pay_to": PAY_TO,
        "network": "eip155:8453",
        "version": 2,
        "valid_before": 2_000_000_000,
    }
    fields.update(kw)
    return NewPayment(**fields)  # type: ignore[arg-type]


@pytest.fixture
async def ledger(tmp_path: Path) -> AsyncIterator[SqliteLedger]:
    async with SqliteLedger(tmp_path / "ledger.db") as led:
        yield led


async def test_reserve_is_idempotent_per_authorization(ledger: SqliteLedger) -> None:
    nonce = os.urandom(32)
    first, created = await ledger.reserve(new_payment(nonce))
    assert created and first.state is PaymentState.RESERVED
    again, created_again = await ledger.reserve(new_payment(nonce))
    assert not created_again and again.id == first.id
    # address case does not dodge the key
    lower, created_lower = await ledger.reserve(
        new_payment(nonce, payer=PAYER.lower(), asset=USDC.lower())
    )
    assert not created_lower and lower.id == first.id and lower.payer == PAYER
    # another nonce, chain or asset is another payment
    other, created_other = await ledger.reserve(new_payment(nonce, chain_id=84532))
    assert created_other and other.id != first.id
    found = await ledger.get_by_key(8453, USDC, PAYER, nonce)
    assert found is not None and found.id == first.id
    assert await ledger.get_by_key(8453, USDC, PAYER, os.urandom(32)) is None


async def test_concurrent_reserves_create_exactly_one_row(ledger: SqliteLedger) -> None:
    nonce = os.urandom(32)
    results = await asyncio.gather(*(ledger.reserve(new_payment(nonce)) for _ in range(20)))
    assert sum(created for _, created in results) == 1
    assert len({row.id for row, _ in results}) == 1


async def test_happy_path_and_refund_transitions(ledger: SqliteLedger) -> None:
    row, _ = await ledger.reserve(new_payment())
    row = await ledger.mark_submitted(row.id, TX_A)
    assert row.state is PaymentState.SUBMITTED and row.tx_hash == TX_A
    row = await ledger.mark_submitted(row.id, TX_B)  # re-signed after a nonce resync
    assert row.tx_hash == TX_B
    row = await ledger.mark_settled(row.id)
    assert row.state is PaymentState.SETTLED and row.tx_hash == TX_B
    assert (await ledger.mark_settled(row.id)).state is PaymentState.SETTLED  # idempotent
    row = await ledger.link_task(row.id, "task-1")
    assert row.task_id == "task-1"
    assert (await ledger.link_task(row.id, "task-1")).task_id == "task-1"
    with pytest.raises(IllegalTransition):
        await ledger.link_task(row.id, "task-2")  # one payment buys one task
    row = await ledger.mark_refund_submitted(row.id, TX_A)
    assert row.state is PaymentState.REFUND_SUBMITTED and row.refund_tx == TX_A
    with pytest.raises(IllegalTransition):  # a second refunder cannot start another refund
        await ledger.mark_refund_submitted(row.id, TX_B)
    row = await ledger.abandon_refund(row.id)  # the node refused it: back to settled
    assert row.state is PaymentState.SETTLED and row.refund_tx is None
    row = await ledger.mark_refund_submitted(row.id, TX_A)
    row = await ledger.mark_refund_submitted(row.id, TX_B, resend=True)
    assert row.refund_tx == TX_B
    row = await ledger.mark_refunded(row.id)
    assert row.state is PaymentState.REFUNDED
    assert (await ledger.mark_refunded(row.id)).state is PaymentState.REFUNDED
    assert row.updated_at_ms >= row.created_at_ms


@pytest.mark.parametrize(
    ("path", "illegal"),
    [
        ([], "mark_refund_submitted"),  # reserved cannot be refunded
        ([], "mark_refunded"),
        ([], "link_task"),  # no work before settlement
        (["submit", "fail"], "mark_submitted"),  # failed is final
        (["submit", "fail"], "mark_settled"),
        (["submit", "settle"], "mark_failed"),  # settled money is not "failed"; refund it
        (["submit", "settle"], "mark_submitted"),
        (["submit", "settle"], "release"),  # never forget money that moved
        (["submit", "settle", "refund", "refunded"], "mark_refund_submitted"),
    ],
)
async def test_illegal_transitions_raise(
    ledger: SqliteLedger, path: list[str], illegal: str
) -> None:
    row, _ = await ledger.reserve(new_payment())
    steps = {
        "submit": lambda: ledger.mark_submitted(row.id, TX_A),
        "fail": lambda: ledger.mark_failed(row.id, "some_reason"),
        "settle": lambda: ledger.mark_settled(row.id),
        "refund": lambda: ledger.mark_refund_submitted(row.id, TX_B),
        "refunded": lambda: ledger.mark_refunded(row.id),
    }
    for step in path:
        await steps[step]()
    before = await ledger.get(row.id)
    calls = {
        "mark_submitted": lambda: ledger.mark_submitted(row.id, TX_B),
        "mark_settled": lambda: ledger.mark_settled(row.id, TX_B),
        "mark_failed": lambda: ledger.mark_failed(row.id, "other"),
        "release": lambda: ledger.release(row.id),
        "link_task": lambda: ledger.link_task(row.id, "t"),
        "mark_refund_submitted": lambda: ledger.mark_refund_submitted(row.id, TX_B),
        "mark_refunded": lambda: ledger.mark_refunded(row.id),
    }
    with pytest.raises(IllegalTransition):
        await calls[illegal]()
    assert await ledger.get(row.id) == before  # nothing changed


async def test_settle_without_a_tx_hash_is_illegal(ledger: SqliteLedger) -> None:
    row, _ = await ledger.reserve(new_payment())
    with pytest.raises(IllegalTransition):
        await ledger.mark_settled(row.id)
    # ...but reconcile may settle a reserved row with the tx it found on chain
    settled = await ledger.mark_settled(row.id, TX_A)
    assert settled.state is PaymentState.SETTLED and settled.tx_hash == TX_A


async def test_release_frees_the_key(ledger: SqliteLedger) -> None:
    nonce = os.urandom(32)
    row, _ = await ledger.reserve(new_payment(nonce))
    await ledger.release(row.id)
    with pytest.raises(UnknownPayment):
        await ledger.get(row.id)
    again, created = await ledger.reserve(new_payment(nonce))
    assert created and again.id != row.id


async def test_pending_and_totals(ledger: SqliteLedger) -> None:
    reserved, _ = await ledger.reserve(new_payment(amount=1))
    submitted, _ = await ledger.reserve(new_payment(amount=10))
    await ledger.mark_submitted(submitted.id, TX_A)
    settled, _ = await ledger.reserve(new_payment(amount=100))
    await ledger.mark_settled(settled.id, TX_A)
    linked, _ = await ledger.reserve(new_payment(amount=1_000))
    await ledger.mark_settled(linked.id, TX_B)
    await ledger.link_task(linked.id, "t")
    failed, _ = await ledger.reserve(new_payment(amount=10_000))
    await ledger.mark_failed(failed.id, "x")
    refunding, _ = await ledger.reserve(new_payment(amount=100_000))
    await ledger.mark_settled(refunding.id, TX_A)
    await ledger.mark_refund_submitted(refunding.id, TX_B)
    refunded, _ = await ledger.reserve(new_payment(amount=1_000_000))
    await ledger.mark_settled(refunded.id, TX_A)
    await ledger.mark_refund_submitted(refunded.id, TX_B)
    await ledger.mark_refunded(refunded.id)

    pending = {r.id for r in await ledger.pending()}
    assert pending == {reserved.id, submitted.id, settled.id, refunding.id}
    totals = await ledger.totals()
    assert totals.received == 100 + 1_000 + 100_000 + 1_000_000
    assert totals.refunded == 1_000_000
    assert totals.net == 101_100
    assert (await ledger.totals(chain_id=84532)).received == 0
    assert (await ledger.totals(asset=USDC.lower())).net == 101_100


async def test_unlink_task_takes_back_only_the_named_delivery(ledger: SqliteLedger) -> None:
    row, _ = await ledger.reserve(new_payment())
    with pytest.raises(IllegalTransition):
        await ledger.unlink_task(row.id, "proxy:200")  # not settled yet
    await ledger.mark_settled(row.id, TX_A)
    await ledger.link_task(row.id, "proxy:200")
    assert row.id not in {r.id for r in await ledger.pending()}
    with pytest.raises(IllegalTransition):
        await ledger.unlink_task(row.id, "proxy:201")  # another delivery than the one recorded
    row = await ledger.unlink_task(row.id, "proxy:200")
    assert row.task_id is None and row.state is PaymentState.SETTLED
    assert row.id in {r.id for r in await ledger.pending()}  # owed back: pending again
    assert (await ledger.unlink_task(row.id, "proxy:200")).task_id is None  # idempotent


async def test_pending_for_a_sweep_only_lists_rows_left_alone_long_enough(
    tmp_path: Path,
) -> None:
    now = [1_000.0]
    async with SqliteLedger(tmp_path / "l.db", clock=lambda: now[0]) as led:
        old, _ = await led.reserve(new_payment())
        await led.mark_submitted(old.id, TX_A)  # last touched at t=1000
        now[0] = 1_100.0
        touched, _ = await led.reserve(new_payment())
        now[0] = 1_200.0
        fresh, _ = await led.reserve(new_payment())
        await led.mark_submitted(touched.id, TX_B)  # touched again at t=1200

        assert {r.id for r in await led.pending()} == {old.id, touched.id, fresh.id}
        assert [r.id for r in await led.pending(idle_for_ms=150_000)] == [old.id]
        assert [r.id for r in await led.pending(idle_for_ms=200_000)] == [old.id]
        assert await led.pending(idle_for_ms=200_001) == []
        assert {r.id for r in await led.pending(idle_for_ms=0)} == {old.id, touched.id, fresh.id}


async def test_rows_survive_reopen(tmp_path: Path) -> None:
    path = tmp_path / "l.db"
    async with SqliteLedger(path) as led:
        row, _ = await led.reserve(new_payment())
        await led.mark_submitted(row.id, TX_A)
    async with SqliteLedger(path) as led:
        again = await led.get(row.id)
        assert again.state is PaymentState.SUBMITTED and again.tx_hash == TX_A
        assert [r.id for r in await led.pending()] == [row.id]


def test_new_payment_validates() -> None:
    with pytest.raises(ValueError):
        new_payment(nonce=b"\x00" * 31)
    with pytest.raises(ValueError):
        new_payment(amount=2**63)
    with pytest.raises(ValueError):
        new_payment(amount=-1)


async def test_database_errors_are_infrastructure_errors(tmp_path: Path) -> None:
    with pytest.raises(InfrastructureError):
        await SqliteLedger(tmp_path / "missing-dir" / "l.db").open()
    led = SqliteLedger(tmp_path / "l.db")
    with pytest.raises(InfrastructureError):
        await led.reserve(new_payment())  # not opened
    await led.open()
    await led.close()
    with pytest.raises(InfrastructureError):
        await led.get("x")


async def test_lookups_stay_indexed_at_100k_rows(tmp_path: Path) -> None:
    path = tmp_path / "big.db"
    async with SqliteLedger(path) as led:
        first, _ = await led.reserve(new_payment())
    # bulk-load 100k settled+linked rows directly (the API would fsync 300k times)
    con = sqlite3.connect(path)
    now = int(time.time() * 1000)
    con.executemany(
        "INSERT INTO payments VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
        (
            (
                f"bulk{i}",
                8453,
                USDC,
                PAYER,
                "0x" + i.to_bytes(32, "big").hex(),
                1,
                PAY_TO,
                "eip155:8453",
                2,
                2_000_000_000,
                "settled",
                TX_A,
                None,
                f"t{i}",
                None,
                now,
                now,
            )
            for i in range(100_000)
        ),
    )
    con.commit()
    plans = {
        "key": "SELECT * FROM payments WHERE chain_id = 1 AND asset = 'a' AND payer = 'b' "
        "AND nonce = 'c'",
        "id": "SELECT * FROM payments WHERE id = 'x'",
        "pending": PENDING_SQL,  # the query pending() runs, not a copy of it
    }
    params: dict[str, tuple[int, ...]] = {"pending": (now, 5)}
    expected = {"key": "SEARCH", "id": "SEARCH", "pending": "USING INDEX payments_pending"}
    for name, sql in plans.items():
        plan = con.execute("EXPLAIN QUERY PLAN " + sql, params.get(name, ()))
        detail = " ".join(str(r[3]) for r in plan)
        assert expected[name] in detail, (name, detail)
    con.close()

    async with SqliteLedger(path) as led:
        t0 = time.perf_counter()
        for _ in range(50):
            row, created = await led.reserve(new_payment())
            assert created
            await led.get(row.id)
        per_op = (time.perf_counter() - t0) / 50
        assert [r.id for r in await led.pending()][:1] == [first.id]
        assert len(await led.pending()) == 51
        assert (await led.totals()).received == 100_000
    assert per_op < 0.05, per_op
