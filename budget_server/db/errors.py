"""Which database failures mean "the database is unavailable right now" (retry), as
opposed to a bug. Both the actors and the unary handlers map these to UNAVAILABLE."""

from __future__ import annotations

from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

# SQLSTATE classes: 08 connection exception; 57P admin shutdown, crash shutdown, cannot
# connect now (PostgreSQL shutting down or starting up).
_UNAVAILABLE_SQLSTATES = ("08", "57P")


def _sqlstate(exc: BaseException) -> str:
    for candidate in (exc, getattr(exc, "orig", None), getattr(exc, "__cause__", None)):
        state = getattr(candidate, "sqlstate", None) or getattr(candidate, "pgcode", None)
        if isinstance(state, str):
            return state
    cause = getattr(getattr(exc, "orig", None), "__cause__", None)
    state = getattr(cause, "sqlstate", None)
    return state if isinstance(state, str) else ""


def is_unavailable(exc: BaseException) -> bool:
    if isinstance(exc, InterfaceError | OperationalError | ConnectionError | OSError):
        return True
    if not isinstance(exc, DBAPIError):
        return False
    return exc.connection_invalidated or _sqlstate(exc).startswith(_UNAVAILABLE_SQLSTATES)
