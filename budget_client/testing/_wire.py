"""OpenAI's chat completion wire format, byte for byte where clients care.

Kept apart from the HTTP plumbing so the exact shapes (key order, `usage: null`
on every chunk when usage was requested, the `choices: []` usage chunk) are in
one place that reads like the API reference.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from budget_client.testing._tokens import Reply

SYSTEM_FINGERPRINT = "fp_fakebudgetd"


@dataclass(frozen=True)
class Emission:
    """One write of the response body, due `due` seconds after the response started."""

    due: float
    body: bytes
    text: str = ""
    tokens: int = 0
    chunk: bool = False  # a chat.completion.chunk event (counted in chunks_sent)


@dataclass(frozen=True)
class Plan:
    """Everything decided about a reply before the first byte is written."""

    request_id: str
    created: int
    model: str
    reply: Reply
    prompt_tokens: int
    finish_reason: str
    include_usage: bool
    tokens_per_second: float

    def due(self, tokens_done: int) -> float:
        """When the token number `tokens_done` is 'generated' (0 = as fast as possible)."""
        rate = self.tokens_per_second
        return tokens_done / rate if rate > 0 else 0.0

    def usage(self) -> dict[str, Any]:
        completion = len(self.reply.ids)
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": 0,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        }


def dumps(obj: object) -> bytes:
    """Compact JSON with raw UTF-8, as the real API sends it."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def stream_emissions(plan: Plan) -> Iterator[Emission]:
    """The SSE events of a streamed reply: role, one content chunk per token, stop, usage, DONE."""
    head = {
        "id": plan.request_id,
        "object": "chat.completion.chunk",
        "created": plan.created,
        "model": plan.model,
        "system_fingerprint": SYSTEM_FINGERPRINT,
    }

    def event(choices: list[dict[str, Any]], usage: dict[str, Any] | None) -> bytes:
        obj = {**head, "choices": choices}
        if plan.include_usage:
            obj["usage"] = usage
        return b"data: " + dumps(obj) + b"\n\n"

    def choice(delta: dict[str, str], finish_reason: str | None) -> list[dict[str, Any]]:
        return [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]

    role = {"role": "assistant", "content": ""}
    yield Emission(0.0, event(choice(role, None), None), chunk=True)
    done = 0
    for text, n in plan.reply.chunks():
        done += n
        body = event(choice({"content": text}, None), None)
        yield Emission(plan.due(done), body, text=text, tokens=n, chunk=True)
    end = plan.due(done)
    yield Emission(end, event(choice({}, plan.finish_reason), None), chunk=True)
    if plan.include_usage:
        yield Emission(end, event([], plan.usage()), chunk=True)
    yield Emission(end, b"data: [DONE]\n\n")


def completion_body(plan: Plan) -> bytes:
    """The non-streamed `chat.completion` object."""
    message: dict[str, Any] = {
        "role": "assistant",
        "content": plan.reply.text,
        "refusal": None,
        "annotations": [],
    }
    return dumps(
        {
            "id": plan.request_id,
            "object": "chat.completion",
            "created": plan.created,
            "model": plan.model,
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "logprobs": None,
                    "finish_reason": plan.finish_reason,
                }
            ],
            "usage": plan.usage(),
            "service_tier": "default",
            "system_fingerprint": SYSTEM_FINGERPRINT,
        }
    )


def error_body(message: str, param: str | None = None) -> bytes:
    return dumps(
        {
            "error": {
                "message": message,
                "type": "invalid_request_error",
                "param": param,
                "code": None,
            }
        }
    )
