"""The ASGI app: OpenAI-compatible chat completions paced in real time.

Per-request overrides travel as HTTP headers because that is the one channel
the official SDK passes through untouched (`extra_headers=`):

- `x-fake-tokens: N`    reply length in tokens (still capped by `max_tokens` /
                        `max_completion_tokens`, which then give `finish_reason: "length"`);
- `x-fake-rate: R`      tokens per second, 0 = as fast as the socket takes them;
- `x-fake-style: S`     english, code, chinese, emoji or mixed.

The text is seeded by the request's `seed` field when given, otherwise by a hash
of model, messages and style, so the same request always gets the same reply.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from budget_client.testing._paced import PacedResponse
from budget_client.testing._records import RecordStore, RequestRecord
from budget_client.testing._styles import TEXT_STYLES
from budget_client.testing._tokens import build_reply, count_prompt_tokens
from budget_client.testing._wire import (
    Emission,
    Plan,
    completion_body,
    error_body,
    stream_emissions,
)

_MODELS = ("gpt-4o", "gpt-4o-mini", "gpt-4.1", "gpt-4.1-mini", "o4-mini")


@dataclass
class FakeConfig:
    """Server-wide defaults; mutable so a test can change them between requests."""

    tokens: int = 256
    tokens_per_second: float = 0.0
    style: str = "english"


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def create_app(
    config: FakeConfig, store: RecordStore, shutdown: asyncio.Event | None = None
) -> Starlette:
    """Build the app; `shutdown`, when set, makes in-flight responses end at once."""
    stop = shutdown if shutdown is not None else asyncio.Event()

    async def chat_completions(request: Request) -> Response:
        try:
            body = await request.json()
            plan, stream, style = _plan(request.headers, body, config)
        except json.JSONDecodeError:
            return _error(400, "We could not parse the JSON body of your request.")
        except BadRequest as exc:
            return _error(400, str(exc), exc.param)
        live = store.open(
            RequestRecord(
                request_id=plan.request_id,
                model=plan.model,
                stream=stream,
                include_usage=plan.include_usage,
                style=style,
                tokens_per_second=plan.tokens_per_second,
                prompt_tokens=plan.prompt_tokens,
                tokens_planned=len(plan.reply.ids),
                finish_reason=plan.finish_reason,
            )
        )
        headers = {"x-request-id": "req_" + secrets.token_hex(16), "openai-version": "2020-10-01"}
        if stream:
            headers["cache-control"] = "no-cache"
            return PacedResponse(stream_emissions(plan), live, stop, headers, "text/event-stream")
        emission = Emission(
            plan.due(len(plan.reply.ids)),
            completion_body(plan),
            text=plan.reply.text,
            tokens=len(plan.reply.ids),
        )
        headers["content-length"] = str(len(emission.body))
        return PacedResponse(iter([emission]), live, stop, headers, "application/json")

    async def models(request: Request) -> Response:
        data = [
            {"id": m, "object": "model", "created": 1715367049, "owned_by": "system"}
            for m in _MODELS
        ]
        return JSONResponse({"object": "list", "data": data})

    async def records(request: Request) -> Response:
        if request.method == "DELETE":
            store.clear()
            return Response(status_code=204)
        return JSONResponse([r.to_json() for r in store.snapshot()])

    return Starlette(
        routes=[
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/_fake/records", records, methods=["GET", "DELETE"]),
        ]
    )


def _error(status: int, message: str, param: str | None = None) -> Response:
    return Response(error_body(message, param), status_code=status, media_type="application/json")


def _plan(headers: Mapping[str, str], body: object, config: FakeConfig) -> tuple[Plan, bool, str]:
    if not isinstance(body, dict):
        raise BadRequest("The request body must be a JSON object.")
    model = body.get("model")
    messages = body.get("messages")
    if not isinstance(model, str) or not model:
        raise BadRequest("you must provide a model parameter", "model")
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise BadRequest("'messages' must be a list of message objects", "messages")
    tokens = int(_header(headers, "x-fake-tokens", config.tokens, int))
    rate = _header(headers, "x-fake-rate", config.tokens_per_second, float)
    style = headers.get("x-fake-style", config.style)
    if style not in TEXT_STYLES:
        raise BadRequest(f"x-fake-style must be one of {', '.join(TEXT_STYLES)}")
    cap = _cap(body)
    finish_reason = "stop"
    if cap is not None and cap < tokens:
        tokens, finish_reason = cap, "length"
    stream = body.get("stream") is True
    options = body.get("stream_options")
    include_usage = stream and isinstance(options, dict) and options.get("include_usage") is True
    seed = body.get("seed")
    if not isinstance(seed, int):
        seed = _digest(model, messages, style)
    plan = Plan(
        request_id="chatcmpl-" + secrets.token_urlsafe(21).replace("-", "x").replace("_", "y"),
        created=int(time.time()),
        model=model,
        reply=build_reply(tokens, style, seed),
        prompt_tokens=count_prompt_tokens(messages),
        finish_reason=finish_reason,
        include_usage=include_usage,
        tokens_per_second=rate,
    )
    return plan, stream, style


def _header(headers: Mapping[str, str], name: str, default: float, parse: type[float]) -> float:
    raw = headers.get(name)
    if raw is None:
        return default
    try:
        value = parse(raw)
    except ValueError:
        raise BadRequest(f"{name} must be a number, got {raw!r}") from None
    if value < 0 or not math.isfinite(value):
        raise BadRequest(f"{name} must be >= 0, got {raw!r}")
    return value


def _cap(body: dict[str, Any]) -> int | None:
    for key in ("max_completion_tokens", "max_tokens"):
        value = body.get(key)
        if value is None:
            continue
        if not isinstance(value, int) or value < 1:
            raise BadRequest(f"{key} must be an integer >= 1", key)
        return value
    return None


def _digest(model: str, messages: list[Any], style: str) -> int:
    blob = json.dumps([model, messages, style], sort_keys=True, default=str).encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:8], "big")
