"""The payments ledger: one row per authorization, under a unique key, before any money moves.

State machine (every transition is one conditional UPDATE, committed before the caller's next
side effect; anything else raises ``IllegalTransition``)::

    reserved --> submitted(tx) --> settled --(link_task)--> settled + task
        |            |   ^  |         |
        |            +---+  |         +--> refund_submitted(refund_tx) --> refunded
        |      (re-signed)  |         ^            |  ^   |
        +-------------------+-->      +------------+  +---+ (re-sent refund)
                         failed(reason)  (refund never broadcast: abandon_refund)

``reserved`` and ``submitted`` rows may also be *released* (deleted) when the caller knows the
transaction was never broadcast, so the payer can retry the same authorization.

The unique key is ``(chain_id, asset, payer, nonce)``: the token itself refuses a second use of
an authorization nonce, and the ledger refuses it before we spend gas on it.

``synchronous=FULL``: a row's ``submitted`` state (with the tx hash) is the only record that
money may be moving. With ``NORMAL`` in WAL mode a power loss can drop the last commits; the
transaction would still be mined and we would have lost the link between payment and tx.

Group commit: an fsync still costs milliseconds (3-7 ms on the benchmark VM's disk), and one
connection runs one statement at a time, so concurrent payments queued behind each other's
fsyncs. Every statement, read or write, is therefore queued and run by one committer task: it
takes everything queued, runs it inside one ``BEGIN IMMEDIATE ... COMMIT`` and only then hands
each caller its result: a caller sees its change, or anything it read, only once it is
committed, and N concurrent transitions share one fsync.

Only the records made before a broadcast wait for their own fsync: ``mark_submitted`` and
``mark_refund_submitted`` (and the rarer ``mark_failed``, ``release``, ...). ``reserve``,
``mark_settled`` and ``link_task`` are committed without one (``synchronous=NORMAL`` for a batch
holding nothing else). A crash of the process loses none of them (the commit is in the WAL). A
power loss can drop them, but only the newest ones (the WAL reaches the disk in commit order,
and the next durable commit takes them along), and the chain is the truth they are rebuilt
from: a reserved row was never broadcast; a submitted row is settled from its receipt; a
settled row without a task gets its task or a refund at start-up, exactly as for a task row
lost from the task store (which runs ``synchronous=NORMAL`` itself). A paid request costs one
fsync instead of four.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import aiosqlite
from eth_utils.address import to_checksum_address

from payments.errors import InfrastructureError

__all__ = [
    "IllegalTransition",
    "Ledger",
    "LedgerError",
    "LedgerTotals",
    "NewPayment",
    "PaymentRecord",
    "PaymentState",
    "SqliteLedger",
    "UnknownPayment",
]

# SQLite INTEGER is signed 64-bit; every real USDC amount fits by many orders of magnitude.
_MAX_AMOUNT = 2**63 - 1


class PaymentState(StrEnum):
    RESERVED = "reserved"
    SUBMITTED = "submitted"
    SETTLED = "settled"
    FAILED = "failed"
    REFUND_SUBMITTED = "refund_submitted"
    REFUNDED = "refunded"


class LedgerError(Exception):
    """A ledger call that is a programming error or a lost race, not a database outage."""


class IllegalTransition(LedgerError):
    def __init__(self, payment_id: str, state: PaymentState, wanted: str) -> None:
        super().__init__(f"payment {payment_id}: cannot {wanted} from state {state.value}")
        self.payment_id = payment_id
        self.state = state
        self.wanted = wanted


class UnknownPayment(LedgerError, KeyError):
    def __init__(self, payment_id: str) -> None:
        super().__init__(f"unknown payment {payment_id}")
        self.payment_id = payment_id

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


@dataclass(frozen=True, slots=True)
class NewPayment:
    """What is known about a payment when it is reserved (all of it from the signed payload)."""

    chain_id: int
    asset: str
    payer: str
    nonce: bytes
    amount: int
    pay_to: str
    network: str
    version: int
    valid_before: int

    def __post_init__(self) -> None:
        if len(self.nonce) != 32:
            raise ValueError("nonce must be 32 bytes")
        if not 0 <= self.amount <= _MAX_AMOUNT:
            raise ValueError("amount out of the ledger's range")


@dataclass(frozen=True, slots=True)
class PaymentRecord:
    id: str
    chain_id: int
    asset: str
    payer: str
    nonce: bytes
    amount: int
    pay_to: str
    network: str
    version: int
    valid_before: int
    state: PaymentState
    tx_hash: str | None
    reason: str | None
    task_id: str | None
    refund_tx: str | None
    created_at_ms: int
    updated_at_ms: int

    @property
    def in_flight(self) -> bool:
        """Not yet settled or failed: somebody is (or was, before a crash) settling it."""
        return self.state in (PaymentState.RESERVED, PaymentState.SUBMITTED)


@dataclass(frozen=True, slots=True)
class LedgerTotals:
    """Sums in atomic units. ``received`` counts every payment settled on chain (including the
    ones later refunded); ``net`` is what the payee should hold from this ledger."""

    received: int
    refunded: int

    @property
    def net(self) -> int:
        return self.received - self.refunded


class Ledger(Protocol):
    """Storage seam: SQLite here, PostgreSQL when several gateways share one ledger."""

    async def reserve(self, new: NewPayment) -> tuple[PaymentRecord, bool]: ...
    async def get(self, payment_id: str) -> PaymentRecord: ...
    async def get_by_key(
        self, chain_id: int, asset: str, payer: str, nonce: bytes
    ) -> PaymentRecord | None: ...
    async def mark_submitted(self, payment_id: str, tx_hash: str) -> PaymentRecord: ...
    async def mark_settled(self, payment_id: str, tx_hash: str | None = None) -> PaymentRecord: ...
    async def mark_failed(self, payment_id: str, reason: str) -> PaymentRecord: ...
    async def release(self, payment_id: str) -> None: ...
    async def link_task(self, payment_id: str, task_id: str) -> PaymentRecord: ...
    async def unlink_task(self, payment_id: str, task_id: str) -> PaymentRecord: ...
    async def mark_refund_submitted(
        self, payment_id: str, tx_hash: str, *, resend: bool = False
    ) -> PaymentRecord: ...
    async def abandon_refund(self, payment_id: str) -> PaymentRecord: ...
    async def mark_refunded(self, payment_id: str) -> PaymentRecord: ...
    async def pending(
        self, limit: int = 1000, *, idle_for_ms: int | None = None
    ) -> list[PaymentRecord]: ...
    async def totals(
        self, *, chain_id: int | None = None, asset: str | None = None
    ) -> LedgerTotals: ...
    async def close(self) -> None: ...


_S = PaymentState

_SCHEMA = """
CREATE TABLE IF NOT EXISTS payments (
    id            TEXT PRIMARY KEY,
    chain_id      INTEGER NOT NULL,
    asset         TEXT NOT NULL,
    payer         TEXT NOT NULL,
    nonce         TEXT NOT NULL,
    amount        INTEGER NOT NULL CHECK (amount >= 0),
    pay_to        TEXT NOT NULL,
    network       TEXT NOT NULL,
    version       INTEGER NOT NULL,
    valid_before  INTEGER NOT NULL,
    state         TEXT NOT NULL CHECK (state IN ('reserved', 'submitted', 'settled', 'failed',
                                                 'refund_submitted', 'refunded')),
    tx_hash       TEXT,
    reason        TEXT,
    task_id       TEXT,
    refund_tx     TEXT,
    created_at_ms INTEGER NOT NULL,
    updated_at_ms INTEGER NOT NULL,
    UNIQUE (chain_id, asset, payer, nonce)
);
CREATE INDEX IF NOT EXISTS payments_pending ON payments (state)
    WHERE state IN ('reserved', 'submitted', 'refund_submitted')
       OR (state = 'settled' AND task_id IS NULL);
