"""Every bound the service enforces, in one place (TigerBeetle style: a limit on everything).

Units go last in names. Amounts are int64 on the wire and BIGINT in SQL, so sums are
capped well below 2**63 to leave room for adding a grant to spent + reserved.
"""

from typing import Final

INT64_MAX: Final = 2**63 - 1
AMOUNT_MAX: Final = 2**62  # any single amount, limit or usage count; sums stay < INT64_MAX
ID_LENGTH_MAX: Final = 128
IDEMPOTENCY_KEY_LENGTH_MAX: Final = 128
MODEL_LENGTH_MAX: Final = 128
LABELS_MAX: Final = 16
LABEL_KEY_LENGTH_MAX: Final = 64
LABEL_VALUE_LENGTH_MAX: Final = 256
THRESHOLDS_MAX: Final = 10
TTL_DEFAULT_MS: Final = 5 * 60 * 1000
TTL_MIN_MS: Final = 1_000
TTL_MAX_MS: Final = 24 * 60 * 60 * 1000
PAGE_SIZE_DEFAULT: Final = 100
PAGE_SIZE_MAX: Final = 1000
CHAIN_DEPTH_MAX: Final = 16  # levels budgets may nest
BATCH_OPS_MAX: Final = 256  # operations one actor applies in one SQL transaction
# Batches of many budgets run together on PostgreSQL (`ledger.group`): this many at most
# in one transaction, and this many such transactions at once per process. One at a time
# let the batches arriving meanwhile form the next, larger group, where several in flight
# split them into small groups and batches run alone: measure 2 on 1,000 budgets, 3
# paired runs, 1 in flight did 1.3x the requests/s of 4, 2 did 1.27x, 8 did 0.92x.
GROUP_BATCHES_MAX: Final = 128
GROUPS_IN_FLIGHT_MAX: Final = 1
ACTOR_QUEUE_MAX: Final = 10_000  # operations waiting on one budget before callers are refused
SWEEP_BATCH_MAX: Final = 500
# HTTP/2 MAX_CONCURRENT_STREAMS: what one connection may have open at once. Unbounded, a
# flood of streams on one connection (rapid reset, CVE-2023-44487; answers never read;
# calls left open) had gRPC cancel other clients' calls. budget_client asks gRPC to open
# more connections when one is full (gRFC A105), so an app is not held to this.
STREAMS_PER_CONNECTION_MAX: Final = 250
# Clients ping every 10 s to notice a dead connection under an idle meter stream (the
# client's grpc.keepalive_time_ms). gRPC servers by default allow one ping without data
# per 5 minutes and answer the third early one with GOAWAY "too_many_pings", which broke
# every idle stream about every 30 s. Half the client's interval, so jitter is no strike.
PING_INTERVAL_WITHOUT_DATA_MIN_MS: Final = 5_000
DEFAULT_THRESHOLDS_PCT: Final = (50, 70, 90, 100)
