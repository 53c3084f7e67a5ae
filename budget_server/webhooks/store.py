"""Webhook registrations in the `webhooks` table: create, list, delete, with their checks.

Operators decide where events go, so any http(s) host is accepted, loopback included; what
is refused is what could not work or would leak: other schemes, credentials in the URL
(ListWebhooks shows URLs, and the sender does not do HTTP auth; receivers verify the
signature instead), unknown event kinds, and a registry past WEBHOOKS_MAX.
"""

from __future__ import annotations

import re
import secrets
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final

from sqlalchemy import delete, func, insert, select

from budget_server.db.engine import Database
from budget_server.db.schema import webhook_deliveries, webhooks
from budget_server.errors import FailedPrecondition, InvalidArgument, NotFound
from budget_server.events.model import KINDS
from budget_server.limits import ID_LENGTH_MAX

WEBHOOKS_MAX: Final = 100
"""Registrations per database: every event is matched against each of them."""
URL_LENGTH_MAX: Final = 2048
SECRET_LENGTH_MIN: Final = 16
SECRET_LENGTH_MAX: Final = 256
WEBHOOK_ID_LENGTH_MAX: Final = 40
DEFAULT_KINDS: Final = ("ALERT",)
"""What a webhook created without kinds receives."""

_PREFIX = re.compile(r"[A-Za-z0-9:/._@+=-]*")
_PRINTABLE = re.compile(r"[\x21-\x7e]+")


@dataclass(frozen=True, slots=True)
class Webhook:
    """A registration as shown to operators: everything but the secret."""

    id: str
    url: str
    budget_prefix: str
    kinds: tuple[str, ...]
    """Event kind names (`ALERT`, `FROZEN`, ...), in the order of `events.model.KINDS`."""
    created_at_us: int

    @classmethod
    def from_row(cls, row: Any) -> Webhook:
        return cls(
            id=row.id,
            url=row.url,
            budget_prefix=row.budget_prefix,
            kinds=parse_kinds(row.kinds),
            created_at_us=row.created_at_us,
        )


def new_webhook_id() -> str:
    return "wh_" + secrets.token_hex(16)


def parse_kinds(text: str) -> tuple[str, ...]:
    return tuple(part for part in text.split(",") if part)


