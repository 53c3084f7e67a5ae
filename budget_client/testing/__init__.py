"""A local OpenAI-compatible streaming server for tests, benchmarks and the demo.

Replies are real o200k_base tokens sent one per SSE chunk at a set rate, and
every request leaves a record of exactly what reached the socket, so budget
enforcement can be checked against what the "upstream" really sent.
"""

from budget_client.testing._fake_openai import FakeConfig, create_app
from budget_client.testing._records import RecordStore, RequestRecord
from budget_client.testing._server import FakeOpenAIServer
from budget_client.testing._styles import TEXT_STYLES, TextStyle

__all__ = [
    "TEXT_STYLES",
    "FakeConfig",
    "FakeOpenAIServer",
    "RecordStore",
    "RequestRecord",
    "TextStyle",
    "create_app",
]
