"""Per-request sampling with llama.cpp's native sampler chains (no Python loop over the vocabulary)."""

from __future__ import annotations

from dataclasses import dataclass

import llama_cpp

RANDOM_SEED = llama_cpp.LLAMA_DEFAULT_SEED  # llama.cpp draws a random seed for this value


@dataclass(frozen=True)
class SamplingParams:
    """How to pick the next token. ``temperature == 0`` is greedy decoding."""

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    penalty_last_n: int = 64
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    @property
    def has_penalties(self) -> bool:
        return self.repeat_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0


class Sampler:
    """A llama.cpp sampler chain built from :class:`SamplingParams`; owned by one sequence."""

    def __init__(self, params: SamplingParams, n_vocab: int) -> None:
        chain_params = llama_cpp.llama_sampler_chain_default_params()
        chain_params.no_perf = True
        self._ptr = llama_cpp.llama_sampler_chain_init(chain_params)
        if params.has_penalties:
            self._add(llama_cpp.llama_sampler_init_penalties(
                n_vocab, params.penalty_last_n, params.repeat_penalty, params.frequency_penalty,
                params.presence_penalty,
            ))
        if params.greedy:
            self._add(llama_cpp.llama_sampler_init_greedy())
        else:
            if params.top_k > 0:
                self._add(llama_cpp.llama_sampler_init_top_k(params.top_k))
            if params.top_p < 1.0:
                self._add(llama_cpp.llama_sampler_init_top_p(params.top_p, 1))
            if params.min_p > 0.0:
                self._add(llama_cpp.llama_sampler_init_min_p(params.min_p, 1))
            self._add(llama_cpp.llama_sampler_init_temp(params.temperature))
            seed = RANDOM_SEED if params.seed is None else params.seed & 0xFFFFFFFF
            self._add(llama_cpp.llama_sampler_init_dist(seed))

    def _add(self, sampler: llama_cpp.llama_sampler_p) -> None:
        llama_cpp.llama_sampler_chain_add(self._ptr, sampler)  # the chain owns it from here

    def accept(self, token: int) -> None:
        """Feed a prompt token to the penalty window, as if it had been sampled."""
        llama_cpp.llama_sampler_accept(self._ptr, token)

    def sample(self, ctx: llama_cpp.llama_context_p, batch_index: int) -> int:
        """Pick the next token from the logits at ``batch_index`` of the last decode (and accept it)."""
        return int(llama_cpp.llama_sampler_sample(self._ptr, ctx, batch_index))

    def close(self) -> None:
        if self._ptr:
            llama_cpp.llama_sampler_free(self._ptr)
            self._ptr = None
