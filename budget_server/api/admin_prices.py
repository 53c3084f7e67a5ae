"""AdminService, prices."""

from __future__ import annotations

from typing import Any

import grpc

from budget_client._proto.budgetd.v1 import budget_pb2 as pb
from budget_server.api.admin_base import AdminBase

Context = grpc.aio.ServicerContext[Any, Any]


class PriceAdmin(AdminBase):
    """AdminService methods about prices."""

    async def SetPrice(self, request: pb.SetPriceRequest, context: Context) -> pb.SetPriceResponse:
        # PLACEHOLDER until implemented in this session; must not ship.
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "SetPrice is not implemented yet")

    async def ListPrices(
        self, request: pb.ListPricesRequest, context: Context
    ) -> pb.ListPricesResponse:
        # PLACEHOLDER until implemented in this session; must not ship.
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "ListPrices is not implemented yet")

    async def ImportPrices(
        self, request: pb.ImportPricesRequest, context: Context
    ) -> pb.ImportPricesResponse:
        # PLACEHOLDER until implemented in this session; must not ship.
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "ImportPrices is not implemented yet")

    async def DeletePrice(
        self, request: pb.DeletePriceRequest, context: Context
    ) -> pb.DeletePriceResponse:
        # PLACEHOLDER until implemented in this session; must not ship.
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "DeletePrice is not implemented yet")
