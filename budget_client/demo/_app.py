"""One app instance of the demo: an ordinary openai app whose client budgetd wraps.

The demo runs several of these as separate processes, as a real deployment runs several
replicas of one service, all charging one shared budget:

    python -m budget_client.demo._app --name app-1 --address HOST:PORT \
        --base-url http://127.0.0.1:PORT/v1 --budget-id demo:team --reply-tokens 300

It reports each step as a JSON line on stdout (budget_client.demo._protocol), waits for
`go` on stdin, then streams chat completions in a loop. A stream that budgetd cuts off
raises BudgetExceeded mid-stream, and the app simply goes on to its next request; the app
stops when a new request is refused up front and no other stream holds budget that could
still come back.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai

from budget_client import BudgetClient, BudgetExceeded, MeteredAsyncStream, wrap_openai
from budget_client._tokenizer import get_encoding_for_model
from budget_client.demo._protocol import Report, ReportKind

MODEL = "gpt-4o"
PROGRESS_INTERVAL_S = 0.05
"""How often the token count of the open stream is reported: 20 a second, twice the
demo's frame rate, and few enough lines that the demo's reading costs nothing."""
ROOM_POLL_S = 0.2
"""How often a refused app looks whether other streams gave budget back."""
PROMPTS = (
    "Summarise this week's support tickets for the team channel.",
    "Draft release notes for the search service.",
    "Explain the quarterly cloud bill to the finance team, line by line.",
    "Write unit tests for the billing module.",
    "Translate the onboarding guide into plain English.",
    "Review this pull request and list every risk you see.",
    "Reply to the customer who asked about refunds.",
    "Outline a migration plan from SQLite to PostgreSQL.",
    "Brainstorm names for the new analytics dashboard.",
)


@dataclass(frozen=True, slots=True)
class AppOptions:
    """How one app instance runs."""

    name: str
    """Shown by the demo, and sent to budgetd as the `app` label of each reservation."""
    address: str
    """budgetd's host:port."""
    base_url: str
    """The OpenAI-compatible server's base URL (the fake one, in the demo)."""
    budget_id: str
    """The budget every request is charged to."""
    reply_tokens: int
    """How long the fake server's replies to this app are."""
    prompt: str
    """What this app asks for (the fake server's reply does not depend on it)."""
    spool_dir: Path | None
    """Where the client would spool usage if budgetd were unreachable."""


def _emit(report: Report) -> None:
    sys.stdout.write(report.to_line() + "\n")
    sys.stdout.flush()


async def run(options: AppOptions) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    control = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(control), sys.stdin)
    get_encoding_for_model(MODEL)  # load the vocabulary now, not in the first request
    overrides: dict[str, Any] = {}
    if options.spool_dir is not None:
        overrides["spool_dir"] = options.spool_dir
    # Fail closed: a demo that went unmetered because budgetd was away would prove nothing.
    budgets = BudgetClient(options.address, fail_policy="closed", **overrides)
    upstream = openai.AsyncOpenAI(base_url=options.base_url, api_key="demo", max_retries=0)
    async with budgets, upstream:
        client: Any = wrap_openai(upstream, budgets)  # create() also takes budget=...
        _emit(Report("ready"))
        if (await control.readline()).strip() != b"go":
            return 0
        watcher = asyncio.create_task(_watch_control(control, stop))
        try:
            reason = await _stream_until_refused(client, budgets, options, stop)
        except Exception as error:  # reported to the demo, which shows it
            _emit(Report("error", message=f"{type(error).__name__}: {error}"))
            return 1
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
    _emit(Report("exit", message=reason))
    return 0


async def _watch_control(control: asyncio.StreamReader, stop: asyncio.Event) -> None:
    """`stop` on stdin, or stdin closing because the demo is gone, stops the app."""
    while True:
        line = await control.readline()
        if not line or line.strip() == b"stop":
            stop.set()
            return


