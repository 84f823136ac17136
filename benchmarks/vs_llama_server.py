"""llama-inference against llama.cpp's own ``llama-server``, built from the same llama.cpp, side by side in one run.

    .venv/bin/python -m benchmarks.vs_llama_server --llama-server PATH/llama-server \\
        --model-path /tmp/llama7b-shape/llama-2-7b-shape.Q4_K_M.gguf --threads 2 --levels 1,2,4

``llama-server`` is not part of this project: build it from the llama.cpp that llama-cpp-python vendors (its sdist,
``vendor/llama.cpp``, ``cmake --build build --target llama-server``) with this project's flags (no OpenMP,
``-fno-dse``), so both servers run the same kernels.

Both servers get the same model, threads, slots, context, KV-cache type and flash attention, weights read rather
than mapped, and stay up for the whole run; the load alternates between them level by level. Both are driven
through the same OpenAI ``/v1/completions`` streaming API with greedy, ``ignore_eos`` requests, so each request
yields exactly ``--tokens`` tokens. Reported:

- aggregate tok/s at each client count (tokens of all requests / wall time of the level, prefills included),
  and each stream's decode rate (first to last token, median);
- the worst inter-token gap of a running stream while a ~1,000-token prompt (``max_tokens`` 1, never cached:
  every round's prompt starts with a new number) arrives on another connection, over the stream's steady gap
  before the prompt, and over its steady gap at the length it had then (a stream's steps slow down as it grows;
  see ``prefill_gap.one_round``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
from pathlib import Path

from benchmarks.common import free_port, our_server_cmd, running
from benchmarks.concurrency import Level, run_level, summarize
from benchmarks.prefill_gap import one_round, quiet_round


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llama-server", required=True, help="path of llama.cpp's llama-server binary")
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument("--ctx-size", type=int, default=4096)
    parser.add_argument("--cache-type", default="q8_0", help="KV-cache type of both (ours picks q8_0 for 7B)")
    parser.add_argument("--levels", default="1,2,4")
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--gap-rounds", type=int, default=2, help="0: skip the long-prompt measurement")
    parser.add_argument("--prompt-words", type=int, default=750, help="about 1,000 tokens")
    parser.add_argument("--quiet-control", action="store_true",
                        help="after each long-prompt round, stream alone on our server for as many tokens as its "
                        "prefill lasted: the worst gap this machine gives with no prompt beside the stream")
    parser.add_argument("--ours-extra", default="", help="more flags for llama-inference serve")
    parser.add_argument("--theirs-extra", default="", help="more flags for llama-server")
    parser.add_argument("--ours-log", help="keep our server's log here (with --ours-extra=--log-level=debug: "
                        "a line per engine step)")
    parser.add_argument("--out", default="benchmarks/results/vs_llama_server.json")
    args = parser.parse_args()
    levels = [int(x) for x in args.levels.split(",") if x]
    ours_port, theirs_port = free_port(), free_port()
    common = {"threads": str(args.threads), "parallel": str(args.parallel), "ctx": str(args.ctx_size)}
    ours_cmd = our_server_cmd(ours_port, "--model-path", args.model_path, "--n-threads", common["threads"],
                              "--parallel", common["parallel"], "--ctx-size", common["ctx"],
                              "--cache-type", args.cache_type, "--served-model-name", "model",
                              *args.ours_extra.split())
    theirs_cmd = [args.llama_server, "-m", args.model_path, "--host", "127.0.0.1", "--port", str(theirs_port),
                  "-t", common["threads"], "-tb", common["threads"], "-np", common["parallel"], "-c", common["ctx"],
                  "-fa", "on", "-ctk", args.cache_type, "-ctv", args.cache_type, "-lm", "none", "-a", "model",
                  "--no-webui", *args.theirs_extra.split()]
    servers = {"llama-inference": f"http://127.0.0.1:{ours_port}", "llama-server": f"http://127.0.0.1:{theirs_port}"}
    words = "the keeper climbed the stairs of the old lighthouse every evening at dusk and lit the lamp".split()
    levels_out: list[Level] = []
    gaps: dict[str, list[dict[str, float]]] = {name: [] for name in servers}
    quiet: list[dict[str, float]] = []  # --quiet-control
    extra: dict[str, object] = {"ignore_eos": True, "stream_options": {"include_usage": True}}
    with running(ours_cmd, servers["llama-inference"] + "/ready", timeout=900, log_path=args.ours_log), \
            running(theirs_cmd, servers["llama-server"] + "/health", timeout=900):
        for url in servers.values():  # warm-up, not counted
            asyncio.run(run_level(url, "openai", 1, 1, 8, model="model", extra=extra))
        order = list(servers.items())
        for i, clients in enumerate(levels):
            for name, url in order if i % 2 == 0 else order[::-1]:
                samples, errors, wall = asyncio.run(run_level(url, "openai", clients, args.requests_per_client,
                                                              args.tokens, model="model", extra=extra))
                level = summarize(name, clients, samples, errors, wall)
                levels_out.append(level)
                print(f"  {name:15s} clients={clients}: {level.aggregate_tps:6.2f} tok/s aggregate, "
                      f"{level.per_stream_tps:5.2f} per stream, TTFT p50 {level.ttft_p50_ms:.0f} ms, "
                      f"errors {errors}", flush=True)
        for r in range(args.gap_rounds):
            for name, url in order if r % 2 == 0 else order[::-1]:
                prompt = f"{r} {name} " + " ".join(words[i % len(words)] for i in range(args.prompt_words))
                gaps[name].append(one_round(url, prompt, api="openai", model="model"))
                print(f"  {name:15s} long prompt: {json.dumps(gaps[name][-1])}", flush=True)
            if args.quiet_control:
                n_gaps = int(gaps["llama-inference"][-1]["tokens_during"])
                quiet.append(quiet_round(servers["llama-inference"], n_gaps, api="openai", model="model"))
                print(f"  llama-inference alone: {json.dumps(quiet[-1])}", flush=True)

    print(f"\nmodel {args.model_path}, {args.threads} threads, {args.parallel} slots, ctx {args.ctx_size}, "
          f"KV {args.cache_type}, {args.tokens} greedy tokens per request, {args.requests_per_client} requests "
          f"per client\n")
    print("| clients | aggregate tok/s: ours | llama-server | ratio | per-stream decode tok/s: ours | llama-server "
          "| ratio | TTFT p50 ms: ours | llama-server | errors |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    # A level listed again (--levels 1,2,4,1,2,4) is a repeat: a row each, then the ratios' medians.
    seen: dict[int, int] = {}
    ratios: dict[int, list[float]] = {}
    for clients in levels:
        k = seen[clients] = seen.get(clients, -1) + 1
        ours = [lv for lv in levels_out if lv.server == "llama-inference" and lv.clients == clients][k]
        theirs = [lv for lv in levels_out if lv.server == "llama-server" and lv.clients == clients][k]
        ratios.setdefault(clients, []).append(ours.aggregate_tps / theirs.aggregate_tps)
        print(f"| {clients} | {ours.aggregate_tps:.2f} | {theirs.aggregate_tps:.2f} | "
              f"**{ours.aggregate_tps / theirs.aggregate_tps:.2f}x** | {ours.per_stream_tps:.2f} | "
              f"{theirs.per_stream_tps:.2f} | {ours.per_stream_tps / theirs.per_stream_tps:.2f}x | "
              f"{ours.ttft_p50_ms:.0f} | {theirs.ttft_p50_ms:.0f} | {ours.errors} / {theirs.errors} |")
    if any(len(r) > 1 for r in ratios.values()):
        print("\naggregate ratio over repeats: " + "; ".join(
            f"{c} client{'s' if c > 1 else ''}: median {statistics.median(r):.2f}x ({', '.join(f'{x:.2f}' for x in r)})"
            for c, r in ratios.items()))
    if args.gap_rounds:
        print("\n| server | prompt tokens | steady gap ms: before | after | worst gap ms | worst / steady before "
              "| worst / steady at its length | median / steady before | median / steady at its length "
              "| p90 / steady before | tokens during prefill | long prompt TTFT s |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for name, rows in gaps.items():
            def med(key: str, rows: list[dict[str, float]] = rows) -> float:
                return statistics.median(row[key] for row in rows)
            print(f"| {name} | {int(med('prompt_tokens'))} | {med('steady_ms'):.0f} | {med('steady_after_ms'):.0f} | "
                  f"{med('worst_ms'):.0f} | **{med('ratio'):.2f}** | **{med('ratio_at_length'):.2f}** | "
                  f"{med('median_during_ratio'):.2f} | {med('median_at_length'):.2f} | {med('p90_during_ratio'):.2f} | "
                  f"{int(med('tokens_during'))} | {med('ttft_s'):.1f} |")
        if quiet:
            def qmed(key: str) -> float:
                return statistics.median(row[key] for row in quiet)
            print(f"| llama-inference, the stream alone (control) | 0 | {qmed('steady_ms'):.0f} | "
                  f"{qmed('steady_after_ms'):.0f} | {qmed('worst_ms'):.0f} | **{qmed('ratio'):.2f}** | "
                  f"**{qmed('ratio_at_length'):.2f}** | {qmed('median_during_ratio'):.2f} | "
                  f"{qmed('median_at_length'):.2f} | {qmed('p90_during_ratio'):.2f} | {int(qmed('tokens_during'))} | |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"levels": [vars(lv) for lv in levels_out], "gaps": gaps, "quiet": quiet},
                                   indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
