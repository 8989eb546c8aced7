"""Group commit: concurrent transitions share one durable COMMIT, each caller still sees only
durable state, and one failing statement fails alone."""

from __future__ import annotations

import asyncio
import os
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from payments.errors import InfrastructureError
from payments.ledger import PaymentState, SqliteLedger

from .test_ledger import TX_A, TX_B, new_payment


@pytest.fixture
async def ledger(tmp_path: Path) -> AsyncIterator[SqliteLedger]:
    async with SqliteLedger(tmp_path / "ledger.db") as led:
        yield led


async def _count_commits(ledger: SqliteLedger) -> list[str]:
    seen: list[str] = []
    assert ledger._db is not None
    await ledger._db.set_trace_callback(seen.append)
    return seen


async def test_concurrent_transitions_share_commits_and_are_durable(
    ledger: SqliteLedger, tmp_path: Path
) -> None:
    statements = await _count_commits(ledger)
    rows = await asyncio.gather(*(ledger.reserve(new_payment()) for _ in range(50)))
    assert all(created for _, created in rows)
    await asyncio.gather(*(ledger.mark_submitted(row.id, TX_A) for row, _ in rows))
    commits = sum(1 for s in statements if s == "COMMIT")
    assert 2 <= commits < 20, commits  # 100 transitions, a handful of fsyncs
    # another connection (another process after a crash) sees every change
    with sqlite3.connect(tmp_path / "ledger.db") as other:
        states = other.execute("SELECT state, COUNT(*) FROM payments GROUP BY state").fetchall()
    assert states == [(PaymentState.SUBMITTED.value, 50)]


async def test_a_failing_statement_fails_alone(ledger: SqliteLedger) -> None:
    bad = ledger._run("INSERT INTO no_such_table VALUES (1)", (), write=True)
    good = ledger.reserve(new_payment())
    outcomes = await asyncio.gather(bad, good, return_exceptions=True)
    assert isinstance(outcomes[0], InfrastructureError)
    row, created = outcomes[1]  # type: ignore[misc]
    assert created and (await ledger.get(row.id)).state is PaymentState.RESERVED


async def test_reads_alone_need_no_transaction(ledger: SqliteLedger) -> None:
    row, _ = await ledger.reserve(new_payment())
    statements = await _count_commits(ledger)
    await asyncio.gather(*(ledger.get(row.id) for _ in range(5)), ledger.pending())
    assert "COMMIT" not in statements and "BEGIN IMMEDIATE" not in statements
    assert await ledger.get_by_key(8453, row.asset, row.payer, os.urandom(32)) is None


async def test_only_the_record_before_a_broadcast_waits_for_its_fsync(
    ledger: SqliteLedger,
) -> None:
    statements = await _count_commits(ledger)

    def mode_of_last_commit() -> str:
        pragmas = [s for s in statements if s.startswith("PRAGMA synchronous")]
        return pragmas[-1].split("=")[1] if pragmas else "FULL"  # the connection starts FULL

    row, _ = await ledger.reserve(new_payment())
    assert mode_of_last_commit() == "NORMAL"  # the reservation alone: no fsync of its own
    await ledger.mark_submitted(row.id, TX_A)
    assert mode_of_last_commit() == "FULL"  # the record before the broadcast
    await ledger.mark_settled(row.id)
    assert mode_of_last_commit() == "NORMAL"
    await ledger.link_task(row.id, "task-1")
    assert mode_of_last_commit() == "NORMAL"
    await ledger.mark_refund_submitted(row.id, TX_B)
    assert mode_of_last_commit() == "FULL"  # the record before the refund's broadcast
