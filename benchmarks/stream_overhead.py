"""Decode speed of one streaming HTTP client against in-process llama_cpp, on the same model and threads.

    .venv/bin/python -m benchmarks.stream_overhead [--tokens 256] [--rounds 5] [--threads 2]

Both sides generate the same greedy continuation; they run one after the other, alternating, so neither
steals the other's cores. The ratio (HTTP / in-process) should be at least 0.95.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import httpx
from llama_cpp import Llama

from benchmarks.common import free_port, median, our_server_cmd, running, stream_generate
from server.model_files import resolve_model_path

PROMPT = "Write a long story about a lighthouse keeper and the sea. Once upon a time"


def in_process(llm: Llama, prompt: str, max_tokens: int) -> tuple[int, float, str]:
    first = last = None
    n = 0
    parts = []
    for chunk in llm.create_completion(prompt, max_tokens=max_tokens, temperature=0.0, repeat_penalty=1.0,
                                       stream=True):
        choice = chunk["choices"][0]  # type: ignore[index]
        if choice["finish_reason"] is not None and not choice["text"]:
            continue  # the closing chunk carries no token
        now = time.perf_counter()
        first = first or now
        last = now
        n += 1
        parts.append(choice["text"])
    return n, (last - first) if first and last else 0.0, "".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-path", default=None)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    model = str(resolve_model_path(None if args.model_path is None else Path(args.model_path)))

    port = free_port()
    llm = Llama(model, n_ctx=2048, n_threads=args.threads, n_threads_batch=args.threads, flash_attn=True,
                verbose=False)
    http_tps: list[float] = []
    local_tps: list[float] = []
    cmd = our_server_cmd(port, "--model-path", model, "--n-threads", str(args.threads), "--parallel", "1",
                         "--ctx-size", "2048")
    with running(cmd, f"http://127.0.0.1:{port}/ready"), httpx.Client(base_url=f"http://127.0.0.1:{port}",
                                                                        timeout=300) as client:
        stream_generate(client, PROMPT, 16)  # warm-up, both sides
        in_process(llm, PROMPT, 16)
        for i in range(args.rounds):
            # Alternate which side goes first, so a drift in the machine's speed favours neither.
            if i % 2 == 0:
                r = stream_generate(client, PROMPT, args.tokens)
                n, secs, text = in_process(llm, PROMPT, args.tokens)
            else:
                n, secs, text = in_process(llm, PROMPT, args.tokens)
                r = stream_generate(client, PROMPT, args.tokens)
            if text != r.text:
                print("warning: the two sides generated different text")
            http_tps.append(r.decode_tps)
            local_tps.append((n - 1) / secs)
            print(f"  round: http {r.tokens} tok {r.decode_tps:7.1f} tok/s | in-process {n} tok "
                  f"{(n - 1) / secs:7.1f} tok/s")
    llm.close()
    h, lo = median(http_tps), median(local_tps)
    paired = median([a / b for a, b in zip(http_tps, local_tps, strict=True)])
    print(f"model {model}, {args.threads} threads, {args.tokens} tokens, median of {args.rounds} rounds")
    print(f"decode tok/s  HTTP streaming (llama-inference): {h:.1f}")
    print(f"decode tok/s  in-process llama_cpp.Llama:       {lo:.1f}")
    print(f"ratio HTTP / in-process: {paired:.3f} (median of per-round ratios; ratio of medians {h / lo:.3f}); "
          "target >= 0.95")


if __name__ == "__main__":
    main()
