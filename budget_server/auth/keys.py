"""The shape of an API key and of its scopes (pure functions; no I/O).

A key reads `bdk_<id>_<secret>`: the id is public (it names the key in listings and logs),
the secret is 32 random bytes. Only SHA-256 of the secret is stored: the secret has full
entropy, so a slow password hash would add latency to every call and no security.

Scopes: `admin`; `charge:<pattern>` (reserve, extend, commit, release, meter; implies read);
`read:<pattern>`. A pattern is a glob over budget ids (`team:*`, `org:acme/*`, `*`).
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

from budget_server.errors import InvalidArgument, Unauthenticated
from budget_server.limits import ID_LENGTH_MAX

KEY_PREFIX = "bdk_"
SCOPES_MAX = 32
_KEY = re.compile(r"bdk_([0-9a-f]{16})_([A-Za-z0-9_-]{43})")
_PATTERN = re.compile(r"[A-Za-z0-9:/._@+=*?-]+")

ACTIONS = ("read", "charge", "admin")


@dataclass(frozen=True, slots=True)
class Scope:
    action: str  # "admin", "charge" or "read"
    pattern: str  # "" for admin

    def __str__(self) -> str:
        return self.action if self.action == "admin" else f"{self.action}:{self.pattern}"

    def allows(self, action: str, budget_id: str) -> bool:
        if self.action == "admin":
            return True
        if action == "admin" or (action == "charge" and self.action != "charge"):
            return False
        return fnmatch.fnmatchcase(budget_id, self.pattern)

    def covers_prefix(self, action: str, prefix: str) -> bool:
        """Whether every budget id starting with `prefix` matches (for listings)."""
        if self.action == "admin":
            return True
        if action == "admin" or (action == "charge" and self.action != "charge"):
            return False
        pattern = self.pattern
        if pattern == "*":
            return True
        head, star, tail = pattern.partition("*")
        return bool(star) and not tail and "?" not in head and prefix.startswith(head)


def parse_scope(text: str) -> Scope:
    if text == "admin":
        return Scope("admin", "")
    action, sep, pattern = text.partition(":")
    if not sep or action not in ("read", "charge"):
        raise InvalidArgument(
            f"scope {text[:80]!r} must be 'admin', 'charge:<budget pattern>' or "
            "'read:<budget pattern>'"
        )
    if not pattern or len(pattern) > ID_LENGTH_MAX or not _PATTERN.fullmatch(pattern):
        raise InvalidArgument(
            f"budget pattern {pattern[:80]!r} must be 1-{ID_LENGTH_MAX} characters of a budget "
            "id, with * and ? as wildcards"
        )
    return Scope(action, pattern)


def parse_scopes(texts: list[str] | tuple[str, ...]) -> tuple[Scope, ...]:
    if not texts:
        raise InvalidArgument("a key needs at least one scope")
    if len(texts) > SCOPES_MAX:
        raise InvalidArgument(f"{len(texts)} scopes; the maximum is {SCOPES_MAX}")
    return tuple(parse_scope(t) for t in texts)


def new_key() -> tuple[str, str, str]:
    """(key id, the whole key to hand out once, sha256 of its secret to store)."""
    key_id = secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)
    return key_id, f"{KEY_PREFIX}{key_id}_{secret}", secret_hash(secret)


def secret_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def split_key(presented: str) -> tuple[str, str]:
    """(key id, secret) of a presented key, or UNAUTHENTICATED."""
    match = _KEY.fullmatch(presented)
    if match is None:
        raise Unauthenticated("the API key is malformed; expected bdk_<id>_<secret>")
    return match.group(1), match.group(2)


def secret_matches(secret: str, stored_hash: str) -> bool:
    return hmac.compare_digest(secret_hash(secret), stored_hash)
