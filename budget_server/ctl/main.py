"""`budgetctl`: parse the command line, run one command against budgetd, print, exit.

Output goes to stdout (one JSON document with --json); failures go to stderr as
`budgetctl: ...` with the exit codes listed in failures.py, so scripts can branch on them.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence

import grpc

from budget_server.ctl.commands import Result
from budget_server.ctl.credentials import api_key_from, unauthenticated_hint, working_directory
from budget_server.ctl.failures import (
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    CtlError,
    ServerRefused,
    UsageError,
)
from budget_server.ctl.parser import build_parser, server_from
from budget_server.ctl.rpc import connect


def main(argv: Sequence[str] | None = None) -> int:
    """Run budgetctl; returns the exit status instead of exiting, so tests can call it."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help (0) or a usage error (2), already printed
        return exit_.code if isinstance(exit_.code, int) else EXIT_ERROR
    try:
        here = working_directory()
        key = api_key_from(str(args.api_key), str(args.api_key_file), os.environ, here)
        with connect(
            args.server or server_from(os.environ),
            float(args.timeout),
            api_key=key.secret,
            tls=bool(args.tls),
            tls_ca_file=str(args.tls_ca),
        ) as admin:
            try:
                result: Result = args.run(admin, args)
            except ServerRefused as error:
                if error.code != grpc.StatusCode.UNAUTHENTICATED:
                    raise
                # budgetd's text tells gRPC clients which metadata to send; say instead
                # which key budgetctl sent, or where it looked for one.
                hint = unauthenticated_hint(key, here)
                raise ServerRefused(error.code, f"{error}\n  {hint}") from None
    except UsageError as error:
        args.command_parser.print_usage(sys.stderr)
        print(f"{args.command_parser.prog}: error: {error}", file=sys.stderr)
        return error.exit_code
    except CtlError as error:
        print(f"budgetctl: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    return _emit(result, as_json=bool(args.json))


def _emit(result: Result, *, as_json: bool) -> int:
    text = json.dumps(result.doc, indent=2, ensure_ascii=False) if as_json else result.text
    try:
        print(text, flush=True)
    except BrokenPipeError:
        # `budgetctl ledger ... | head`: the reader left. Point stdout at /dev/null so
        # the interpreter's final flush does not raise again (Python's signal docs).
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main())
