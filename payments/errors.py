"""The one exception tree of the payments package.

::

    PaymentError                      base of everything raised on purpose here
    ├── InvalidPayment                the payer's fault: answer 402 with .reason (x402 string)
    ├── InfrastructureError           RPC / database unavailable before money moved: answer 503
    ├── SettlementFailed              the transfer was sent (or tried) and did not go through
    ├── UnknownNetworkError           (also a KeyError) no such network in the registry
    └── InvalidAmount                 (also a ValueError) a human price that is not exact USDC

`InvalidPayment.reason` is always one of the strings in `payments.reasons` (the x402 spec
strings), so a client can act on it; `.detail` is a short human sentence that never echoes a
signature or a whole header.
"""

from __future__ import annotations

__all__ = [
    "InfrastructureError",
    "InvalidAmount",
    "InvalidPayment",
    "PaymentError",
    "SettlementFailed",
    "UnknownNetworkError",
]


class PaymentError(Exception):
    """Base class of every error the payments package raises on purpose."""


class InvalidPayment(PaymentError):
    """The payment itself is wrong; the request must be answered 402 with `reason`."""

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail or reason
        super().__init__(f"{reason}: {self.detail}")


class InfrastructureError(PaymentError):
    """A dependency (RPC node, database) failed before any money moved: retry later (503)."""


class SettlementFailed(PaymentError):
    """Settlement was attempted and did not succeed (reverted, not mined, ...)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail or reason
        super().__init__(f"{reason}: {self.detail}")


class UnknownNetworkError(PaymentError, KeyError):
    """`get_network` was asked for a name or CAIP-2 id it does not know."""

    def __init__(self, key: str) -> None:
        self.key = key
        super().__init__(key)

    def __str__(self) -> str:
        return f"unknown network {self.key!r}"


class InvalidAmount(PaymentError, ValueError):
    """A human-readable USDC amount that cannot be represented exactly in atomic units."""
