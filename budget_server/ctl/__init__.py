"""budgetctl: the operators' command line for budgetd's AdminService.

    main.py      runs one command, prints its result, maps failures to exit codes
                 (0 ok, 1 ledger drift, 2 error, 3 budgetd unreachable, 130 Ctrl-C)
    parser.py    the argparse tree: every command, its help and its examples
    commands.py  one function per command: call budgetd, build the result
    rpc.py       the gRPC channel, a deadline on every call, page-token following
    credentials.py  the API key to send and where it came from (flags, variables, file)
    failures.py  the exceptions budgetctl reports, and gRPC statuses turned into them
    amounts.py   amounts parsed and shown exactly (tokens, nano-dollars as dollars)
    times.py     ISO 8601 in, microseconds since the epoch out, and back
    render.py    tables for people, JSON documents for scripts
    tables.py    column alignment

Nothing here is imported by this package's `__init__`, so `python -m budget_server.ctl.main`
runs main.py once, as `__main__`, without runpy's double-import warning.
"""
