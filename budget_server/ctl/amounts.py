"""Amounts typed by people and shown to people, converted exactly.

Budgets hold integers: tokens, or nano-dollars for USD (1 USD = 10^9). A person types
`12.50` or `1.5M`; going through a float would turn `0.1` into 0.1000000000000000055...,
so text goes through `decimal.Decimal`, whose construction from a string is exact, and
arithmetic runs in a context that raises instead of rounding. Anything that does not
map to a whole number of the unit (a tenth of a token, a tenth of a nano-dollar) is
refused rather than rounded: an operator who typed it meant something we cannot store.
"""

from __future__ import annotations

import re
from decimal import Context, Decimal, Inexact, Rounded
from typing import Final

from budget_client._proto.budgetd.v1 import budget_pb2 as pb
from budget_server.limits import AMOUNT_MAX

NANOS_PER_USD: Final = 10**9
USD_DECIMALS_MAX: Final = 9
TEXT_LENGTH_MAX: Final = 40
"""Longer input is a typo; the bound also keeps the exact context's precision sufficient."""

TOKEN_SUFFIXES: Final = {"": 1, "k": 10**3, "K": 10**3, "M": 10**6, "G": 10**9}

# Underscores only between digits, as in Python literals: `1_000_000`, not `_1` or `1__0`.
_DIGITS = r"\d(?:_?\d)*"
_TOKENS = re.compile(rf"(?P<number>{_DIGITS}(?:\.{_DIGITS})?)(?P<suffix>[kKMG]?)")
_USD = re.compile(rf"\$?(?P<number>{_DIGITS}(?:\.{_DIGITS})?)")

# Precision far above TEXT_LENGTH_MAX digits plus the scale, and any rounding is an error.
_EXACT = Context(prec=100, traps=[Inexact, Rounded])


class AmountError(ValueError):
    """Text that is not an amount of the unit; the message says what to type instead."""


def parse_tokens(text: str) -> int:
    """`1500000`, `1_500_000`, `1.5M` and `1500k` are all 1,500,000 tokens."""
    match = _TOKENS.fullmatch(_checked(text))
    if match is None:
        raise AmountError(
            f"{text!r} is not a token count: use a whole number such as 250000, 250_000, "
            "250k or 1.5M"
        )
    value = _EXACT.multiply(
        Decimal(match["number"].replace("_", "")), Decimal(TOKEN_SUFFIXES[match["suffix"]])
    )
    if value != value.to_integral_value():
        raise AmountError(f"{text!r} is {value} tokens: a budget counts whole tokens")
    return _bounded(int(value), text, format_tokens(AMOUNT_MAX))


def parse_usd(text: str) -> int:
    """Dollars (`12.50`, `$12.50`, `$0.000000001`) to nano-dollars, exactly."""
    match = _USD.fullmatch(_checked(text))
    if match is None:
        raise AmountError(
            f"{text!r} is not an amount in dollars: use digits with an optional $ and "
            "decimal point, such as 12.50 or $0.002 (no commas)"
        )
    dollars = Decimal(match["number"].replace("_", ""))
    exponent = dollars.as_tuple().exponent  # a str only for NaN/infinity, which never match
    if not isinstance(exponent, int) or -exponent > USD_DECIMALS_MAX:
        raise AmountError(
            f"{text!r} has more than {USD_DECIMALS_MAX} decimal places; USD amounts are "
            "exact to one nano-dollar ($0.000000001)"
        )
    nanos = int(_EXACT.scaleb(dollars, Decimal(USD_DECIMALS_MAX)))
    return _bounded(nanos, text, format_usd(AMOUNT_MAX))


def parse_amount(text: str, unit: pb.Unit.ValueType) -> int:
    """An amount in the budget's own unit: nano-dollars for USD, else tokens."""
    return parse_usd(text) if unit == pb.UNIT_USD else parse_tokens(text)


def format_tokens(value: int, *, signed: bool = False) -> str:
    """`1,234,567 tok`: grouped so that a misplaced zero is visible."""
    return f"{_sign(value, signed)}{abs(value):,} tok"


def format_usd(nanos: int, *, signed: bool = False, exact: bool = False) -> str:
    """`$1,234.50` (trailing zeros trimmed to cents) or, with exact, all nine decimals.

    Trimming drops only zeros, so the trimmed form is exact too; it just reads better.
    """
    dollars, fraction = divmod(abs(nanos), NANOS_PER_USD)
    digits = f"{fraction:09d}"
    if not exact:
        digits = digits.rstrip("0").ljust(2, "0")
    return f"{_sign(nanos, signed)}${dollars:,}.{digits}"


def format_amount(value: int, unit: pb.Unit.ValueType, *, signed: bool = False) -> str:
    """An amount shown in the budget's unit."""
    if unit == pb.UNIT_USD:
        return format_usd(value, signed=signed)
    return format_tokens(value, signed=signed)


def format_percent(part: int, whole: int) -> str:
    """`part / whole` to one decimal, rounded down, so 99.97 % never reads as 100.0 %."""
    if whole <= 0:
        return "-"
    tenths = part * 1000 // whole
    return f"{tenths // 10}.{tenths % 10}%"


def _checked(text: str) -> str:
    stripped = text.strip()
    if len(stripped) > TEXT_LENGTH_MAX:
        raise AmountError(f"amount {stripped[:TEXT_LENGTH_MAX]!r}... is too long")
    return stripped


def _bounded(value: int, text: str, largest: str) -> int:
    if value > AMOUNT_MAX:
        raise AmountError(f"{text!r} is above the largest amount budgetd stores ({largest})")
    return value


def _sign(value: int, signed: bool) -> str:
    if value < 0:
        return "-"
    return "+" if signed and value > 0 else ""
