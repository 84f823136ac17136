"""RoPE settings from a Hugging Face ``config.json``, in either layout transformers has written.

transformers 4 wrote ``rope_theta`` and ``rope_scaling`` at the top level; transformers 5 writes one
``rope_parameters`` object holding ``rope_theta``, ``rope_type`` and the scaling fields. Both are read here, the
newer winning where both are present, and turned into what llama.cpp reads: GGUF keys for linear and YaRN
scaling, and a ``rope_freqs`` tensor of per-dimension divisors for LLaMA 3's scaling (as llama.cpp's own
converter does). A RoPE type llama.cpp cannot reproduce is refused by name rather than silently dropped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import gguf
import numpy as np

from convert.errors import PipelineError

DEFAULT_THETA = 10000.0  # LlamaConfig's default when a config names none
SUPPORTED = ("default", "linear", "llama3", "yarn")


@dataclass(frozen=True)
class Rope:
    theta: float
    kind: str = "default"
    factor: float = 1.0
    original_context: int | None = None
    # llama3: the band of wavelengths that is interpolated between "kept" and "divided by factor"
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    # yarn: the optional fields llama.cpp has keys for, as given
    yarn: dict[str, float] = field(default_factory=dict)

    def add_to_gguf(self, writer: gguf.GGUFWriter) -> None:
        writer.add_rope_freq_base(self.theta)
        if self.kind == "linear":
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(self.factor)
        elif self.kind == "yarn":
            writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
            writer.add_rope_scaling_factor(self.factor)
            if self.original_context:
                writer.add_rope_scaling_orig_ctx_len(self.original_context)
            adders = {"attention_factor": writer.add_rope_scaling_yarn_attn_factor,
                      "beta_fast": writer.add_rope_scaling_yarn_beta_fast,
                      "beta_slow": writer.add_rope_scaling_yarn_beta_slow,
                      "extrapolation_factor": writer.add_rope_scaling_yarn_ext_factor}
            for key, value in self.yarn.items():
                adders[key](value)

    def freq_factors(self, head_dim: int) -> np.ndarray | None:
        """LLaMA 3 scaling as llama.cpp applies it: each rotation frequency divided by a factor (a tensor)."""
        if self.kind != "llama3":
            return None
        old = float(self.original_context or 8192)
        low_wavelen, high_wavelen = old / self.low_freq_factor, old / self.high_freq_factor
        freqs = 1.0 / self.theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
        factors = []
        for freq in freqs:
            wavelen = 2 * math.pi / freq
            if wavelen < high_wavelen:
                factors.append(1.0)
            elif wavelen > low_wavelen:
                factors.append(self.factor)
            else:
                smooth = (old / wavelen - self.low_freq_factor) / (self.high_freq_factor - self.low_freq_factor)
                factors.append(1.0 / ((1 - smooth) / self.factor + smooth))
        return np.array(factors, dtype=np.float32)


def _number(params: dict[str, Any], key: str, default: float | None = None) -> float:
    value = params.get(key, default)
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise PipelineError(f"config.json: rope parameter {key!r} must be a number, got {value!r}")
    return float(value)


def read_rope(config: dict[str, Any]) -> Rope:
    """The RoPE of ``config``: ``rope_parameters`` (transformers 5) over ``rope_theta``/``rope_scaling`` (4)."""
    params: dict[str, Any] = {}
    for key in ("rope_scaling", "rope_parameters"):  # later wins
        value = config.get(key)
        if value is None:
            continue
        if not isinstance(value, dict):
            raise PipelineError(f"config.json: {key} must be an object, got {value!r}")
        if "full_attention" in value and isinstance(value["full_attention"], dict):
            value = value["full_attention"]  # per-layer-type parameters: LLaMA layers are all full attention
        params.update(value)
    theta = _number(params, "rope_theta", config.get("rope_theta", DEFAULT_THETA))
    kind = params.get("rope_type", params.get("type")) or "default"
    if kind not in SUPPORTED:
        raise PipelineError(f"config.json: rope type {kind!r} is not supported (supported: {', '.join(SUPPORTED)})")
    if kind == "default":
        return Rope(theta=theta)
    factor = _number(params, "factor")
    original = params.get("original_max_position_embeddings")
    if kind == "linear":
        return Rope(theta=theta, kind=kind, factor=factor)
    if kind == "llama3":
        return Rope(theta=theta, kind=kind, factor=factor, original_context=int(original or 8192),
                    low_freq_factor=_number(params, "low_freq_factor", 1.0),
                    high_freq_factor=_number(params, "high_freq_factor", 4.0))
    # yarn: transformers takes the original context from max_position_embeddings when the field is absent
    for unsupported in ("mscale", "mscale_all_dim"):
        if params.get(unsupported) not in (None, 0, 1, 0.0, 1.0):
            raise PipelineError(f"config.json: yarn rope parameter {unsupported!r} is not supported for LLaMA")
    yarn = {k: _number(params, k) for k in ("attention_factor", "beta_fast", "beta_slow", "extrapolation_factor")
            if params.get(k) is not None}
    return Rope(theta=theta, kind=kind, factor=factor,
                original_context=int(original or config.get("max_position_embeddings") or 0) or None, yarn=yarn)
