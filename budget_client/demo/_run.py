"""The demo's conductor: start the parts, share one budget, watch it run out, sum it up."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import signal
import sys
import tempfile
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TextIO

import grpc

from budget_client._proto.budgetd.v1 import budget_pb2 as pb
from budget_client._proto.budgetd.v1 import budget_pb2_grpc as pb_grpc
from budget_client._types import Budget
from budget_client.demo._app import MODEL, PROMPTS
from budget_client.demo._children import Child, ChildFailed
from budget_client.demo._protocol import Report
from budget_client.demo._render import (
    THRESHOLDS_PCT,
    LiveScreen,
    Output,
    Painter,
    PlainLines,
    Setting,
    rate_text,
    summary_lines,
)
from budget_client.demo._state import AppView, DemoState
from budget_client.demo._summary import Ending, Summary, Upstream, Verification

BUDGET_ID = "demo:team"
REPLY_TOKENS = (300, 700, 1500, 450, 1000, 2000, 200, 850, 1200)
"""Reply length of each app: short ones that fit, long ones the budget cuts off."""
APPS_MAX = len(REPLY_TOKENS)
FRAME_INTERVAL_S = 0.1
POLL_INTERVAL_S = 0.1
PLAIN_STATUS_INTERVAL_S = 1.0
START_TIMEOUT_S = 60.0
"""budgetd migrates its database on start and the apps import openai and tiktoken: on a
busy 2-core machine that takes seconds, not minutes."""
APP_STOP_GRACE_S = 5.0
CHILD_STOP_GRACE_S = 10.0
RPC_TIMEOUT_S = 5.0
_BANNER = re.compile(r"listening on (\S+)")

Phase = Literal["starting", "running", "ending"]


@dataclass(frozen=True, slots=True)
class DemoOptions:
    """The demo's command line."""

    budget_tokens: int
    """Limit of the shared budget, in tokens."""
    apps: int
    """How many app processes share it."""
    rate_tokens_per_s: float
    """How fast the fake server streams each reply (0: as fast as it can)."""
    duration_limit_s: float
    """Safety stop: end the demo after this long even if the budget is not gone."""
    plain: bool
    """Plain lines even on a terminal."""


def parse_options(argv: Sequence[str] | None = None) -> DemoOptions:
    parser = argparse.ArgumentParser(
        prog="python -m budget_client.demo",
        description="budgetd, a local OpenAI-compatible server and several app processes "
        "sharing one token budget, shown live until the budget is gone.",
    )
    parser.add_argument(
        "--budget", type=int, default=3000, help="shared budget in tokens (default %(default)s)"
    )
    parser.add_argument(
        "--apps", type=int, default=3, help=f"app processes, 1-{APPS_MAX} (default %(default)s)"
    )
    parser.add_argument(
        "--rate",
        type=float,
        default=100.0,
        help="tokens per second of each streamed reply, 0 = unpaced (default %(default)s)",
    )
    parser.add_argument(
        "--duration-limit",
        type=float,
        default=120.0,
        help="safety stop after this many seconds; exits 1 (default %(default)s)",
    )
    parser.add_argument(
        "--plain", action="store_true", help="periodic plain lines even on a terminal"
    )
    args = parser.parse_args(argv)
    if args.budget < 1:
        parser.error("--budget must be at least 1")
    if not 1 <= args.apps <= APPS_MAX:
        parser.error(f"--apps must be between 1 and {APPS_MAX}")
    if args.rate < 0:
        parser.error("--rate must be >= 0")
    if args.duration_limit <= 0:
        parser.error("--duration-limit must be > 0")
    return DemoOptions(
        budget_tokens=args.budget,
        apps=args.apps,
        rate_tokens_per_s=args.rate,
        duration_limit_s=args.duration_limit,
        plain=args.plain,
    )


