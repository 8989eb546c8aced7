"""Session-wide fixtures: one Anvil chain for the whole run, and funded throwaway payers.

Kept small and generic; package-specific fixtures live in the subfolders' conftest files.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import py_ecc  # noqa: F401  (see below)
import pytest
from eth_account import Account

from payments.localchain import DevAccount, LocalChain

# py_ecc (imported by eth-account) raises the interpreter's recursion limit at import. Import it
# first, so the limit is set once before pytest compiles test modules: CPython 3.11 raised
# "AST constructor recursion depth mismatch" once here when the limit moved mid-session.

DEFAULT_PAYER_USDC = 10_000_000  # 10 USDC in atomic units
DEFAULT_PAYER_ETH_WEI = 10**17


@pytest.fixture(scope="session")
def local_chain() -> Iterator[LocalChain]:
    """A real anvil (chain id 8453) with test USDC at the canonical Base address."""
    chain = LocalChain()
    chain.start()
    try:
        yield chain
    finally:
        chain.stop()


@pytest.fixture
def funded_payer(local_chain: LocalChain) -> Callable[..., DevAccount]:
    """Factory: a fresh random key holding `usdc` test USDC and `eth_wei` ETH."""

    def make(usdc: int = DEFAULT_PAYER_USDC, eth_wei: int = DEFAULT_PAYER_ETH_WEI) -> DevAccount:
        account = Account.create()
        local_chain.fund(account.address, usdc=usdc, eth_wei=eth_wei)
        return DevAccount(account.address, "0x" + bytes(account.key).hex())

    return make
