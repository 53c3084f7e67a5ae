"""`budgetctl webhooks`: register, list and delete the URLs budget events are POSTed to.

`create` prints the signing secret once: budgetd keeps it to sign, and never shows it again.
`--json` documents carry budget.proto's Webhook:

    webhooks create   {"webhook": Webhook, "secret": str}
    webhooks list     {"webhooks": [Webhook, ...]}
    webhooks delete   {"deleted": str}

The parser's helpers come from parser.py, which imports this module to register the
command; only functions of each module are used across, so the import cycle is harmless.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from budget_client._proto.budgetd.v1 import budget_pb2 as pb
from budget_server.ctl import parser as cli
from budget_server.ctl import render
from budget_server.ctl.commands import Result
from budget_server.ctl.rpc import Admin
from budget_server.ctl.tables import Column, fields, table
from budget_server.ctl.times import format_time

KIND_PREFIX = "BUDGET_EVENT_KIND_"
# What budgetd delivers to webhooks (webhooks/store.py DELIVERED_KINDS, repeated here so
# budgetctl needs no server-side import); the frequent kinds are for `budgetctl watch`.
DELIVERED = ("alert", "limit_changed", "frozen", "unfrozen", "deleted")
KINDS = {
    value.name.removeprefix(KIND_PREFIX).lower(): value.number
    for value in pb.BudgetEventKind.DESCRIPTOR.values
    if value.name.removeprefix(KIND_PREFIX).lower() in DELIVERED
}


def kinds_arg(text: str) -> list[int]:
    """`alert,frozen` -> the BudgetEventKind values."""
    values = []
    for part in text.split(","):
        name = part.strip().lower().removeprefix(KIND_PREFIX.lower())
        if name not in KINDS:
            raise argparse.ArgumentTypeError(
                f"{part.strip()!r} is not an event kind; use some of {', '.join(KINDS)}, "
                "separated by commas"
            )
        values.append(KINDS[name])
    return values


def kind_labels(kinds: Sequence[int]) -> str:
    return ",".join(render.enum_label(pb.BudgetEventKind.DESCRIPTOR, kind) for kind in kinds)


WEBHOOK_COLUMNS = (
    Column("id"),
    Column("url"),
    Column("prefix"),
    Column("kinds"),
    Column("created"),
)


def webhooks_table(webhooks: Sequence[pb.Webhook]) -> str:
    rows = [
        [
            hook.id,
            hook.url,
            hook.budget_prefix or "(all budgets)",
            kind_labels(hook.kinds),
            format_time(hook.created_at_us),
        ]
        for hook in webhooks
    ]
    return table(WEBHOOK_COLUMNS, rows)


def webhooks_create(admin: Admin, args: argparse.Namespace) -> Result:
    request = pb.CreateWebhookRequest(
        url=str(args.url), budget_prefix=str(args.prefix), kinds=list(args.kinds or ())
    )
    response = admin.call(admin.stub.CreateWebhook, request)
    hook = response.webhook
    text = "\n".join(
        [
            f"created webhook {hook.id}",
            fields(
                [
                    ("url", hook.url),
                    (
                        "budgets",
                        f"ids starting {hook.budget_prefix!r}" if hook.budget_prefix else "all",
                    ),
                    ("events", kind_labels(hook.kinds)),
                    ("secret", response.secret),
                ]
            ),
            "",
            "The secret is shown this once: store it where the receiver can read it. Verify",
            "each request's X-Budgetd-Signature with budget_client.webhooks.verify_signature",
            "and de-duplicate on X-Budgetd-Event-Id (retries send the same event again).",
        ]
    )
    doc = {"webhook": render.message_json(hook), "secret": response.secret}
    return Result(doc, text)


def webhooks_list(admin: Admin, args: argparse.Namespace) -> Result:
    hooks = list(admin.call(admin.stub.ListWebhooks, pb.ListWebhooksRequest()).webhooks)
    text = webhooks_table(hooks) if hooks else "no webhooks"
    return Result({"webhooks": [render.message_json(hook) for hook in hooks]}, text)


def webhooks_delete(admin: Admin, args: argparse.Namespace) -> Result:
    webhook_id = str(args.id)
    admin.call(admin.stub.DeleteWebhook, pb.DeleteWebhookRequest(id=webhook_id))
    return Result({"deleted": webhook_id}, f"deleted webhook {webhook_id}")


def add_parser(top: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`budgetctl webhooks ACTION ...`, registered by parser.build_parser."""
    webhooks = top.add_parser(
        "webhooks",
        help="create, list and delete webhooks (budget events POSTed to a URL)",
        description="Webhooks: budgetd POSTs budget events (alerts by default) as signed JSON "
        "to a URL, retrying with back-off until the receiver answers 2xx.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = webhooks.add_subparsers(dest="action", metavar="ACTION", required=True)

    create = cli._command(
        actions,
        "create",
        webhooks_create,
        summary="register a URL for budget events; prints its secret once",
        description="Register a URL that budgetd POSTs events to, for the budgets whose id "
        "starts with --prefix. Each request is signed with HMAC-SHA256 and the secret "
        "printed here, once.",
        examples="""\
  budgetctl webhooks create https://hooks.example.com/budgetd --prefix org:acme/
  budgetctl webhooks create http://127.0.0.1:9000/alerts --kinds alert,frozen,limit_changed
  budgetctl --json webhooks create https://hooks.example.com/b | jq -r .secret
""",
    )
    create.add_argument("url", metavar="URL", help="http:// or https:// URL to POST to")
    create.add_argument("--prefix", default="", help="only budgets whose id starts with this")
    create.add_argument(
        "--kinds",
        metavar="KIND,...",
        type=kinds_arg,
        help=f"event kinds to send (default: alert); any of {', '.join(KINDS)}",
    )

    cli._command(
        actions,
        "list",
        webhooks_list,
        summary="list webhooks (without their secrets)",
        description="List the registered webhooks, oldest first. Secrets are never shown "
        "again after create.",
        examples="  budgetctl webhooks list\n",
    )

    delete = cli._command(
        actions,
        "delete",
        webhooks_delete,
        summary="delete a webhook; its undelivered events are dropped",
        description="Delete a webhook. Nothing more is sent to it, including events still "
        "waiting for a retry.",
        examples="  budgetctl webhooks delete wh_0123456789abcdef0123456789abcdef\n",
    )
    delete.add_argument("id", metavar="ID")