class Demo:
    def __init__(self, options: DemoOptions, out: TextIO = sys.stdout) -> None:
        self.options = options
        self.out = Output(out)
        self.live = (
            not options.plain and out.isatty() and os.environ.get("TERM", "") not in ("", "dumb")
        )
        self.painter = Painter(color=self.live and "NO_COLOR" not in os.environ)
        self.phase: Phase = "starting"
        self.children: list[Child] = []
        self.apps: list[tuple[Child, AppView]] = []
        self.errors: list[str] = []
        self.interrupted = asyncio.Event()
        self.signals = 0
        self.screen: LiveScreen | None = None
        self.plain = PlainLines(self.out)
        self.metadata: tuple[tuple[str, str], ...] = ()
        """The admin API key, as gRPC metadata for the demo's own AdminService calls."""

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
        for signum in handled:
            loop.add_signal_handler(signum, self._on_signal, task)
        try:
            with tempfile.TemporaryDirectory(prefix="budgetd-demo-") as tmp:
                try:
                    return await self._run_in(Path(tmp))
                finally:
                    # Before the directory goes: budgetd's database lives in it.
                    await self._stop_children()
        except ChildFailed as failure:
            self._say(f"budgetd demo: {failure}", stream=sys.stderr)
            return 1
        except grpc.aio.AioRpcError as error:
            self._say(
                f"budgetd demo: budgetd answered {error.code().name}: {error.details()}",
                stream=sys.stderr,
            )
            return 1
        finally:
            if self.screen is not None:
                self.screen.close()
            for signum in handled:
                loop.remove_signal_handler(signum)

    def _on_signal(self, task: asyncio.Task[int]) -> None:
        """First Ctrl-C while running: stop the apps and sum up. Otherwise: leave now."""
        self.signals += 1
        if self.signals == 1 and self.phase == "running":
            self.interrupted.set()
            return
        for child in self.children:
            child.signal(signal.SIGKILL)
        task.cancel()

    async def _stop_children(self) -> None:
        """Apps first, so that their last streams commit while budgetd is still up."""
        for child, _view in self.apps:
            await child.stop(APP_STOP_GRACE_S)
        for child in reversed(self.children):
            await child.stop(CHILD_STOP_GRACE_S)

    def _say(self, text: str, stream: TextIO | None = None) -> None:
        (Output(stream) if stream is not None else self.out).write(text + "\n")

    # ------------------------------------------------------------------ the run

    async def _run_in(self, tmp: Path) -> int:
        options = self.options
        address = await self._start_budgetd(tmp)
        base_url = await self._start_fake_openai()
        async with grpc.aio.insecure_channel(address) as channel:
            admin = pb_grpc.AdminServiceStub(channel)
            await admin.CreateBudget(
                pb.CreateBudgetRequest(
                    id=BUDGET_ID,
                    unit=pb.UNIT_TOKENS,
                    limit=options.budget_tokens,
                    period=pb.PERIOD_NONE,
                    mode=pb.MODE_HARD,
                    alert_thresholds_pct=THRESHOLDS_PCT,
                ),
                timeout=RPC_TIMEOUT_S,
                metadata=self.metadata,
            )
            # The apps get a key of their own that may charge this budget and nothing else.
            app_key = await admin.CreateKey(
                pb.CreateKeyRequest(name="demo-apps", scopes=[f"charge:{BUDGET_ID}"]),
                timeout=RPC_TIMEOUT_S,
                metadata=self.metadata,
            )
            self._say(
                f"budget {BUDGET_ID}: {options.budget_tokens:,} tokens, HARD; "
                f"starting {options.apps} app processes ..."
            )
            views = [
                AppView(name=f"app-{i + 1}", reply_tokens=REPLY_TOKENS[i])
                for i in range(options.apps)
            ]
            state = DemoState(BUDGET_ID, options.budget_tokens, views)
            setting = Setting(address, base_url, options.rate_tokens_per_s, MODEL)
            for index, view in enumerate(views):
                child = await self._start_app(tmp, view, index, address, base_url, app_key.secret)
                self.apps.append((child, view))
            readers = [
                asyncio.create_task(self._read_app(child, view, state), name=f"app:{view.name}")
                for child, view in self.apps
            ]
            background = [
                asyncio.create_task(self._watch(admin, state), name="watch"),
                asyncio.create_task(self._poll(admin, state), name="poll"),
                asyncio.create_task(self._render(state, setting), name="render"),
            ]
            try:
                state.status = "waiting for the apps to start"
                await self._wait_ready(state)
                state.restart_clock()
                state.status = "streaming"
                self.phase = "running"
                for child, _view in self.apps:
                    child.send("go")
                ending = await self._wait_for_end(state, readers)
                self.phase = "ending"
                await self._stop_apps(state, readers)
                state.status = "summing up"
                try:
                    await self._poll_once(admin, state)
                except grpc.aio.AioRpcError as error:
                    self.errors.append(f"GetBudget failed: {error.code().name}")
                verification = await self._verify(admin)
                upstream = await self._upstream(base_url, state)
            finally:
                for task in background:
                    task.cancel()
                await asyncio.gather(*background, return_exceptions=True)
            state.status = {
                "exhausted": "budget exhausted: all apps stopped",
                "duration-limit": "stopped by --duration-limit",
                "interrupted": "interrupted",
                "error": "stopped by an error",
            }[ending]
            self._final_frame(state, setting)
            summary = Summary.of(state, ending, verification, upstream, self.errors)
            self._print_summary(summary)
        if ending == "interrupted":
            return 130
        healthy = verification is not None and verification.ok and not self.errors
        return 0 if ending == "exhausted" and healthy else 1

    async def _start_budgetd(self, tmp: Path) -> str:
        """budgetd on a fresh SQLite database; with API keys, as in production: on a new
        database it writes its first admin key to the file named on its command line."""
        self._say("starting budgetd ...")
        key_file = tmp / "admin.key"
        child = await Child.spawn(
            "budgetd",
            [
                "-m",
                "budget_server.cli",
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--db",
                f"sqlite+aiosqlite:///{tmp / 'demo.db'}",
                "--log-level",
                "warning",
                "--admin-key-file",
                str(key_file),
            ],
        )
        self.children.append(child)
        banner = await child.first_line(START_TIMEOUT_S)
        match = _BANNER.search(banner)
        if match is None:
            raise ChildFailed(f"budgetd said {banner!r}, not where it listens")
        child.drain_stdout()
        try:
            admin_key = key_file.read_text().strip()
        except OSError as error:
            raise ChildFailed(f"budgetd wrote no admin API key to {key_file}: {error}") from None
        self.metadata = (("authorization", f"Bearer {admin_key}"),)
        self._say(f"  {banner}")
        return match.group(1)

    async def _start_fake_openai(self) -> str:
        self._say("starting the local OpenAI-compatible server ...")
        child = await Child.spawn(
            "fake OpenAI server",
            [
                "-m",
                "budget_client.testing",
                "--port",
                "0",
                "--rate",
                f"{self.options.rate_tokens_per_s:g}",
            ],
        )
        self.children.append(child)
        base_url = await child.first_line(START_TIMEOUT_S)
        if not base_url.startswith("http"):
            raise ChildFailed(f"the fake OpenAI server said {base_url!r}, not its URL")
        child.drain_stdout()
        self._say(f"  {base_url} ({rate_text(self.options.rate_tokens_per_s)} per stream)")
        return base_url

    async def _start_app(
        self, tmp: Path, view: AppView, index: int, address: str, base_url: str, api_key: str
    ) -> Child:
        return await Child.spawn(
            view.name,
            [
                "-m",
                "budget_client.demo._app",
                "--name",
                view.name,
                "--address",
                address,
                "--base-url",
                base_url,
                "--budget-id",
                BUDGET_ID,
                "--reply-tokens",
                str(view.reply_tokens),
                "--prompt",
                PROMPTS[index % len(PROMPTS)],
                "--spool-dir",
                str(tmp / "spool" / view.name),
            ],
            stdin=True,
            env={"BUDGETD_API_KEY": api_key},  # not on the command line, where ps shows it
        )

    async def _read_app(self, child: Child, view: AppView, state: DemoState) -> None:
        """The app's reports, until it exits; then its exit status."""
        stdout = child.process.stdout
        assert stdout is not None
        with contextlib.suppress(ValueError, OSError):
            while line := await stdout.readline():
                report = Report.from_line(line.decode(errors="replace"))
                if report is not None:
                    state.apply_report(view, report)
        code = await child.process.wait()
        state.app_exited(view, code, (await child.stderr_text()).strip()[-400:])
        if code != 0 and self.phase != "ending":
            self.errors.append(f"{view.name} exited with status {code}: {view.error}")

    async def _wait_ready(self, state: DemoState) -> None:
        async with asyncio.timeout(START_TIMEOUT_S):
            while any(view.phase == "starting" for _child, view in self.apps):
                for child, view in self.apps:
                    if not child.running:
                        detail = await child.stderr_text()
                        raise ChildFailed(f"{view.name} exited before it was ready:\n{detail}")
                await asyncio.sleep(0.05)

    async def _wait_for_end(
        self, state: DemoState, readers: Sequence[asyncio.Task[None]]
    ) -> Ending:
        apps_done = asyncio.ensure_future(asyncio.gather(*readers))
        interrupted = asyncio.ensure_future(self.interrupted.wait())
        try:
            done, _ = await asyncio.wait(
                (apps_done, interrupted),
                timeout=self.options.duration_limit_s,
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            interrupted.cancel()
        if interrupted in done:
            return "interrupted"
        if apps_done in done:
            return "exhausted" if state.exhausted else "error"
        limit_s = self.options.duration_limit_s
        self.errors.append(f"the budget was not exhausted within {limit_s:g} s")
        return "duration-limit"

    async def _stop_apps(self, state: DemoState, readers: Sequence[asyncio.Task[None]]) -> None:
        """`stop` to apps still running: each closes its stream, commits it, exits."""
        if all(task.done() for task in readers):
            return
        state.status = "stopping the apps"
        for child, _view in self.apps:
            child.send("stop")
        _, pending = await asyncio.wait(readers, timeout=APP_STOP_GRACE_S)
        for child, _view in self.apps:
            if child.running:
                await child.stop(1.0)
        await asyncio.gather(*pending, return_exceptions=True)

    # ------------------------------------------------------------------ budgetd

    async def _watch(self, admin: pb_grpc.AdminServiceAsyncStub, state: DemoState) -> None:
        call = admin.WatchBudgets(pb.WatchBudgetsRequest(prefix=BUDGET_ID), metadata=self.metadata)
        try:
            async for event in call:
                state.apply_event(event)
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.CANCELLED:
                state.note("demo", "WATCH", f"WatchBudgets ended: {error.code().name}")
        finally:
            call.cancel()

    async def _poll(self, admin: pb_grpc.AdminServiceAsyncStub, state: DemoState) -> None:
        while True:
            with contextlib.suppress(grpc.aio.AioRpcError):
                await self._poll_once(admin, state)
            await asyncio.sleep(POLL_INTERVAL_S)

    async def _poll_once(self, admin: pb_grpc.AdminServiceAsyncStub, state: DemoState) -> None:
        response = await admin.GetBudget(
            pb.GetBudgetRequest(budget_id=BUDGET_ID), timeout=RPC_TIMEOUT_S, metadata=self.metadata
        )
        state.set_budget(Budget.from_pb(response.budget))

    async def _verify(self, admin: pb_grpc.AdminServiceAsyncStub) -> Verification | None:
        try:
            response = await admin.VerifyLedger(
                pb.VerifyLedgerRequest(budget_id=BUDGET_ID),
                timeout=RPC_TIMEOUT_S,
                metadata=self.metadata,
            )
        except grpc.aio.AioRpcError as error:
            self.errors.append(f"VerifyLedger failed: {error.code().name} {error.details()}")
            return None
        return Verification.of(response)

    async def _upstream(self, base_url: str, state: DemoState) -> Upstream | None:
        url = base_url.removesuffix("/").removesuffix("/v1") + "/_fake/records"
        try:
            records = await asyncio.to_thread(_fetch_json, url)
        except (OSError, ValueError) as error:
            self.errors.append(f"could not read the fake server's records: {error}")
            return None
        if not isinstance(records, list):
            self.errors.append("the fake server's records are not a list")
            return None
        return Upstream.of([r for r in records if isinstance(r, dict)], state.apps)

    # ------------------------------------------------------------------ output

    async def _render(self, state: DemoState, setting: Setting) -> None:
        if self.live:
            self.screen = LiveScreen(self.out, self.painter)
            while True:
                self.screen.draw(state, setting)
                await asyncio.sleep(FRAME_INTERVAL_S)
        loop = asyncio.get_running_loop()
        status_at = loop.time()
        while True:
            self.plain.events(state)
            if self.phase == "running" and loop.time() >= status_at:
                self.plain.status(state)
                status_at = loop.time() + PLAIN_STATUS_INTERVAL_S
            await asyncio.sleep(FRAME_INTERVAL_S)

    def _final_frame(self, state: DemoState, setting: Setting) -> None:
        if self.screen is not None:
            self.screen.draw(state, setting)
            self.screen.close()
            self.screen = None
            return
        self.plain.events(state)
        self.plain.status(state)

    def _print_summary(self, summary: Summary) -> None:
        self._say("")
        for line in summary_lines(summary, self.painter):
            self._say(line)
        self._say("SUMMARY " + summary.to_json())


def _fetch_json(url: str) -> object:
    with urllib.request.urlopen(url, timeout=RPC_TIMEOUT_S) as response:
        return json.loads(response.read())


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_options(argv)
    try:
        return asyncio.run(Demo(options).run())
    except (KeyboardInterrupt, asyncio.CancelledError):
        Output(sys.stderr).write("budgetd demo: interrupted; its processes are stopped\n")
        return 130
