"""One command, three servers, the same model, threads and load: llama-inference, llama-cpp-python's own
``llama_cpp.server``, and the seed's design (FastAPI + transformers + torch, ``benchmarks/baselines/``).

    .venv/bin/python -m benchmarks.compare [--levels 1,4,8] [--max-tokens 64] [--threads 2]

Needs the ``bench`` and ``baseline`` extras (``pip install -e '.[bench,baseline]'``). The model is SmolLM2-135M:
the GGUF for the llama.cpp servers and, for transformers, the Hugging Face checkpoint rebuilt from it in F32
(tests/hf_fixtures.py), so all three serve the same weights. One server runs at a time; the others are not
started yet, so each has the machine to itself. Results go to --out (JSON, Markdown, PNG plots).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from benchmarks.bench import markdown, run_bench, write_results
from benchmarks.common import free_port, our_server_cmd, running
from benchmarks.loadgen import LevelStats
from server.model_files import embedded_model_path
from tests.hf_fixtures import checkpoint_from_gguf


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--levels", default="1,4,8")
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prompt-words", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/compare")
    args = parser.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    gguf = embedded_model_path()
    results: dict[str, list[LevelStats]] = {}

    def load(name: str, url: str, api: str, pid: int, model: str | None = None) -> None:
        stats: list[LevelStats] = []
        for level in levels:
            stats += run_bench(url, api=api, levels=[level], requests=level * args.requests_per_client,
                               duration_s=None, prompt_words=args.prompt_words, max_tokens=args.max_tokens,
                               model=model, pid=pid, name=name, progress=False)
            print(markdown(stats[-1:], name).splitlines()[-1], flush=True)
        results[name] = stats

    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = checkpoint_from_gguf(gguf, Path(tmp) / "hf")
        port = free_port()
        cmd = our_server_cmd(port, "--model-path", str(gguf), "--n-threads", str(args.threads),
                             "--parallel", str(max(levels)), "--ctx-size", str(1024 * max(levels)),
                             "--queue-size", "64")
        with running(cmd, f"http://127.0.0.1:{port}/ready") as proc:
            load("llama-inference", f"http://127.0.0.1:{port}", "native", proc.pid)
        port = free_port()
        cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", "smollm2",
               "--host", "127.0.0.1", "--port", str(port), "--n_threads", str(args.threads),
               "--n_threads_batch", str(args.threads), "--n_ctx", "2048", "--flash_attn", "true",
               "--interrupt_requests", "false"]
        with running(cmd, f"http://127.0.0.1:{port}/v1/models") as proc:
            load("llama_cpp.server", f"http://127.0.0.1:{port}", "openai", proc.pid, model="smollm2")
        port = free_port()
        cmd = [sys.executable, "-m", "benchmarks.baselines.transformers_server", "--model-dir", str(hf_dir),
               "--port", str(port), "--threads", str(args.threads)]
        with running(cmd, f"http://127.0.0.1:{port}/health", timeout=300) as proc:
            load("transformers (seed)", f"http://127.0.0.1:{port}", "native", proc.pid)

    files = write_results(Path(args.out), results, {"levels": levels, "max_tokens": args.max_tokens,
                                                    "threads": args.threads, "model": str(gguf)})
    print()
    for name, stats in results.items():
        print(markdown(stats, name))
    ours, seed = results["llama-inference"], results["transformers (seed)"]
    one = 0
    print(f"decode tok/s per stream at 1 client: llama-inference / transformers = "
          f"{ours[one].per_stream_tps_p50 / seed[one].per_stream_tps_p50:.2f}x (target >= 5)")
    print(f"aggregate tok/s at {levels[-1]} clients: llama-inference / transformers = "
          f"{ours[-1].aggregate_tps / seed[-1].aggregate_tps:.2f}x")
    peak_ours = max(s.server_peak_rss_mb or 0 for s in ours)
    peak_seed = max(s.server_peak_rss_mb or 0 for s in seed)
    print(f"peak RSS: llama-inference {peak_ours:.0f} MB, transformers {peak_seed:.0f} MB, ratio "
          f"{peak_ours / peak_seed:.2f} (target <= 0.5)")
    print("wrote " + ", ".join(str(f) for f in files))


if __name__ == "__main__":
    main()
