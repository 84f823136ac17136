"""Size, load time, decode speed and perplexity of the test model at several quantization types.

    .venv/bin/python -m benchmarks.quant_table [--threads 2] [--text FILE]

SmolLM2-135M is rebuilt as a Hugging Face checkpoint from the bundled GGUF (tests/hf_fixtures.py), converted
to F16 with `llama-inference convert`, then quantized with `llama-inference quantize`. Perplexity is measured on
a text file (default: this repository's READMEs, 512-token windows, second half of each window scored).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from convert.verify import _greedy, perplexity
from server.engine.llama import LlamaContext, LlamaModel
from server.logs import configure_logging
from server.model_files import embedded_model_path
from tests.hf_fixtures import checkpoint_from_gguf

REPO = Path(__file__).resolve().parent.parent
TYPES = ["F16", "Q8_0", "Q5_K_M", "Q4_K_M", "Q4_0"]


def cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "server", *args], check=True, capture_output=True, cwd=REPO)


def measure(path: Path, text: str, threads: int) -> tuple[float, float, float]:
    start = time.perf_counter()
    model = LlamaModel(path)
    ctx = LlamaContext(model, n_ctx=512, n_batch=512, n_seq_max=1, n_threads=threads, n_threads_batch=threads)
    load_s = time.perf_counter() - start
    try:
        _greedy(model, ctx, model.tokenize("Once upon a time"), 8)  # warm-up
        ctx.clear()
        start = time.perf_counter()
        n = len(model.tokenize(_greedy(model, ctx, model.tokenize("Once upon a time"), 128), add_special=False))
        tps = n / (time.perf_counter() - start)
        ppl = perplexity(model, text, threads=threads)
    finally:
        ctx.close()
        model.close()
    return load_s, tps, ppl


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--text", default=None)
    args = parser.parse_args()
    configure_logging("warning")
    text = Path(args.text).read_text() if args.text else "\n\n".join(
        p.read_text() for p in [REPO / "README.md", REPO / "k8s" / "README.md"])
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        checkpoint_from_gguf(embedded_model_path(), work / "hf")
        cli("convert", str(work / "hf"), "--outtype", "f16", "--out", str(work / "F16.gguf"), "--quiet")
        for qtype in TYPES[1:]:
            cli("quantize", str(work / "F16.gguf"), str(work / f"{qtype}.gguf"), "--type", qtype,
                "--threads", str(args.threads))
        print(f"SmolLM2-135M-Instruct (from the bundled Q4_1), {args.threads} threads\n")
        print("| type | size MB | load s | decode tok/s | perplexity |")
        print("|---|---|---|---|---|")
        for qtype in TYPES:
            path = work / f"{qtype}.gguf"
            load_s, tps, ppl = measure(path, text, args.threads)
            print(f"| {qtype} | {path.stat().st_size / 1e6:.1f} | {load_s:.2f} | {tps:.1f} | {ppl:.2f} |", flush=True)


if __name__ == "__main__":
    main()
