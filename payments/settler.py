"""The settler: sends ``transferWithAuthorization`` (and refunds) from one hot key.

Nonce manager with pipelined sends: concurrent ``submit``/``refund`` calls queue up, and one
sender task drains the queue in batches under one ``asyncio.Lock``: it gives the batch
consecutive nonces, signs every transaction, runs every ``before_send`` at once (the caller
persists the tx hash; the ledger commits them together) and then broadcasts the whole batch in
ONE JSON-RPC batch request, in nonce order. Settlements therefore never collide, and a batch
costs one signing pass, one durable write and one round trip. After any send that did not go
out, the next nonce is resynced from the node's ``pending`` count, which stops at that nonce;
the transactions after it are already out, queued behind it, and get mined as soon as the next
transaction fills it (a retried one, the next payment, or a 0-value transfer to ourselves when
nothing else is waiting). A transaction is never re-signed once it may have gone out.

Send outcomes (the processor relies on the distinction):
- returns the tx hash: the node accepted it (or already had it);
- ``SendRejected``: the node answered with an error and does not know the tx -> nothing was
  broadcast, the authorization is untouched (safe to release the reservation);
- ``SendUncertain``: transport failure mid-send -> it may have been broadcast (never release;
  reconcile from the receipt / the token's authorizationState).

Confirmation: one confirmer task per settler polls the account's mined nonce count (one cheap
read per tick for every waiting transaction) and fetches, in one batch, the receipts of the
transactions that count has passed. No receipt is asked for a transaction still in the pool,
and the waiters of one block are released together, so their next settlements reach the node
together too. Hashes this settler did not send (after a restart) are polled one by one.

Fees: ``eth_gasPrice`` is read at start and refreshed at most every ``fee_refresh_s`` (not per
request); ``maxFeePerGas = gasPrice * max_fee_multiplier + tip`` leaves headroom for base-fee
growth between refreshes. Gas limits are fixed and generous (a first-use authorization with a
fresh balance slot costs ~80k gas; an EIP-1271 wallet adds its own verification).

Refunds are sent from THIS key as a plain ERC-20 ``transfer``: the settler address must hold
the USDC it refunds. Dev mode and tests make payTo the settler address; an operator whose payTo
is another wallet must keep the settler funded with USDC for refunds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Final

import rlp  # type: ignore[import-untyped]
from coincurve import PrivateKey
from eth_account import Account
from eth_utils.crypto import keccak
from rlp.sedes import (  # type: ignore[import-untyped]
    Binary,
    CountableList,
    List,
    big_endian_int,
    binary,
)

from payments.chain import (
    Chain,
    Receipt,
    ReceiptTimeout,
    RpcError,
    encode_transfer,
    encode_transfer_with_authorization,
)
from payments.eip3009 import Authorization, normalize_address
from payments.errors import InfrastructureError

__all__ = [
    "BeforeSend",
    "GasSettings",
    "SendRejected",
    "SendUncertain",
    "Settler",
]


# EIP-1559 fields: chainId, nonce, maxPriorityFee, maxFee, gas, to, value, data, accessList
# (+ yParity, r, s). Explicit sedes: pyrlp then skips inferring one per field.
_FIELDS_1559 = [big_endian_int] * 5 + [Binary.fixed_length(20), big_endian_int, binary]
_UNSIGNED_1559 = List([*_FIELDS_1559, CountableList(binary)])
_SIGNED_1559 = List([*_FIELDS_1559, CountableList(binary), *[big_endian_int] * 3])

log = logging.getLogger(__name__)

BeforeSend = Callable[[str], Awaitable[None]]
"""Called with the tx hash after signing and before broadcasting (persist it). If it raises,
nothing is sent and the nonce is not consumed."""

_MAX_SEND_ATTEMPTS: Final = 3  # refusals of one transaction (fee / nonce) before SendRejected
_MAX_ROUNDS: Final = 10  # times one transaction may be (re-)signed, whoever's fault it was
_MAX_BATCH: Final = 64


class SendRejected(InfrastructureError):
    """The node refused the transaction; it was not broadcast."""


class SendUncertain(InfrastructureError):
    """The send failed in transport: the transaction may or may not have been broadcast."""

    def __init__(self, tx_hash: str, detail: str) -> None:
        self.tx_hash = tx_hash
        super().__init__(f"send of {tx_hash} uncertain: {detail}")


@dataclass(frozen=True, slots=True)
class GasSettings:
    gas_limit: int = 150_000
    gas_limit_contract_wallet: int = 300_000
    gas_limit_refund: int = 100_000
    priority_fee_wei: int = 1_000_000  # 0.001 gwei: Base tips are tiny; Anvil accepts it
    max_fee_multiplier: int = 2
    fee_refresh_s: float = 15.0
    receipt_timeout_s: float = 30.0
    # Transactions waiting and no new nonce mined for this long: send every pending one again
    # (same signed bytes, so harmless), in case the node dropped or stranded them.
    rebroadcast_after_s: float = 2.0


_UNCONFIRMED_KEPT = 10_000
_CONFIRM_POLL_FIRST_S: Final = 0.001
_CONFIRM_POLL_MAX_S: Final = 0.1


def _nonce_error(message: str) -> bool:
    low = message.lower()
    return "nonce too low" in low or "nonce too high" in low or "invalid nonce" in low


def _fee_error(message: str) -> bool:
    low = message.lower()
    return "underpriced" in low or "base fee" in low or "fee cap" in low


def _already_known(message: str) -> bool:
    low = message.lower()
    return "already known" in low or "known transaction" in low or "already imported" in low


class Settler:
    def __init__(
        self,
        chain: Chain,
        private_key: str | bytes,
        *,
        gas: GasSettings | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._chain = chain
        account = Account.from_key(private_key)
        self._key = PrivateKey(bytes(account.key))
        self.address: str = normalize_address(account.address)
        self.gas = gas or GasSettings()
        self._monotonic = monotonic
        self._lock = asyncio.Lock()
        self._nonce: int | None = None
        self._gas_price: int | None = None
        self._gas_price_at = 0.0
        self._chain_id: int | None = None
        self._queue: deque[_Outgoing] = deque()
        self._sender: asyncio.Task[None] | None = None
        # tx hash -> (signed bytes, nonce), until confirmed
        self._unconfirmed: dict[str, tuple[bytes, int]] = {}
        self._waiters: dict[str, asyncio.Future[Receipt]] = {}
        self._confirmer: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._anvil_pool = True  # until the node says it has no anvil_removePoolTransactions

    def __repr__(self) -> str:  # never show the key
        return f"Settler(address={self.address})"

    async def start(self) -> None:
        """Warm the caches (chain id, nonce, fees) so the first payment pays no extra RPCs."""
        async with self._lock:
            await self._ensure_ready()

    async def _ensure_ready(self) -> None:
        if self._chain_id is None:
            self._chain_id = await self._chain.chain_id()
        if self._nonce is None:
            self._nonce = await self._chain.transaction_count(self.address, "pending")
        if (
            self._gas_price is None
            or self._monotonic() - self._gas_price_at > self.gas.fee_refresh_s
        ):
            await self._refresh_fees()

    async def _refresh_fees(self) -> None:
        self._gas_price = await self._chain.gas_price()
        self._gas_price_at = self._monotonic()

    def invalidate_nonce(self) -> None:
        """Resync from the node before the next send (e.g. after a receipt never came)."""
        self._nonce = None

    # -- sending -------------------------------------------------------------------------------

    def _sign(self, to: str, data: bytes, gas_limit: int, nonce: int) -> tuple[str, bytes]:
        """An EIP-1559 (type 2) transaction, signed here: RLP + keccak + one libsecp256k1 call
        (eth-account builds the same bytes ~4x slower, re-deriving the key every time)."""
        assert self._gas_price is not None and self._chain_id is not None
        max_fee = self._gas_price * self.gas.max_fee_multiplier + self.gas.priority_fee_wei
        fields: list[int | bytes | list[object]] = [
            self._chain_id,
            nonce,
            min(self.gas.priority_fee_wei, max_fee),
            max_fee,
            gas_limit,
            bytes.fromhex(to[2:]),
            0,  # value
            data,
            [],  # access list
        ]
        unsigned = b"\x02" + rlp.encode(fields, sedes=_UNSIGNED_1559)
        sig = self._key.sign_recoverable(keccak(unsigned), hasher=None)  # r || s || recid
        raw = b"\x02" + rlp.encode(
            [*fields, sig[64], int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:64], "big")],
            sedes=_SIGNED_1559,
        )
        return "0x" + keccak(raw).hex(), raw

    async def _send(
        self, to: str, data: bytes, gas_limit: int, before_send: BeforeSend | None
    ) -> str:
        done: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._queue.append(_Outgoing(to, data, gas_limit, before_send, done))
        if self._sender is None or self._sender.done():
            self._sender = asyncio.create_task(self._drain())
        return await done  # a cancelled caller cancels `done`; the sender then skips it

    async def _drain(self) -> None:
        batch: list[_Outgoing] = []
        async with self._lock:
            try:
                while self._queue:
                    batch = []
                    while self._queue and len(batch) < _MAX_BATCH:
                        item = self._queue.popleft()
                        if item.done.done():
                            continue  # cancelled before its turn
                        if item.rounds >= _MAX_ROUNDS or item.attempts >= _MAX_SEND_ATTEMPTS:
                            item.fail(SendRejected(f"refused after retries: {item.last_error}"))
                            continue
                        batch.append(item)
                    retry = await self._send_batch(batch)
                    self._queue.extendleft(reversed(retry))
            except BaseException as exc:  # never leave a caller waiting forever
                for item in (*batch, *self._queue):
                    item.fail(InfrastructureError(f"settler stopped: {exc!r}"))
                self._queue.clear()
                raise

    async def _send_batch(self, batch: Sequence[_Outgoing]) -> list[_Outgoing]:
        """Sign, record and broadcast ``batch`` in nonce order; returns what must be re-signed
        (everything after the first transaction that did not go out)."""
        if not batch:
            return []
        try:
            await self._ensure_ready()
        except InfrastructureError as exc:
            self._nonce = None
            for item in batch:
                item.fail(exc)
            return []
        assert self._nonce is not None
        first = self._nonce
        signed: list[tuple[_Outgoing, str, bytes]] = []
        for offset, item in enumerate(batch):
            item.rounds += 1
            signed.append((item, *self._sign(item.to, item.data, item.gas_limit, first + offset)))

        recorded = await asyncio.gather(
            *(_record(item, tx_hash) for item, tx_hash, _ in signed), return_exceptions=True
        )
        for index, record_error in enumerate(recorded):
            if isinstance(record_error, BaseException):  # nothing sent; nonce not consumed
                batch[index].fail(record_error)
                return [*batch[:index], *batch[index + 1 :]]  # same hashes would leave a gap

        for offset, (_, tx_hash, raw) in enumerate(signed):
            self._unconfirmed[tx_hash] = (raw, first + offset)
        while len(self._unconfirmed) > _UNCONFIRMED_KEPT:  # never waited for (e.g. fillers)
            del self._unconfirmed[next(iter(self._unconfirmed))]
        try:
            outcomes = await self._chain.send_raw_many([raw for _, _, raw in signed])
        except InfrastructureError as exc:  # transport: each may or may not have gone out
            log.warning("broadcast of %d txs uncertain: %s", len(signed), exc)
            self._nonce = None
            for item, tx_hash, _ in signed:
                item.fail(SendUncertain(tx_hash, str(exc)))
            return []
        retry: list[_Outgoing] = []
        gap = False  # a nonce that did not go out, below one that did
        for (item, tx_hash, _), sent in zip(signed, outcomes, strict=True):
            if isinstance(sent, RpcError) and not _already_known(sent.message):
                log.warning("node refused settlement tx %s: %s", tx_hash, sent.message)
                try:
                    known = await self._known(tx_hash)
                except SendUncertain as uncertain:
                    item.fail(uncertain)
                    gap = True
                    continue
                if not known:
                    gap = True
                    del self._unconfirmed[tx_hash]  # never out: must not be sent again later
                    item.last_error = sent.message
                    if _fee_error(sent.message):
                        self._gas_price = None
                    if _fee_error(sent.message) or _nonce_error(sent.message):
                        item.attempts += 1
                        retry.append(item)
                    else:
                        item.fail(SendRejected(f"node refused the transaction: {sent.message}"))
                    continue
            if not item.done.done():
                item.done.set_result(tx_hash)
        if not gap:
            self._nonce = first + len(signed)
            return []
        log.warning("nonce gap after batch from nonce %d; resyncing from the node", first)
        # Resync: the node's pending count stops at the first nonce that did not go out, and
        # the next transaction sent fills it, so the ones after it (already out) get mined.
        self._nonce = None
        if not retry and not self._queue:
            retry.append(self._filler())
        return retry

    def _filler(self) -> _Outgoing:
        """A 0-value transfer to ourselves: fills a nonce gap when nothing else is waiting."""
        done: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        done.add_done_callback(lambda f: f.cancelled() or f.exception())
        return _Outgoing(self.address, b"", 21_000, None, done)

    async def _known(self, tx_hash: str) -> bool:
        try:
            return await self._chain.transaction_known(tx_hash)
        except InfrastructureError as exc:
            raise SendUncertain(tx_hash, f"could not check the refused send: {exc}") from exc

    async def submit(
        self,
        auth: Authorization,
        signature: bytes,
        *,
        contract_wallet: bool = False,
        before_send: BeforeSend | None = None,
    ) -> str:
        """Broadcast ``transferWithAuthorization`` (v,r,s for EOAs, bytes for EIP-1271 wallets).

        ``before_send`` may run more than once (with a new hash) if the nonce had to be resynced;
        only the hash returned was broadcast."""
        data = encode_transfer_with_authorization(auth, signature, contract_wallet=contract_wallet)
        gas = self.gas.gas_limit_contract_wallet if contract_wallet else self.gas.gas_limit
        return await self._send(self._chain.token, data, gas, before_send)

    async def refund(self, to: str, amount: int, *, before_send: BeforeSend | None = None) -> str:
        """ERC-20 ``transfer(to, amount)`` of the token from the settler's own balance."""
        return await self._send(
            self._chain.token,
            encode_transfer(normalize_address(to), amount),
            self.gas.gas_limit_refund,
            before_send,
        )

    # -- confirming ----------------------------------------------------------------------------

    async def wait(self, tx_hash: str, timeout_s: float | None = None) -> Receipt:
        limit = self.gas.receipt_timeout_s if timeout_s is None else timeout_s
        try:
            return await self._receipt(tx_hash, limit)
        except ReceiptTimeout:
            log.warning(
                "no receipt for %s within the timeout; nonce resync (%s)",
                tx_hash,
                await self._diagnose(tx_hash),
            )
            self.invalidate_nonce()  # a dropped tx would strand every later nonce
            raise
        finally:
            self._unconfirmed.pop(tx_hash, None)
            waiter = self._waiters.pop(tx_hash, None)
            if waiter is not None and not waiter.done():
                waiter.cancel()

    async def _receipt(self, tx_hash: str, timeout_s: float) -> Receipt:
        """The receipt of a transaction. Ours (sent by this settler, nonce known) are confirmed
        by the one confirmer task; any other hash is polled for on its own."""
        if tx_hash not in self._unconfirmed:
            return await self._chain.wait_receipt(tx_hash, timeout_s)
        waiter = self._waiters.get(tx_hash)
        if waiter is None:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters[tx_hash] = waiter
            self._wake.set()
            if self._confirmer is None or self._confirmer.done():
                self._confirmer = asyncio.create_task(self._confirm_loop())
        try:
            return await asyncio.wait_for(asyncio.shield(waiter), timeout_s)
        except TimeoutError:
            raise ReceiptTimeout(tx_hash, timeout_s) from None

    async def _confirm_loop(self) -> None:
        """Confirm every waiting transaction of ours from ONE cheap read per tick: the
        account's mined nonce count. Only the transactions it has passed are asked for their
        receipt, all in one batch. Waiters are thus released together, once per block, and
        their next settlements reach the node together: bigger blocks, fewer of them (on Anvil
        every block costs more than the transactions in it), and no receipt polls for
        transactions still in the pool.

        The same count shows a stuck pool: no progress for ``rebroadcast_after_s`` while
        transactions wait, and every unconfirmed one is sent again, in nonce order, in one
        batch (see ``_resend_pending``)."""
        delay = _CONFIRM_POLL_FIRST_S
        mined_before = -1
        progress_at = self._monotonic()
        while self._waiters:
            self._wake.clear()
            released = 0
            try:
                mined = await self._chain.transaction_count(self.address, "latest")
                if mined != mined_before:
                    mined_before, progress_at = mined, self._monotonic()
                due = [
                    tx_hash
                    for tx_hash in self._waiters
                    if self._unconfirmed.get(tx_hash, (b"", -1))[1] < mined
                ]
                if due:
                    receipts = await asyncio.gather(*(self._chain.get_receipt(h) for h in due))
                    for tx_hash, receipt in zip(due, receipts, strict=True):
                        waiter = self._waiters.get(tx_hash)
                        # None: the node's index trails its nonce count; asked again next tick
                        if receipt is not None and waiter is not None:
                            del self._waiters[tx_hash]
                            if not waiter.done():
                                waiter.set_result(receipt)
                            released += 1
                elif self._monotonic() - progress_at >= self.gas.rebroadcast_after_s:
                    await self._resend_pending(mined)
                    progress_at = self._monotonic()
            except InfrastructureError as exc:
                log.debug("confirmer poll failed: %s", exc)  # the waiters' deadlines decide
            delay = _CONFIRM_POLL_FIRST_S if released else min(delay * 2, _CONFIRM_POLL_MAX_S)
            if not self._waiters:
                return
            with contextlib.suppress(TimeoutError):
                # a new transaction to wait for restarts the fast polling
                await asyncio.wait_for(self._wake.wait(), delay)
            if self._wake.is_set():
                delay = _CONFIRM_POLL_FIRST_S
                await asyncio.sleep(delay)

    async def _resend_pending(self, mined: int) -> None:
        """Send every unconfirmed transaction from nonce ``mined`` on again: the same signed
        bytes (same hashes, so ledger rows and waiters are unaffected), in nonce order, in one
        batch, under the send lock (no new transaction can slip in between).

        On Anvil they are first taken out of its pool: it can file the next-nonce transaction
        as waiting for a predecessor that was just mined (foundry-rs/foundry#10122; seen as
        ``txpool_status`` pending 0, queued N) and then never mines it, nor anything after it,
        and the same bytes are "already imported" for good. Sent again in order, the first is
        ready at once. Other nodes do not have the method; for them this is a plain resend."""
        async with self._lock:
            latest: dict[int, tuple[str, bytes]] = {}
            for tx_hash, (raw, nonce) in self._unconfirmed.items():
                if nonce >= mined:
                    latest[nonce] = (tx_hash, raw)  # a re-signed nonce: the last one signed
            if not latest:
                return
            pending = [latest[nonce] for nonce in sorted(latest)]
            cleared = False
            if self._anvil_pool:
                try:
                    await self._chain.rpc("anvil_removePoolTransactions", [self.address])
                    cleared = True
                except RpcError:
                    self._anvil_pool = False  # not Anvil: the method does not exist
            outcomes = await self._chain.send_raw_many([raw for _, raw in pending])
        accepted = sum(1 for outcome in outcomes if isinstance(outcome, str))
        # "already known" / "nonce too low" (mined meanwhile) are expected answers here
        log.warning(
            "no new block for our nonce %d in %.1f s: sent the %d pending txs again "
            "(%d accepted; Anvil pool cleared first: %s)",
            mined,
            self.gas.rebroadcast_after_s,
            len(pending),
            accepted,
            cleared,
        )

    async def _diagnose(self, tx_hash: str) -> str:
        """What the node says about a transaction that never got a receipt (for the log)."""
        try:
            tx = await self._chain.rpc("eth_getTransactionByHash", [tx_hash])
            latest = await self._chain.transaction_count(self.address, "latest")
            pending = await self._chain.transaction_count(self.address, "pending")
        except InfrastructureError as exc:
            return f"node not asked: {exc}"
        if tx is None:
            return f"node does not know it; nonces latest={latest} pending={pending}"
        return (
            f"node has it at nonce {int(tx.get('nonce', '0x0'), 16)}, block "
            f"{tx.get('blockNumber')}; nonces latest={latest} pending={pending}"
        )

    def check_transfer(self, receipt: Receipt, payer: str, pay_to: str, amount: int) -> None:
        self._chain.check_transfer(receipt, payer, pay_to, amount)

    async def confirm(
        self,
        tx_hash: str,
        *,
        payer: str,
        pay_to: str,
        amount: int,
        timeout_s: float | None = None,
    ) -> Receipt:
        """Await the receipt and check it. ``ReceiptTimeout`` (infra) if it does not come;
        ``SettlementFailed`` if it reverted or did not move exactly the money expected."""
        receipt = await self.wait(tx_hash, timeout_s)
        self.check_transfer(receipt, payer, pay_to, amount)
        return receipt


@dataclass(eq=False)
class _Outgoing:
    """One transaction waiting for the sender task."""

    to: str
    data: bytes
    gas_limit: int
    before_send: BeforeSend | None
    done: asyncio.Future[str]
    attempts: int = 0  # refused by the node for fee / nonce reasons
    rounds: int = 0  # signed (a batch may re-sign it when an earlier one failed)
    last_error: str = field(default="")

    def fail(self, exc: BaseException) -> None:
        if not self.done.done():
            self.done.set_exception(exc)


async def _record(item: _Outgoing, tx_hash: str) -> None:
    if item.before_send is not None:
        await item.before_send(tx_hash)
