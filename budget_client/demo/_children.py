"""The demo's child processes: budgetd, the fake OpenAI server, the app instances.

Each child runs in its own session, so a Ctrl-C at the terminal reaches only the demo,
which then stops the children in order (apps first, so their streams commit while
budgetd is still up). Their stderr is kept (the last lines) instead of being let through,
because it would tear the live view; it is shown when a child fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections import deque
from collections.abc import Mapping, Sequence

STDERR_LINES_KEPT = 20
READ_LINE_BYTES_MAX = 1 << 20


class ChildFailed(Exception):
    """A child process did not start, or died while it was needed."""


class Child:
    def __init__(self, name: str, process: asyncio.subprocess.Process) -> None:
        self.name = name
        self.process = process
        self.stderr_tail: deque[str] = deque(maxlen=STDERR_LINES_KEPT)
        self._stderr_done = asyncio.Event()
        self._stderr_task = asyncio.create_task(self._keep_stderr(), name=f"stderr:{name}")

    @classmethod
    async def spawn(
        cls,
        name: str,
        args: Sequence[str],
        *,
        stdin: bool = False,
        env: Mapping[str, str] | None = None,
    ) -> Child:
        """`python args...` in its own session, stdout piped (and stdin when asked)."""
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            *args,
            stdin=asyncio.subprocess.PIPE if stdin else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            limit=READ_LINE_BYTES_MAX,
        )
        return cls(name, process)

    @property
    def running(self) -> bool:
        return self.process.returncode is None

    async def _keep_stderr(self) -> None:
        stream = self.process.stderr
        assert stream is not None
        try:
            while line := await stream.readline():
                self.stderr_tail.append(line.decode(errors="replace").rstrip())
        except (ValueError, OSError):  # an overlong line, or the pipe went away
            pass
        finally:
            self._stderr_done.set()

    async def stderr_text(self, wait_s: float = 1.0) -> str:
        """The last lines of stderr, after giving a dying child a moment to finish them."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait_s):
                await self._stderr_done.wait()
        return "\n".join(self.stderr_tail)

    async def first_line(self, timeout_s: float) -> str:
        """The first stdout line: the address the child announces once it is up."""
        stdout = self.process.stdout
        assert stdout is not None
        try:
            async with asyncio.timeout(timeout_s):
                line = await stdout.readline()
        except TimeoutError:
            raise ChildFailed(f"{self.name} did not start within {timeout_s:g} s") from None
        if not line:
            await self.process.wait()
            detail = await self.stderr_text()
            raise ChildFailed(
                f"{self.name} exited with status {self.process.returncode} before starting"
                + (f":\n{detail}" if detail else "")
            )
        return line.decode(errors="replace").strip()

    def drain_stdout(self) -> asyncio.Task[None]:
        """Keep reading (and dropping) stdout, so the child never blocks on a full pipe."""
        return asyncio.create_task(self._drain(), name=f"stdout:{self.name}")

    async def _drain(self) -> None:
        stdout = self.process.stdout
        assert stdout is not None
        with contextlib.suppress(OSError):
            while await stdout.read(65536):
                pass

    def send(self, line: str) -> None:
        """A line on the child's stdin; a child that is gone misses nothing it needs."""
        stdin = self.process.stdin
        if stdin is None or stdin.is_closing():
            return
        with contextlib.suppress(OSError):
            stdin.write(line.encode() + b"\n")

    def signal(self, signum: int) -> None:
        if self.running:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signum)

    async def stop(self, grace_s: float) -> int:
        """SIGTERM, then SIGKILL after `grace_s`; returns the exit status."""
        if self.process.stdin is not None:
            self.process.stdin.close()
        if self.running:
            self.signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(grace_s):
                    await self.process.wait()
            except TimeoutError:
                self.signal(signal.SIGKILL)
        code = await self.process.wait()
        await self.stderr_text(wait_s=grace_s)
        if not self._stderr_task.done():
            self._stderr_task.cancel()
        return code
