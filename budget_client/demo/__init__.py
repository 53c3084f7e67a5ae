"""`make demo`: watch budgetd count streamed tokens and cut streams off, live.

    python -m budget_client.demo [--budget 3000] [--apps 3] [--rate 100] [--duration-limit 120]

The demo starts budgetd (SQLite in a temporary directory), a local OpenAI-compatible
server that streams real tokens at a set rate, and one shared HARD budget; then several
app processes, each an ordinary `openai.AsyncOpenAI` app wrapped by `wrap_openai`, stream
replies of different lengths against that budget until it is gone. On a terminal it
redraws a live view ten times a second (per app: the stream's tokens counted and its
state; the budget as a bar; budgetd's events); elsewhere it prints plain lines. It ends
with a summary: what each app was charged, the ledger's own verification, and what the
server really sent against what was charged; the last line is `SUMMARY {json}`.

Parts, one job each:

    _run        the conductor: options, child processes, gRPC, the end and the summary
    _app        one app instance (a separate process)
    _protocol   the JSON lines an app reports on its stdout
    _children   starting and stopping child processes
    _state      what the demo knows, from the apps and from budgetd
    _render     the live frame, plain lines and the summary text
    _summary    the result, for people and as JSON

Nothing is imported here: `python -m budget_client.demo._app` runs an app with this package
imported first, and the app module must not be imported before it runs as `__main__`.
"""
