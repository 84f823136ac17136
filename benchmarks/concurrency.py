"""Concurrent streaming clients: llama-inference against llama-cpp-python's own server, side by side.

    .venv/bin/python -m benchmarks.concurrency [--levels 1,2,4,8] [--requests-per-client 2] [--tokens 128]

Both servers run the same model with the same threads and flash attention, and stay up for the whole run; the
load alternates between them level by level, so a drift in the machine's speed favours neither. Each client
sends streamed greedy requests one after another. llama_cpp.server is started with --interrupt_requests False:
its default cuts a running stream off when another request arrives, which would lose tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

from benchmarks.common import free_port, median, our_server_cmd, percentile, running
from server.model_files import resolve_model_path

TOPICS = ["a lighthouse keeper", "a clockmaker", "a sailor lost at sea", "a dragon who loves books",
          "a small robot", "a mountain village", "a detective in Paris", "a gardener on Mars"]


@dataclass
class Level:
    server: str
    clients: int
    requests: int
    errors: int
    tokens: int
    wall_s: float
    aggregate_tps: float
    per_stream_tps: float
    ttft_p50_ms: float
    ttft_p95_ms: float


@dataclass
class Sample:
    tokens: int
    ttft_s: float
    decode_tps: float


async def _stream(client: httpx.AsyncClient, kind: str, prompt: str, max_tokens: int, model: str | None = None,
                  extra: dict[str, object] | None = None) -> Sample:
    if kind == "native":
        path, body = "/generate", {"prompt": prompt, "max_length": max_tokens, "temperature": 0, "stream": True}
    else:
        path, body = "/v1/completions", {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                                         "stream": True}
        if model:
            body["model"] = model
    body |= extra or {}
    counted = None  # the server's own count, when it sends usage
    start = time.perf_counter()
    first = last = None
    n = 0
    buffer = b""
    async with client.stream("POST", path, json=body) as response:
        if response.status_code != 200:
            await response.aread()
            raise httpx.HTTPStatusError(f"{response.status_code} {response.text[:300]}", request=response.request,
                                        response=response)
        async for chunk in response.aiter_raw():
            buffer += chunk.replace(b"\r\n", b"\n")
            while b"\n\n" in buffer:
                block, buffer = buffer.split(b"\n\n", 1)
                data = next((ln[5:].strip() for ln in block.decode().split("\n") if ln.startswith("data:")), "")
                if not data or data == "[DONE]":
                    continue
                payload = json.loads(data)
                if (payload.get("usage") or {}).get("completion_tokens") is not None:
                    counted = payload["usage"]["completion_tokens"]
                if kind == "native":
                    has_token = payload.get("type") == "token"
                else:
                    choices = payload.get("choices") or [{}]
                    has_token = bool(choices[0].get("text"))
                if has_token:
                    now = time.perf_counter()
                    first = first or now
                    last = now
                    n += 1
    end = time.perf_counter()
    first = first or end
    decode = (last or end) - first
    n = counted if counted is not None else n
    return Sample(tokens=n, ttft_s=first - start, decode_tps=(n - 1) / decode if n > 1 and decode > 0 else 0.0)


async def run_level(url: str, kind: str, clients: int, per_client: int, max_tokens: int, model: str | None = None,
                    extra: dict[str, object] | None = None) -> tuple[list[Sample], int, float]:
    samples: list[Sample] = []
    errors = 0

    async def client_loop(i: int, client: httpx.AsyncClient) -> None:
        nonlocal errors
        for j in range(per_client):
            topic = TOPICS[(i + j * clients) % len(TOPICS)]
            prompt = f"Here is a long story about {topic}.\n\nOnce upon a time,"
            try:
                try:
                    samples.append(await _stream(client, kind, prompt, max_tokens, model, extra))
                except httpx.RemoteProtocolError:
                    # The server closed a kept-alive connection as the request went out on it (llama-server
                    # closes one after a streamed answer): nothing was processed, so send it again once.
                    samples.append(await _stream(client, kind, prompt, max_tokens, model, extra))
            except httpx.HTTPError as exc:
                errors += 1
                print(f"  request failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)

    limits = httpx.Limits(max_connections=clients + 2)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(i, client) for i in range(clients)))
        wall = time.perf_counter() - start
    return samples, errors, wall


def summarize(server: str, clients: int, samples: list[Sample], errors: int, wall: float) -> Level:
    tokens = sum(s.tokens for s in samples)
    ttfts = [s.ttft_s * 1000 for s in samples]
    return Level(
        server=server, clients=clients, requests=len(samples), errors=errors, tokens=tokens, wall_s=round(wall, 3),
        aggregate_tps=round(tokens / wall, 2), per_stream_tps=round(median([s.decode_tps for s in samples]), 2),
        ttft_p50_ms=round(percentile(ttfts, 0.5), 1), ttft_p95_ms=round(percentile(ttfts, 0.95), 1),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-path", default=None)
    parser.add_argument("--levels", default="1,2,4,8")
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/concurrency.json")
    args = parser.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    model = str(resolve_model_path(Path(args.model_path) if args.model_path else None))
    slots = max(levels)

    ours_port, theirs_port = free_port(), free_port()
    ours_cmd = our_server_cmd(ours_port, "--model-path", model, "--n-threads", str(args.threads),
                              "--parallel", str(slots), "--ctx-size", str(1024 * slots), "--queue-size", "64")
    theirs_cmd = [sys.executable, "-m", "llama_cpp.server", "--model", model, "--host", "127.0.0.1",
                  "--port", str(theirs_port), "--n_threads", str(args.threads), "--n_threads_batch", str(args.threads),
                  "--n_ctx", "2048", "--flash_attn", "true", "--interrupt_requests", "false", "--verbose", "false"]
    results: list[Level] = []
    ours_url, theirs_url = f"http://127.0.0.1:{ours_port}", f"http://127.0.0.1:{theirs_port}"
    with running(ours_cmd, ours_url + "/ready"), running(theirs_cmd, theirs_url + "/v1/models"):
        for url, kind in ((ours_url, "native"), (theirs_url, "openai")):  # warm-up
            asyncio.run(run_level(url, kind, 1, 1, 16))
        for i, clients in enumerate(levels):
            order = [("llama-inference", ours_url, "native"), ("llama_cpp.server", theirs_url, "openai")]
            for name, url, kind in order if i % 2 == 0 else order[::-1]:
                samples, errors, wall = asyncio.run(
                    run_level(url, kind, clients, args.requests_per_client, args.tokens))
                level = summarize(name, clients, samples, errors, wall)
                results.append(level)
                print(f"  {name:17s} clients={clients}: {level.aggregate_tps:7.1f} tok/s aggregate, "
                      f"{level.per_stream_tps:6.1f} per stream, TTFT p50 {level.ttft_p50_ms:.0f} ms "
                      f"p95 {level.ttft_p95_ms:.0f} ms, errors {errors}", flush=True)

    def get(server: str, clients: int) -> Level:
        return next(r for r in results if r.server == server and r.clients == clients)

    print(f"\nmodel {model}, {args.threads} threads, {args.tokens} tokens per request, "
          f"{args.requests_per_client} requests per client\n")
    print("| clients | server | aggregate tok/s | per-stream tok/s | TTFT p50 ms | TTFT p95 ms | errors |")
    print("|---|---|---|---|---|---|---|")
    for r in sorted(results, key=lambda r: (r.clients, r.server)):
        print(f"| {r.clients} | {r.server} | {r.aggregate_tps:.1f} | {r.per_stream_tps:.1f} | {r.ttft_p50_ms:.0f} "
              f"| {r.ttft_p95_ms:.0f} | {r.errors} |")
    if 4 in levels and 1 in levels:
        ours4, theirs4, ours1 = get("llama-inference", 4), get("llama_cpp.server", 4), get("llama-inference", 1)
        print(f"\nat 4 clients: llama-inference / llama_cpp.server aggregate = "
              f"{ours4.aggregate_tps / theirs4.aggregate_tps:.2f}x (target >= 1.8)")
        print(f"at 4 clients: llama-inference / its own 1-client rate = "
              f"{ours4.aggregate_tps / ours1.aggregate_tps:.2f}x (target >= 1.35)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps([asdict(r) for r in results], indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
