"""A fleet behind vLLM's own router: which policy keeps conversations on the replica holding their cache.

    .venv/bin/python -m benchmarks.fleet --replicas 3 --conversations 6 --turns 5

Starts ``--replicas`` servers (``--n-threads`` each: on a small machine they share its cores, as pods share a node)
and, for each policy in turn, ``vllm-router`` (the PyPI wheel the test extra pins) in front of them; runs
``--conversations`` conversations at once, each ``--turns`` turns in order, behind one system prompt of ~250 tokens
(what a deployed assistant sends) and each with ~150 tokens of its own in its first turn, streamed through OpenAI's
chat API. Reported per policy: the share of later
turns' history found cached, the time to first token of later turns (p50, p90), the share of requests the busiest
replica served, and the wall time; and TTFT p50 over round robin's. Every conversation of a policy opens with a new
visitor number, so no policy finds another's cache.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import threading
import time
from collections import Counter
from contextlib import ExitStack
from pathlib import Path

import httpx

from benchmarks.common import free_port, iter_sse, our_server_cmd, percentile, running

ROUTER = str(Path(sys.executable).parent / "vllm-router")
SYSTEM = ("You are the help desk of the public library of a small town. Answer in one short, friendly sentence. "
          + " ".join(f"Rule {i}: the library opens at nine, closes at six, lends books for three weeks, renews them "
                     "twice, and has a quiet reading room on the first floor beside the map collection."
                     for i in range(8)))
QUESTIONS = ["When do you open?", "How long can I keep a book?", "Can I renew it?", "Where can I read quietly?",
             "Do you have maps?", "Is there wifi?", "Thanks, bye!"]
# name: (router flags, whether the client sends a session header)
POLICIES: dict[str, tuple[list[str], bool]] = {
    "round_robin": (["--policy", "round_robin"], False),
    "power_of_two": (["--policy", "power_of_two"], False),
    "cache_aware": (["--policy", "cache_aware", "--balance-abs-threshold", "1", "--balance-rel-threshold", "1.0",
                     "--cache-threshold", "0.5"], False),
    "sticky_least_loaded": (["--policy", "sticky_least_loaded"], True),
}


def converse(url: str, visitor: str, turns: int, session: bool, out: list[dict[str, float]],
             max_tokens: int = 32) -> None:
    history = [{"role": "system", "content": SYSTEM}]
    headers = {"X-Session-ID": visitor} if session else {}
    with httpx.Client(base_url=url, timeout=600, headers=headers) as client:
        for turn in range(turns):
            question = QUESTIONS[turn % len(QUESTIONS)]
            if turn == 0:  # what makes a conversation its own: the visitor's own text (~150 tokens), then questions
                question = f"I am {visitor}. " + " ".join(
                    f"My note {i} on {visitor}: I borrowed book {i} of the series last spring and liked chapter {i}."
                    for i in range(6)) + " " + question
            history.append({"role": "user", "content": question})
            started = time.perf_counter()
            first, text, usage = None, "", {}
            body = {"model": "m", "messages": history, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                    "stream_options": {"include_usage": True}, "user": visitor}
            with client.stream("POST", "/v1/chat/completions", json=body) as resp:
                resp.raise_for_status()
                for at, _event, data in iter_sse((chunk, time.perf_counter()) for chunk in resp.iter_bytes()):
                    if data == "[DONE]":
                        break
                    chunk = json.loads(data)
                    if chunk.get("usage"):
                        usage = chunk["usage"]
                    for choice in chunk.get("choices") or []:
                        piece = (choice.get("delta") or {}).get("content") or ""
                        if piece and first is None:
                            first = at
                        text += piece
            history.append({"role": "assistant", "content": text})
            if turn:
                history_tokens = usage["prompt_tokens"] - 20  # about this turn's own new tokens
                cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
                out.append({"ttft_s": (first or time.perf_counter()) - started,
                            "cached_share": min(1.0, cached / max(1, history_tokens))})


def served_by(logs: list[Path]) -> list[int]:
    return [p.read_text(errors="replace").count("path=/v1/chat/completions status=200") for p in logs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--n-threads", type=int, default=1)
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--ctx-size", type=int, default=8192)
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens an answer")
    parser.add_argument("--server-args", default="", help="more flags for each replica (e.g. --chat-template FILE "
                        "for a GGUF without one, as the 7B shape)")
    parser.add_argument("--model-path", help="GGUF of every replica (default: the embedded model)")
    parser.add_argument("--conversations", type=int, default=6)
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--out", default="benchmarks/results/fleet.json")
    parser.add_argument("--logs", default="/tmp/fleet-logs")
    args = parser.parse_args()
    if not Path(ROUTER).exists() and shutil.which("vllm-router") is None:
        sys.exit("vllm-router is not installed (pip install -e '.[test]' pins it)")
    logs = Path(args.logs)
    logs.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, float]] = {}
    with ExitStack() as stack:
        urls, log_paths = [], []
        for i in range(args.replicas):
            port = free_port()
            model = ["--model-path", args.model_path] if args.model_path else []
            log_paths.append(logs / f"replica-{i}.log")
            stack.enter_context(running(our_server_cmd(port, *model, "--n-threads", str(args.n_threads), "--parallel",
                                                       str(args.parallel), "--ctx-size", str(args.ctx_size),
                                                       "--queue-size", "32", *args.server_args.split()),
                                        f"http://127.0.0.1:{port}/ready", timeout=900, log_path=str(log_paths[-1])))
            urls.append(f"http://127.0.0.1:{port}")
        for name in args.policies.split(","):
            flags, session = POLICIES[name]
            port = free_port()
            router = [ROUTER, "--host", "127.0.0.1", "--port", str(port), *flags, "--worker-urls", *urls]
            before = served_by(log_paths)
            with running(router, f"http://127.0.0.1:{port}/readiness", timeout=60):
                turns: list[dict[str, float]] = []
                started = time.perf_counter()
                threads = [threading.Thread(target=converse, args=(f"http://127.0.0.1:{port}", f"{name}-visitor-{n}",
                                                                   args.turns, session, turns, args.max_tokens))
                           for n in range(args.conversations)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                wall = time.perf_counter() - started
            served = [b - a for a, b in zip(before, served_by(log_paths), strict=True)]
            ttfts = [t["ttft_s"] for t in turns]
            results[name] = {
                "later_turns": len(turns),
                "cached_share": sum(t["cached_share"] for t in turns) / max(1, len(turns)),
                "ttft_p50_ms": percentile(ttfts, 0.5) * 1000, "ttft_p90_ms": percentile(ttfts, 0.9) * 1000,
                "busiest_share": max(served) / max(1, sum(served)), "wall_s": wall,
                "served": dict(Counter({f"replica-{i}": n for i, n in enumerate(served)})),  # type: ignore[dict-item]
            }
            print(f"  {name}: {json.dumps(results[name])}", flush=True)
    base = results.get("round_robin", {}).get("ttft_p50_ms")
    print(f"\n{args.replicas} replicas x {args.n_threads} threads x {args.parallel} slots; {args.conversations} "
          f"conversations of {args.turns} turns at once, {args.max_tokens} tokens an answer")
    print("| policy | later turns' history cached | TTFT p50 | TTFT p90 | p50 / round robin | busiest replica | wall |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        ratio = f"{r['ttft_p50_ms'] / base:.2f}x" if base else "-"
        print(f"| {name} | {r['cached_share']:.2f} | {r['ttft_p50_ms']:.0f} ms | {r['ttft_p90_ms']:.0f} ms | {ratio} | "
              f"{r['busiest_share']:.2f} | {r['wall_s']:.1f} s |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "results": results}, indent=2))


if __name__ == "__main__":
    main()
