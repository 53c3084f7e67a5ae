"""budgetctl's command line: every command, its options, its help and examples.

Global options (--server, --timeout, --json) are accepted before or after the command,
because operators type `budgetctl budgets list --json` as often as `budgetctl --json ...`.
The copies on the subcommands default to SUPPRESS so that, when absent, they do not
overwrite the value parsed before the command.

Command groups (prices, keys, report, webhooks, alerts, watch) live in their own modules,
each registered by one `add_parser(top)` line in `build_parser`.

--server, --api-key and --api-key-file default to None/"" rather than to their variables:
main reads the environment after parsing, so a message can name the variable a bad value
came from and a refused key can be traced to its source (credentials.py).
"""

from __future__ import annotations

import argparse
import os
import textwrap
from collections.abc import Mapping
from typing import Final

from budget_server.ctl import (
    alerts_cmd,
    commands,
    keys_cmd,
    prices_cmd,
    report_cmd,
    watch_cmd,
    webhooks_cmd,
)
from budget_server.ctl.credentials import API_KEY_FILE_DEFAULT
from budget_server.ctl.failures import CtlError
from budget_server.ctl.rpc import TIMEOUT_DEFAULT_S
from budget_server.ctl.times import parse_time

SERVER_DEFAULT: Final = "127.0.0.1:50051"
PORT_MAX: Final = 65535
ROWS_DEFAULT: Final = 100
THRESHOLD_PCT_MAX: Final = 1000
DESCRIPTION_WIDTH: Final = 88

_FORMATTER = argparse.RawDescriptionHelpFormatter

DESCRIPTION = """\
Operate budgetd: create and change budgets, look at their figures, reservations and
ledger entries, and check that the running figures agree with the ledger.

Amounts are typed in the budget's unit: tokens as whole numbers (250000, 250_000,
250k, 1.5M), USD as dollars exact to the nano-dollar (12.50, $0.002).
"""

EPILOG = """\
examples:
  budgetctl budgets create org:acme --limit '$500' --unit usd --period month
  budgetctl budgets create org:acme/team:search --parent org:acme --limit 2M
  budgetctl budgets list --prefix org:acme/
  budgetctl --json budgets show org:acme/team:search
  budgetctl ledger org:acme/team:search --kind commit --since 2026-12-01
  budgetctl verify

exit status:
  0  done            1  verify found drift between the figures and the ledger
  2  error (bad arguments, or budgetd refused: the status is printed)
  3  budgetd could not be reached (not running, wrong --server, or too slow)

--json prints one JSON document on stdout: budget.proto's messages with their .proto
field names, enums by name, 64-bit integers as numbers, amounts in the budget's unit
(tokens, or nano-dollars for UNIT_USD). See budget_server/ctl/render.py for each shape.
"""


def thresholds_arg(text: str) -> list[int]:
    """`50,70,90,100` -> [50, 70, 90, 100]; `none` -> [] (no alerts)."""
    if text.strip().lower() == "none":
        return []
    values = []
    for part in text.split(","):
        part = part.strip().removesuffix("%")
        if not part.isdigit() or not 1 <= int(part) <= THRESHOLD_PCT_MAX:
            raise argparse.ArgumentTypeError(
                f"{text!r}: give percentages between 1 and {THRESHOLD_PCT_MAX} separated by "
                "commas, e.g. 50,80,100, or 'none'"
            )
        values.append(int(part))
    return values


