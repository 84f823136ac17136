"""How long a running stream stalls while a long prompt arrives beside it, for several PREFILL_BUDGET values.

    .venv/bin/python -m benchmarks.prefill_gap                      # embedded model, budgets 0 (measured) and 512
    .venv/bin/python -m benchmarks.prefill_gap --model-path M.gguf --prompt-words 750 --threads 2

One server per budget, all up for the whole run; rounds alternate between them. Each round streams a greedy
request, and once it runs steadily sends a long prompt (``max_length`` 1, no prompt cache) on a second
connection. Reported per budget (medians over rounds): the stream's steady inter-token gap before the prompt
arrived, its worst gap while the prompt was prefilled, their ratio, and the long prompt's time to first token.
Token times are taken at the client as the events arrive.

With ``--step-costs`` it first measures, in process, what a step costs: one generating stream alone, then with
1, 2, 4... prompt tokens of another sequence beside it (best of 7): the numbers the measured budget works from.

With ``--levels`` it also measures what the budget costs in throughput: streamed greedy requests from 1, 2, 4...
concurrent clients (``benchmarks.concurrency``'s load), aggregate tok/s and TTFT per budget, alternating.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import threading
import time

import httpx

from benchmarks.common import free_port, our_server_cmd, running
from benchmarks.concurrency import run_level, summarize

STEADY_TOKENS = 30
AFTER_TOKENS = 20  # the steady gap after the prefill: the median of this many


def _stream(url: str, path: str, body: dict[str, object], marker: str, times: list[float],
            steady: threading.Event, stop: threading.Event) -> None:
    """Stream ``body``, appending each token's arrival time to ``times``; ``steady`` is set after STEADY_TOKENS
    (or at the end), and the stream ends early once ``stop`` is set."""
    try:
        with httpx.Client(base_url=url, timeout=900) as client, client.stream("POST", path, json=body) as r:
            if r.status_code != 200:
                raise RuntimeError(f"{url}{path}: {r.status_code} {r.read().decode()[:300]}")
            for line in r.iter_lines():
                if line.startswith("data:") and marker in line:
                    times.append(time.perf_counter())
                    if len(times) == STEADY_TOKENS:
                        steady.set()
                if stop.is_set():
                    break
    finally:
        steady.set()


def _stream_body(api: str, model: str, n_tokens: int) -> tuple[str, str, dict[str, object]]:
    """(path, marker of a token's event, body) of a greedy stream of ``n_tokens`` through ``api``."""
    if api == "native":
        return "/generate", '"token"', {"prompt": "Once upon a time", "max_length": n_tokens, "temperature": 0,
                                        "ignore_eos": True, "stream": True}
    return "/v1/completions", '"choices"', {"model": model, "prompt": "Once upon a time", "max_tokens": n_tokens,
                                            "temperature": 0, "ignore_eos": True, "stream": True}


def _gap_stats(before: list[float], during: list[tuple[int, float]], after: list[float]) -> dict[str, float]:
    """A stream's gaps while something happened (``during``: (token index, gap)) against its steady gap before and
    after. A stream's own steps slow down as its context grows, so each gap is also compared with the steady gap
    at its length: from the middle of the ``before`` window to the end of ``during``, by tokens."""
    steady = statistics.median(before)
    steady_after = statistics.median(after) if len(after) >= 5 else steady
    i0, i1 = STEADY_TOKENS // 2, (during[-1][0] + 1) if during else 1

    def steady_at(i: int) -> float:
        return steady + (steady_after - steady) * min(max((i - i0) / max(i1 - i0, 1), 0.0), 1.0)

    gaps = sorted(g for _, g in during)
    own = [g / steady_at(i) for i, g in during]
    worst = gaps[-1] if gaps else steady
    return {"steady_ms": steady * 1000, "steady_after_ms": steady_after * 1000, "worst_ms": worst * 1000,
            "ratio": worst / steady, "ratio_at_length": max(own) if own else 1.0, "tokens_during": len(during),
            "median_during_ratio": statistics.median(gaps) / steady if gaps else 0.0,
            "p90_during_ratio": gaps[int(0.9 * (len(gaps) - 1))] / steady if gaps else 0.0,
            "median_at_length": statistics.median(own) if own else 0.0}


def quiet_round(url: str, n_gaps: int, api: str = "native", model: str = "any") -> dict[str, float]:
    """The control for :func:`one_round`: the same stream alone, for as many gaps as one_round's prefill lasted,
    measured the same way: what this machine's own hiccups give with no prompt beside the stream."""
    n_gaps = max(n_gaps, 1)
    times: list[float] = []
    path, marker, body = _stream_body(api, model, STEADY_TOKENS + n_gaps + AFTER_TOKENS + 3)
    _stream(url, path, body, marker, times, threading.Event(), threading.Event())
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    first = STEADY_TOKENS - 1  # the gap that ends at the token one_round sends its prompt after
    before = gaps[5:first]
    if len(before) < 5 or len(gaps) < first + n_gaps:
        raise RuntimeError(f"{url}: the quiet stream gave {len(times)} tokens")
    during = list(enumerate(gaps))[first:first + n_gaps]
    return _gap_stats(before, during, gaps[first + n_gaps:][2:AFTER_TOKENS + 2])


def one_round(url: str, long_prompt: str, api: str = "native", model: str = "any",
              stream_tokens: int = 1000) -> dict[str, float]:
    """A greedy stream, then ``long_prompt`` (one token to generate, not cached) on another connection: the
    stream's steady gap before it, its gaps while the prompt was prefilled, its steady gap after, and the prompt's
    TTFT. ``api``: ``native`` (/generate) or ``openai`` (/v1/completions, which llama.cpp's llama-server serves too).

    A stream's own steps grow slower as its context grows (attention reads every cell), and it may grow by the
    prompt's length while a budget prefills it token by token beside it. So each gap during the prefill is also
    compared with the steady gap the stream has at that length (:func:`_gap_stats`), which is what the prefill
    itself adds; ``stream_tokens`` must leave room for ``AFTER_TOKENS`` more tokens after the prefill (else there
    is no "after" and the before gap stands for both)."""
    times: list[float] = []
    steady = threading.Event()
    stop = threading.Event()
    path, marker, stream_body = _stream_body(api, model, stream_tokens)
    long_body: dict[str, object] = {"prompt": long_prompt, "temperature": 0}
    long_body.update({"max_length": 1, "cache_prompt": False} if api == "native" else {"model": model, "max_tokens": 1})
    runner = threading.Thread(target=_stream, args=(url, path, stream_body, marker, times, steady, stop))
    runner.start()
    steady.wait(900)
    t0 = time.perf_counter()
    with httpx.Client(base_url=url, timeout=900) as client:
        answer = client.post(path, json=long_body).json()
    t1 = time.perf_counter()
    n_before_end = len(times)
    while runner.is_alive() and len(times) < n_before_end + AFTER_TOKENS + 5:
        time.sleep(0.05)
    stop.set()
    runner.join(900)
    pairs = list(zip(times, times[1:], strict=False))
    before = [b - a for a, b in pairs if b <= t0][5:]
    # Gaps that overlap the prefill (the one that spans its end included), with the stream's token index.
    during = [(i, b - a) for i, (a, b) in enumerate(pairs) if b > t0 and a < t1]
    after = [b - a for a, b in pairs if a >= t1][2:AFTER_TOKENS + 2]
    if len(before) < 5:
        raise RuntimeError(f"{url}: the stream gave {len(times)} tokens, too few before the long prompt")
    return {"prompt_tokens": answer["usage"]["prompt_tokens"], "ttft_s": t1 - t0,
            **_gap_stats(before, during, after)}


def _step_cost(ctx, batch, tokens: list[int], n: int) -> float:  # type: ignore[no-untyped-def]
    """Best of 7: sequence 0's next token with ``n`` prompt tokens of sequence 1 beside it."""
    best = float("inf")
    for _ in range(7):
        batch.clear()
        batch.add_one(tokens[0], 300, 0)
        if n:
            batch.add(tokens[200:200 + n], 200, 1, True)
        t = time.perf_counter()
        ctx.decode(batch)
        best = min(best, time.perf_counter() - t)
        ctx.seq_rm(0, 300, -1)
        ctx.seq_rm(1, 200, -1)
    return best


def step_costs(model_path: str | None, threads: int, cache_type: str = "f16") -> None:
    """What a step costs, in process: a generating stream alone, then with 1, 2, 4... prompt tokens of another
    sequence beside it (best of 7), with one KV stream per slot (llama.cpp splits such a step into micro-batches
    of equal length per sequence) and with one unified KV cache (one micro-batch), side by side."""
    from server.engine.llama import Batch, LlamaContext, LlamaModel
    from server.model_files import embedded_model_path

    model = LlamaModel(model_path or embedded_model_path(), use_mmap=False)  # type: ignore[arg-type]
    tokens = model.tokenize("The keeper climbed the stairs of the old lighthouse every evening at dusk. " * 40)
    sizes = (0, 1, 2, 3, 4, 6, 8, 16, 64)
    costs: dict[bool, dict[int, float]] = {}
    for unified in (False, True):
        ctx = LlamaContext(model, n_ctx=4096, n_batch=512, n_seq_max=4, n_threads=threads, n_threads_batch=threads,
                           cache_type=cache_type, kv_unified=unified)
        batch = Batch(512)
        for seq, n in ((0, 300), (1, 200)):  # a stream 300 tokens in; another sequence 200 tokens into its prompt
            batch.clear()
            batch.add(tokens[:n], 0, seq, True)
            ctx.decode(batch)

        costs[unified] = {n: _step_cost(ctx, batch, tokens, n) for n in sizes}
        ctx.close()
    model.close()
    print("\n| prompt tokens beside one stream | KV stream per slot: step ms | x a decode step "
          "| unified KV: step ms | x a decode step |\n|---|---|---|---|---|")
    for n in sizes:
        split, one = costs[False][n], costs[True][n]
        print(f"| {n} | {split * 1000:.1f} | {split / costs[False][0]:.2f} | {one * 1000:.1f} | "
              f"{one / costs[True][0]:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", default="0,512", help="PREFILL_BUDGET values (0: measured; empty: none)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompt-words", type=int, default=750, help="about 1,000 tokens")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument("--model-path", default=None)
    parser.add_argument("--levels", default="", help="also measure throughput at these client counts, e.g. 1,2,4")
    parser.add_argument("--tokens", type=int, default=64, help="tokens per request in the throughput levels")
    parser.add_argument("--step-costs", action="store_true", help="first measure step costs in process")
    parser.add_argument("--cache-type", default="f16", help="KV-cache type of the step-cost measurement")
    args = parser.parse_args()
    if args.step_costs:
        step_costs(args.model_path, args.threads, args.cache_type)
    words = "the keeper climbed the stairs of the old lighthouse every evening at dusk and lit the lamp".split()
    long_prompt = " ".join(words[i % len(words)] for i in range(args.prompt_words))
    budgets = [int(b) for b in args.budgets.split(",") if b]
    if not budgets:  # --budgets "": the step costs only
        return
    extra = ["--n-threads", str(args.threads), "--parallel", str(args.parallel)]
    if args.model_path:
        extra += ["--model-path", args.model_path]
    ports = {b: free_port() for b in budgets}
    results: dict[int, list[dict[str, float]]] = {b: [] for b in budgets}
    servers = [running(our_server_cmd(ports[b], *extra, "--prefill-budget", str(b)),
                       f"http://127.0.0.1:{ports[b]}/ready", timeout=600) for b in budgets]
    for server in servers:
        server.__enter__()
    levels = [int(n) for n in args.levels.split(",") if n]
    throughput = []
    try:
        for b in budgets:  # a round per server first, not counted: the first one is slower whichever it is
            one_round(f"http://127.0.0.1:{ports[b]}", long_prompt)
        for _ in range(args.rounds):
            for b in budgets:
                results[b].append(one_round(f"http://127.0.0.1:{ports[b]}", long_prompt))
        for clients in levels:
            for b in budgets:
                samples, errors, wall = asyncio.run(run_level(f"http://127.0.0.1:{ports[b]}", "native", clients, 2,
                                                              args.tokens))
                throughput.append((b, summarize(f"budget {b}", clients, samples, errors, wall)))
    finally:
        for server in servers:
            server.__exit__(None, None, None)
    print("| PREFILL_BUDGET | prompt tokens | steady gap ms | worst gap ms | worst / steady | tokens during prefill "
          "| long prompt TTFT s |")
    print("|---|---|---|---|---|---|---|")
    for b in budgets:
        rows = results[b]

        def med(key: str, rows: list[dict[str, float]] = rows) -> float:
            return statistics.median(r[key] for r in rows)

        print(f"| {b or 'measured (0)'} | {int(med('prompt_tokens'))} | {med('steady_ms'):.1f} | "
              f"{med('worst_ms'):.1f} | {med('ratio'):.2f} | {int(med('tokens_during'))} | {med('ttft_s'):.2f} |")
    if throughput:
        print("\n| clients | PREFILL_BUDGET | aggregate tok/s | per-stream tok/s | TTFT p50 ms | TTFT p95 ms "
              "| errors |")
        print("|---|---|---|---|---|---|---|")
        for b, level in throughput:
            print(f"| {level.clients} | {b or 'measured (0)'} | {level.aggregate_tps} | {level.per_stream_tps} | "
                  f"{level.ttft_p50_ms} | {level.ttft_p95_ms} | {level.errors} |")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
