"""`python -m budget_client.testing`: the fake OpenAI server as a standalone process.

Prints its base URL as the first stdout line (so a script can read it) and
serves until Ctrl+C or SIGTERM, both of which shut it down cleanly.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from types import FrameType

from budget_client.testing._server import FakeOpenAIServer
from budget_client.testing._styles import TEXT_STYLES


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m budget_client.testing",
        description="Local OpenAI-compatible chat completions server streaming real tokens.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8400, help="0 picks a free port")
    parser.add_argument("--tokens", type=int, default=256, help="reply length in tokens")
    parser.add_argument("--rate", type=float, default=0.0, help="tokens per second, 0 = no pacing")
    parser.add_argument("--style", choices=TEXT_STYLES, default="english")
    args = parser.parse_args(argv)

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server = FakeOpenAIServer(args.tokens, args.rate, args.style, host=args.host, port=args.port)
    with server as srv:
        print(srv.base_url, flush=True)
        print(
            f"fake OpenAI: {args.tokens} tokens at {args.rate or 'unlimited'} tok/s, "
            f"style {args.style}; records at {srv.records_url}; Ctrl+C to stop",
            file=sys.stderr,
            flush=True,
        )
        while not stop.wait(0.5):
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
