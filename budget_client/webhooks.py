"""Receiving budgetd's webhooks: check that a request really came from budgetd.

budgetd POSTs each event as a JSON object (`id`, `kind`, `budget_id`, `at_us`,
`threshold_pct`, `spent`, `limit`, `message`, ...) with these headers:

    Content-Type: application/json
    X-Budgetd-Event-Id: ev_...          the event's id, the same on every retry
    X-Budgetd-Signature: sha256=<hex>   HMAC-SHA256 of the raw body, keyed with the secret
    X-Budgetd-Timestamp: <int>          when this attempt was sent, microseconds since epoch

Delivery is at least once: a receiver that answered 2xx too late, or whose answer was lost,
gets the same event again. De-duplicate on the event id: record the ids already handled
(a unique column in the table the receiver writes to, or a set with a retention of a few
days; budgetd stops retrying after its last attempt, about an hour by default) and answer
2xx to a repeat without acting on it again. Verify the signature over the raw bytes as
received, before parsing: re-serialising the JSON changes the bytes.

The timestamp header is not signed; the body's `at_us` (signed) is the time of the event.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Final

EVENT_ID_HEADER: Final = "X-Budgetd-Event-Id"
SIGNATURE_HEADER: Final = "X-Budgetd-Signature"
TIMESTAMP_HEADER: Final = "X-Budgetd-Timestamp"
SIGNATURE_SCHEME: Final = "sha256="

__all__ = [
    "EVENT_ID_HEADER",
    "SIGNATURE_HEADER",
    "SIGNATURE_SCHEME",
    "TIMESTAMP_HEADER",
    "sign",
    "verify_signature",
]


def _key(secret: str | bytes) -> bytes:
    return secret.encode() if isinstance(secret, str) else secret


def sign(secret: str | bytes, body: bytes) -> str:
    """The `X-Budgetd-Signature` value for `body`: `sha256=` and the hex HMAC-SHA256."""
    return SIGNATURE_SCHEME + hmac.new(_key(secret), body, hashlib.sha256).hexdigest()


def verify_signature(secret: str | bytes, body: bytes, header: str | None) -> bool:
    """Whether `header` (the X-Budgetd-Signature value) signs `body` with `secret`.

    The comparison takes the same time wherever the strings differ, so an attacker cannot
    find a valid signature byte by byte from response times. A missing or malformed
    header is simply not valid.

        body = await request.body()
        if not verify_signature(SECRET, body, request.headers.get(SIGNATURE_HEADER)):
            return Response(status_code=401)
        event = json.loads(body)
        if already_handled(event["id"]):   # a retry of an event we acted on
            return Response(status_code=200)
    """
    if not header:
        return False
    expected = sign(secret, body)
    return hmac.compare_digest(expected.encode(), header.strip().encode("utf-8", "replace"))
