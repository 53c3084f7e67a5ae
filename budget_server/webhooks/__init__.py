"""Webhooks: budget events POSTed to operators' URLs, signed, retried, never lost.

    store.py      registrations (the `webhooks` table): checks, create, list, delete
    directory.py  this process's snapshot of them, so matching an event costs no SQL
    outbox.py     `enqueue`: delivery rows written in the transaction that made the events
    delivery.py   the worker: claims due rows under a lease, POSTs, backs off, gives up

Receivers verify the signature with `budget_client.webhooks.verify_signature`.
"""

from budget_server.webhooks.delivery import DeliveryPolicy, DeliveryWorker
from budget_server.webhooks.directory import WebhookDirectory, WebhookTarget
from budget_server.webhooks.outbox import OutboxWriter, enqueue, outbox_writer
from budget_server.webhooks.store import (
    Webhook,
    create_webhook,
    delete_webhook,
    list_webhooks,
)

__all__ = [
    "DeliveryPolicy",
    "DeliveryWorker",
    "OutboxWriter",
    "Webhook",
    "WebhookDirectory",
    "WebhookTarget",
    "create_webhook",
    "delete_webhook",
    "enqueue",
    "list_webhooks",
    "outbox_writer",
]
