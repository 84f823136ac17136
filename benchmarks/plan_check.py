"""The capacity planner against the server it plans for, on the same GGUF, in one run.

    .venv/bin/python -m benchmarks.plan_check --gguf /tmp/llama7b-shape/llama-2-7b-shape.Q4_K_M.gguf \\
        --ctx-size 4096 --parallel 4 --n-threads 2

Runs ``llama-inference plan --gguf FILE --calibrate --json`` with the settings given (the planner decodes that very
file, alone and with every slot busy), then starts ``serve`` with exactly the environment the plan printed and
measures what the plan predicted: resident memory (peak RSS of the server while every slot decodes), decode tok/s
of one stream alone, and aggregate tok/s while ``PARALLEL`` streams all decode. Greedy ``ignore_eos`` requests,
so each one decodes exactly ``--tokens`` tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import threading
import time

import httpx
import psutil

from benchmarks.common import REPO, free_port, our_server_cmd, running
from benchmarks.concurrency import run_level, summarize


def peak_rss_while(pid: int, work) -> tuple[object, int]:  # type: ignore[no-untyped-def]
    """Run ``work()`` while sampling ``pid``'s resident memory every 50 ms; its result and the peak in bytes."""
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        proc = psutil.Process(pid)
        while not done.is_set():
            peak = max(peak, proc.memory_info().rss)
            time.sleep(0.05)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        return work(), peak
    finally:
        done.set()
        sampler.join()


def all_decoding_rate(url: str, streams: int, tokens: int) -> float:
    """Aggregate tok/s while ``streams`` greedy streams all decode: their token times, counted over the window
    from the last stream's first token to the first stream's last (prefills, which the planner's figure leaves
    out, fall outside it)."""
    times: list[list[float]] = [[] for _ in range(streams)]

    def one(i: int) -> None:
        body = {"prompt": f"Stream {i}: once upon a time", "max_length": tokens, "temperature": 0,
                "ignore_eos": True, "stream": True}
        with httpx.Client(base_url=url, timeout=900) as client, client.stream("POST", "/generate", json=body) as r:
            for line in r.iter_lines():
                if line.startswith("data:") and '"token"' in line:
                    times[i].append(time.perf_counter())

    workers = [threading.Thread(target=one, args=(i,)) for i in range(streams)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    start, end = max(t[0] for t in times), min(t[-1] for t in times)
    inside = sum(1 for t in times for x in t if start < x <= end)
    return inside / (end - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", required=True)
    parser.add_argument("--ctx-size", default="4096")
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument("--n-threads", default="2")
    parser.add_argument("--tokens", type=int, default=48, help="tokens per request")
    parser.add_argument("--requests-per-client", type=int, default=2)
    args = parser.parse_args()
    settings = ["--ctx-size", args.ctx_size, "--parallel", str(args.parallel), "--n-threads", args.n_threads]
    t0 = time.perf_counter()
    planned = subprocess.run([sys.executable, "-m", "server", "plan", "--gguf", args.gguf, "--calibrate", "--json",
                              "--calibration-threads", args.n_threads, *settings],
                             cwd=REPO, capture_output=True, text=True, check=True)
    plan = json.loads(planned.stdout)
    print(f"plan (with calibration) took {time.perf_counter() - t0:.0f} s; env: {plan['env']}", flush=True)
    env = {**plan["env"], "MODEL_PATH": args.gguf}  # no flags: the plan's environment alone sets the server up
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    extra: dict[str, object] = {"ignore_eos": True, "stream_options": {"include_usage": True}}
    with running(our_server_cmd(port), url + "/ready", env=env, timeout=900) as proc:
        asyncio.run(run_level(url, "openai", 1, 1, 4, extra=extra))  # warm-up
        alone = summarize("alone", 1, *asyncio.run(run_level(url, "openai", 1, args.requests_per_client,
                                                             args.tokens, extra=extra)))
        busy, peak = peak_rss_while(proc.pid, lambda: all_decoding_rate(url, args.parallel, args.tokens))
    rows = [
        # A short run leaves the host-memory prompt cache empty: what it will hold is not resident yet.
        ("resident memory GiB (prompt cache empty)", plan["memory_gib"]["total"] - plan["memory_gib"]["prompt_cache"],
         peak / 2**30, 0.10),
        ("decode tok/s, one stream", plan["decode_tps"], alone.per_stream_tps, 0.15),
        (f"aggregate tok/s, {args.parallel} streams", plan["aggregate_tps"], busy, 0.15),
    ]
    print(f"\n{args.gguf}: {' '.join(settings)}; {args.tokens} greedy tokens per request\n")
    print("| quantity | planned | measured | planned / measured - 1 | target |")
    print("|---|---|---|---|---|")
    for name, predicted, measured, tolerance in rows:
        error = predicted / measured - 1
        mark = "within" if abs(error) <= tolerance else "OUTSIDE"
        print(f"| {name} | {predicted:.2f} | {measured:.2f} | {error:+.0%} | {mark} {tolerance:.0%} |")
    print("\nplan assumptions:\n- " + "\n- ".join(plan["assumptions"]))


if __name__ == "__main__":
    main()
