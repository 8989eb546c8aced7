"""Small generic helpers shared by tests (no fixtures here; see conftest.py)."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from eth_abi.abi import decode
from eth_account import Account

from payments.localchain import RpcError

__all__ = ["Key", "free_port", "new_key", "revert_reason", "wait_balance", "wait_until"]

T = TypeVar("T")

_ERROR_STRING_SELECTOR = bytes.fromhex("08c379a0")  # Error(string)


@dataclass(frozen=True)
class Key:
    address: str
    key: str


def new_key() -> Key:
    """A fresh random key (checksummed address, 0x-prefixed hex key)."""
    acct = Account.create()
    return Key(acct.address, "0x" + bytes(acct.key).hex())


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def revert_reason(error: RpcError) -> str:
    """The Error(string) revert reason carried by a JSON-RPC error ('' if there is none)."""
    if not error.data:
        return ""
    raw = bytes.fromhex(error.data.removeprefix("0x"))
    if raw[:4] != _ERROR_STRING_SELECTOR:
        return ""
    (reason,) = decode(["string"], raw[4:])
    return str(reason)


async def wait_balance(local_chain: Any, address: str, expected: int, limit_s: float = 15) -> None:
    """Until ``address`` holds ``expected`` USDC on chain (a transaction the node took may still
    wait for its block); asserts it does within ``limit_s``."""

    async def balance() -> int:
        held: int = local_chain.usdc_balance(address)
        return held

    await wait_until(balance, lambda held: held == expected, limit_s)


async def wait_until(
    probe: Callable[[], Awaitable[T]], done: Callable[[T], bool], limit_s: float = 15
) -> T:
    """Call ``probe`` until ``done`` holds for what it returns (a ledger row written a moment
    after the block that caused it, say); asserts it does within ``limit_s``."""
    deadline = time.monotonic() + limit_s
    seen = await probe()
    while not done(seen) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        seen = await probe()
    assert done(seen), seen
    return seen
