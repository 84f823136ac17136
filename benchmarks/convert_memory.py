"""Peak memory of ``llama-inference convert`` on a synthetic checkpoint of more than 2 GB.

    .venv/bin/python -m benchmarks.convert_memory [--layers 19] [--workdir /tmp/convert-bench]

The checkpoint has LLaMA's layout (hidden 2048, 16 heads, 4 KV heads, FFN 5632) with random F16 weights and
SmolLM2's tokenizer; it is written tensor by tensor so that making it does not need the memory either. The
conversion runs as a child process, which reports its own peak RSS (VmHWM: the high-water mark of its memory
since exec; ru_maxrss of a child would count the pages it shared with this process when forked). Target: at
most a quarter of the checkpoint's size plus 300 MB.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from convert.safetensors_io import write_f16_safetensors_streamed
from server.model_files import embedded_model_path
from tests.hf_fixtures import checkpoint_from_gguf

HIDDEN, FF, HEADS, KV_HEADS = 2048, 5632, 16, 4
CHILD = (
    "import sys\n"
    "from server.cli import main\n"
    "code = main(sys.argv[1:])\n"
    "print(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).strip(), file=sys.stderr)\n"
    "sys.exit(code)\n"
)


def shapes(layers: int, vocab: int) -> dict[str, tuple[int, ...]]:
    hd = HIDDEN // HEADS
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, HIDDEN),
                                       "model.norm.weight": (HIDDEN,), "lm_head.weight": (vocab, HIDDEN)}
    for i in range(layers):
        p = f"model.layers.{i}."
        out |= {p + "input_layernorm.weight": (HIDDEN,), p + "post_attention_layernorm.weight": (HIDDEN,),
                p + "self_attn.q_proj.weight": (HEADS * hd, HIDDEN),
                p + "self_attn.k_proj.weight": (KV_HEADS * hd, HIDDEN),
                p + "self_attn.v_proj.weight": (KV_HEADS * hd, HIDDEN), p + "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
                p + "mlp.gate_proj.weight": (FF, HIDDEN), p + "mlp.up_proj.weight": (FF, HIDDEN),
                p + "mlp.down_proj.weight": (HIDDEN, FF)}
    return out


def write_checkpoint(directory: Path, layers: int) -> int:
    """Random F16 tensors written one at a time; returns the checkpoint's size in bytes."""
    tokenizer_src = directory / "_smol"
    checkpoint_from_gguf(embedded_model_path(), tokenizer_src)  # for its tokenizer files only
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_src / name, directory / name)
    vocab = json.loads((tokenizer_src / "config.json").read_text())["vocab_size"]
    shutil.rmtree(tokenizer_src)
    rng = np.random.default_rng(0)
    write_f16_safetensors_streamed(directory / "model.safetensors", shapes(layers, vocab),
                                   lambda shape: iter([rng.standard_normal(shape, dtype=np.float32)]))
    config = {"architectures": ["LlamaForCausalLM"], "hidden_size": HIDDEN, "intermediate_size": FF,
              "num_hidden_layers": layers, "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
              "vocab_size": vocab, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
              "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2}
    (directory / "config.json").write_text(json.dumps(config))
    return (directory / "model.safetensors").stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=19)
    parser.add_argument("--workdir", default="/tmp/convert-bench")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint and GGUF afterwards")
    args = parser.parse_args()
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    (work / "hf").mkdir(parents=True)
    size = write_checkpoint(work / "hf", args.layers)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD, "convert", str(work / "hf"), "--outtype", "f16",
                           "--out", str(work / "model.gguf"), "--quiet"], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(proc.stderr)
    peak = int(next(line for line in proc.stderr.splitlines() if line.startswith("VmHWM")).split()[1]) * 1024
    budget = size / 4 + 300e6
    gguf_size = (work / "model.gguf").stat().st_size
    print(f"checkpoint {size / 1e9:.2f} GB ({args.layers} layers, F16) -> GGUF {gguf_size / 1e9:.2f} GB")
    print(f"wall time {wall:.1f} s, {size / 1e6 / wall:.0f} MB/s")
    print(f"peak RSS of the conversion: {peak / 1e6:.0f} MB; budget (size/4 + 300 MB) {budget / 1e6:.0f} MB; "
          f"ratio peak/size {peak / size:.3f} -> {'OK' if peak <= budget else 'OVER BUDGET'}")
    if not args.keep:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
