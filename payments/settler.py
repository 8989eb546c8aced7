"""The settler: sends ``transferWithAuthorization`` (and refunds) from one hot key.

Nonce manager: one ``asyncio.Lock`` serialises allocate -> sign -> ``before_send`` (the caller
persists the tx hash) -> broadcast. Holding the lock across the broadcast means there is never
more than one transaction whose fate is unknown, so after ANY failure the right next nonce is
simply the node's ``pending`` transaction count (resync). Concurrent settlements therefore never
collide, and a refused send cannot leave a nonce gap that would strand later transactions.

Send outcomes (the processor relies on the distinction):
- returns the tx hash: the node accepted it (or already had it);
- ``SendRejected``: the node answered with an error and does not know the tx -> nothing was
  broadcast, the authorization is untouched (safe to release the reservation);
- ``SendUncertain``: transport failure mid-send -> it may have been broadcast (never release;
  reconcile from the receipt / the token's authorizationState).

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
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final

from eth_account import Account
from eth_account.signers.local import LocalAccount

from payments import reasons
from payments.chain import (
    Chain,
    Receipt,
    ReceiptTimeout,
    RpcError,
    encode_transfer,
    encode_transfer_with_authorization,
)
from payments.eip3009 import Authorization, normalize_address
from payments.errors import InfrastructureError, SettlementFailed

__all__ = [
    "BeforeSend",
    "GasSettings",
    "SendRejected",
    "SendUncertain",
    "Settler",
]

log = logging.getLogger(__name__)

BeforeSend = Callable[[str], Awaitable[None]]
"""Called with the tx hash after signing and before broadcasting (persist it). If it raises,
nothing is sent and the nonce is not consumed."""

_MAX_SEND_ATTEMPTS: Final = 3


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
        self._account: LocalAccount = Account.from_key(private_key)
        self.address: str = normalize_address(self._account.address)
        self.gas = gas or GasSettings()
        self._monotonic = monotonic
        self._lock = asyncio.Lock()
        self._nonce: int | None = None
        self._gas_price: int | None = None
        self._gas_price_at = 0.0
        self._chain_id: int | None = None

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
        assert self._gas_price is not None and self._chain_id is not None
        max_fee = self._gas_price * self.gas.max_fee_multiplier + self.gas.priority_fee_wei
        tx: dict[str, Any] = {
            "type": 2,
            "chainId": self._chain_id,
            "nonce": nonce,
            "to": to,
            "value": 0,
            "data": data,
            "gas": gas_limit,
            "maxFeePerGas": max_fee,
            "maxPriorityFeePerGas": min(self.gas.priority_fee_wei, max_fee),
        }
        signed = self._account.sign_transaction(tx)
        return "0x" + bytes(signed.hash).hex(), bytes(signed.raw_transaction)

    async def _send(
        self, to: str, data: bytes, gas_limit: int, before_send: BeforeSend | None
    ) -> str:
        async with self._lock:
            last_error = ""
            for _ in range(_MAX_SEND_ATTEMPTS):
                try:
                    await self._ensure_ready()
                except InfrastructureError:
                    self._nonce = None
                    raise
                assert self._nonce is not None
                nonce = self._nonce
                tx_hash, raw = self._sign(to, data, gas_limit, nonce)
                if before_send is not None:
                    await before_send(tx_hash)  # raises -> nothing sent, nonce unchanged
                try:
                    await self._chain.send_raw(raw)
                except RpcError as exc:
                    if _already_known(exc.message):
                        self._nonce = nonce + 1
                        return tx_hash
                    last_error = exc.message
                    # "nonce too low" can mean OUR tx got in after all (e.g. a proxy retried it)
                    if await self._known(tx_hash):
                        self._nonce = nonce + 1
                        return tx_hash
                    self._nonce = None
                    if _fee_error(exc.message):
                        self._gas_price = None
                        continue
                    if _nonce_error(exc.message):
                        continue
                    raise SendRejected(f"node refused the transaction: {exc.message}") from exc
                except InfrastructureError as exc:
                    self._nonce = None
                    raise SendUncertain(tx_hash, str(exc)) from exc
                self._nonce = nonce + 1
                return tx_hash
            raise SendRejected(f"transaction refused after retries: {last_error}")

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
        try:
            return await self._chain.wait_receipt(
                tx_hash, self.gas.receipt_timeout_s if timeout_s is None else timeout_s
            )
        except ReceiptTimeout:
            self.invalidate_nonce()  # a dropped tx would strand every later nonce
            raise

    def check_transfer(self, receipt: Receipt, payer: str, pay_to: str, amount: int) -> None:
        """Succeeded AND moved exactly ``amount`` from payer to payTo in this token."""
        if not receipt.succeeded:
            raise SettlementFailed(reasons.TRANSACTION_FAILED, f"{receipt.tx_hash} reverted")
        payer, pay_to = normalize_address(payer), normalize_address(pay_to)
        for transfer in self._chain.transfer_logs(receipt):
            if transfer.from_ == payer and transfer.to == pay_to and transfer.value == amount:
                return
        raise SettlementFailed(
            reasons.TRANSFER_EVENT_MISMATCH, f"{receipt.tx_hash} has no matching Transfer log"
        )

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
