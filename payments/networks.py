"""Networks this gateway can be paid on, and their USDC token domain.

`LOCAL` *is* `BASE`: the local Anvil chain runs chain id 8453 and the test token's code is moved
to the canonical Base USDC address, so dev mode, tests and mainnet share one set of constants
(and the official clients, which only pay the canonical USDC by default, accept it).
A custom network is just `Network(...)` built by the caller.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final

from .eip3009 import TokenDomain, normalize_address
from .errors import UnknownNetworkError

__all__ = ["BASE", "BASE_SEPOLIA", "LOCAL", "NETWORKS", "Network", "get_network"]

_CAIP2_EIP155: Final = re.compile(r"eip155:[1-9][0-9]{0,19}")


@dataclass(frozen=True, slots=True)
class Network:
    """An EVM network: v1 name, v2 CAIP-2 id, chain id and its EIP-3009 USDC token."""

    name: str
    caip2: str
    chain_id: int
    usdc: str
    token_name: str
    token_version: str
    decimals: int = 6

    def __post_init__(self) -> None:
        if _CAIP2_EIP155.fullmatch(self.caip2) is None or self.caip2 != f"eip155:{self.chain_id}":
            raise ValueError(f"caip2 must be 'eip155:{self.chain_id}', got {self.caip2!r}")
        object.__setattr__(self, "usdc", normalize_address(self.usdc))

    @property
    def token_domain(self) -> TokenDomain:
        """EIP-712 domain of this network's USDC."""
        return TokenDomain(self.token_name, self.token_version, self.chain_id, self.usdc)


BASE: Final = Network(
    name="base",
    caip2="eip155:8453",
    chain_id=8453,
    usdc="0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913",
    token_name="USD Coin",  # noqa: S106 - not a secret
    token_version="2",  # noqa: S106 - not a secret
)
BASE_SEPOLIA: Final = Network(
    name="base-sepolia",
    caip2="eip155:84532",
    chain_id=84532,
    usdc="0x036CbD53842c5426634e7929541eC2318f3dCF7e",
    token_name="USDC",  # noqa: S106 - not a secret
    token_version="2",  # noqa: S106 - not a secret
)
LOCAL: Final = BASE

NETWORKS: Final = MappingProxyType(
    {key: net for net in (BASE, BASE_SEPOLIA) for key in (net.name, net.caip2)}
)


def get_network(name_or_caip2: str) -> Network:
    """Look a network up by v1 name ("base") or CAIP-2 id ("eip155:8453"); "local" is BASE."""
    if name_or_caip2 == "local":
        return LOCAL
    try:
        return NETWORKS[name_or_caip2]
    except KeyError:
        raise UnknownNetworkError(name_or_caip2) from None
