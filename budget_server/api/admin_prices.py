"""AdminService, prices: set, list, import (LiteLLM's format) and delete model prices.

Prices are nano-dollars per million tokens. A change applies from the next charge on
every replica (the ledger reads the table in each charging transaction); charges already
made keep the price they were made at. Each change is logged, as the table keeps only
the latest price and its source.
"""

from __future__ import annotations

import logging
from typing import Any

import grpc

from budget_client._proto.budgetd.v1 import budget_pb2 as pb
from budget_server.api.admin_base import AdminBase
from budget_server.api.status import unary
from budget_server.errors import InvalidArgument
from budget_server.ledger.usage import Price
from budget_server.pricing import store
from budget_server.pricing.litellm import IMPORT_BYTES_MAX

Context = grpc.aio.ServicerContext[Any, Any]

log = logging.getLogger("budgetd.prices")


def price_to_pb(stored: store.StoredPrice) -> pb.ModelPrice:
    return pb.ModelPrice(
        model=stored.price.model,
        input_nanousd_per_mtok=stored.price.input_nanousd_per_mtok,
        cached_input_nanousd_per_mtok=stored.price.cached_input_nanousd_per_mtok,
        output_nanousd_per_mtok=stored.price.output_nanousd_per_mtok,
        source=stored.source,
        updated_at_us=stored.updated_at_us,
    )


class PriceAdmin(AdminBase):
    """AdminService methods about prices."""

    @unary
    async def SetPrice(self, request: pb.SetPriceRequest, context: Context) -> pb.SetPriceResponse:
        """Create or replace a price; its source is recorded as "manual"."""
        if not request.HasField("price"):
            raise InvalidArgument("price is required")
        given = request.price
        price = Price(
            model=given.model,
            input_nanousd_per_mtok=given.input_nanousd_per_mtok,
            cached_input_nanousd_per_mtok=given.cached_input_nanousd_per_mtok,
            output_nanousd_per_mtok=given.output_nanousd_per_mtok,
        )
        stored = await store.set_price(self.ledger.db, price, self._now_us())
        log.info(
            "price of %r set: input %d, cached input %d, output %d nano-USD per Mtok",
            price.model,
            price.input_nanousd_per_mtok,
            price.cached_input_nanousd_per_mtok,
            price.output_nanousd_per_mtok,
        )
        return pb.SetPriceResponse(price=price_to_pb(stored))

    @unary
    async def ListPrices(
        self, request: pb.ListPricesRequest, context: Context
    ) -> pb.ListPricesResponse:
        page, token = await store.list_prices(
            self.ledger.db, request.prefix, request.page_size, request.page_token
        )
        return pb.ListPricesResponse(prices=[price_to_pb(p) for p in page], next_page_token=token)

    @unary
    async def ImportPrices(
        self, request: pb.ImportPricesRequest, context: Context
    ) -> pb.ImportPricesResponse:
        size = len(request.litellm_json)
        if size > IMPORT_BYTES_MAX:
            raise InvalidArgument(
                f"litellm_json is {size:,} bytes; the maximum is {IMPORT_BYTES_MAX:,} "
                f"({IMPORT_BYTES_MAX // 2**20} MiB)"
            )
        outcome = await store.import_prices(
            self.ledger.db, request.litellm_json, request.source, self._now_us()
        )
        log.info(
            "imported %d prices (%d entries skipped) from %d bytes, source %r",
            outcome.imported,
            outcome.skipped,
            size,
            outcome.source,
        )
        return pb.ImportPricesResponse(imported=outcome.imported, skipped=outcome.skipped)

    @unary
    async def DeletePrice(
        self, request: pb.DeletePriceRequest, context: Context
    ) -> pb.DeletePriceResponse:
        await store.delete_price(self.ledger.db, request.model)
        log.info("price of %r deleted", request.model)
        return pb.DeletePriceResponse()
