"""A tiny sliding-window-attention GGUF for the engine's tests, written with the gguf library, loaded by llama.cpp.

No sliding-window checkpoint is at hand offline, so this is an OLMo-2 model (llama.cpp's ``olmo2``: LLaMA-like
blocks, sliding-window attention when ``olmo2.attention.sliding_window`` is set, every fourth layer full) with
random weights and the embedded model's tokenizer. Its text means nothing; what the tests compare it with is
llama.cpp's own fresh prefill of the same prompt, so any cells lost to the window show as a different answer.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

N_EMBD, N_HEAD, N_FF, N_LAYER = 64, 4, 128, 4


def write_swa_model(path: Path, tokenizer_from: Path, n_swa: int) -> Path:
    """Write the model to ``path`` (a window of ``n_swa`` tokens), with the tokenizer of the GGUF ``tokenizer_from``."""
    source = gguf.GGUFReader(tokenizer_from)
    n_vocab = len(source.fields["tokenizer.ggml.tokens"].data)
    writer = gguf.GGUFWriter(path, "olmo2")
    writer.add_name("swa-test-olmo2")
    writer.add_context_length(4096)
    writer.add_embedding_length(N_EMBD)
    writer.add_block_count(N_LAYER)
    writer.add_feed_forward_length(N_FF)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_HEAD)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(10000.0)
    writer.add_sliding_window(n_swa)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    for field in source.fields.values():
        if field.name.startswith("tokenizer."):
            kind = field.types[0]
            sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(field.name, field.contents(), kind, sub)

    rng = np.random.default_rng(0)

    def weight(*shape: int) -> np.ndarray:  # numpy shape: GGUF's dimensions reversed
        return (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)

    def ones(n: int) -> np.ndarray:
        return np.ones(n, dtype=np.float32)

    names = gguf.TENSOR_NAMES
    t = gguf.MODEL_TENSOR
    writer.add_tensor(names[t.TOKEN_EMBD] + ".weight", weight(n_vocab, N_EMBD))
    writer.add_tensor(names[t.OUTPUT_NORM] + ".weight", ones(N_EMBD))
    writer.add_tensor(names[t.OUTPUT] + ".weight", weight(n_vocab, N_EMBD))
    for i in range(N_LAYER):
        for kind, array in [
            (t.ATTN_Q, weight(N_EMBD, N_EMBD)), (t.ATTN_K, weight(N_EMBD, N_EMBD)), (t.ATTN_V, weight(N_EMBD, N_EMBD)),
            (t.ATTN_OUT, weight(N_EMBD, N_EMBD)), (t.ATTN_Q_NORM, ones(N_EMBD)), (t.ATTN_K_NORM, ones(N_EMBD)),
            (t.ATTN_POST_NORM, ones(N_EMBD)), (t.FFN_GATE, weight(N_FF, N_EMBD)), (t.FFN_UP, weight(N_FF, N_EMBD)),
            (t.FFN_DOWN, weight(N_EMBD, N_FF)), (t.FFN_POST_NORM, ones(N_EMBD)),
        ]:
            writer.add_tensor(names[kind].format(bid=i) + ".weight", array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