async def _stream_until_refused(
    client: Any, budgets: BudgetClient, options: AppOptions, stop: asyncio.Event
) -> str:
    """Stream replies one after another; returns why it stopped: "budget" or "stop"."""
    number = 0
    while not stop.is_set():
        messages = [
            {"role": "user", "content": f"{options.prompt} (request {number + 1})"},
        ]
        try:
            stream: MeteredAsyncStream = await client.chat.completions.create(
                model=MODEL,
                messages=messages,
                stream=True,
                budget=options.budget_id,
                budget_labels={"app": options.name},
                extra_headers={"x-fake-tokens": str(options.reply_tokens)},
            )
        except BudgetExceeded as refused:
            # Refused before anything was sent. Budget held by streams still running may
            # come back when they commit less than they hold; only when nothing is held
            # is the budget really gone for this app.
            budget = await budgets.get_budget(options.budget_id)
            waiting = budget.reserved > 0
            _emit(
                Report(
                    "refused",
                    available_tokens=refused.available or 0,
                    waiting=waiting,
                    message=refused.message,
                )
            )
            if not waiting:
                return "budget"
            await _wait_for_room(budgets, options.budget_id, budget.available, stop)
            continue
        number += 1
        if await _read_stream(stream, number, stop) == "closed":
            break
    return "stop"


async def _read_stream(stream: MeteredAsyncStream, number: int, stop: asyncio.Event) -> str:
    """Read one stream to its end, reporting the count as it grows; returns its outcome."""
    meter = stream.meter
    _emit(
        Report(
            "start",
            stream=number,
            reservation_id=meter.reservation_id,
            grant_tokens=meter.granted_output_tokens,
        )
    )
    loop = asyncio.get_running_loop()
    reported_at = loop.time()
    request_id = ""
    try:
        async for chunk in stream:
            request_id = request_id or chunk.id
            if stop.is_set():
                await stream.close()  # closes the upstream connection, commits the usage
                _emit(_settled("closed", stream, number, request_id))
                return "closed"
            now = loop.time()
            if now - reported_at >= PROGRESS_INTERVAL_S:
                reported_at = now
                _emit(
                    Report(
                        "progress",
                        stream=number,
                        output_tokens=meter.usage.output_tokens,
                        grant_tokens=meter.granted_output_tokens,
                    )
                )
    except BudgetExceeded as aborted:
        # The wrapper has already closed the upstream stream and committed the usage.
        _emit(_settled("aborted", stream, number, request_id, aborted.budget_id))
        return "aborted"
    _emit(_settled("done", stream, number, request_id))
    return "done"


def _settled(
    kind: ReportKind, stream: MeteredAsyncStream, number: int, request_id: str, message: str = ""
) -> Report:
    meter = stream.meter
    committed = meter.committed
    return Report(
        kind,
        stream=number,
        output_tokens=meter.usage.output_tokens,
        input_tokens=meter.usage.input_tokens,
        grant_tokens=meter.granted_output_tokens,
        charged_tokens=committed.charged if committed is not None else 0,
        overage_tokens=committed.overage if committed is not None else 0,
        reservation_id=meter.reservation_id,
        request_id=request_id,
        message=message,
    )


async def _wait_for_room(
    budgets: BudgetClient, budget_id: str, available_then: int, stop: asyncio.Event
) -> None:
    """Until budget comes back, or nothing is held any more (then a retry settles it)."""
    while not stop.is_set():
        await asyncio.sleep(ROOM_POLL_S)
        budget = await budgets.get_budget(budget_id)
        if budget.reserved == 0 or budget.available > available_then:
            return


def parse_options(argv: Sequence[str] | None = None) -> AppOptions:
    parser = argparse.ArgumentParser(
        prog="python -m budget_client.demo._app",
        description="One app instance of the budgetd demo (the demo starts these itself).",
    )
    parser.add_argument("--name", required=True)
    parser.add_argument("--address", required=True, help="budgetd host:port")
    parser.add_argument("--base-url", required=True, help="OpenAI-compatible base URL")
    parser.add_argument("--budget-id", required=True)
    parser.add_argument("--reply-tokens", type=int, required=True)
    parser.add_argument("--prompt", default=PROMPTS[0])
    parser.add_argument("--spool-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    return AppOptions(
        name=args.name,
        address=args.address,
        base_url=args.base_url,
        budget_id=args.budget_id,
        reply_tokens=args.reply_tokens,
        prompt=args.prompt,
        spool_dir=args.spool_dir,
    )


def main(argv: Sequence[str] | None = None) -> int:
    return asyncio.run(run(parse_options(argv)))


if __name__ == "__main__":
    sys.exit(main())
