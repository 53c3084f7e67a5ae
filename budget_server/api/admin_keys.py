"""AdminService, API keys: create (the secret is shown once), list, revoke."""

from __future__ import annotations

from typing import Any

import grpc

from budget_client._proto.budgetd.v1 import budget_pb2 as pb
from budget_server.api.admin_base import AdminBase
from budget_server.api.status import unary
from budget_server.auth.store import KeyRecord

Context = grpc.aio.ServicerContext[Any, Any]


def key_to_pb(record: KeyRecord) -> pb.ApiKey:
    return pb.ApiKey(
        id=record.id,
        name=record.name,
        scopes=[str(s) for s in record.scopes],
        created_at_us=record.created_at_us,
        revoked_at_us=record.revoked_at_us,
    )


class KeyAdmin(AdminBase):
    """AdminService methods about API keys."""

    @unary
    async def CreateKey(
        self, request: pb.CreateKeyRequest, context: Context
    ) -> pb.CreateKeyResponse:
        record, secret = await self.keys.create(request.name, tuple(request.scopes))
        return pb.CreateKeyResponse(key=key_to_pb(record), secret=secret)

    @unary
    async def ListKeys(self, request: pb.ListKeysRequest, context: Context) -> pb.ListKeysResponse:
        return pb.ListKeysResponse(keys=[key_to_pb(r) for r in await self.keys.list()])

    @unary
    async def RevokeKey(
        self, request: pb.RevokeKeyRequest, context: Context
    ) -> pb.RevokeKeyResponse:
        return pb.RevokeKeyResponse(key=key_to_pb(await self.keys.revoke(request.id)))
