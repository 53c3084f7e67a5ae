"""budgetd's benchmarks: each measure runs budgetd beside its own limit in the same run.

`python -m bench.run --mode full|quick|smoke` starts every process it needs (budgetd,
the bare gRPC service that is its ceiling, the naive ledger, the fake OpenAI server, load
generators), prints a table and writes `bench/results/<name>.json`.
"""

import os

# This process talks gRPC while it starts others (fork, then exec). gRPC's fork handlers,
# on by default in its core, then run in the child between fork and exec, and with other
# threads inside gRPC they can crash it (SIGSEGV before the child's Python starts:
# grpc/grpc#13873, #31885). Nothing here needs gRPC in a forked child, so they are off.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
