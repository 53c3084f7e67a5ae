"""`Usage.validate` accepts valid counts with one chained comparison; the counts it accepts
must be exactly those that pass every one of its detailed checks."""

from __future__ import annotations

import itertools

import pytest

from budget_server.errors import InvalidArgument
from budget_server.ledger.usage import Usage
from budget_server.limits import AMOUNT_MAX

EDGES = (-1, 0, 1, 2, AMOUNT_MAX - 1, AMOUNT_MAX, AMOUNT_MAX + 1)


def possible(i: int, c: int, o: int, r: int) -> bool:
    """The rules, one by one, as the error messages state them."""
    return (
        all(0 <= v <= AMOUNT_MAX for v in (i, c, o, r))
        and i + o <= AMOUNT_MAX
        and c <= i
        and r <= o
    )


def test_validate_accepts_exactly_the_possible_counts() -> None:
    checked = 0
    for counts in itertools.product(EDGES, repeat=4):
        usage = Usage(*counts)
        if possible(*counts):
            assert usage.validate() is usage, counts
        else:
            with pytest.raises(InvalidArgument, match=r"^usage"):
                usage.validate()
        checked += 1
    assert checked == len(EDGES) ** 4
