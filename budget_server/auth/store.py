"""API keys in the database, with a short-lived cache in front of it.

Authentication must not cost a SQL query per call, so keys are cached for a few seconds.
Revocation still takes effect at once everywhere: the revoking process evicts its cache
entry and publishes a KEY_REVOKED event, which PostgreSQL's NOTIFY carries to the other
processes (see events/publisher.py); the TTL only bounds the damage of a lost notice.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import func, insert, select, update

from budget_server import validation
from budget_server.auth.keys import (
    Scope,
    new_key,
    parse_scope,
    parse_scopes,
    secret_matches,
    split_key,
)
from budget_server.clock import Clock
from budget_server.db.engine import Database
from budget_server.db.schema import api_keys
from budget_server.errors import InvalidArgument, NotFound, Unauthenticated
from budget_server.events.model import BudgetEvent, new_event_id
from budget_server.events.publisher import EventPublisher

log = logging.getLogger("budgetd.auth")

CACHE_TTL_US = 10_000_000
CACHE_KEYS_MAX = 10_000
KEY_NAME_LENGTH_MAX = 128


@dataclass(frozen=True, slots=True)
class KeyRecord:
    id: str
    name: str
    secret_sha256: str
    scopes: tuple[Scope, ...]
    created_at_us: int
    revoked_at_us: int


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: the key's id and name, and what it may do."""

    key_id: str
    name: str
    scopes: tuple[Scope, ...]

    def allows(self, action: str, budget_id: str) -> bool:
        return any(scope.allows(action, budget_id) for scope in self.scopes)

    def covers_prefix(self, action: str, prefix: str) -> bool:
        return any(scope.covers_prefix(action, prefix) for scope in self.scopes)


def _record(row: object) -> KeyRecord:
    return KeyRecord(
        id=row.id,  # type: ignore[attr-defined]
        name=row.name,  # type: ignore[attr-defined]
        secret_sha256=row.secret_sha256,  # type: ignore[attr-defined]
        scopes=tuple(parse_scope(s) for s in json.loads(row.scopes)),  # type: ignore[attr-defined]
        created_at_us=row.created_at_us,  # type: ignore[attr-defined]
        revoked_at_us=row.revoked_at_us,  # type: ignore[attr-defined]
    )


class KeyStore:
    def __init__(self, db: Database, clock: Clock, publisher: EventPublisher) -> None:
        self._db = db
        self._clock = clock
        self._publisher = publisher
        self._cache: dict[str, tuple[int, KeyRecord | None]] = {}
        publisher.bus.add_listener(self._on_event)

    def _on_event(self, event: BudgetEvent) -> None:
        if event.kind == "KEY_REVOKED":
            self._cache.pop(event.reservation_id, None)  # the key id travels in that field

    async def authenticate(self, presented: str) -> Principal:
        key_id, secret = split_key(presented)
        record = await self._lookup(key_id)
        if record is None or not secret_matches(secret, record.secret_sha256):
            raise Unauthenticated("the API key is not valid")
        if record.revoked_at_us:
            raise Unauthenticated(f"the API key {key_id} has been revoked")
        return Principal(record.id, record.name, record.scopes)

    async def _lookup(self, key_id: str) -> KeyRecord | None:
        now_us = self._clock.now_us()
        cached = self._cache.get(key_id)
        if cached is not None and now_us - cached[0] < CACHE_TTL_US:
            return cached[1]
        async with self._db.read() as conn:
            row = (await conn.execute(select(api_keys).where(api_keys.c.id == key_id))).first()
        record = _record(row) if row is not None else None
        if len(self._cache) >= CACHE_KEYS_MAX:
            self._cache.clear()
        self._cache[key_id] = (now_us, record)
        return record

    async def create(self, name: str, scopes: list[str] | tuple[str, ...]) -> tuple[KeyRecord, str]:
        if not name or len(name) > KEY_NAME_LENGTH_MAX:
            raise InvalidArgument(f"a key's name must be 1-{KEY_NAME_LENGTH_MAX} characters")
        validation.printable(name, "a key's name")
        parsed = parse_scopes(tuple(scopes))
        key_id, whole_key, digest = new_key()
        return await self._store(key_id, name, digest, parsed), whole_key

    async def _store(
        self, key_id: str, name: str, digest: str, parsed: tuple[Scope, ...]
    ) -> KeyRecord:
        now_us = self._clock.now_us()
        record = KeyRecord(key_id, name, digest, parsed, now_us, 0)
        async with self._db.write() as conn:
            await conn.execute(
                insert(api_keys).values(
                    id=key_id,
                    name=name,
                    secret_sha256=digest,
                    scopes=json.dumps([str(s) for s in parsed]),
                    created_at_us=now_us,
                    revoked_at_us=0,
                )
            )
        return record

    async def list(self) -> list[KeyRecord]:
        async with self._db.read() as conn:
            rows = (await conn.execute(select(api_keys).order_by(api_keys.c.created_at_us))).all()
        return [_record(r) for r in rows]

    async def revoke(self, key_id: str) -> KeyRecord:
        now_us = self._clock.now_us()
        event = BudgetEvent(
            id=new_event_id(), kind="KEY_REVOKED", budget_id="", at_us=now_us, reservation_id=key_id
        )
        async with self._db.write() as conn:
            row = (await conn.execute(select(api_keys).where(api_keys.c.id == key_id))).first()
            if row is None:
                raise NotFound(f"API key {key_id!r} does not exist")
            if not row.revoked_at_us:
                await conn.execute(
                    update(api_keys).where(api_keys.c.id == key_id).values(revoked_at_us=now_us)
                )
                await self._publisher.in_transaction(conn, [event], now_us)
            row = (await conn.execute(select(api_keys).where(api_keys.c.id == key_id))).one()
        self._cache.pop(key_id, None)
        self._publisher.after_commit([event])
        return _record(row)

    async def bootstrap_admin_key(self, path: Path) -> Path | None:
        """On a database with no keys at all, make one admin key and write it to `path`,
        readable by the owner only; return the path, or None when keys already exist.

        The file is written before the key is stored, and never over an existing file: a
        file already there may hold the only copy of another database's admin key (only
        a hash is stored), and a key stored but not written would lock everyone out."""
        async with self._db.read() as conn:
            count = (await conn.execute(select(func.count()).select_from(api_keys))).scalar_one()
        if count:
            return None
        key_id, whole_key, digest = new_key()
        written = await asyncio.to_thread(write_private_file, path, whole_key + "\n")
        try:
            await self._store(key_id, "bootstrap-admin", digest, parse_scopes(("admin",)))
        except BaseException:
            written.unlink(missing_ok=True)  # its key never reached the database
            raise
        log.warning("created the first admin API key; it is in %s (mode 0600)", written)
        return written


def write_private_file(path: Path, content: str) -> Path:
    """Write a new file only its owner can read (mode 0600 from its creation); refuse to
    replace one that exists."""
    path = path.expanduser().resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise AdminKeyFileExists(
            f"{path} already exists, and this database has no API keys yet: it may hold the "
            "only copy of another database's admin key, so it is kept. Move it away, or "
            "name a new file with --admin-key-file (or BUDGETD_ADMIN_KEY_FILE)"
        ) from None
    with os.fdopen(descriptor, "w") as handle:
        handle.write(content)
    return path


class AdminKeyFileExists(ValueError):
    """Start-up refused: the first admin key would overwrite an existing file."""