CREATE INDEX IF NOT EXISTS payments_tx_hash ON payments (tx_hash) WHERE tx_hash IS NOT NULL;
"""

_COLUMNS = (
    "id, chain_id, asset, payer, nonce, amount, pay_to, network, version, valid_before, state, "
    "tx_hash, reason, task_id, refund_tx, created_at_ms, updated_at_ms"
)

_NEVER_MS = 2**62  # an updated_at_ms no row reaches

# Must stay textually identical to the partial index's WHERE so SQLite can use the index.
_PENDING_WHERE = (
    "state IN ('reserved', 'submitted', 'refund_submitted') "
    "OR (state = 'settled' AND task_id IS NULL)"
)

# Served by the partial index payments_pending (only pending rows are in it).
PENDING_SQL = (
    f"SELECT {_COLUMNS} FROM payments "  # noqa: S608
    f"WHERE ({_PENDING_WHERE}) AND updated_at_ms <= ? LIMIT ?"
)


@functools.lru_cache(maxsize=4096)
def _key_address(address: str) -> str:
    # One spelling per address (EIP-55) so the unique key cannot be dodged by changing case.
    # Cached: payers, payees and the asset repeat, and EIP-55 costs a keccak each time.
    if len(address) != 42 or not address.startswith("0x"):
        raise ValueError(f"not an address: {address!r}")
    return to_checksum_address(address)


def _row_to_record(row: Sequence[Any]) -> PaymentRecord:
    return PaymentRecord(
        id=row[0],
        chain_id=row[1],
        asset=row[2],
        payer=row[3],
        nonce=bytes.fromhex(row[4][2:]),
        amount=row[5],
        pay_to=row[6],
        network=row[7],
        version=row[8],
        valid_before=row[9],
        state=PaymentState(row[10]),
        tx_hash=row[11],
        reason=row[12],
        task_id=row[13],
        refund_tx=row[14],
        created_at_ms=row[15],
        updated_at_ms=row[16],
    )


@dataclass(slots=True)
class _Statement:
    sql: str
    params: tuple[Any, ...]
    write: bool
    durable: bool  # a write whose caller must not go on before it is on disk
    done: asyncio.Future[list[Any]]


class SqliteLedger:
    """The embedded ledger: one aiosqlite connection (its own thread), WAL, synchronous=FULL,
    group commit."""

    def __init__(
        self,
        path: str | Path,
        *,
        clock: Callable[[], float] = time.time,
        busy_timeout_ms: int = 5000,
    ) -> None:
        self._path = str(path)
        self._clock = clock
        self._busy_timeout_ms = busy_timeout_ms
        self._db: aiosqlite.Connection | None = None
        self._queued: list[_Statement] = []
        self._committer: asyncio.Task[None] | None = None
        self._fsync = True  # the connection's synchronous mode: FULL (True) or NORMAL

    async def open(self) -> SqliteLedger:
        if self._db is not None:
            return self
        try:
            db = await aiosqlite.connect(self._path, isolation_level=None)
            try:
                await db.execute("PRAGMA journal_mode=WAL")
                await db.execute("PRAGMA synchronous=FULL")
                await db.execute(f"PRAGMA busy_timeout={int(self._busy_timeout_ms)}")
                await db.executescript(_SCHEMA)
            except BaseException:
                await db.close()
                raise
        except sqlite3.Error as exc:
            raise InfrastructureError(f"ledger database unavailable: {exc}") from exc
        self._db = db
        return self

    async def close(self) -> None:
        if self._db is not None:
            db, self._db = self._db, None
            if self._committer is not None:  # let queued statements finish first
                with contextlib.suppress(Exception):
                    await self._committer
            await db.close()

    async def __aenter__(self) -> SqliteLedger:
        return await self.open()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- low level ---------------------------------------------------------------------------

    def _conn(self) -> aiosqlite.Connection:
        if self._db is None:
            raise InfrastructureError("ledger is not open")
        return self._db

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    async def _run(
        self, sql: str, params: Iterable[Any], *, write: bool, durable: bool = True
    ) -> list[Any]:
        """Queue one statement for the committer; its rows once committed (and, when
        ``durable``, on disk)."""
        db = self._conn()
        done: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        self._queued.append(_Statement(sql, tuple(params), write, write and durable, done))
        if self._committer is None or self._committer.done():
            self._committer = asyncio.create_task(self._commit_queued(db))
        try:
            return await done
        except sqlite3.Error as exc:
            kind = "write" if write else "read"
            raise InfrastructureError(f"ledger {kind} failed: {exc}") from exc

    async def _commit_queued(self, db: aiosqlite.Connection) -> None:
        while self._queued:
            batch, self._queued = self._queued, []
            await self._commit(db, batch)

    async def _commit(self, db: aiosqlite.Connection, batch: list[_Statement]) -> None:
        """Run ``batch`` in one transaction (none if it only reads), then answer every caller.
        A failing statement fails alone unless it took the transaction down with it."""
        writes = any(st.write for st in batch)
        fsync = any(st.durable for st in batch)
        outcomes: list[list[Any] | sqlite3.Error] = []
        try:
            if writes and fsync != self._fsync:
                await db.execute(f"PRAGMA synchronous={'FULL' if fsync else 'NORMAL'}")
                self._fsync = fsync
            if writes:
                await db.execute("BEGIN IMMEDIATE")
            for st in batch:
                try:
                    outcomes.append(list(await db.execute_fetchall(st.sql, st.params)))
                except sqlite3.Error as exc:
                    if writes and not db.in_transaction:
                        raise  # rolled back: nothing in this batch is durable
                    outcomes.append(exc)
            if writes:
                await db.execute("COMMIT")
        except BaseException as exc:
            if writes and db.in_transaction:
                with contextlib.suppress(Exception):
                    await db.execute("ROLLBACK")
            failure = exc if isinstance(exc, sqlite3.Error) else sqlite3.OperationalError(repr(exc))
            for st in batch:
                if not st.done.done():
                    st.done.set_exception(failure)
            if not isinstance(exc, sqlite3.Error):
                raise
            return
        for st, outcome in zip(batch, outcomes, strict=True):
            if st.done.done():  # the caller was cancelled; its statement still ran
                continue
            if isinstance(outcome, sqlite3.Error):
                st.done.set_exception(outcome)
            else:
                st.done.set_result(outcome)

    async def _fetch(self, sql: str, params: Iterable[Any] = ()) -> list[PaymentRecord]:
        return [_row_to_record(r) for r in await self._run(sql, params, write=False)]

    async def _write(
        self, sql: str, params: Iterable[Any], *, durable: bool = True
    ) -> list[PaymentRecord]:
        """One statement with RETURNING: the change is committed (and durable, unless the
        caller knows a durable write of the same payment follows) when this returns."""
        rows = await self._run(sql, params, write=True, durable=durable)
        return [_row_to_record(r) for r in rows]

    async def _transition(
        self,
        payment_id: str,
        wanted: str,
        allowed_from: tuple[PaymentState, ...],
        assignments: str,
        params: Sequence[Any],
        *,
        idempotent: Callable[[PaymentRecord], bool] | None = None,
        also: str = "",
        also_params: Sequence[Any] = (),
        durable: bool = True,
    ) -> PaymentRecord:
        placeholders = ", ".join("?" for _ in allowed_from)
        sql = (
            f"UPDATE payments SET {assignments}, updated_at_ms = ? "  # noqa: S608
            f"WHERE id = ? AND state IN ({placeholders}){also} RETURNING {_COLUMNS}"
        )
        rows = await self._write(
            sql,
            [*params, self._now_ms(), payment_id, *(s.value for s in allowed_from), *also_params],
            durable=durable,
        )
        if rows:
            return rows[0]
        current = await self.get(payment_id)
        if idempotent is not None and idempotent(current):
            return current
        raise IllegalTransition(payment_id, current.state, wanted)

    # -- API -----------------------------------------------------------------------------------

    async def reserve(self, new: NewPayment) -> tuple[PaymentRecord, bool]:
        """Insert the payment, or return the row already holding its key (``created`` False)."""
        now = self._now_ms()
        nonce_hex = "0x" + new.nonce.hex()
        for _ in range(3):  # a concurrent release() can delete the row between our two statements
            rows = await self._write(
                f"INSERT INTO payments ({_COLUMNS}) "  # noqa: S608
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, NULL, NULL, NULL, ?, ?) "
                "ON CONFLICT (chain_id, asset, payer, nonce) DO NOTHING "
                f"RETURNING {_COLUMNS}",
                (
                    uuid.uuid4().hex,
                    new.chain_id,
                    _key_address(new.asset),
                    _key_address(new.payer),
                    nonce_hex,
                    new.amount,
                    _key_address(new.pay_to),
                    new.network,
                    new.version,
                    new.valid_before,
                    _S.RESERVED.value,
                    now,
                    now,
                ),
                durable=False,  # mark_submitted (durable) comes before anything is broadcast
            )
            if rows:
                return rows[0], True
            existing = await self.get_by_key(new.chain_id, new.asset, new.payer, new.nonce)
            if existing is not None:
                return existing, False
        raise InfrastructureError("ledger reservation kept racing with releases")

    async def get(self, payment_id: str) -> PaymentRecord:
        rows = await self._fetch(f"SELECT {_COLUMNS} FROM payments WHERE id = ?", (payment_id,))  # noqa: S608
        if not rows:
            raise UnknownPayment(payment_id)
        return rows[0]

    async def get_by_key(
        self, chain_id: int, asset: str, payer: str, nonce: bytes
    ) -> PaymentRecord | None:
        rows = await self._fetch(
            f"SELECT {_COLUMNS} FROM payments "  # noqa: S608
            "WHERE chain_id = ? AND asset = ? AND payer = ? AND nonce = ?",
            (chain_id, _key_address(asset), _key_address(payer), "0x" + nonce.hex()),
        )
        return rows[0] if rows else None

    async def mark_submitted(self, payment_id: str, tx_hash: str) -> PaymentRecord:
        """Record the tx hash BEFORE broadcasting. Re-signing (nonce resync) replaces it."""
        return await self._transition(
            payment_id,
            "mark submitted",
            (_S.RESERVED, _S.SUBMITTED),
            "state = ?, tx_hash = ?",
            (_S.SUBMITTED.value, tx_hash),
        )

    async def mark_settled(self, payment_id: str, tx_hash: str | None = None) -> PaymentRecord:
        """Settled by ``tx_hash`` (default: the recorded one). Reconcile may settle a reserved row
        whose transaction was broadcast but not recorded before a crash."""
        if tx_hash is None:
            rows = await self._write(
                "UPDATE payments SET state = ?, updated_at_ms = ? "  # noqa: S608
                f"WHERE id = ? AND state = ? AND tx_hash IS NOT NULL RETURNING {_COLUMNS}",
                (_S.SETTLED.value, self._now_ms(), payment_id, _S.SUBMITTED.value),
                durable=False,  # see the module docstring: the submitted row is the safety net
            )
            if rows:
                return rows[0]
            current = await self.get(payment_id)
            if current.state is _S.SETTLED:
                return current
            raise IllegalTransition(payment_id, current.state, "mark settled")
        return await self._transition(
            payment_id,
            "mark settled",
            (_S.RESERVED, _S.SUBMITTED),
            "state = ?, tx_hash = ?",
            (_S.SETTLED.value, tx_hash),
            idempotent=lambda r: r.state is _S.SETTLED and r.tx_hash == tx_hash,
            durable=False,
        )

    async def mark_failed(self, payment_id: str, reason: str) -> PaymentRecord:
        return await self._transition(
            payment_id,
            "mark failed",
            (_S.RESERVED, _S.SUBMITTED),
            "state = ?, reason = ?",
            (_S.FAILED.value, reason),
            idempotent=lambda r: r.state is _S.FAILED and r.reason == reason,
        )

    async def release(self, payment_id: str) -> None:
        """Forget an in-flight row. Only for a caller that KNOWS nothing was broadcast."""
        deleted = await self._run(
            "DELETE FROM payments WHERE id = ? AND state IN (?, ?) RETURNING id",
            (payment_id, _S.RESERVED.value, _S.SUBMITTED.value),
            write=True,
        )
        if not deleted:
            current = await self.get(payment_id)
            raise IllegalTransition(payment_id, current.state, "release")

    async def link_task(self, payment_id: str, task_id: str) -> PaymentRecord:
        """Attach the paid work. Only a settled payment buys a task, and only one task."""
        return await self._transition(
            payment_id,
            "link a task",
            (_S.SETTLED,),
            "task_id = ?",
            (task_id,),
            idempotent=lambda r: r.task_id == task_id,
            also=" AND task_id IS NULL",
            durable=False,
        )

    async def unlink_task(self, payment_id: str, task_id: str) -> PaymentRecord:
        """Take back ``task_id``: the work it named was not delivered after all, so the payment
        is pending again (its refund is owed; start-up and sweeps see it). Durable, as it is
        the only record of that debt."""
        return await self._transition(
            payment_id,
            "unlink a task",
            (_S.SETTLED,),
            "task_id = NULL",
            (),
            idempotent=lambda r: r.state is _S.SETTLED and r.task_id is None,
            also=" AND task_id = ?",
            also_params=(task_id,),
        )

    async def mark_refund_submitted(
        self, payment_id: str, tx_hash: str, *, resend: bool = False
    ) -> PaymentRecord:
        """Record the refund tx BEFORE broadcasting it. Only a settled row can start a refund
        (so two refunders cannot both send); ``resend`` replaces the tx of a refund in flight."""
        return await self._transition(
            payment_id,
            "re-submit a refund" if resend else "submit a refund",
            (_S.REFUND_SUBMITTED,) if resend else (_S.SETTLED,),
            "state = ?, refund_tx = ?",
            (_S.REFUND_SUBMITTED.value, tx_hash),
        )

    async def abandon_refund(self, payment_id: str) -> PaymentRecord:
        """Back to ``settled``: for a caller that KNOWS the refund tx was never broadcast."""
        return await self._transition(
            payment_id,
            "abandon the refund",
            (_S.REFUND_SUBMITTED,),
            "state = ?, refund_tx = NULL",
            (_S.SETTLED.value,),
        )

    async def mark_refunded(self, payment_id: str) -> PaymentRecord:
        return await self._transition(
            payment_id,
            "mark refunded",
            (_S.REFUND_SUBMITTED,),
            "state = ?",
            (_S.REFUNDED.value,),
            idempotent=lambda r: r.state is _S.REFUNDED,
        )

    async def pending(
        self, limit: int = 1000, *, idle_for_ms: int | None = None
    ) -> list[PaymentRecord]:
        """Rows a restart must look at: in flight, settled without work, refund in flight.
        With ``idle_for_ms``, only those unchanged for that long (a sweep while serving)."""
        changed_before = _NEVER_MS if idle_for_ms is None else self._now_ms() - idle_for_ms
        return await self._fetch(PENDING_SQL, (changed_before, limit))

    async def totals(
        self, *, chain_id: int | None = None, asset: str | None = None
    ) -> LedgerTotals:
        where = ["state IN ('settled', 'refund_submitted', 'refunded')"]
        params: list[Any] = []
        if chain_id is not None:
            where.append("chain_id = ?")
            params.append(chain_id)
        if asset is not None:
            where.append("asset = ?")
            params.append(_key_address(asset))
        sql = (
            "SELECT COALESCE(SUM(amount), 0), "  # noqa: S608
            "COALESCE(SUM(CASE WHEN state = 'refunded' THEN amount ELSE 0 END), 0) "
            f"FROM payments WHERE {' AND '.join(where)}"
        )
        [row] = await self._run(sql, params, write=False)
        return LedgerTotals(received=int(row[0]), refunded=int(row[1]))


if TYPE_CHECKING:
    _conforms: type[Ledger] = SqliteLedger
