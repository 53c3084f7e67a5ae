"""AdminService, webhooks: register, list and remove the URLs budget events are POSTed to."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import grpc

from budget_client._proto.budgetd.v1 import budget_pb2 as pb
from budget_server.api.admin_base import AdminBase
from budget_server.api.status import unary
from budget_server.errors import InvalidArgument
from budget_server.events.model import KIND_NAMES, KIND_VALUES
from budget_server.webhooks import store

Context = grpc.aio.ServicerContext[Any, Any]


def webhook_to_pb(webhook: store.Webhook) -> pb.Webhook:
    return pb.Webhook(
        id=webhook.id,
        url=webhook.url,
        budget_prefix=webhook.budget_prefix,
        kinds=[KIND_VALUES[kind] for kind in webhook.kinds],
        created_at_us=webhook.created_at_us,
    )


def kind_names(values: Iterable[pb.BudgetEventKind.ValueType]) -> list[str]:
    names = []
    for value in values:
        name = KIND_NAMES.get(value)
        if name is None:
            raise InvalidArgument(f"kinds has an unknown value {value}")
        names.append(name)
    return names


class WebhookAdmin(AdminBase):
    """AdminService methods about webhooks."""

    async def _refresh_directory(self) -> None:
        if self.webhooks is not None:
            await self.webhooks.refresh()

    @unary
    async def CreateWebhook(
        self, request: pb.CreateWebhookRequest, context: Context
    ) -> pb.CreateWebhookResponse:
        webhook, secret = await store.create_webhook(
            self.ledger.db,
            url=request.url,
            budget_prefix=request.budget_prefix,
            kinds=kind_names(request.kinds),
            secret=request.secret,
            now_us=self._now_us(),
        )
        await self._refresh_directory()
        return pb.CreateWebhookResponse(webhook=webhook_to_pb(webhook), secret=secret)

    @unary
    async def ListWebhooks(
        self, request: pb.ListWebhooksRequest, context: Context
    ) -> pb.ListWebhooksResponse:
        found = await store.list_webhooks(self.ledger.db)
        return pb.ListWebhooksResponse(webhooks=[webhook_to_pb(w) for w in found])

    @unary
    async def DeleteWebhook(
        self, request: pb.DeleteWebhookRequest, context: Context
    ) -> pb.DeleteWebhookResponse:
        await store.delete_webhook(self.ledger.db, request.id)
        await self._refresh_directory()
        return pb.DeleteWebhookResponse()
