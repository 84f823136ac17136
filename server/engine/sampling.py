"""Per-request sampling with llama.cpp's native sampler chains (no Python loop over the vocabulary)."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import llama_cpp
import numpy as np

RANDOM_SEED = llama_cpp.LLAMA_DEFAULT_SEED  # llama.cpp draws a random seed for this value
GRAMMAR_SHORTLIST = 256  # tokens a grammar checks first when the sampled token is refused
# Generated tokens that presence and frequency penalties count (OpenAI counts all of them; 4096 is the default
# MAX_TOKENS_LIMIT).
GENERATED_PENALTY_WINDOW = 4096


class GrammarDeadEnd(ValueError):
    """The grammar allows no token (of those logit_bias leaves in): the request's input cannot be satisfied."""


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
    grammar: str | None = None  # GBNF the output must match (structured output)
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token, bias); -inf keeps a token out
    logprobs: int | None = None  # report the sampled token's log-probability and this many alternatives

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    @property
    def has_penalties(self) -> bool:
        return self.repeat_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0


@dataclass(frozen=True)
class TokenLogprob:
    """The sampled token's log-probability under the model (raw logits), and the likeliest alternatives."""

    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def grammar_sampler(vocab: llama_cpp.llama_vocab_p, grammar: str) -> llama_cpp.llama_sampler_p | None:
    """llama.cpp's grammar sampler for GBNF text rooted at ``root``; None if the grammar does not parse."""
    ptr = llama_cpp.llama_sampler_init_grammar(vocab, grammar.encode(), b"root")
    return ptr or None


def grammar_parses(vocab: llama_cpp.llama_vocab_p, grammar: str) -> bool:
    """Whether llama.cpp accepts this GBNF (checked before a request takes a slot)."""
    ptr = grammar_sampler(vocab, grammar)
    if ptr is None:
        return False
    llama_cpp.llama_sampler_free(ptr)
    return True


