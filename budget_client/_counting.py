"""What a streamed response has produced so far, counted exactly as it arrives.

Content and tool-call arguments each get their own incremental counter (tiktoken splits
them separately, so counting their concatenation would be wrong at the seams); all of it is
output. Keeping this apart from the transport lets the sync client count in the app's own
thread and hand only the totals to the event loop.
"""

from __future__ import annotations

from budget_client._tokenizer import IncrementalTokenCounter, get_encoding_for_model
from budget_client._types import Usage

# Text kept for BudgetExceeded.partial_text; a runaway response must not grow memory.
PARTIAL_TEXT_CHARS_MAX = 1_000_000


class OutputCounter:
    """Running exact count of one response's output tokens."""

    def __init__(self, model: str) -> None:
        self._encoding = get_encoding_for_model(model)
        self._content: dict[int, IncrementalTokenCounter] = {}
        self._tool_arguments: dict[tuple[int, int], IncrementalTokenCounter] = {}
        self._tool_name_tokens = 0
        self._extra_tokens = 0
        self._parts: list[str] = []
        self._chars = 0

    @property
    def output_tokens(self) -> int:
        return (
            sum(c.count for c in self._content.values())
            + sum(c.count for c in self._tool_arguments.values())
            + self._tool_name_tokens
            + self._extra_tokens
        )

    @property
    def text(self) -> str:
        return "".join(self._parts)

    def add_text(self, text: str, choice: int = 0) -> int:
        """Count content of one choice (each choice is its own text, tokenized apart)."""
        if text:
            counter = self._content.get(choice)
            if counter is None:
                counter = self._content[choice] = IncrementalTokenCounter(self._encoding)
            counter.feed(text)
            if self._chars < PARTIAL_TEXT_CHARS_MAX:
                self._parts.append(text)
                self._chars += len(text)
        return self.output_tokens

    def add_tool_call(
        self, index: int, name: str | None, arguments: str | None, choice: int = 0
    ) -> int:
        if name:
            self._tool_name_tokens += len(self._encoding.encode_ordinary(name))
        if arguments:
            counter = self._tool_arguments.get((choice, index))
            if counter is None:
                counter = self._tool_arguments[(choice, index)] = IncrementalTokenCounter(
                    self._encoding
                )
            counter.feed(arguments)
        return self.output_tokens

    def add_tokens(self, tokens: int) -> int:
        """For sources that report their own token counts."""
        self._extra_tokens += tokens
        return self.output_tokens

    def usage(self, prompt_tokens: int) -> Usage:
        return Usage(input_tokens=prompt_tokens, output_tokens=self.output_tokens)
