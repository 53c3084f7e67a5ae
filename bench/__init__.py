"""budgetd's benchmarks: each measure runs budgetd beside its own limit in the same run.

`python -m bench.run --mode full|quick|smoke` starts every process it needs (budgetd,
the bare gRPC service that is its ceiling, the naive ledger, the fake OpenAI server, load
generators), prints a table and writes `bench/results/<name>.json`.
"""