def time_arg(text: str) -> int:
    try:
        return parse_time(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def count_arg(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of 1 or more")
    return int(text)


def seconds_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return value


def server_arg(text: str) -> str:
    """HOST:PORT, refused without a numeric port.

    gRPC reads a bare host as port 443, so `--server 127.0.0.1` would quietly try a port
    budgetd does not listen on and fail as "cannot reach budgetd", pointing nowhere near
    the missing port. An IPv6 host goes in brackets, as gRPC wants: [::1]:50051.
    """
    host, colon, port = text.rpartition(":")
    numeric = port.isascii() and port.isdigit() and 1 <= int(port) <= PORT_MAX
    bracketed = host.startswith("[") and host.endswith("]")
    if not (colon and host and numeric) or (":" in host and not bracketed):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not HOST:PORT with a numeric port, e.g. 127.0.0.1:50051 "
            "([::1]:50051 for IPv6)"
        )
    return text


def server_from(environ: Mapping[str, str]) -> str:
    """--server's value when it is not given: BUDGETD_SERVER, else the first address of
    BUDGETD_ADDRESS (the client library's variable, a comma-separated list of replicas;
    budgetctl needs one), else SERVER_DEFAULT. A bad value is an error naming its variable."""
    for name, value in [
        ("BUDGETD_SERVER", environ.get("BUDGETD_SERVER", "")),
        ("BUDGETD_ADDRESS", environ.get("BUDGETD_ADDRESS", "").split(",")[0].strip()),
    ]:
        if value:
            try:
                return server_arg(value)
            except argparse.ArgumentTypeError as error:
                raise CtlError(f"{name}: {error}") from None
    return SERVER_DEFAULT


def _global_options(parser: argparse.ArgumentParser, *, top_level: bool) -> None:
    def default(value: object) -> object:
        return value if top_level else argparse.SUPPRESS

    group = parser.add_argument_group("global options")
    group.add_argument(
        "--server",
        metavar="HOST:PORT",
        type=server_arg,
        default=default(None),
        help="budgetd's address (env BUDGETD_SERVER, else the first address of "
        f"BUDGETD_ADDRESS as the client library reads it; default {SERVER_DEFAULT})",
    )
    group.add_argument(
        "--api-key",
        metavar="KEY",
        default=default(""),
        help="API key (env BUDGETD_API_KEY; default: the key in --api-key-file)",
    )
    group.add_argument(
        "--api-key-file",
        metavar="PATH",
        default=default(""),
        help="file holding the API key, e.g. the admin key budgetd wrote on first start "
        f"(env BUDGETD_API_KEY_FILE; default {API_KEY_FILE_DEFAULT} in the current "
        "directory, used if it exists)",
    )
    group.add_argument(
        "--tls",
        action="store_true",
        default=default(False),
        help="connect over TLS, trusting the system's CAs (or --tls-ca)",
    )
    group.add_argument(
        "--tls-ca",
        metavar="PEM",
        default=default(os.environ.get("BUDGETD_TLS_CA", "")),
        help="CA bundle to trust for budgetd's certificate (implies --tls)",
    )
    group.add_argument(
        "--timeout",
        metavar="SECONDS",
        type=seconds_arg,
        default=default(TIMEOUT_DEFAULT_S),
        help=f"give up on a call after this long (default {TIMEOUT_DEFAULT_S:g})",
    )
    group.add_argument(
        "--json",
        action="store_true",
        default=default(False),
        help="print one JSON document for scripts instead of tables",
    )


def _command(
    commands_group: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    run: commands.Command,
    *,
    summary: str,
    description: str,
    examples: str,
) -> argparse.ArgumentParser:
    sub = commands_group.add_parser(
        name,
        help=summary,
        description=textwrap.fill(description, DESCRIPTION_WIDTH),
        epilog="examples:\n" + examples,
        formatter_class=_FORMATTER,
    )
    _global_options(sub, top_level=False)
    # main reports a UsageError raised by `run` through this parser's usage line.
    sub.set_defaults(run=run, command_parser=sub)
    return sub


def _page_size_option(parser: argparse.ArgumentParser, default: int) -> None:
    # Hidden: rows per call only matter to tests and to debugging budgetd's paging.
    parser.add_argument("--page-size", type=count_arg, default=default, help=argparse.SUPPRESS)


def _add_budgets(top: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    budgets = top.add_parser(
        "budgets",
        help="create, list, show, change, freeze and delete budgets",
        description="Create, list, show, change, freeze and delete budgets.",
        formatter_class=_FORMATTER,
    )
    actions = budgets.add_subparsers(dest="action", metavar="ACTION", required=True)

    create = _command(
        actions,
        "create",
        commands.budgets_create,
        summary="create a budget",
        description="Create a budget. A charge must fit in the budget and in every ancestor.",
        examples="""\
  budgetctl budgets create org:acme --unit usd --limit '$500' --period month --tz Europe/Paris
  budgetctl budgets create org:acme/team:search --parent org:acme --limit 1.5M
  budgetctl budgets create org:acme/team:lab --parent org:acme --limit 250k --mode soft \\
      --thresholds 80,100
""",
    )
    create.add_argument("id", metavar="ID", help="the budget's id, e.g. org:acme/team:search")
    create.add_argument(
        "--limit",
        required=True,
        metavar="AMOUNT",
        help="tokens (250000, 250_000, 250k, 1.5M) or, with --unit usd, dollars (12.50 or "
        "'$12.50', up to 9 decimals)",
    )
    create.add_argument("--parent", metavar="ID", help="the parent budget (default: a root)")
    create.add_argument(
        "--unit", choices=sorted(commands.UNITS), default="tokens", help="(default: tokens)"
    )
    create.add_argument(
        "--period",
        choices=list(commands.PERIODS),
        default="none",
        help="spend resets at each calendar day, ISO week or month (default: none, never)",
    )
    create.add_argument(
        "--tz",
        metavar="ZONE",
        default="UTC",
        help="IANA time zone the period's calendar follows, e.g. Europe/Paris (default: UTC)",
    )
    create.add_argument(
        "--mode",
        choices=list(commands.MODES),
        default="hard",
        help="hard refuses grants past the limit and aborts streams; soft only alerts "
        "(default: hard)",
    )
    create.add_argument(
        "--thresholds",
        metavar="PCT,...",
        type=thresholds_arg,
        help="alert at these percentages of the limit (default: 50,70,90,100)",
    )

    listing = _command(
        actions,
        "list",
        commands.budgets_list,
        summary="list budgets with their figures",
        description="List budgets in id order, with limit, spent, reserved, available and "
        "the share of the limit spent (USED).",
        examples="""\
  budgetctl budgets list
  budgetctl budgets list --prefix org:acme/ --all
  budgetctl --json budgets list --all | jq '.budgets[] | select(.frozen)'
""",
    )
    listing.add_argument("--prefix", default="", help="only ids starting with this")
    listing.add_argument(
        "--all",
        action="store_true",
        help=f"follow every page (default: the first {ROWS_DEFAULT} budgets)",
    )
    _page_size_option(listing, ROWS_DEFAULT)

    show = _command(
        actions,
        "show",
        commands.budgets_show,
        summary="show one budget and its ancestors",
        description="Show one budget's every figure and setting, then its ancestors, "
        "parent first: a grant must fit in each of them.",
        examples="  budgetctl budgets show org:acme/team:search\n",
    )
    show.add_argument("id", metavar="ID")

    update = _command(
        actions,
        "update",
        commands.budgets_update,
        summary="change a budget's limit, mode, alerts or freeze it",
        description="Change a budget. Freezing refuses every new grant and aborts the "
        "budget's open streams; lowering the limit below what is spent does the same.",
        examples="""\
  budgetctl budgets update org:acme --limit '$750'
  budgetctl budgets update org:acme/team:lab --mode hard --thresholds 50,90
  budgetctl budgets update org:acme/team:lab --freeze
""",
    )
    update.add_argument("id", metavar="ID")
    update.add_argument(
        "--limit", metavar="AMOUNT", help="the new limit, in the budget's unit (as for create)"
    )
    update.add_argument("--mode", choices=list(commands.MODES))
    update.add_argument(
        "--thresholds", metavar="PCT,...", type=thresholds_arg, help="or 'none' for no alerts"
    )
    freeze = update.add_mutually_exclusive_group()
    freeze.add_argument(
        "--freeze", dest="frozen", action="store_const", const=True, help="refuse every grant"
    )
    freeze.add_argument(
        "--unfreeze", dest="frozen", action="store_const", const=False, help="grant again"
    )

    freeze_now = _command(
        actions,
        "freeze",
        commands.budgets_freeze,
        summary="stop a budget now: refuse grants, abort its open streams",
        description="Freeze a budget: every new grant on it (and on its descendants) is "
        "refused, and budgetd aborts its open meter streams on every replica, telling each "
        "the reason. Reservations already granted can still be committed.",
        examples="""\
  budgetctl budgets freeze org:acme/team:lab --reason 'runaway agent, incident 4711'
""",
    )
    freeze_now.add_argument("id", metavar="ID")
    freeze_now.add_argument(
        "--reason",
        metavar="TEXT",
        default="",
        help=f"why, sent with each aborted stream (up to {commands.FREEZE_REASON_LENGTH_MAX} "
        "characters)",
    )

    unfreeze = _command(
        actions,
        "unfreeze",
        commands.budgets_unfreeze,
        summary="grant on a frozen budget again",
        description="Unfreeze a budget: it grants again. Streams aborted by the freeze stay "
        "aborted.",
        examples="  budgetctl budgets unfreeze org:acme/team:lab\n",
    )
    unfreeze.add_argument("id", metavar="ID")

    delete = _command(
        actions,
        "delete",
        commands.budgets_delete,
        summary="retire a budget for good",
        description="Delete a budget. Refused while it has child budgets or open "
        "reservations. Its ledger entries stay, but every call on it is refused and the id "
        "can never be created again, so budgetctl asks first; scripts (--json, or no "
        "terminal on stdin) must pass --yes.",
        examples="""\
  budgetctl budgets delete org:acme/team:old
  budgetctl budgets delete org:acme/team:old --yes
""",
    )
    delete.add_argument("id", metavar="ID")
    delete.add_argument("--yes", action="store_true", help="do not ask for confirmation")


def _add_reservations(top: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    sub = _command(
        top,
        "reservations",
        commands.reservations,
        summary="list a budget's reservations (holds)",
        description="List a budget's reservations, oldest first: what each was granted, "
        "what it was charged, and its token counts.",
        examples="""\
  budgetctl reservations org:acme/team:search --state pending
  budgetctl --json reservations org:acme/team:search --limit 1000
""",
    )
    sub.add_argument("id", metavar="ID", help="the budget")
    sub.add_argument("--state", choices=list(commands.STATES), help="only this state")
    sub.add_argument(
        "--limit",
        metavar="N",
        type=count_arg,
        default=ROWS_DEFAULT,
        help=f"at most N reservations (default {ROWS_DEFAULT})",
    )
    _page_size_option(sub, ROWS_DEFAULT)


def _add_ledger(top: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    sub = _command(
        top,
        "ledger",
        commands.ledger,
        summary="list a budget's ledger entries",
        description="List a budget's ledger entries, oldest first. Each shows the figure it "
        "is about (grant, charge, new limit) and its changes to spent, reserved and "
        "overage. Times without an offset are UTC.",
        examples="""\
  budgetctl ledger org:acme/team:search
  budgetctl ledger org:acme/team:search --kind commit --since 2026-12-01 --until 2026-12-02
  budgetctl ledger org:acme/team:search --since 2026-12-01T09:30:00+01:00 --limit 5000
""",
    )
    sub.add_argument("id", metavar="ID", help="the budget")
    sub.add_argument("--kind", choices=list(commands.KINDS), help="only this kind of entry")
    sub.add_argument(
        "--since", metavar="TIME", type=time_arg, help="from this ISO 8601 time (inclusive)"
    )
    sub.add_argument(
        "--until", metavar="TIME", type=time_arg, help="up to this ISO 8601 time (exclusive)"
    )
    sub.add_argument(
        "--limit",
        metavar="N",
        type=count_arg,
        default=ROWS_DEFAULT,
        help=f"at most N entries (default {ROWS_DEFAULT})",
    )
    _page_size_option(sub, ROWS_DEFAULT)


def _add_verify(top: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    sub = _command(
        top,
        "verify",
        commands.verify,
        summary="check the running figures against the ledger",
        description="Recompute spent, reserved and overage from the ledger entries and the "
        "open holds, and report every figure that differs. Exit status 1 when any does.",
        examples="""\
  budgetctl verify
  budgetctl verify org:acme/team:search || page-the-on-call
""",
    )
    sub.add_argument("id", metavar="ID", nargs="?", help="one budget (default: all)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="budgetctl",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=_FORMATTER,
    )
    _global_options(parser, top_level=True)
    top = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_budgets(top)
    _add_reservations(top)
    _add_ledger(top)
    _add_verify(top)
    prices_cmd.add_parser(top)
    keys_cmd.add_parser(top)
    report_cmd.add_parser(top)
    webhooks_cmd.add_parser(top)
    alerts_cmd.add_parser(top)
    watch_cmd.add_parser(top)
    return parser
