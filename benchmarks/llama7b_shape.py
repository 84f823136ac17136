"""A LLaMA-2-7B-shaped model for real speed and memory measurements: the true shapes (32 layers, 4096 wide,
11008 FFN, 32 heads) and a 32000-token vocabulary, random weights. Its text is noise; its speed and memory are
real. Files stay under --workdir (default /tmp/llama7b-shape), never in git or CI.

    .venv/bin/python -m benchmarks.llama7b_shape build      # checkpoint (13.5 GB, streamed) -> F16 GGUF -> Q4_K_M
    .venv/bin/python -m benchmarks.llama7b_shape measure    # server: load time, RSS, TTFT, decode tok/s per setting
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import psutil

from benchmarks.common import free_port, our_server_cmd, running
from convert.safetensors_io import write_f16_safetensors_streamed
from server.model_files import embedded_model_path
from tests.hf_fixtures import field

N_LAYER, N_EMBD, N_HEAD, N_FF, N_VOCAB = 32, 4096, 32, 11008, 32000


def tokenizer_files(out: Path) -> None:
    """SmolLM2's byte-level BPE cut to 32000 tokens (and the merges among them): a valid tokenizer of LLaMA 2's
    vocabulary size, built and saved by the Hugging Face ``tokenizers`` library."""
    import gguf
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    reader = gguf.GGUFReader(embedded_model_path())
    tokens = field(reader, "tokenizer.ggml.tokens")[:N_VOCAB]
    known = set(tokens)
    merges = [tuple(m.split(" ")) for m in field(reader, "tokenizer.ggml.merges")
              if all(p in known for p in m.split(" ")) and m.replace(" ", "") in known]
    tokenizer = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                       pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(tokens[i], special=True) for i in range(17)])
    tokenizer.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({"bos_token": tokens[1], "eos_token": tokens[2],
                                                           "add_bos_token": True}))


def write_checkpoint(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (N_VOCAB, N_EMBD)}
    for i in range(N_LAYER):
        p = f"model.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (N_EMBD,), p + "post_attention_layernorm.weight": (N_EMBD,),
                   **{p + f"self_attn.{n}_proj.weight": (N_EMBD, N_EMBD) for n in "qkvo"},
                   p + "mlp.gate_proj.weight": (N_FF, N_EMBD), p + "mlp.up_proj.weight": (N_FF, N_EMBD),
                   p + "mlp.down_proj.weight": (N_EMBD, N_FF)}
    shapes |= {"model.norm.weight": (N_EMBD,), "lm_head.weight": (N_VOCAB, N_EMBD)}
    rng = np.random.default_rng(0)
    pool = (rng.standard_normal(32 * 2**20, dtype=np.float32) * 0.02).astype(np.float16)  # 64 MB of noise

    def fill(shape: tuple[int, ...]) -> Iterator[np.ndarray]:
        n = int(np.prod(shape))
        if len(shape) == 1:
            yield np.ones(n, dtype=np.float16)
            return
        while n > 0:  # random windows of the pool: cheap to make, no two tensors alike
            take = min(n, len(pool) // 2)
            start = int(rng.integers(0, len(pool) - take))
            yield pool[start:start + take]
            n -= take

    kept = out / "model.safetensors"  # a whole one from an earlier build that stopped later is kept
    if not kept.exists() or kept.stat().st_size < 2 * sum(int(np.prod(shape)) for shape in shapes.values()):
        write_f16_safetensors_streamed(kept, shapes, fill)
    config = {"architectures": ["LlamaForCausalLM"], "hidden_size": N_EMBD, "intermediate_size": N_FF,
              "num_hidden_layers": N_LAYER, "num_attention_heads": N_HEAD, "num_key_value_heads": N_HEAD,
              "vocab_size": N_VOCAB, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
              "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2}
    (out / "config.json").write_text(json.dumps(config))
    tokenizer_files(out)


def build(work: Path, threads: int) -> Path:
    hf, f16, q4 = work / "hf", work / "llama-2-7b-shape.f16.gguf", work / "llama-2-7b-shape.Q4_K_M.gguf"
    if not q4.exists():
        t = time.perf_counter()
        write_checkpoint(hf)
        size = (hf / "model.safetensors").stat().st_size
        print(f"checkpoint: {size / 1e9:.1f} GB in {time.perf_counter() - t:.0f} s")
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "server", "convert", str(hf), "--outtype", "f16", "--out", str(f16),
                        "--quiet"], check=True)
        print(f"convert: {time.perf_counter() - t:.0f} s")
        (hf / "model.safetensors").unlink()
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "server", "quantize", str(f16), str(q4), "--type", "Q4_K_M",
                        "--threads", str(threads)], check=True)
        print(f"quantize Q4_K_M: {time.perf_counter() - t:.0f} s, {q4.stat().st_size / 1e9:.2f} GB")
        f16.unlink()
    return q4


def measure_one(model: Path, label: str, extra: list[str], threads: int, prompt_tokens: int = 100,
                n_tokens: int = 32) -> dict[str, object]:
    port = free_port()
    cmd = our_server_cmd(port, "--model-path", str(model), "--n-threads", str(threads), "--ctx-size", "4096",
                         "--parallel", "1", *extra)
    start = time.perf_counter()
    with running(cmd, f"http://127.0.0.1:{port}/ready", timeout=900) as proc:
        load_s = time.perf_counter() - start
        prompt = " ".join(["word"] * (prompt_tokens - 1))
        peak = 0
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=900) as client:
            first = last = None
            n = 0
            t0 = time.perf_counter()
            with client.stream("POST", "/generate", json={"prompt": prompt, "max_length": n_tokens,
                                                          "temperature": 0, "stream": True,
                                                          "ignore_eos": True}) as resp:
                for line in resp.iter_lines():
                    if line.startswith("event: token"):
                        now = time.perf_counter()
                        first = first or now
                        last = now
                        n += 1
                        peak = max(peak, psutil.Process(proc.pid).memory_info().rss)
            usage = client.get("/metrics").text
    del usage
    return {"setting": label, "load_s": round(load_s, 1), "peak_rss_gib": round(peak / 2**30, 2),
            "ttft_s": round((first or t0) - t0, 2), "decode_tps": round((n - 1) / ((last or t0) - (first or t0)), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=["build", "measure"])
    parser.add_argument("--workdir", default="/tmp/llama7b-shape")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    if args.step == "build":
        build(work, args.threads)
        return
    model = work / "llama-2-7b-shape.Q4_K_M.gguf"
    settings = [("mmap on, KV f16", ["--use-mmap", "--cache-type", "f16"]),
                ("mmap off, KV f16", ["--no-use-mmap", "--cache-type", "f16"]),
                ("mmap on, KV q8_0", ["--use-mmap", "--cache-type", "q8_0"]),
                ("mmap off, KV q8_0", ["--no-use-mmap", "--cache-type", "q8_0"])]
    print("| setting | load s | peak RSS GiB | TTFT s (100 tokens) | decode tok/s |")
    print("|---|---|---|---|---|")
    for label, extra in settings:
        r = measure_one(model, label, extra, args.threads)
        print(f"| {r['setting']} | {r['load_s']} | {r['peak_rss_gib']} | {r['ttft_s']} | {r['decode_tps']} |",
              flush=True)
    print(f"\n{os.cpu_count()} CPUs here; {args.threads} threads")


if __name__ == "__main__":
    main()
