"""Usage recorded while budgetd was unreachable, kept on disk until it is replayed.

One file per call, written atomically (temp file + rename), named by its idempotency key:
several app processes may share the directory, a crash never leaves half an entry, and
replaying an entry twice charges it once, because budgetd de-duplicates by key.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from budget_client._types import Usage

log = logging.getLogger("budget_client.spool")

SPOOL_ENTRIES_MAX = 100_000


@dataclass(frozen=True, slots=True)
class SpoolEntry:
    """One call's usage, with what budgetd needs to charge it exactly once."""

    idempotency_key: str
    budget_id: str
    model: str
    usage: Usage
    reservation_id: str = ""  # set when the call had a reservation before budgetd went away
    labels: dict[str, str] | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> SpoolEntry:
        data = json.loads(text)
        data["usage"] = Usage(**data["usage"])
        return cls(**data)


class Spool:
    """A directory of pending usage entries."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def _path(self, key: str) -> Path:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in key)
        return self.directory / f"{safe}.json"

    def add(self, entry: SpoolEntry) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        if len(os.listdir(self.directory)) >= SPOOL_ENTRIES_MAX:
            raise OSError(f"the spool at {self.directory} holds {SPOOL_ENTRIES_MAX} entries")
        path = self._path(entry.idempotency_key)
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".tmp-", suffix=".json")
        with os.fdopen(fd, "w") as handle:
            handle.write(entry.to_json())
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        log.warning(
            "budgetd unreachable: usage of %s spooled to %s for replay", entry.budget_id, path
        )
        return path

    def entries(self) -> list[tuple[Path, SpoolEntry]]:
        if not self.directory.is_dir():
            return []
        found = []
        for path in sorted(self.directory.glob("*.json")):
            if path.name.startswith(".tmp-"):
                continue
            try:
                found.append((path, SpoolEntry.from_json(path.read_text())))
            except (OSError, ValueError, TypeError) as exc:
                log.error("unreadable spool entry %s left in place: %s", path, exc)
        return found

    def remove(self, path: Path) -> None:
        path.unlink(missing_ok=True)

    def __len__(self) -> int:
        return len(self.entries())
