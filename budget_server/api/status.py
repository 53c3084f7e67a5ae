"""Turn ledger errors into gRPC statuses, with machine-readable details where they help.

RESOURCE_EXHAUSTED from a budget carries a `BudgetExhaustedDetail` in the standard
`grpc-status-details-bin` trailer (google.rpc.Status), so clients read the amount
available without parsing the message.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn, TypeVar

import grpc
from google.protobuf import any_pb2
from google.rpc import status_pb2

from budget_client._proto.budgetd.v1 import budget_pb2 as pb
from budget_server.api.convert import UNIT_VALUES
from budget_server.api.handlers import MalformedRequest
from budget_server.db.errors import is_unavailable
from budget_server.errors import BudgetExhausted, LedgerError, Unavailable

log = logging.getLogger("budgetd.api")

STATUS_DETAILS_KEY = "grpc-status-details-bin"

Request = TypeVar("Request")
Response = TypeVar("Response")


def status_trailer(error: LedgerError) -> tuple[tuple[str, bytes], ...]:
    if not isinstance(error, BudgetExhausted):
        return ()
    detail = any_pb2.Any()
    detail.Pack(
        pb.BudgetExhaustedDetail(
            budget_id=error.budget_id,
            requested=error.requested,
            available=error.available,
            unit=UNIT_VALUES.get(error.unit, pb.UNIT_UNSPECIFIED),
        )
    )
    status = status_pb2.Status(code=error.code.value[0], message=str(error), details=[detail])
    return ((STATUS_DETAILS_KEY, status.SerializeToString()),)


async def abort(context: grpc.aio.ServicerContext[Any, Any], error: LedgerError) -> NoReturn:
    await context.abort(error.code, str(error), trailing_metadata=status_trailer(error))


def unary(
    handler: Callable[
        [Any, Request, grpc.aio.ServicerContext[Request, Response]], Awaitable[Response]
    ],
) -> Callable[[Any, Request, grpc.aio.ServicerContext[Request, Response]], Awaitable[Response]]:
    """Map LedgerError to its status; anything else is a bug: logged, INTERNAL."""

    @functools.wraps(handler)
    async def wrapper(
        self: Any, request: Request, context: grpc.aio.ServicerContext[Request, Response]
    ) -> Response:
        try:
            if isinstance(request, MalformedRequest):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
            return await handler(self, request, context)
        except LedgerError as error:
            await abort(context, error)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            if is_unavailable(exc):
                await abort(context, Unavailable(f"the ledger database is unavailable: {exc}"))
            log.exception("%s failed", handler.__qualname__)
            await context.abort(grpc.StatusCode.INTERNAL, "internal error; see the server log")

    return wrapper
