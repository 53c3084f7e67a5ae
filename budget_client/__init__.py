"""budgetd's client: count tokens as a response streams, charge them against a shared
budget in real time, and stop the response the moment the budget is gone.

    async with BudgetClient("127.0.0.1:50051") as budgets:
        openai_client = wrap_openai(AsyncOpenAI(), budgets)
        stream = await openai_client.chat.completions.create(
            model="gpt-4o", messages=[...], stream=True, budget="team:search"
        )
"""

from budget_client._client import BudgetClient
from budget_client._config import ClientConfig, FailPolicy
from budget_client._errors import (
    AccessDenied,
    BudgetError,
    BudgetExceeded,
    BudgetUnavailable,
    InvalidRequest,
    ReservationError,
)
from budget_client._meter import Meter
from budget_client._openai import MeteredAsyncStream, MeteredStream, wrap_openai
from budget_client._sync import SyncBudgetClient, SyncMeter
from budget_client._types import Budget, Committed, Reservation, Usage

__all__ = [
    "AccessDenied",
    "Budget",
    "BudgetClient",
    "BudgetError",
    "BudgetExceeded",
    "BudgetUnavailable",
    "ClientConfig",
    "Committed",
    "FailPolicy",
    "InvalidRequest",
    "Meter",
    "MeteredAsyncStream",
    "MeteredStream",
    "Reservation",
    "ReservationError",
    "SyncBudgetClient",
    "SyncMeter",
    "Usage",
    "wrap_openai",
]
