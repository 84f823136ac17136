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
    """How many tokens a request drafts next. Like transformers' assisted generation: the length grows by 2
    after a step whose drafts were all accepted and falls to one more than were accepted otherwise, within
    [1, ``max_k``]; so a stream that copies its input drafts long runs and one that does not drafts one token,
    whose verification costs little beside the token the step computes anyway. After ``pause_after``
    steps in a row where nothing was accepted it drafts nothing for a while (a cool-down that doubles each
    time, up to ``max_pause`` steps)."""

    max_k: int
    pause_after: int = 3  # fruitless drafting steps in a row before pausing
    max_pause: int = 64
    current: int = 0
    _fruitless: int = 0
    _pause: int = 0
    _next_pause: int = 4
    drafted: int = 0
    accepted: int = 0

    def __post_init__(self) -> None:
        self.current = self.current or max(1, self.max_k // 2)

    def k(self) -> int:
        if self._pause > 0:
            self._pause -= 1
            return 0
        return self.current

    def observe(self, drafted: int, accepted: int) -> None:
        if drafted == 0:
            return
        self.drafted += drafted
        self.accepted += accepted
        if accepted == drafted:
            self.current = min(self.max_k, self.current + 2)
        else:
            self.current = max(1, min(self.max_k, accepted + 1))
        if accepted:
            self._fruitless = 0
            self._next_pause = 4
            return
        self._fruitless += 1
        if self._fruitless >= self.pause_after:
            self._pause = self._next_pause
            self._next_pause = min(self._next_pause * 2, self.max_pause)
            self._fruitless = 0

    @property
    def acceptance(self) -> float | None:
        return self.accepted / self.drafted if self.drafted else None
