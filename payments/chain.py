"""Chain I/O: the one place that talks JSON-RPC to the node.

Calls are JSON-RPC POSTs on one pooled keep-alive aiohttp session, with calldata we encode
ourselves (eth-abi, precomputed selectors). Not through web3's ``AsyncHTTPProvider``: it takes a
``threading.Lock`` through the default thread pool on every request, and that thread hop cost
more CPU than everything else a settlement does (see the commit that made the change). web3's
list of safely retryable read methods is still the one used here.

Error policy: a node we cannot reach, a timeout, an HTTP error or a JSON-RPC error on a read is an
``InfrastructureError`` (503: retry later, no money moved); it is never turned into "invalid
payment". Only a revert of the settlement *simulation* says something about the payment, and it
is mapped from the FiatToken revert strings to x402 reasons.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import aiohttp
from eth_abi.abi import decode as abi_decode
from eth_abi.abi import encode as abi_encode
from eth_utils.crypto import keccak
from web3.providers.rpc.utils import REQUEST_RETRY_ALLOWLIST

from payments import reasons
from payments.eip3009 import Authorization, normalize_address, split_signature
from payments.errors import InfrastructureError, InvalidPayment, SettlementFailed

__all__ = [
    "Chain",
    "Receipt",
    "ReceiptTimeout",
    "RpcError",
    "TransferLog",
    "encode_transfer",
    "encode_transfer_with_authorization",
    "reason_for_revert",
]


def _selector(signature: str) -> bytes:
    return keccak(text=signature)[:4]


SEL_TRANSFER_WITH_AUTHORIZATION_VRS: Final = _selector(
    "transferWithAuthorization(address,address,uint256,uint256,uint256,bytes32,uint8,bytes32,bytes32)"
)
SEL_TRANSFER_WITH_AUTHORIZATION_BYTES: Final = _selector(
    "transferWithAuthorization(address,address,uint256,uint256,uint256,bytes32,bytes)"
)
SEL_AUTHORIZATION_STATE: Final = _selector("authorizationState(address,bytes32)")
SEL_BALANCE_OF: Final = _selector("balanceOf(address)")
SEL_TRANSFER: Final = _selector("transfer(address,uint256)")
SEL_IS_VALID_SIGNATURE: Final = _selector("isValidSignature(bytes32,bytes)")  # == magic value
TOPIC_TRANSFER: Final = "0x" + keccak(text="Transfer(address,address,uint256)").hex()
TOPIC_AUTHORIZATION_USED: Final = "0x" + keccak(text="AuthorizationUsed(address,bytes32)").hex()
_ERROR_STRING_SELECTOR: Final = _selector("Error(string)")

# Sends are not retried here: a resent raw tx that was already mined answers "nonce too low",
# which must not be mistaken for a rejection. The settler handles sends.
_RETRY_ALLOWLIST: Final = [m for m in REQUEST_RETRY_ALLOWLIST if m != "eth_sendRawTransaction"]
_RETRY_BACKOFF_S: Final = 0.05
_JSON_HEADERS: Final = {"Content-Type": "application/json"}


def _retried(method: str) -> bool:
    """Reads are retried on transport errors (web3's allowlist, sends excluded)."""
    return method in _RETRY_ALLOWLIST or method.split("_")[0] in _RETRY_ALLOWLIST


# The receipt poll starts fast (Anvil mines on send) and backs off towards one poll per 100 ms.
_POLL_FIRST_S: Final = 0.001
_POLL_MAX_S: Final = 0.1
_POLL_GROWTH: Final = 2.0
# The first poll waits this share of the recent receipt lag: too early costs a poll, and the
# average then creeps down towards the real lag; too late only when blocks slow down.
_LAG_SHARE: Final = 0.8
_LAG_WEIGHT: Final = 0.1
_LAG_FIRST_MAX_S: Final = 5.0


class RpcError(InfrastructureError):
    """The node answered with a JSON-RPC error object (it is up, but refused the call)."""

    def __init__(self, method: str, code: int, message: str, data: object = None) -> None:
        self.method = method
        self.code = code
        self.message = message
        self.data = data
        super().__init__(f"{method}: RPC error {code}: {message}")


class ReceiptTimeout(InfrastructureError):
    """No receipt within the wait: the transaction may still be mined later."""

    def __init__(self, tx_hash: str, waited_s: float) -> None:
        self.tx_hash = tx_hash
        super().__init__(f"no receipt for {tx_hash} after {waited_s:.1f}s")


@dataclass(frozen=True, slots=True)
class Log:
    address: str
    topics: tuple[str, ...]
    data: bytes


@dataclass(frozen=True, slots=True)
class Receipt:
    tx_hash: str
    status: int
    block_number: int
    gas_used: int
    logs: tuple[Log, ...]

    @property
    def succeeded(self) -> bool:
        return self.status == 1


@dataclass(frozen=True, slots=True)
class TransferLog:
    token: str
    from_: str
    to: str
    value: int


# -- calldata (pure) ------------------------------------------------------------------------


def _word_address(address: str) -> bytes:
    raw = bytes.fromhex(address[2:] if address.startswith(("0x", "0X")) else address)
    if len(raw) != 20:
        raise ValueError("address must be 20 bytes")
    return b"\x00" * 12 + raw


def _word_uint(value: int) -> bytes:
    return value.to_bytes(32, "big")  # raises OverflowError beyond uint256 / for negatives


def encode_transfer_with_authorization(
    auth: Authorization, signature: bytes, *, contract_wallet: bool = False
) -> bytes:
    """Calldata for the v,r,s overload (EOA) or, for EIP-1271 wallets, the bytes overload."""
    if len(auth.nonce) != 32:
        raise ValueError("nonce must be 32 bytes")
    head = (
        _word_address(auth.from_)
        + _word_address(auth.to)
        + _word_uint(auth.value)
        + _word_uint(auth.valid_after)
        + _word_uint(auth.valid_before)
        + auth.nonce
    )
    if contract_wallet:
        tail = abi_encode(["bytes"], [signature])  # offset word + length + padded bytes
        # the offset is relative to the start of the arguments: 6 static words + itself
        return SEL_TRANSFER_WITH_AUTHORIZATION_BYTES + head + _word_uint(7 * 32) + tail[32:]
    v, r, s = split_signature(signature)
    return SEL_TRANSFER_WITH_AUTHORIZATION_VRS + head + _word_uint(v) + r + s


def encode_transfer(to: str, amount: int) -> bytes:
    return SEL_TRANSFER + _word_address(to) + _word_uint(amount)


def _decode_revert_reason(data: object) -> str | None:
    if not isinstance(data, str) or not data.startswith("0x"):
        return None
    try:
        raw = bytes.fromhex(data[2:])
    except ValueError:
        return None
    if raw[:4] != _ERROR_STRING_SELECTOR:
        return None
    try:
        (text,) = abi_decode(["string"], raw[4:])
    except Exception:
        return None
    return str(text)


# FiatToken / our test token revert strings -> x402 reasons. Order matters: first match wins.
_REVERT_REASONS: Final[tuple[tuple[str, str], ...]] = (
    ("exceeds balance", reasons.INSUFFICIENT_BALANCE),
    ("authorization is used or canceled", reasons.NONCE_ALREADY_USED),
    ("authorization is not yet valid", reasons.VALID_AFTER_IN_FUTURE),
    ("authorization is expired", reasons.VALID_BEFORE_EXPIRED),
    ("invalid signature", reasons.INVALID_SIGNATURE),  # also ECRecover's 's'/'v' value checks
    ("invalid signer", reasons.INVALID_SIGNATURE),
)


def reason_for_revert(message: str) -> str:
    low = message.lower()
    for needle, reason in _REVERT_REASONS:
        if needle in low:
            return reason
    return reasons.SIMULATION_FAILED


def _hex_int(value: object) -> int:
    if not isinstance(value, str):
        raise InfrastructureError(f"RPC returned a non-hex quantity: {value!r}")
    return int(value, 16)


def _hex_bytes(value: object) -> bytes:
    if not isinstance(value, str) or not value.startswith("0x"):
        raise InfrastructureError("RPC returned non-hex data")
    return bytes.fromhex(value[2:])


def _topic_address(topic: str) -> str:
    return normalize_address("0x" + topic[-40:])


def _result(method: str, response: object) -> Any:
    """The result of one JSON-RPC answer; RpcError for an error object."""
    if not isinstance(response, dict):
        raise InfrastructureError(f"{method}: malformed RPC response")
    error = response.get("error")
    if error is not None:
        if isinstance(error, dict):
            raise RpcError(
                method,
                int(error.get("code", 0) or 0),
                str(error.get("message", "")),
                error.get("data"),
            )
        raise RpcError(method, 0, str(error))
    if "result" not in response:
        raise InfrastructureError(f"{method}: RPC response without result")
    return response["result"]


def _settle_future(
    future: asyncio.Future[Any], *, result: Any = None, error: BaseException | None = None
) -> None:
    if future.done():  # the waiter gave up (cancelled, timed out)
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _receipt(tx_hash: str, raw: Any) -> Receipt | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise InfrastructureError("malformed receipt")
    if raw.get("blockNumber") is None:  # some nodes answer pending receipts
        return None
    logs = tuple(
        Log(
            address=str(lg["address"]),
            topics=tuple(str(t).lower() for t in lg.get("topics", ())),
            data=_hex_bytes(lg.get("data", "0x")),
        )
        for lg in raw.get("logs", ())
    )
    return Receipt(
        tx_hash=str(raw.get("transactionHash", tx_hash)),
        status=_hex_int(raw.get("status", "0x0")),
        block_number=_hex_int(raw["blockNumber"]),
        gas_used=_hex_int(raw.get("gasUsed", "0x0")),
        logs=logs,
    )


class Chain:
    """Async chain adapter for one token on one network. Create once per process; ``open()`` in
    the application's lifespan, ``close()`` on shutdown."""

    def __init__(
        self,
        rpc_url: str,
        token_address: str,
        *,
        request_timeout: float = 10.0,
        max_connections: int = 64,
        read_retries: int = 2,
    ) -> None:
        self.rpc_url = rpc_url
        self.token = normalize_address(token_address)
        self._timeout = aiohttp.ClientTimeout(total=request_timeout)
        self._max_connections = max_connections
        self._attempts = max(1, read_retries)
        self._ids = itertools.count(1)
        self._session: aiohttp.ClientSession | None = None
        self._closed = False  # after close(), late calls fail instead of leaking a new session
        self._chain_id: int | None = None
        self._receipt_lag = 0.0  # moving average: seconds from wait_receipt to its receipt
        self._batches = True  # JSON-RPC batches accepted (until the node refuses one)
        self._receipt_requests: list[tuple[str, asyncio.Future[Any]]] = []
        self._receipt_flush: asyncio.Handle | None = None
        self._background: set[asyncio.Future[None]] = set()

    async def open(self) -> Chain:
        """One pooled keep-alive session for every call."""
        self._closed = False
        if self._session is None or self._session.closed:
            session = aiohttp.ClientSession(
                raise_for_status=True,
                timeout=self._timeout,
                connector=aiohttp.TCPConnector(limit=self._max_connections, ttl_dns_cache=300),
            )
            self._session = session
        return self

    async def close(self) -> None:
        self._closed = True
        if self._session is not None and not self._session.closed:
            await self._session.close()
        self._session = None

    async def __aenter__(self) -> Chain:
        return await self.open()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- transport ---------------------------------------------------------------------------

    async def _post(self, method: str, request: object, *, attempts: int) -> Any:
        """POST one JSON-RPC request (or batch); the decoded answer. Transport trouble ->
        InfrastructureError, after ``attempts`` tries."""
        if self._closed:
            raise InfrastructureError(f"{method}: the chain adapter is closed")
        if self._session is None or self._session.closed:
            await self.open()
        assert self._session is not None
        body = json.dumps(request, separators=(",", ":")).encode()
        for attempt in range(attempts):
            try:
                async with self._session.post(
                    self.rpc_url, data=body, headers=_JSON_HEADERS
                ) as answer:
                    raw = await answer.read()
                break
            except aiohttp.ClientResponseError as exc:
                raise InfrastructureError(f"{method}: RPC answered HTTP {exc.status}") from exc
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                if attempt + 1 < attempts:
                    await asyncio.sleep(_RETRY_BACKOFF_S * 2**attempt)
                    continue
                raise InfrastructureError(
                    f"{method}: RPC unreachable ({type(exc).__name__})"
                ) from exc
        try:
            return json.loads(raw)
        except ValueError as exc:  # not JSON
            raise InfrastructureError(f"{method}: RPC answered garbage") from exc

    async def rpc(self, method: str, params: Sequence[Any]) -> Any:
        """One JSON-RPC call. Transport trouble -> InfrastructureError; error object -> RpcError."""
        request = {
            "jsonrpc": "2.0",
            "id": next(self._ids),
            "method": method,
            "params": list(params),
        }
        response = await self._post(
            method, request, attempts=self._attempts if _retried(method) else 1
        )
        return _result(method, response)

    async def _call(self, to: str, data: bytes, *, sender: str | None = None) -> bytes:
        tx: dict[str, str] = {"to": to, "data": "0x" + data.hex()}
        if sender is not None:
            tx["from"] = sender
        return _hex_bytes(await self.rpc("eth_call", [tx, "latest"]))

    # -- reads ---------------------------------------------------------------------------------

    async def chain_id(self) -> int:
        if self._chain_id is None:
            self._chain_id = _hex_int(await self.rpc("eth_chainId", []))
        return self._chain_id

    async def code_at(self, address: str) -> bytes:
        return _hex_bytes(await self.rpc("eth_getCode", [address, "latest"]))

    async def eth_balance(self, address: str) -> int:
        return _hex_int(await self.rpc("eth_getBalance", [address, "latest"]))

    async def balance_of(self, address: str) -> int:
        out = await self._call(self.token, SEL_BALANCE_OF + _word_address(address))
        return int.from_bytes(out[:32], "big")

    async def authorization_state(self, authorizer: str, nonce: bytes) -> bool:
        """True once the (authorizer, nonce) pair was used or canceled on chain."""
        out = await self._call(
            self.token, SEL_AUTHORIZATION_STATE + _word_address(authorizer) + nonce
        )
        return int.from_bytes(out[:32], "big") != 0

    async def transaction_count(self, address: str, block: str = "pending") -> int:
        return _hex_int(await self.rpc("eth_getTransactionCount", [address, block]))

    async def gas_price(self) -> int:
        return _hex_int(await self.rpc("eth_gasPrice", []))

    async def is_valid_signature_1271(self, wallet: str, digest: bytes, signature: bytes) -> bool:
        """EIP-1271: does the contract wallet accept ``signature`` over ``digest``?"""
        data = SEL_IS_VALID_SIGNATURE + abi_encode(["bytes32", "bytes"], [digest, signature])
        try:
            out = await self._call(wallet, data)
        except RpcError as exc:
            if _is_revert(exc):
                return False
            raise
        return out[:4] == SEL_IS_VALID_SIGNATURE and len(out) >= 32

    async def simulate_transfer(
        self,
        auth: Authorization,
        signature: bytes,
        sender: str,
        *,
        contract_wallet: bool = False,
    ) -> None:
        """``eth_call`` the settlement exactly as the settler will send it. One round trip covers
        balance, nonce state, validity window and the token's own signature check."""
        data = encode_transfer_with_authorization(auth, signature, contract_wallet=contract_wallet)
        try:
            await self._call(self.token, data, sender=sender)
        except RpcError as exc:
            if not _is_revert(exc):
                raise
            text = _decode_revert_reason(exc.data) or exc.message
            raise InvalidPayment(
                reason_for_revert(text), f"settlement would revert: {text}"
            ) from exc

    async def authorization_used_tx(
        self, authorizer: str, nonce: bytes, *, from_block: int | str = "earliest"
    ) -> str | None:
        """The tx that used (authorizer, nonce) on the token, from its AuthorizationUsed log."""
        logs = await self.rpc(
            "eth_getLogs",
            [
                {
                    "address": self.token,
                    "fromBlock": hex(from_block) if isinstance(from_block, int) else from_block,
                    "toBlock": "latest",
                    "topics": [
                        TOPIC_AUTHORIZATION_USED,
                        "0x" + _word_address(authorizer).hex(),
                        "0x" + nonce.hex(),
                    ],
                }
            ],
        )
        if not isinstance(logs, list) or not logs:
            return None
        tx = logs[-1].get("transactionHash") if isinstance(logs[-1], dict) else None
        return str(tx) if tx else None

    async def block_number(self) -> int:
        return _hex_int(await self.rpc("eth_blockNumber", []))

    # -- transactions --------------------------------------------------------------------------

    async def send_raw(self, raw_tx: bytes) -> str:
        """Broadcast a signed transaction. Raises RpcError when the node refuses it."""
        result = await self.rpc("eth_sendRawTransaction", ["0x" + raw_tx.hex()])
        return str(result)

    async def send_raw_many(self, raw_txs: Sequence[bytes]) -> list[str | RpcError]:
        """Broadcast signed transactions in ONE JSON-RPC batch, in order (a node runs a batch's
        calls in sequence), so N consecutive nonces cost one round trip. Per transaction: its
        hash, or the RpcError the node answered. InfrastructureError when the transport failed
        (then each may or may not have been broadcast)."""
        if len(raw_txs) == 1 or not self._batches:
            outcomes: list[str | RpcError] = []
            for raw in raw_txs:
                try:
                    outcomes.append(await self.send_raw(raw))
                except RpcError as exc:
                    outcomes.append(exc)
            return outcomes
        method = "eth_sendRawTransaction"
        first = next(self._ids)
        request = [
            {"jsonrpc": "2.0", "id": first + i, "method": method, "params": ["0x" + raw.hex()]}
            for i, raw in enumerate(raw_txs)
        ]
        for _ in raw_txs[1:]:
            next(self._ids)
        answer = await self._post(method, request, attempts=1)
        if not isinstance(answer, list):  # a node without batches refused the whole request
            self._batches = False
            return await self.send_raw_many(raw_txs)
        by_id = {item.get("id"): item for item in answer if isinstance(item, dict)}
        out: list[str | RpcError] = []
        for i in range(len(raw_txs)):
            try:
                out.append(str(_result(method, by_id.get(first + i))))
            except RpcError as exc:
                out.append(exc)
            except InfrastructureError as exc:  # no answer for it: fate unknown
                raise InfrastructureError(f"{method}: incomplete batch answer") from exc
        return out

    async def transaction_known(self, tx_hash: str) -> bool:
        """Does the node know the tx (pending or mined)? Distinguishes 'refused' from 'sent'."""
        return (await self.rpc("eth_getTransactionByHash", [tx_hash])) is not None

    async def get_receipt(self, tx_hash: str) -> Receipt | None:
        """The receipt, or None while the tx is not mined. Concurrent calls made in the same
        event-loop turn go out as ONE JSON-RPC batch (many settlements polling at once cost
        one round trip, for us and for the node)."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._receipt_requests.append((tx_hash, future))
        if self._receipt_flush is None:
            self._receipt_flush = asyncio.get_running_loop().call_soon(self._flush_receipts)
        return _receipt(tx_hash, await future)

    def _flush_receipts(self) -> None:
        self._receipt_flush = None
        batch, self._receipt_requests = self._receipt_requests, []
        task = asyncio.ensure_future(self._fetch_receipts(batch))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _fetch_receipts(self, batch: list[tuple[str, asyncio.Future[Any]]]) -> None:
        method = "eth_getTransactionReceipt"
        try:
            if len(batch) == 1 or not self._batches:
                for tx_hash, future in batch:
                    try:
                        raw = await self.rpc(method, [tx_hash])
                    except Exception as exc:  # handed to the waiter, whatever it is
                        _settle_future(future, error=exc)
                    else:
                        _settle_future(future, result=raw)
                return
            first = next(self._ids)
            for _ in batch[1:]:
                next(self._ids)
            request = [
                {"jsonrpc": "2.0", "id": first + i, "method": method, "params": [tx_hash]}
                for i, (tx_hash, _) in enumerate(batch)
            ]
            answer = await self._post(method, request, attempts=self._attempts)
            if not isinstance(answer, list):  # the node refuses batches: ask one by one
                self._batches = False
                await self._fetch_receipts(batch)
                return
            by_id = {item.get("id"): item for item in answer if isinstance(item, dict)}
            for i, (_, future) in enumerate(batch):
                try:
                    _settle_future(future, result=_result(method, by_id.get(first + i)))
                except (RpcError, InfrastructureError) as exc:
                    _settle_future(future, error=exc)
        except Exception as exc:  # transport failure: every waiter in the batch learns it
            for _, future in batch:
                _settle_future(future, error=exc)

    async def wait_receipt(self, tx_hash: str, timeout_s: float = 30.0) -> Receipt:
        """Poll for the receipt: first when receipts have recently taken to come (most of that
        wait, learnt as a moving average), then after 1 ms doubling to 100 ms. Never web3's
        flat 0.1 s, which dominated settlement latency on a long Anvil chain; and under load
        one or two polls per transaction instead of a poll every few ms from every waiter."""
        start = time.monotonic()
        first = min(self._receipt_lag * _LAG_SHARE, _LAG_FIRST_MAX_S, timeout_s)
        if first >= _POLL_FIRST_S:
            await asyncio.sleep(first)
        delay = _POLL_FIRST_S
        while True:
            receipt = await self.get_receipt(tx_hash)
            if receipt is not None:
                lag = time.monotonic() - start
                self._receipt_lag += _LAG_WEIGHT * (lag - self._receipt_lag)
                return receipt
            waited = time.monotonic() - start
            if waited >= timeout_s:
                raise ReceiptTimeout(tx_hash, waited)
            await asyncio.sleep(min(delay, max(0.0, timeout_s - waited)))
            delay = min(delay * _POLL_GROWTH, _POLL_MAX_S)

    def check_transfer(self, receipt: Receipt, payer: str, pay_to: str, amount: int) -> None:
        """Succeeded AND moved exactly ``amount`` from payer to payTo in this token:
        ``SettlementFailed`` otherwise (a revert, or a tx that did something else)."""
        if not receipt.succeeded:
            raise SettlementFailed(reasons.TRANSACTION_FAILED, f"{receipt.tx_hash} reverted")
        payer, pay_to = normalize_address(payer), normalize_address(pay_to)
        for transfer in self.transfer_logs(receipt):
            if transfer.from_ == payer and transfer.to == pay_to and transfer.value == amount:
                return
        raise SettlementFailed(
            reasons.TRANSFER_EVENT_MISMATCH, f"{receipt.tx_hash} has no matching Transfer log"
        )

    def transfer_logs(self, receipt: Receipt) -> list[TransferLog]:
        """ERC-20 Transfer events emitted by this chain's token in ``receipt``."""
        token = self.token.lower()
        out: list[TransferLog] = []
        for log in receipt.logs:
            if log.address.lower() != token or len(log.topics) != 3:
                continue
            if log.topics[0] != TOPIC_TRANSFER:
                continue
            out.append(
                TransferLog(
                    token=self.token,
                    from_=_topic_address(log.topics[1]),
                    to=_topic_address(log.topics[2]),
                    value=int.from_bytes(log.data[:32], "big"),
                )
            )
        return out


def _is_revert(exc: RpcError) -> bool:
    """A revert (the EVM said no) as opposed to a node-side failure of the call."""
    if isinstance(exc.data, str) and exc.data.startswith("0x"):
        return True
    return exc.code == 3 or "revert" in exc.message.lower()
