"""Which API key budgetctl sends, and where it found it, so a refusal can say which key.

The first of these that is set wins, flags before variables (a flag typed now means more
than a variable exported long ago):

    --api-key KEY, --api-key-file PATH, BUDGETD_API_KEY, BUDGETD_API_KEY_FILE,
    budgetd-admin.key in the current directory (the admin key budgetd writes on first start)

A key file the operator named must be readable: skipping it would surface only as budgetd's
"no API key", far from the typo that caused it. The default file is read only when it is
there, because against an --insecure budgetd no key is needed at all.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from budget_server.ctl.failures import CtlError

API_KEY_FILE_DEFAULT: Final = "budgetd-admin.key"
_HOW: Final = "give one with --api-key KEY, --api-key-file PATH or BUDGETD_API_KEY=KEY"


@dataclass(frozen=True, slots=True)
class ApiKey:
    """The key to send ("" for none) and where it came from, for messages (never the key)."""

    secret: str
    source: str


def api_key_from(key: str, key_file: str, environ: Mapping[str, str], cwd: Path) -> ApiKey:
    """The key from the first source set (see the module docstring); CtlError (exit 2) if a
    key file named by --api-key-file or BUDGETD_API_KEY_FILE cannot be read or is empty."""
    if key:
        return ApiKey(key, "--api-key")
    if key_file:
        return _read(Path(key_file), "--api-key-file")
    if environ.get("BUDGETD_API_KEY"):
        return ApiKey(environ["BUDGETD_API_KEY"], "BUDGETD_API_KEY")
    if environ.get("BUDGETD_API_KEY_FILE"):
        return _read(Path(environ["BUDGETD_API_KEY_FILE"]), "BUDGETD_API_KEY_FILE")
    default = cwd / API_KEY_FILE_DEFAULT
    try:
        secret = default.read_text().strip() if default.is_file() else ""
    except OSError:
        secret = ""  # as if absent: an --insecure budgetd needs no key
    return ApiKey(secret, f"{default} (read from the current directory)" if secret else "")


def _read(path: Path, option: str) -> ApiKey:
    try:
        secret = path.read_text().strip()
    except OSError as error:
        reason = error.strerror or str(error)
        raise CtlError(f"cannot read the API key file {path} ({option}): {reason}") from None
    if not secret:
        raise CtlError(f"the API key file {path} ({option}) is empty")
    return ApiKey(secret, f"{option} {path}" if option.startswith("--") else f"{option}={path}")


def working_directory() -> Path:
    """Where budgetd-admin.key is looked for; "." when that directory was deleted under us
    (Path.cwd() raises then, and budgetctl can still run with a key given otherwise)."""
    try:
        return Path.cwd()
    except OSError:
        return Path()


def unauthenticated_hint(key: ApiKey, cwd: Path) -> str:
    """What to tell the operator under budgetd's UNAUTHENTICATED, whose text is written for
    gRPC clients ("send metadata 'authorization: ...'"), not for budgetctl's options."""
    if key.secret:
        return f"hint: budgetctl sent the API key from {key.source}; if it is wrong, {_HOW}"
    return (
        "hint: budgetctl found no API key in --api-key, --api-key-file, BUDGETD_API_KEY, "
        f"BUDGETD_API_KEY_FILE or {API_KEY_FILE_DEFAULT} in the current directory ({cwd}); " + _HOW
    )
