"""bench/client_cost.py's figures in seconds rather than a minute, for the quick modes.

    python -m bench.cost_sampled --tokens 8000 --runs 3 --json PATH

Same response, same timed passes (its functions are reused); what differs is the check of
exactness: client_cost.py re-encodes the whole text after every chunk (quadratic: about 13
seconds at 8,000 tokens here), this compares the counter with a full encode after every
40th chunk and after the last one. The whitespace flood is left out. `make bench` runs
client_cost.py itself.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import tiktoken

from bench.client_cost import (
    SAMPLE_EVERY,
    english_response,
    incremental_us_per_chunk,
    naive_us_per_chunk,
    prefixes_at,
)
from budget_client._tokenizer import IncrementalTokenCounter, get_encoding_for_model


def exact_at_samples(enc: tiktoken.Encoding, chunks: list[str], every: int) -> bool:
    counter = IncrementalTokenCounter(enc)
    so_far = ""
    for index, chunk in enumerate(chunks):
        so_far += chunk
        count = counter.feed(chunk)
        sampled = index % every == 0 or index == len(chunks) - 1
        if sampled and count != len(enc.encode_ordinary(so_far)):
            return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="gpt-4o")
    parser.add_argument("--tokens", type=int, default=8000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--naive-chunks", type=int, default=100)
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args()
    enc = get_encoding_for_model(args.model)
    chunks = english_response(enc, args.tokens)
    n = len(chunks)
    tail = min(args.naive_chunks, n)
    incremental = incremental_us_per_chunk(enc, chunks, args.runs)
    naive_end = naive_us_per_chunk(enc, prefixes_at(chunks, range(n - tail, n)), args.runs)
    naive_mean = naive_us_per_chunk(enc, prefixes_at(chunks, range(0, n, SAMPLE_EVERY)), args.runs)
    text = "".join(chunks)
    results = {
        "model": args.model,
        "encoding": enc.name,
        "tokens": len(enc.encode_ordinary(text)),
        "chars": len(text),
        "chunks": n,
        "runs": args.runs,
        "incremental_us_per_chunk": round(incremental, 2),
        "naive_us_per_chunk_at_end": round(naive_end, 1),
        "naive_us_per_chunk_stream_mean": round(naive_mean, 1),
        "ratio_at_end": round(naive_end / incremental, 1),
        "ratio_stream_mean": round(naive_mean / incremental, 1),
        "naive_end_chunks_measured": tail,
        "exact_at_samples": exact_at_samples(enc, chunks, SAMPLE_EVERY),
        "exactness_checked": f"after every {SAMPLE_EVERY}th chunk and the last",
    }
    args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
