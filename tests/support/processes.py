"""Run helper client processes from async tests without blocking the test's event loop."""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any


async def run_module_json(module: str, *args: str, timeout_s: float = 120) -> Any:
    """Run `python -m module args...`; parse its stdout as one JSON document."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        module,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout_s)
    if process.returncode != 0:
        raise AssertionError(f"{module} exited {process.returncode}: {stderr.decode()[-2000:]}")
    return json.loads(stdout)
