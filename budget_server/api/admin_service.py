"""AdminService: what operators call, assembled from one mixin per area."""

from __future__ import annotations

from budget_client._proto.budgetd.v1 import budget_pb2_grpc as pb_grpc
from budget_server.api.admin_budgets import BudgetAdmin
from budget_server.api.admin_events import EventAdmin
from budget_server.api.admin_keys import KeyAdmin
from budget_server.api.admin_prices import PriceAdmin
from budget_server.api.admin_reports import ReportAdmin
from budget_server.api.admin_webhooks import WebhookAdmin


class AdminService(
    BudgetAdmin,
    EventAdmin,
    KeyAdmin,
    PriceAdmin,
    ReportAdmin,
    WebhookAdmin,
    pb_grpc.AdminServiceServicer,
):
    """The whole AdminService; the mixins define its methods."""