class Sampler:
    """A llama.cpp sampler chain built from :class:`SamplingParams`; owned by one sequence.

    A grammar is checked after sampling, as llama.cpp's common sampler does: the chain picks a token from the
    raw logits, the grammar checks that one token, and only when it is refused are the logits sampled again
    with the grammar masking the whole vocabulary first. Most tokens pass, so the mask is rarely paid for.
    """

    last_logprob: TokenLogprob | None = None

    def __init__(self, params: SamplingParams, n_vocab: int, vocab: llama_cpp.llama_vocab_p | None = None) -> None:
        chain_params = llama_cpp.llama_sampler_chain_default_params()
        chain_params.no_perf = True
        self._n_vocab = n_vocab
        self._n_logprobs = params.logprobs
        self._grammar = None
        if params.grammar is not None:
            if vocab is None:
                raise ValueError("a grammar needs the vocabulary")
            self._grammar = grammar_sampler(vocab, params.grammar)
            if self._grammar is None:
                raise ValueError("the grammar does not parse")
            self._cur = np.zeros(n_vocab, dtype=[("id", np.int32), ("logit", np.float32), ("p", np.float32)])
            self._ids = np.arange(n_vocab, dtype=np.int32)
            self._one = llama_cpp.llama_token_data(0, 1.0, 0.0)
            self._bias_ids = np.array([t for t, _ in params.logit_bias], dtype=np.int32)
            self._stateless = not params.has_penalties
        self._ptr = llama_cpp.llama_sampler_chain_init(chain_params)
        if params.logit_bias:
            biases = (llama_cpp.llama_logit_bias * len(params.logit_bias))(*params.logit_bias)
            self._add(llama_cpp.llama_sampler_init_logit_bias(n_vocab, len(params.logit_bias), biases))
        # repeat_penalty looks back over prompt and output (llama.cpp's meaning); presence and frequency
        # penalties count the generated tokens only (OpenAI's and vLLM's meaning), so they get a sampler of
        # their own that never sees the prompt.
        self._repeat = None
        if params.repeat_penalty != 1.0:
            self._repeat = llama_cpp.llama_sampler_init_penalties(
                n_vocab, params.penalty_last_n, params.repeat_penalty, 0.0, 0.0)
            self._add(self._repeat)
        if params.frequency_penalty != 0.0 or params.presence_penalty != 0.0:
            self._add(llama_cpp.llama_sampler_init_penalties(
                n_vocab, GENERATED_PENALTY_WINDOW, 1.0, params.frequency_penalty, params.presence_penalty))
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
        """Feed a prompt token to the repeat-penalty window (the others count generated tokens only)."""
        if self._repeat is not None:
            llama_cpp.llama_sampler_accept(self._repeat, token)

    def sample(self, ctx: llama_cpp.llama_context_p, batch_index: int) -> int:
        """Pick the next token from the logits at ``batch_index`` of the last decode (and accept it)."""
        if self._grammar is None:
            token = int(llama_cpp.llama_sampler_sample(self._ptr, ctx, batch_index))
        else:
            token = self._sample_with_grammar(ctx, batch_index)
        if self._n_logprobs is not None:
            self.last_logprob = self._logprob(ctx, batch_index, token)
        return token

    def _logits(self, ctx: llama_cpp.llama_context_p, batch_index: int) -> np.ndarray:
        ptr = llama_cpp.llama_get_logits_ith(ctx, batch_index)
        return np.ctypeslib.as_array(ptr, shape=(self._n_vocab,))

    def _candidates(self, logits: np.ndarray) -> llama_cpp.llama_token_data_array:
        """The whole vocabulary with these logits, as llama.cpp's samplers take it (no Python loop)."""
        cur = self._cur
        cur["id"] = self._ids
        cur["logit"] = logits
        cur["p"] = 0.0
        return llama_cpp.llama_token_data_array(
            data=cur.ctypes.data_as(llama_cpp.llama_token_data_p), size=self._n_vocab, selected=-1, sorted=False)

    def _sample_with_grammar(self, ctx: llama_cpp.llama_context_p, batch_index: int) -> int:
        logits = None
        if self._stateless:
            # No penalties: accepting a token changes nothing in the chain, so llama.cpp samples in C.
            token = int(llama_cpp.llama_sampler_sample(self._ptr, ctx, batch_index))
        else:
            logits = self._logits(ctx, batch_index)
            array = self._candidates(logits)
            llama_cpp.llama_sampler_apply(self._ptr, ctypes.byref(array))
            token = int(array.data[array.selected].id)
        if not self._allows(token):
            token = self._resample(self._logits(ctx, batch_index) if logits is None else logits)
            if not self._allows(token):
                # Accepting it would abort the process inside llama.cpp: fail this request instead.
                raise GrammarDeadEnd("the grammar allows no token here that logit_bias leaves in")
        llama_cpp.llama_sampler_accept(self._grammar, token)
        if not self._stateless:
            llama_cpp.llama_sampler_accept(self._ptr, token)
        return token

    def _allows(self, token: int) -> bool:
        """Whether the grammar allows ``token`` next (checked alone: cheap)."""
        one = self._one
        one.id, one.logit, one.p = token, 1.0, 0.0
        single = llama_cpp.llama_token_data_array(data=ctypes.pointer(one), size=1, selected=-1, sorted=False)
        llama_cpp.llama_sampler_apply(self._grammar, ctypes.byref(single))
        return bool(one.logit != float("-inf"))

    def _resample(self, logits: np.ndarray) -> int:
        """The sampled token was refused: sample again among the likeliest tokens the grammar allows.

        The grammar checks the ``GRAMMAR_SHORTLIST`` likeliest tokens (and any with a logit bias) first, not the
        whole vocabulary (about a hundred times cheaper); only when it allows none of them is the whole
        vocabulary masked. Greedy decoding picks the same token either way; sampling leaves out allowed tokens
        below the shortlist, whose probability is negligible.
        """
        k = min(GRAMMAR_SHORTLIST, self._n_vocab)
        short = np.argpartition(logits, self._n_vocab - k)[self._n_vocab - k:]
        if self._bias_ids.size:
            short = np.union1d(short, self._bias_ids)
        n = len(short)
        cur = self._cur
        cur["id"][:n] = short
        cur["logit"][:n] = logits[short]
        cur["p"][:n] = 0.0
        array = llama_cpp.llama_token_data_array(
            data=cur.ctypes.data_as(llama_cpp.llama_token_data_p), size=n, selected=-1, sorted=False)
        llama_cpp.llama_sampler_apply(self._grammar, ctypes.byref(array))
        if not np.isfinite(cur["logit"][:n]).any():
            array = self._candidates(logits)
            llama_cpp.llama_sampler_apply(self._grammar, ctypes.byref(array))
        llama_cpp.llama_sampler_apply(self._ptr, ctypes.byref(array))
        return int(array.data[array.selected].id)

    def _logprob(self, ctx: llama_cpp.llama_context_p, batch_index: int, token: int) -> TokenLogprob:
        logits = self._logits(ctx, batch_index).astype(np.float64)
        peak = logits.max()
        logprobs = logits - (peak + np.log(np.exp(logits - peak).sum()))
        k = min(self._n_logprobs or 0, self._n_vocab)
        top: tuple[tuple[int, float], ...] = ()
        if k > 0:
            best = np.argpartition(-logprobs, k - 1)[:k]
            best = best[np.argsort(-logprobs[best], kind="stable")]
            top = tuple((int(t), float(logprobs[t])) for t in best)
        return TokenLogprob(logprob=float(logprobs[token]), top=top)

    def close(self) -> None:
        if self._grammar:
            llama_cpp.llama_sampler_free(self._grammar)
            self._grammar = None
        if self._ptr:
            llama_cpp.llama_sampler_free(self._ptr)
            self._ptr = None
