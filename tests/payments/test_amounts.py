"""Human USDC strings <-> atomic units, exactly."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from payments.amounts import UINT256_MAX, format_usdc, parse_usdc
from payments.errors import InvalidAmount, PaymentError


@pytest.mark.parametrize(
    ("text", "units"),
    [
        ("0.01", 10_000),
        ("0.25", 250_000),
        ("2.01", 2_010_000),  # the float trap: int(2.01 * 10**6) == 2009999
        ("1", 1_000_000),
        ("1.000000", 1_000_000),
        ("0.000001", 1),
        ("0", 0),
        ("0.0", 0),
        ("007.50", 7_500_000),
        ("123456789.123456", 123_456_789_123_456),
    ],
)
def test_parse_exact(text: str, units: int) -> None:
    assert parse_usdc(text) == units


@pytest.mark.parametrize(
    "text",
    [
        "0.0000001",  # inexact: below one atomic unit
        "1.0000001",
        "-1",
        "-0.01",
        "+1",
        "NaN",
        "nan",
        "Infinity",
        "-inf",
        "1e3",
        "1E-6",
        "1e999999999",
        "",
        " 1",
        "1 ",
        "1,000",
        "1_000",
        ".5",
        "5.",
        "0x10",
        "$1",
        "\u0661",  # ARABIC-INDIC DIGIT ONE: int() would accept it
        "9" * 79,  # longer than any uint256 needs
    ],
)
def test_parse_refuses(text: str) -> None:
    with pytest.raises(InvalidAmount):
        parse_usdc(text)


def test_refusal_is_in_the_payment_error_tree_and_a_value_error() -> None:
    with pytest.raises(PaymentError):
        parse_usdc("0.0000001")
    with pytest.raises(ValueError):
        parse_usdc("abc")


def test_parse_decimal_objects() -> None:
    assert parse_usdc(Decimal("0.25")) == 250_000
    assert parse_usdc(Decimal("2.5E-1")) == 250_000  # already a Decimal: exponent is fine
    assert parse_usdc(Decimal("-0")) == 0
    for bad in (Decimal("NaN"), Decimal("Infinity"), Decimal("-0.01"), Decimal("1E-7")):
        with pytest.raises(InvalidAmount):
            parse_usdc(bad)
    with pytest.raises(InvalidAmount):
        parse_usdc(0.25)  # type: ignore[arg-type]  # floats are refused outright


def test_uint256_bound() -> None:
    top = str(UINT256_MAX)
    assert parse_usdc(top, decimals=0) == UINT256_MAX
    with pytest.raises(InvalidAmount, match="uint256"):
        parse_usdc(str(UINT256_MAX + 1), decimals=0)
    with pytest.raises(InvalidAmount, match="uint256"):
        parse_usdc(top)  # times 10**6 overflows


@pytest.mark.parametrize(
    ("units", "text"),
    [
        (250_000, "0.25"),
        (10_000, "0.01"),
        (1, "0.000001"),
        (1_000_000, "1"),
        (2_010_000, "2.01"),
        (0, "0"),
        (123_456_789_123_456, "123456789.123456"),
    ],
)
def test_format(units: int, text: str) -> None:
    assert format_usdc(units) == text


def test_format_refuses_non_ints_and_negatives() -> None:
    for bad in (-1, 1.5, True, "1"):
        with pytest.raises(InvalidAmount):
            format_usdc(bad)  # type: ignore[arg-type]


def test_other_decimals() -> None:
    assert parse_usdc("1.5", decimals=18) == 1_500_000_000_000_000_000
    assert format_usdc(1_500_000_000_000_000_000, decimals=18) == "1.5"
    assert parse_usdc("42", decimals=0) == 42


@given(st.integers(min_value=0, max_value=10**30))
def test_round_trip(units: int) -> None:
    assert parse_usdc(format_usdc(units)) == units
