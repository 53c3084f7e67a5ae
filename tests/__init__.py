"""budgetd's tests. This runs before any test module imports gRPC."""

import os

# Tests talk gRPC while they start servers and clients as processes (fork, then exec). gRPC's
# fork handlers, on by default in its core, can crash the child between fork and exec when
# other threads are inside gRPC (see bench/__init__.py), and no child needs them: off.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
