"""Soak: many mixed requests (plain, streamed, cancelled, invalid, OpenAI) with the server's RSS sampled.

    .venv/bin/python -m benchmarks.soak [--requests 5000] [--url URL --pid PID]

Without --url it starts llama-inference itself (2 slots, short generations). It prints the RSS samples and the
growth after warm-up; the test suite runs the same loop with 500 requests.
"""

from __future__ import annotations

import argparse
import random
import time
from dataclasses import dataclass, field

import httpx
import psutil

BAD_BODIES = [{"prompt": ""}, {"prompt": 5}, {"max_length": 3}, {"prompt": "x", "temperature": 99}]


@dataclass
class SoakResult:
    statuses: list[int] = field(default_factory=list)
    rss_samples: list[int] = field(default_factory=list)  # bytes, every `every` requests
    seconds: float = 0.0

    def growth_after_warmup(self, warm_samples: int = 4) -> float:
        """Bytes between the lowest of the first post-warm-up samples and the highest of the last ones."""
        warm = self.rss_samples[warm_samples:]
        return float(max(warm[-4:]) - min(warm[:4])) if len(warm) >= 8 else 0.0


def one_request(client: httpx.Client, rng: random.Random, i: int, model: str) -> int:
    kind = rng.choice(["plain", "stream", "cancel", "invalid", "openai"])
    if kind == "plain":
        return client.post("/generate", json={"prompt": f"Soak {i}", "max_length": 4}).status_code
    if kind == "stream":
        with client.stream("POST", "/generate", json={"prompt": f"Soak {i}", "max_length": 4,
                                                      "stream": True}) as resp:
            resp.read()
            return resp.status_code
    if kind == "cancel":  # the client gives up almost at once: the server must cancel and free the slot
        try:
            client.post("/generate", json={"prompt": f"Soak {i}", "max_length": 16, "ignore_eos": True},
                        timeout=0.02)
        except httpx.TimeoutException:
            return 499
        return 200
    if kind == "invalid":
        return client.post("/generate", json=rng.choice(BAD_BODIES)).status_code
    return client.post("/v1/completions", json={"model": model, "prompt": f"Soak {i}",
                                                "max_tokens": 4}).status_code


def run_soak(url: str, pid: int, requests: int, *, every: int = 25, seed: int = 1,
             deadline_s: float = 3600.0) -> SoakResult:
    proc = psutil.Process(pid)
    rng = random.Random(seed)
    result = SoakResult()
    start = time.monotonic()
    with httpx.Client(base_url=url, timeout=60) as client:
        model = client.get("/v1/models").json()["data"][0]["id"]
        for i in range(requests):
            if time.monotonic() - start > deadline_s:
                raise TimeoutError(f"soak stopped after {i} requests: over {deadline_s} s")
            result.statuses.append(one_request(client, rng, i, model))
            if i % every == 0:
                result.rss_samples.append(proc.memory_info().rss)
    result.seconds = time.monotonic() - start
    return result


def main() -> None:
    from benchmarks.common import free_port, our_server_cmd, running

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--url", default=None)
    parser.add_argument("--pid", type=int, default=None)
    args = parser.parse_args()
    if args.url:
        result = run_soak(args.url, args.pid, args.requests)
    else:
        port = free_port()
        cmd = our_server_cmd(port, "--parallel", "2", "--queue-size", "2", "--max-tokens-limit", "16",
                             "--default-max-tokens", "8")
        with running(cmd, f"http://127.0.0.1:{port}/ready") as proc:
            result = run_soak(f"http://127.0.0.1:{port}", proc.pid, args.requests)
    counts = {code: result.statuses.count(code) for code in sorted(set(result.statuses))}
    print(f"{args.requests} requests in {result.seconds:.0f} s; statuses {counts}")
    print("RSS MB every 25 requests: " + " ".join(str(s // 10**6) for s in result.rss_samples))
    print(f"growth after warm-up: {result.growth_after_warmup() / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
