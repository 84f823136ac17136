"""What each API dialect costs over the seed's ``/generate``: one server, one stream at a time, side by side.

    .venv/bin/python -m benchmarks.dialects [--tokens 128] [--rounds 5] [--threads 2]

Every dialect streams the same kind of request to the same server (the embedded model unless ``--model-path``):
greedy, ``--tokens`` at most. The completion dialects (``/generate``, OpenAI completions, Ollama's generate with
``raw``) send a prompt that keeps the model counting; the chat dialects (OpenAI chat, Anthropic Messages, OpenAI
Responses, Ollama's chat) send one user message asking for a long story, which the chat template wraps. Dialects
take turns round by round, in an order rotated each round, prompt cache off. Reported: decode tok/s (first to last
streamed token, at the client) and time to first token, medians, each over its baseline: /generate for the
completion dialects, OpenAI chat for the chat ones (the same rendered prompt).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx

from benchmarks.common import free_port, iter_sse, our_server_cmd, running

PROMPT = "Count from one to two hundred in words, separated by commas: one, two, three, four, five,"
STORY = "Write a long story about a lighthouse keeper and the sea, with many details."  # a long greedy answer
ASK = [{"role": "user", "content": STORY}]
# Each dialect is compared with the one that renders the same prompt: the chat template wraps a chat dialect's
# message (a longer prompt, another answer), so those are compared with OpenAI chat, the rest with /generate.
CHAT_BASE = "OpenAI chat"


def _sse_texts(kind: str) -> Callable[[str, dict[str, object]], str | None]:
    def text(event: str, data: dict) -> str | None:  # type: ignore[type-arg]
        if kind == "generate":
            return data.get("text") if event == "token" else None
        if kind == "completions":
            choices = data.get("choices") or []
            return choices[0].get("text") if choices else None
        if kind == "chat":
            choices = data.get("choices") or []
            return (choices[0].get("delta") or {}).get("content") if choices else None
        if kind == "messages":
            delta = data.get("delta") or {}
            return delta.get("text") if event == "content_block_delta" else None
        if kind == "responses":
            return data.get("delta") if event == "response.output_text.delta" else None
        raise ValueError(kind)
    return text


def _ndjson_text(kind: str) -> Callable[[dict[str, object]], str | None]:
    def text(line: dict) -> str | None:  # type: ignore[type-arg]
        if line.get("done"):
            return None
        return line.get("response") if kind == "ollama_generate" else (line.get("message") or {}).get("content")
    return text


def dialects(tokens: int) -> dict[str, tuple[str, dict[str, object], str]]:
    """name: (path, body, how its stream is read)."""
    greedy = {"temperature": 0}
    return {
        "/generate": ("/generate", {"prompt": PROMPT, "max_length": tokens, "stream": True, **greedy}, "generate"),
        "OpenAI completions": ("/v1/completions", {"model": "m", "prompt": PROMPT, "max_tokens": tokens,
                                                   "stream": True, **greedy}, "completions"),
        "OpenAI chat": ("/v1/chat/completions", {"model": "m", "messages": ASK, "max_tokens": tokens,
                                                 "stream": True, **greedy}, "chat"),
        "Anthropic Messages": ("/v1/messages", {"model": "m", "messages": ASK, "max_tokens": tokens, "stream": True,
                                                **greedy}, "messages"),
        "OpenAI Responses": ("/v1/responses", {"model": "m", "input": STORY, "max_output_tokens": tokens,
                                               "stream": True, **greedy}, "responses"),
        "Ollama generate": ("/api/generate", {"model": "m", "prompt": PROMPT, "raw": True, "stream": True,
                                              "options": {"num_predict": tokens, "repeat_penalty": 1.0, **greedy}},
                            "ollama_generate"),
        "Ollama chat": ("/api/chat", {"model": "m", "messages": ASK, "stream": True,
                                      "options": {"num_predict": tokens, "repeat_penalty": 1.0, **greedy}},
                        "ollama_chat"),
    }


def one(client: httpx.Client, path: str, body: dict[str, object], kind: str) -> tuple[float, float, int]:
    """(time to first token s, decode tok/s, streamed pieces) of one streamed request."""
    started = time.perf_counter()
    times: list[float] = []
    with client.stream("POST", path, json=body) as resp:
        resp.raise_for_status()
        if kind.startswith("ollama"):
            read = _ndjson_text(kind)
            for line in resp.iter_lines():
                if line.strip() and read(json.loads(line)):
                    times.append(time.perf_counter())
        else:
            read_sse = _sse_texts(kind)
            chunks: Iterator[tuple[bytes, float]] = ((c, time.perf_counter()) for c in resp.iter_bytes())
            for at, event, data in iter_sse(chunks):
                if data != "[DONE]" and read_sse(event, json.loads(data)):
                    times.append(at)
    if len(times) < 2:
        raise RuntimeError(f"{path} streamed {len(times)} pieces")
    return times[0] - started, (len(times) - 1) / (times[-1] - times[0]), len(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-path", default=None)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/dialects.json")
    args = parser.parse_args()
    port = free_port()
    model = ["--model-path", args.model_path] if args.model_path else []
    cmd = our_server_cmd(port, *model, "--n-threads", str(args.threads), "--parallel", "1", "--cache-ram-mib", "0",
                         "--prompt-cache-scope", "off")  # every request computes its prompt: TTFT compares
    table = dialects(args.tokens)
    names = list(table)
    samples: dict[str, list[tuple[float, float, int]]] = {name: [] for name in names}
    with running(cmd, f"http://127.0.0.1:{port}/ready", timeout=300), \
            httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=300) as client:
        for name in names:  # warm-up, not counted
            one(client, *table[name])
        for r in range(args.rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                samples[name].append(one(client, *table[name]))
    def medians(name: str) -> tuple[float, float, float]:
        return (statistics.median(s[1] for s in samples[name]), statistics.median(s[0] for s in samples[name]),
                statistics.median(s[2] for s in samples[name]))
    print(f"\n{args.rounds} rounds, {args.tokens} tokens at most, greedy, one stream at a time, {args.threads} "
          "threads, prompt cache off")
    print("| dialect | baseline | decode tok/s | over baseline | TTFT ms | over baseline | pieces streamed |")
    print("|---|---|---|---|---|---|---|")
    rows = {}
    for name in names:
        base = CHAT_BASE if table[name][2] in ("chat", "messages", "responses", "ollama_chat") else "/generate"
        tps, ttft, pieces = medians(name)
        base_tps, base_ttft, _ = medians(base)
        rows[name] = {"baseline": base, "decode_tps": tps, "ttft_ms": ttft * 1000, "pieces": pieces,
                      "decode_ratio": tps / base_tps, "ttft_ratio": ttft / base_ttft}
        print(f"| {name} | {base} | {tps:.1f} | {tps / base_tps:.3f}x | {ttft * 1000:.1f} | {ttft / base_ttft:.3f}x "
              f"| {pieces:.0f} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
