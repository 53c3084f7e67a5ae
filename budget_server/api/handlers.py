"""Register servicers with request decoders that never raise.

grpcio answers a request it cannot parse with UNKNOWN and logs an error with a stack
trace. budgetd's contract is a precise status for bad input, so each request is decoded
here: an undecodable one arrives at the handler as `MalformedRequest`, which the handler
wrappers in `status.py` turn into INVALID_ARGUMENT.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError, Message

from budget_client._proto.budgetd.v1 import budget_pb2 as pb


@dataclass(frozen=True, slots=True)
class MalformedRequest:
    """Bytes that are not a valid encoding of the method's request message."""

    type_name: str
    error: str

    @property
    def message(self) -> str:
        return f"the request is not a valid {self.type_name}: {self.error}"


def _tolerant_decoder(cls: type[Message]) -> Callable[[bytes], Message | MalformedRequest]:
    def decode(data: bytes) -> Message | MalformedRequest:
        try:
            return cls.FromString(data)
        except DecodeError as exc:
            return MalformedRequest(cls.DESCRIPTOR.full_name, str(exc))

    return decode


_HANDLER_FACTORIES = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def add_servicer(
    server: grpc.aio.Server,
    servicer: Any,
    service: ServiceDescriptor,
    guard: Callable[[str, str, Any, tuple[bool, bool]], Any] | None = None,
) -> None:
    """Register every method of `service` implemented by `servicer`, each behind `guard`
    (authentication and scopes) when one is given."""
    handlers = {}
    for method in service.methods:
        request_cls: type[Message] = getattr(pb, method.input_type.name)
        response_cls: type[Message] = getattr(pb, method.output_type.name)
        streaming = (method.client_streaming, method.server_streaming)
        factory = _HANDLER_FACTORIES[streaming]
        handler = getattr(servicer, method.name)
        if guard is not None:
            handler = guard(service.name, method.name, handler, streaming)
        handlers[method.name] = factory(
            handler,
            request_deserializer=_tolerant_decoder(request_cls),
            response_serializer=response_cls.SerializeToString,
        )
    generic = grpc.method_handlers_generic_handler(service.full_name, handlers)
    server.add_generic_rpc_handlers((generic,))
