"""AdminService, webhooks."""

from __future__ import annotations

from typing import Any

import grpc

from budget_client._proto.budgetd.v1 import budget_pb2 as pb
from budget_server.api.admin_base import AdminBase

Context = grpc.aio.ServicerContext[Any, Any]


class WebhookAdmin(AdminBase):
    """AdminService methods about webhooks."""

    async def CreateWebhook(
        self, request: pb.CreateWebhookRequest, context: Context
    ) -> pb.CreateWebhookResponse:
        # PLACEHOLDER until implemented in this session; must not ship.
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "CreateWebhook is not implemented yet")

    async def ListWebhooks(
        self, request: pb.ListWebhooksRequest, context: Context
    ) -> pb.ListWebhooksResponse:
        # PLACEHOLDER until implemented in this session; must not ship.
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "ListWebhooks is not implemented yet")

    async def DeleteWebhook(
        self, request: pb.DeleteWebhookRequest, context: Context
    ) -> pb.DeleteWebhookResponse:
        # PLACEHOLDER until implemented in this session; must not ship.
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "DeleteWebhook is not implemented yet")
