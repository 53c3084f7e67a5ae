"""Client CPU cost of counting a streamed response: incremental counter vs re-encoding.

Run: .venv/bin/python bench/client_cost.py [--model gpt-4o] [--tokens 8000] [--json PATH]

The response is ~8,000 tokens of real English (the stdlib's pydoc topics, deterministic)
streamed one token per chunk, as the OpenAI API streams it (~4 characters per chunk).

What is measured, all with time.process_time (CPU of this process):

* incremental: IncrementalTokenCounter.feed over the whole stream; total CPU divided by
  the number of chunks; median of --runs runs.
* naive at N tokens: ``len(enc.encode_ordinary(text_so_far))`` for only the last
  --naive-chunks chunks of the stream, i.e. what one chunk costs once the response is
  N tokens long (the expensive end); median of --runs runs. Timing all chunks would cost
  several seconds per run and show nothing the next figure does not.
* naive stream mean: the same call after every 40th chunk across the stream, averaged:
  the mean per-chunk cost over a whole response of N tokens; median of --runs runs.

A second, adversarial figure: a "whitespace flood" (a run of newlines and spaces, which
JSON-mode models are known to emit until max_tokens) is one pre-tokenizer piece that never
closes, so the counter must re-encode all of it on every chunk. That is the counter's
worst case; it is reported so nobody mistakes the headline ratio for a bound.

Exactness is checked in a separate pass that compares the counter with a full encode
after every chunk, so the timed passes contain no checking work.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import tiktoken

from budget_client._tokenizer import IncrementalTokenCounter, get_encoding_for_model

SAMPLE_EVERY = 40


def english_response(enc: tiktoken.Encoding, n_tokens: int) -> list[str]:
    """The first ``n_tokens`` tokens of English prose, one decoded token per chunk.

    Bytes are held back until they decode, as an API stream must do for tokens that end
    inside a UTF-8 sequence, so a few chunks may carry two tokens.
    """
    from pydoc_data.topics import topics

    corpus = "\n\n".join(topics[key] for key in sorted(topics))
    chunks: list[str] = []
    pending = b""
    for token in enc.encode_ordinary(corpus)[:n_tokens]:
        pending += enc.decode_single_token_bytes(token)
        try:
            chunks.append(pending.decode("utf-8"))
        except UnicodeDecodeError:
            continue
        pending = b""
    return chunks


def cpu_seconds(fn: Callable[[], object]) -> float:
    start = time.process_time()
    fn()
    return time.process_time() - start


def incremental_us_per_chunk(enc: tiktoken.Encoding, chunks: list[str], runs: int) -> float:
    def stream() -> None:
        counter = IncrementalTokenCounter(enc)
        for chunk in chunks:
            counter.feed(chunk)

    return statistics.median(cpu_seconds(stream) for _ in range(runs)) / len(chunks) * 1e6


def naive_us_per_chunk(enc: tiktoken.Encoding, prefixes: list[str], runs: int) -> float:
    def recount() -> None:
        for prefix in prefixes:
            len(enc.encode_ordinary(prefix))

    return statistics.median(cpu_seconds(recount) for _ in range(runs)) / len(prefixes) * 1e6


def prefixes_at(chunks: list[str], positions: range) -> list[str]:
    """The text so far after each chunk index in ``positions`` (built outside timing)."""
    ends, total = [], 0
    for chunk in chunks:
        total += len(chunk)
        ends.append(total)
    text = "".join(chunks)
    return [text[: ends[i]] for i in positions]


def whitespace_flood(chars: int) -> list[str]:
    text = ("\n\n" + " " * 6) * (chars // 8)
    return [text[i : i + 4] for i in range(0, len(text), 4)]


def verify_exact(enc: tiktoken.Encoding, chunks: list[str]) -> None:
    counter = IncrementalTokenCounter(enc)
    so_far = ""
    for i, chunk in enumerate(chunks):
        so_far += chunk
        got, want = counter.feed(chunk), len(enc.encode_ordinary(so_far))
        if got != want:
            raise SystemExit(f"MISCOUNT after chunk {i}: counter {got}, tiktoken {want}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="gpt-4o")
    parser.add_argument("--tokens", type=int, default=8000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--naive-chunks", type=int, default=200)
    parser.add_argument("--flood-chars", type=int, default=8000)
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()

    enc = get_encoding_for_model(args.model)
    chunks = english_response(enc, args.tokens)
    text = "".join(chunks)
    n = len(chunks)
    tail = min(args.naive_chunks, n)

    incremental = incremental_us_per_chunk(enc, chunks, args.runs)
    naive_end = naive_us_per_chunk(enc, prefixes_at(chunks, range(n - tail, n)), args.runs)
    sampled = prefixes_at(chunks, range(0, n, SAMPLE_EVERY))
    naive_mean = naive_us_per_chunk(enc, sampled, args.runs)
    verify_exact(enc, chunks)

    flood = whitespace_flood(args.flood_chars)
    flood_incremental = incremental_us_per_chunk(enc, flood, args.runs)
    flood_naive_end = naive_us_per_chunk(
        enc, prefixes_at(flood, range(len(flood) - min(tail, len(flood)), len(flood))), args.runs
    )
    verify_exact(enc, flood)

    results = {
        "model": args.model,
        "encoding": enc.name,
        "tokens": len(enc.encode_ordinary(text)),
        "chars": len(text),
        "chunks": n,
        "mean_chars_per_chunk": round(len(text) / n, 2),
        "runs": args.runs,
        "incremental_us_per_chunk": round(incremental, 2),
        "naive_us_per_chunk_at_end": round(naive_end, 1),
        "naive_us_per_chunk_stream_mean": round(naive_mean, 1),
        "ratio_at_end": round(naive_end / incremental, 1),
        "ratio_stream_mean": round(naive_mean / incremental, 1),
        "naive_end_chunks_measured": tail,
        "exact_after_every_chunk": True,
        "whitespace_flood_chars": len("".join(flood)),
        "whitespace_flood_incremental_us_per_chunk": round(flood_incremental, 1),
        "whitespace_flood_naive_us_per_chunk_at_end": round(flood_naive_end, 1),
    }
    print(
        f"{results['tokens']} tokens of English ({enc.name}), {n} chunks of "
        f"~{results['mean_chars_per_chunk']} chars, CPU time, median of {args.runs} runs"
    )
    print(f"  incremental counter           {incremental:10.2f} us/chunk")
    print(f"  naive re-encode, at the end   {naive_end:10.1f} us/chunk  (last {tail} chunks)")
    print(f"  naive re-encode, stream mean  {naive_mean:10.1f} us/chunk  (every {SAMPLE_EVERY}th)")
    print(
        f"  ratio naive/incremental       {naive_end / incremental:10.1f}x at the end, "
        f"{naive_mean / incremental:.1f}x over the stream"
    )
    print(f"  exact after every one of {n} chunks: yes")
    print(
        f"worst case, a {results['whitespace_flood_chars']}-char whitespace flood in 4-char "
        f"chunks: incremental {flood_incremental:.1f} us/chunk, naive at the end "
        f"{flood_naive_end:.1f} us/chunk (exact: yes)"
    )
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
