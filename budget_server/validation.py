"""Input checks shared by the gRPC services: each failure names the field and the limit."""

from __future__ import annotations

import re
from collections.abc import Mapping

from budget_server.errors import InvalidArgument
from budget_server.limits import (
    AMOUNT_MAX,
    ID_LENGTH_MAX,
    IDEMPOTENCY_KEY_LENGTH_MAX,
    LABEL_KEY_LENGTH_MAX,
    LABEL_VALUE_LENGTH_MAX,
    LABELS_MAX,
    MODEL_LENGTH_MAX,
    TTL_DEFAULT_MS,
    TTL_MAX_MS,
    TTL_MIN_MS,
)

# Readable hierarchical keys such as "org:acme/team:search"; no spaces or control characters.
_BUDGET_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9:/._@+=-]*")
_PRINTABLE = re.compile(r"[\x21-\x7e]+")
_WHITESPACE = re.compile(r"\s")  # what str.isspace() calls whitespace, on every open


def budget_id(value: str, field: str = "budget_id") -> str:
    if not value:
        raise InvalidArgument(f"{field} is required")
    if len(value) > ID_LENGTH_MAX:
        raise InvalidArgument(f"{field} is {len(value)} characters; the maximum is {ID_LENGTH_MAX}")
    if not _BUDGET_ID.fullmatch(value):
        raise InvalidArgument(
            f"{field} {value!r} may contain only letters, digits and : / . _ @ + = - "
            "and must start with a letter or digit"
        )
    return value


def reservation_id(value: str) -> str:
    if not value:
        raise InvalidArgument("reservation_id is required")
    if len(value) > 40 or not _PRINTABLE.fullmatch(value):
        raise InvalidArgument(f"reservation_id {value[:50]!r} is not a reservation id")
    return value


def amount(value: int, field: str = "amount", *, allow_zero: bool = False) -> int:
    if value < 0 or (value == 0 and not allow_zero):
        raise InvalidArgument(f"{field} must be positive (got {value})")
    if value > AMOUNT_MAX:
        raise InvalidArgument(f"{field} {value} is above the maximum {AMOUNT_MAX} (AMOUNT_MAX)")
    return value


def limit(value: int) -> int:
    if value < 0:
        raise InvalidArgument(f"limit must not be negative (got {value})")
    if value > AMOUNT_MAX:
        raise InvalidArgument(f"limit {value} is above the maximum {AMOUNT_MAX} (AMOUNT_MAX)")
    return value


def printable(value: str, field: str) -> str:
    """Refuse control characters in free text the ledger stores and logs: a newline would
    forge a line of the server's log, and PostgreSQL's text cannot hold a NUL at all."""
    if not value.isprintable():
        raise InvalidArgument(f"{field} {value[:80]!r} contains control characters")
    return value


def idempotency_key(value: str) -> str | None:
    if not value:
        return None
    if len(value) > IDEMPOTENCY_KEY_LENGTH_MAX:
        raise InvalidArgument(
            f"idempotency_key is {len(value)} characters; the maximum is "
            f"{IDEMPOTENCY_KEY_LENGTH_MAX}"
        )
    return printable(value, "idempotency_key")


def model(value: str) -> str:
    if len(value) > MODEL_LENGTH_MAX:
        raise InvalidArgument(
            f"model is {len(value)} characters; the maximum is {MODEL_LENGTH_MAX}"
        )
    if _WHITESPACE.search(value):  # as a price's name (pricing/litellm.py)
        raise InvalidArgument(f"model {value[:80]!r} contains spaces")
    return printable(value, "model")


def labels(values: Mapping[str, str]) -> dict[str, str]:
    if len(values) > LABELS_MAX:
        raise InvalidArgument(f"{len(values)} labels given; the maximum is {LABELS_MAX}")
    for key, value in values.items():
        if not key or len(key) > LABEL_KEY_LENGTH_MAX:
            raise InvalidArgument(
                f"label key {key[:80]!r} must be 1-{LABEL_KEY_LENGTH_MAX} characters"
            )
        if len(value) > LABEL_VALUE_LENGTH_MAX:
            raise InvalidArgument(
                f"label {key!r} is {len(value)} characters; the maximum is {LABEL_VALUE_LENGTH_MAX}"
            )
        printable(key, "label key")
        printable(value, f"label {key!r}")
    return dict(values)


def ttl_ms(value: int) -> int:
    if value == 0:
        return TTL_DEFAULT_MS
    if not TTL_MIN_MS <= value <= TTL_MAX_MS:
        raise InvalidArgument(f"ttl_ms must be between {TTL_MIN_MS} and {TTL_MAX_MS} (got {value})")
    return value
