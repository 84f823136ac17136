"""Architectures the converter knows: a registry of small hook classes, one per Hugging Face architecture."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import gguf
import numpy as np

from convert.errors import PipelineError
from convert.rope import read_rope

_REGISTRY: dict[str, type[ModelHooks]] = {}


def register(*names: str) -> Callable[[type[ModelHooks]], type[ModelHooks]]:
    def add(cls: type[ModelHooks]) -> type[ModelHooks]:
        for name in names:
            _REGISTRY[name] = cls
        return cls
    return add


def hooks_for(config: dict[str, Any]) -> ModelHooks:
    names = config.get("architectures") or []
    for name in names:
        if name in _REGISTRY:
            return _REGISTRY[name](config)
    raise PipelineError(
        f"unsupported architecture {names or '(none given)'}; supported: {', '.join(sorted(_REGISTRY))}"
    )


class ModelHooks:
    """What differs between architectures: GGUF hyper-parameters, tensor names, tensor transforms."""

    arch: gguf.MODEL_ARCH

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config

    @property
    def arch_name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.arch]

    def add_hparams(self, writer: gguf.GGUFWriter) -> None:
        raise NotImplementedError

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """GGUF tensor name -> numpy shape (rows, cols) it must have."""
        raise NotImplementedError

    def gguf_name(self, hf_name: str) -> str | None:
        raise NotImplementedError

    def extra_tensors(self) -> dict[str, np.ndarray]:
        """Tensors llama.cpp needs that the checkpoint does not hold (computed from the config), by GGUF name."""
        return {}

    def transform(self, gguf_name: str, data: np.ndarray) -> np.ndarray:
        """Rewrite a block of rows (a whole number of :meth:`row_multiple`) into llama.cpp's layout."""
        return data

    def row_multiple(self, gguf_name: str) -> int:
        """Rows that :meth:`transform` must see together (1: any split of the rows is fine)."""
        return 1


def _require(config: dict[str, Any], key: str) -> Any:
    if key not in config:
        raise PipelineError(f"config.json has no {key!r}")
    return config[key]


@register("LlamaForCausalLM", "MistralForCausalLM")
class LlamaHooks(ModelHooks):
    arch = gguf.MODEL_ARCH.LLAMA

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        self.n_embd = int(_require(config, "hidden_size"))
        self.n_layer = int(_require(config, "num_hidden_layers"))
        self.n_head = int(_require(config, "num_attention_heads"))
        self.n_head_kv = int(config.get("num_key_value_heads") or self.n_head)
        self.n_ff = int(_require(config, "intermediate_size"))
        self.n_vocab = int(_require(config, "vocab_size"))
        self.head_dim = int(config.get("head_dim") or self.n_embd // self.n_head)
        self.tied = bool(config.get("tie_word_embeddings", False))
        self.rope = read_rope(config)
        self._names = gguf.get_tensor_name_map(self.arch, self.n_layer)

    def add_hparams(self, writer: gguf.GGUFWriter) -> None:
        c = self.config
        writer.add_context_length(int(c.get("max_position_embeddings", 4096)))
        writer.add_embedding_length(self.n_embd)
        writer.add_block_count(self.n_layer)
        writer.add_feed_forward_length(self.n_ff)
        writer.add_head_count(self.n_head)
        writer.add_head_count_kv(self.n_head_kv)
        writer.add_rope_dimension_count(self.head_dim)
        self.rope.add_to_gguf(writer)
        writer.add_layer_norm_rms_eps(float(c.get("rms_norm_eps", 1e-5)))
        writer.add_vocab_size(self.n_vocab)
        if self.head_dim != self.n_embd // self.n_head:
            writer.add_key_length(self.head_dim)
            writer.add_value_length(self.head_dim)

    def extra_tensors(self) -> dict[str, np.ndarray]:
        factors = self.rope.freq_factors(self.head_dim)
        if factors is None:
            return {}
        return {gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight": factors}

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        e, f, v, d = self.n_embd, self.n_ff, self.n_vocab, self.head_dim
        t = gguf.MODEL_TENSOR
        name = gguf.TENSOR_NAMES
        shapes: dict[str, tuple[int, ...]] = {
            name[t.TOKEN_EMBD] + ".weight": (v, e),
            name[t.OUTPUT_NORM] + ".weight": (e,),
        }
        if not self.tied:
            shapes[name[t.OUTPUT] + ".weight"] = (v, e)
        for i in range(self.n_layer):
            layer = {
                t.ATTN_NORM: (e,), t.ATTN_Q: (self.n_head * d, e), t.ATTN_K: (self.n_head_kv * d, e),
                t.ATTN_V: (self.n_head_kv * d, e), t.ATTN_OUT: (e, self.n_head * d), t.FFN_NORM: (e,),
                t.FFN_GATE: (f, e), t.FFN_UP: (f, e), t.FFN_DOWN: (e, f),
            }
            for kind, shape in layer.items():
                shapes[name[kind].format(bid=i) + ".weight"] = shape
        return shapes

    def gguf_name(self, hf_name: str) -> str | None:
        if hf_name.endswith(".rotary_emb.inv_freq"):
            return None  # recomputed by llama.cpp from rope_theta
        return self._names.get_name(hf_name, try_suffixes=(".weight", ".bias"))

    def transform(self, gguf_name: str, data: np.ndarray) -> np.ndarray:
        # Hugging Face's q/k projections rotate halves (the first half of each head's dims pairs with the
        # second); llama.cpp's LLaMA RoPE rotates adjacent pairs. Reorder each head's rows to match.
        if gguf_name.endswith(("attn_q.weight", "attn_k.weight")):
            return rotate_half_to_interleaved(data, data.shape[0] // self.head_dim)
        return data

    def row_multiple(self, gguf_name: str) -> int:
        return self.head_dim if gguf_name.endswith(("attn_q.weight", "attn_k.weight")) else 1


def rotate_half_to_interleaved(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Rows of each head [x0..x(h/2-1), y0..y(h/2-1)] become [x0, y0, x1, y1, ...]."""
    rows = weight.shape[0]
    head = rows // n_heads
    split = weight.reshape(n_heads, 2, head // 2, *weight.shape[1:])
    return np.ascontiguousarray(split.swapaxes(1, 2)).reshape(weight.shape)


def interleaved_to_rotate_half(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """The inverse of :func:`rotate_half_to_interleaved` (for writing Hugging Face checkpoints from GGUF)."""
    rows = weight.shape[0]
    head = rows // n_heads
    split = weight.reshape(n_heads, head // 2, 2, *weight.shape[1:])
    return np.ascontiguousarray(split.swapaxes(1, 2)).reshape(weight.shape)
