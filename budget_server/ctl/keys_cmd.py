"""`budgetctl keys`: create, list and revoke API keys.

keys create   {"key": ApiKey, "secret": str}   the secret is shown this once
keys list     {"keys": [ApiKey, ...]}
keys revoke   {"key": ApiKey}
"""

from __future__ import annotations

import argparse

from budget_client._proto.budgetd.v1 import budget_pb2 as pb
from budget_server.ctl import parser as cli
from budget_server.ctl import render
from budget_server.ctl.commands import Result
from budget_server.ctl.rpc import Admin
from budget_server.ctl.tables import Column, table
from budget_server.ctl.times import format_time

KEY_COLUMNS = (Column("id"), Column("name"), Column("scopes"), Column("created"), Column("revoked"))


def _row(key: pb.ApiKey) -> list[str]:
    return [
        key.id,
        key.name,
        " ".join(key.scopes),
        format_time(key.created_at_us),
        format_time(key.revoked_at_us) if key.revoked_at_us else "-",
    ]


def keys_create(admin: Admin, args: argparse.Namespace) -> Result:
    request = pb.CreateKeyRequest(name=args.name, scopes=args.scope)
    response = admin.call(admin.stub.CreateKey, request)
    text = (
        f"created API key {response.key.id} ({response.key.name}): "
        f"{' '.join(response.key.scopes)}\n"
        f"{response.secret}\n"
        "This is the only time the key is shown; budgetd keeps only its hash."
    )
    return Result({"key": render.message_json(response.key), "secret": response.secret}, text)


def keys_list(admin: Admin, args: argparse.Namespace) -> Result:
    response = admin.call(admin.stub.ListKeys, pb.ListKeysRequest())
    doc = {"keys": [render.message_json(k) for k in response.keys]}
    return Result(doc, table(KEY_COLUMNS, [_row(k) for k in response.keys]))


def keys_revoke(admin: Admin, args: argparse.Namespace) -> Result:
    response = admin.call(admin.stub.RevokeKey, pb.RevokeKeyRequest(id=args.id))
    text = f"revoked API key {response.key.id} ({response.key.name}); it is refused from now on"
    return Result({"key": render.message_json(response.key)}, text)


def add_parser(top: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`budgetctl keys ACTION ...`, registered by parser.build_parser."""
    keys = top.add_parser(
        "keys",
        help="create, list and revoke API keys",
        description="API keys: who may charge or read which budgets. Scopes: 'admin', "
        "'charge:<budget pattern>' (reserve, commit, meter; implies read), "
        "'read:<budget pattern>'; patterns are globs over budget ids.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = keys.add_subparsers(dest="action", metavar="ACTION", required=True)
    create = cli._command(
        actions,
        "create",
        keys_create,
        summary="create a key (printed once)",
        description="Create an API key with the given scopes and print it once.",
        examples="""\
  budgetctl keys create --name search-app --scope 'charge:org:acme/team:search*'
  budgetctl keys create --name dashboards --scope 'read:*'
""",
    )
    create.add_argument("--name", required=True, help="who or what the key is for")
    create.add_argument(
        "--scope",
        action="append",
        required=True,
        metavar="SCOPE",
        help="admin | charge:PATTERN | read:PATTERN (repeat for several)",
    )
    cli._command(
        actions,
        "list",
        keys_list,
        summary="list keys (never their secrets)",
        description="List API keys with their scopes; secrets are never shown again.",
        examples="  budgetctl keys list\n",
    )
    revoke = cli._command(
        actions,
        "revoke",
        keys_revoke,
        summary="revoke a key, at once on every server",
        description="Revoke an API key; every budgetd process refuses it from now on.",
        examples="  budgetctl keys revoke 3f9c0a1b2c3d4e5f\n",
    )
    revoke.add_argument("id", metavar="KEY_ID")
