"""Exact conversion between human USDC strings and integer atomic units.

Money is an `int` of atomic units everywhere in this package (USDC has 6 decimals). Human
prices ("0.25") are parsed once, with `Decimal`, and refused unless they are exact: a float
would turn 2.01 into 2009999 units. Only plain decimal notation is accepted (no sign, no
exponent, no whitespace, no thousands separators) so a typo in a price list fails loudly.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Final

from .errors import InvalidAmount

__all__ = ["UINT256_MAX", "USDC_DECIMALS", "format_usdc", "parse_usdc"]

UINT256_MAX: Final = 2**256 - 1
USDC_DECIMALS: Final = 6

# Digits, optionally one dot followed by digits. Bounded so Decimal never sees a huge string.
_PLAIN_DECIMAL: Final = re.compile(r"[0-9]{1,78}(?:\.[0-9]{1,78})?")


def parse_usdc(value: str | Decimal, *, decimals: int = USDC_DECIMALS) -> int:
    """Turn "0.25" into 250000 (for 6 decimals); refuse anything not exactly representable."""
    if isinstance(value, Decimal):
        number = value
        if not number.is_finite():
            raise InvalidAmount(f"amount must be a finite number, got {value!r}")
    elif isinstance(value, str):
        if _PLAIN_DECIMAL.fullmatch(value) is None:
            raise InvalidAmount(f"amount must be a plain decimal like '0.25', got {value!r}")
        try:
            number = Decimal(value)
        except InvalidOperation as exc:  # pragma: no cover - the regex already guards this
            raise InvalidAmount(f"not a decimal amount: {value!r}") from exc
    else:
        raise InvalidAmount(f"amount must be a str or Decimal, got {type(value).__name__}")
    if number.is_signed() and number != 0:
        raise InvalidAmount(f"amount must not be negative, got {value!r}")
    # Integer arithmetic on (digits, exponent): Decimal's default 28-digit context would round.
    _, digits, exponent = number.as_tuple()
    assert isinstance(exponent, int)  # finite, checked above
    coefficient = int("".join(map(str, digits)) or "0")
    shift = exponent + decimals
    if coefficient == 0:
        return 0
    if shift >= 0:
        if len(digits) + shift > 79:  # > 10**78 > UINT256_MAX
            raise InvalidAmount(f"amount {value!r} does not fit in uint256")
        units: int = coefficient * pow(10, shift)
    else:
        if -shift > len(digits):  # coefficient < 10**-shift: a non-zero fraction remains
            raise InvalidAmount(f"amount {value!r} has more than {decimals} decimal places")
        scale: int = pow(10, -shift)
        units, remainder = divmod(coefficient, scale)
        if remainder:
            raise InvalidAmount(f"amount {value!r} has more than {decimals} decimal places")
    if units > UINT256_MAX:
        raise InvalidAmount(f"amount {value!r} does not fit in uint256")
    return units


def format_usdc(units: int, *, decimals: int = USDC_DECIMALS) -> str:
    """Turn 250000 into "0.25": shortest exact decimal, no trailing zeros, no exponent."""
    if isinstance(units, bool) or not isinstance(units, int):
        raise InvalidAmount(f"atomic amount must be an int, got {type(units).__name__}")
    if units < 0:
        raise InvalidAmount(f"atomic amount must not be negative, got {units}")
    whole, frac = divmod(units, 10**decimals)
    if frac == 0:
        return str(whole)
    return f"{whole}.{frac:0{decimals}d}".rstrip("0")