def check_url(url: str) -> str:
    if not url:
        raise InvalidArgument("url is required")
    if len(url) > URL_LENGTH_MAX:
        raise InvalidArgument(f"url is {len(url)} characters; the maximum is {URL_LENGTH_MAX}")
    if not _PRINTABLE.fullmatch(url):
        raise InvalidArgument(
            "url must be printable ASCII without spaces (percent-encode the path, "
            "punycode the host)"
        )
    try:
        parts = urllib.parse.urlsplit(url)
        _ = parts.port  # raises on a port that is not a number in range
    except ValueError as exc:
        raise InvalidArgument(f"url {url[:100]!r} is not a valid URL: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise InvalidArgument(f"url must start with http:// or https:// (got {url[:100]!r})")
    if not parts.hostname:
        raise InvalidArgument(f"url {url[:100]!r} has no host")
    if parts.username is not None or parts.password is not None:
        raise InvalidArgument(
            "url must not carry credentials (user:password@): URLs are listed in clear; "
            "receivers authenticate budgetd by the X-Budgetd-Signature header"
        )
    return url


def check_prefix(prefix: str) -> str:
    if len(prefix) > ID_LENGTH_MAX:
        raise InvalidArgument(
            f"budget_prefix is {len(prefix)} characters; the maximum is {ID_LENGTH_MAX}"
        )
    if not _PREFIX.fullmatch(prefix):
        raise InvalidArgument(
            f"budget_prefix {prefix!r} may contain only the characters of budget ids: "
            "letters, digits and : / . _ @ + = -"
        )
    return prefix


DELIVERED_KINDS: Final = ("ALERT", "LIMIT_CHANGED", "FROZEN", "UNFROZEN", "DELETED")
"""Kinds written to the outbox in the transaction that caused them. Reservations, commits
and aborts happen thousands of times a second; WatchBudgets streams them instead."""


def check_kinds(kinds: Iterable[str]) -> tuple[str, ...]:
    """Deliverable kind names, deduplicated in a fixed order; none means alerts only."""
    wanted = set(kinds)
    unknown = wanted - set(KINDS)
    if unknown:
        raise InvalidArgument(
            f"unknown event kind {sorted(unknown)[0]!r}; use one of {', '.join(DELIVERED_KINDS)}"
        )
    undelivered = wanted - set(DELIVERED_KINDS)
    if undelivered:
        raise InvalidArgument(
            f"event kind {sorted(undelivered)[0]!r} is not sent to webhooks (too frequent); "
            f"webhooks take {', '.join(DELIVERED_KINDS)}, and WatchBudgets streams every kind"
        )
    return tuple(kind for kind in KINDS if kind in wanted) or DEFAULT_KINDS


def check_secret(secret: str) -> str:
    """A given secret, or a new one (`secrets.token_urlsafe(32)`: 256 random bits)."""
    if not secret:
        return secrets.token_urlsafe(32)
    if not SECRET_LENGTH_MIN <= len(secret) <= SECRET_LENGTH_MAX:
        raise InvalidArgument(
            f"secret must be {SECRET_LENGTH_MIN}-{SECRET_LENGTH_MAX} characters "
            f"(got {len(secret)}); leave it empty to have one generated"
        )
    if not _PRINTABLE.fullmatch(secret):
        raise InvalidArgument("secret must be printable ASCII without spaces")
    return secret


def check_webhook_id(webhook_id: str) -> str:
    if not webhook_id:
        raise InvalidArgument("id is required")
    if len(webhook_id) > WEBHOOK_ID_LENGTH_MAX or not _PRINTABLE.fullmatch(webhook_id):
        raise InvalidArgument(f"id {webhook_id[:50]!r} is not a webhook id")
    return webhook_id


async def create_webhook(
    db: Database,
    *,
    url: str,
    budget_prefix: str,
    kinds: Iterable[str],
    secret: str,
    now_us: int,
) -> tuple[Webhook, str]:
    """Register a webhook; returns it and its secret (the only time the secret is shown)."""
    webhook = Webhook(
        id=new_webhook_id(),
        url=check_url(url),
        budget_prefix=check_prefix(budget_prefix),
        kinds=check_kinds(kinds),
        created_at_us=now_us,
    )
    secret = check_secret(secret)
    async with db.write() as conn:
        count = (await conn.execute(select(func.count()).select_from(webhooks))).scalar_one()
        if count >= WEBHOOKS_MAX:
            raise FailedPrecondition(
                f"{count} webhooks are registered, the maximum (WEBHOOKS_MAX = {WEBHOOKS_MAX}); "
                "delete one first"
            )
        await conn.execute(
            insert(webhooks).values(
                id=webhook.id,
                url=webhook.url,
                secret=secret,
                budget_prefix=webhook.budget_prefix,
                kinds=",".join(webhook.kinds),
                created_at_us=now_us,
            )
        )
    return webhook, secret


async def list_webhooks(db: Database) -> list[Webhook]:
    """Every registration, oldest first (at most WEBHOOKS_MAX, so no paging)."""
    query = (
        select(
            webhooks.c.id,
            webhooks.c.url,
            webhooks.c.budget_prefix,
            webhooks.c.kinds,
            webhooks.c.created_at_us,
        )
        .order_by(webhooks.c.created_at_us, webhooks.c.id)
        .limit(WEBHOOKS_MAX * 2)  # a bound even if rows were inserted behind our back
    )
    async with db.read() as conn:
        rows = (await conn.execute(query)).all()
    return [Webhook.from_row(row) for row in rows]


async def delete_webhook(db: Database, webhook_id: str) -> None:
    """Remove a webhook and its outbox rows: nothing more is sent to it."""
    check_webhook_id(webhook_id)
    async with db.write() as conn:
        result = await conn.execute(delete(webhooks).where(webhooks.c.id == webhook_id))
        if result.rowcount != 1:
            raise NotFound(f"webhook {webhook_id!r} does not exist")
        await conn.execute(
            delete(webhook_deliveries).where(webhook_deliveries.c.webhook_id == webhook_id)
        )
