"""Speculative decoding's two small parts, kept apart from llama.cpp: proposing draft tokens by prompt lookup,
and deciding how many to propose.

A step verifies a slot's drafts in the same ``llama_decode`` as everything else: the slot's last token and its
``k`` drafts go in with logits for every position, and the slot's own sampler chain samples position after
position, stopping at the first sample that differs from the draft. Each emitted token is one sample of the chain,
exactly as without speculation: greedy output is unchanged, and so is a seeded sampler's sequence of draws, which
is standard rejection sampling for a draft that puts all its probability on one token (accept the draft ``x``
with probability ``p(x)``; otherwise the sample is drawn from ``p`` without ``x``). The cells of rejected drafts
are removed from the sequence.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class NgramIndex:
    """Where each n-gram of a token history last occurred, for prompt lookup (vLLM's and TGI's "n-gram"
    speculation): the tokens that followed the newest earlier occurrence of the history's last ``n`` tokens are
    the draft. Updating costs O(sizes) per token; a look-up O(sizes)."""

    max_n: int
    min_n: int = 2
    history: list[int] = field(default_factory=list)
    _last_end: list[dict[tuple[int, ...], int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.min_n = max(1, min(self.min_n, self.max_n))
        self._last_end = [{} for _ in range(self.max_n + 1)]

    def extend(self, tokens: list[int]) -> None:
        for token in tokens:
            h = self.history
            # The n-grams ending at the previous token now have a continuation: index them.
            end = len(h) - 1
            for n in range(self.min_n, self.max_n + 1):
                if end - n + 1 >= 0:
                    self._last_end[n][tuple(h[end - n + 1:end + 1])] = end
            h.append(token)

    def draft(self, k: int) -> list[int]:
        """Up to ``k`` tokens that followed the newest earlier occurrence of the longest matching suffix."""
        h = self.history
        if k <= 0:
            return []
        for n in range(self.max_n, self.min_n - 1, -1):
            if len(h) < n:
                continue
            end = self._last_end[n].get(tuple(h[-n:]))
            if end is not None:
                return h[end + 1:end + 1 + k]
        return []


@dataclass
class DraftLength:
    """How many tokens a request drafts next.

    The length follows the drafts' fate, as in transformers' assisted generation: 2 more after a step whose
    drafts were all accepted (copied spans come in runs), one more than were accepted otherwise, within
    [1, ``max_k``]. Whether to draft at all follows the cost: a draft accepted with probability ``a`` is worth
    its verification only when ``a`` exceeds ``cost``, what one more token adds to a step in decode steps
    (measured by the engine: near 0 for a large model, whose steps are bound by reading the weights; about
    0.6 for the embedded 135M model on 2 cores). Below that the request does not draft, and tries one token now
    and then (a probe whose interval doubles while it fails, up to ``max_probe`` steps) in case the text turned
    predictable.
    """

    max_k: int
    decay: float = 0.8  # weight of the past in the acceptance estimate (about the last 5 drafting steps)
    max_probe: int = 64
    current: int = 0
    # Decayed counts of accepted drafts and of misses; the prior (2 to 1) lets a new request try drafting.
    _accepted_w: float = 2.0
    _missed_w: float = 1.0
    _idle: int = 0
    _probe_every: int = 4
    drafted: int = 0
    accepted: int = 0

    def __post_init__(self) -> None:
        self.current = self.current or min(self.max_k, 4)

    @property
    def acceptance(self) -> float:
        """The estimated probability that a drafted token is accepted."""
        return self._accepted_w / (self._accepted_w + self._missed_w)

    def k(self, cost: float) -> int:
        if self.acceptance > cost + 0.1:  # a margin: a gain within noise is not worth the risk of a loss
            self._idle = 0
            return self.current
        self._idle += 1
        if self._idle >= self._probe_every:
            self._idle = 0
            return 1
        return 0

    def observe(self, drafted: int, accepted: int) -> None:
        if drafted == 0:
            return
        self.drafted += drafted
        self.accepted += accepted
        self._accepted_w = self.decay * self._accepted_w + accepted
        self._missed_w = self.decay * self._missed_w + (accepted < drafted)
        if accepted == drafted:
            self.current = min(self.max_k, self.current + 2)
        else:
            self.current = max(1, min(self.max_k, accepted + 1))
        if accepted:
            self._probe_every = 4
        elif drafted == 1:  # a failed probe: wait longer before the next one
            self._probe_every = min(2 * self._probe_every, self.max_probe)
