"""Two decisions of the engine's step, kept apart from llama.cpp: which slot a request takes, and how many
prompt tokens a step may prefill beside the streams already generating."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

# With no own slot and no empty one, a slot is reused for its prefix only when the prompt keeps at least this
# share of its cells; llama-server treats losing more than half of a slot's context as losing it.
KEEP_SHARE = 0.5
# A prefix held by another slot is copied into the chosen one when that saves at least this many tokens of
# prefill: the copy moves the whole KV stream of a slot (a few tens of ms on a 7B), so short prefixes are
# cheaper to compute.
COPY_MIN_TOKENS = 32
# While streams are generating, a step takes queued prompts whole (WAITING_SERVED_RATIO) only up to this many
# tokens in all: the streams pause once, for a few dozen tokens' prefill, not for a long prompt.
QUEUE_STEP_TOKENS = 64


class CachedSlot(Protocol):
    seq_id: int
    tokens: list[int]
    prompt_len: int  # of the last request that filled ``tokens``; the cells past it hold its output
    last_used: float
    scope: str


S = TypeVar("S", bound=CachedSlot)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def choose_slot(free: Sequence[S], prompt: Sequence[int], scope: str, reuse: bool,
                busy: frozenset[int] = frozenset(), *, evict_freely: bool = False) -> tuple[S, int]:
    """The free slot a request takes, and how many of its cached tokens the prompt shares.

    As llama-server, by similarity, then least recently used; but without llama-server's host-memory prompt
    cache, a slot holding another conversation is not given up while an empty one is left: first the slot that
    is this prompt's own (it continues the slot's last prompt), then an empty slot, then the slot that keeps the
    most of its cells (at least half), then the least recently used. Only slots whose last request had the same
    ``scope`` share their cells.

    ``busy``: the sequence ids of the slots generating, when each slot has its own KV stream. llama.cpp decodes
    such sequences in one micro-batch only while their ids are consecutive (each run of them is another pass
    over the weights: +15-25% a step for two streams on the 7B shape here), so an empty slot next to a busy one
    is taken first; so is the least recently used one next to a busy one when ``evict_freely`` (a prompt cache
    keeps what the slot gives up), and otherwise the least recently used one, whose conversation is the least
    likely to come back.
    """
    shared = {id(s): common_prefix(s.tokens, prompt) if reuse and s.scope == scope and s.tokens else 0
              for s in free}

    def own(s: S) -> bool:
        # The prompt continues what the slot holds up to the end of its last prompt: a conversation's next turn,
        # a stopped answer continued, the same prompt again. Another conversation that only shares the system
        # prompt diverges before that end.
        return shared[id(s)] > 0 and shared[id(s)] >= min(s.prompt_len, len(s.tokens))

    def keeps_most(s: S) -> bool:
        return shared[id(s)] > 0 and shared[id(s)] >= KEEP_SHARE * len(s.tokens)

    def best(slots: list[S]) -> tuple[S, int]:
        slot = max(slots, key=lambda s: (shared[id(s)], s.last_used))
        return slot, shared[id(slot)]

    def apart(s: S) -> bool:  # would decode in a micro-batch of its own
        return bool(busy) and s.seq_id - 1 not in busy and s.seq_id + 1 not in busy

    if mine := [s for s in free if own(s)]:
        return best(mine)
    if empty := [s for s in free if not s.tokens]:
        return min(empty, key=lambda s: (apart(s), s.seq_id)), 0
    if similar := [s for s in free if keeps_most(s)]:
        return best(similar)
    slot = min(free, key=lambda s: (evict_freely and apart(s), s.last_used))
    return slot, shared[id(slot)]


def best_donor(slots: Sequence[S], prompt: Sequence[int], scope: str) -> tuple[S | None, int]:
    """The slot, busy or not, whose cells share the longest prefix with ``prompt`` (same scope only)."""
    best: S | None = None
    n_best = 0
    for s in slots:
        if s.scope == scope and s.tokens:
            n = common_prefix(s.tokens, prompt)
            if n > n_best:
                best, n_best = s, n
    return best, n_best


@dataclass
class PrefillBudget:
    """Prompt tokens a step may carry while streams are generating.

    A fixed number when set; else measured: a step with ``n`` prompt tokens beside the streams costs about
    ``decode + n * per_token``, so ``decode / per_token`` tokens make such a step about two decode steps long
    (a running stream's inter-token gap at most doubles). Both terms are moving averages of this engine's own
    steps, so the budget follows the model, the machine and the number of streams.

    A long prefill beside the streams leaves no plain step to measure ``decode`` by, while the streams' contexts
    grow and the machine's load changes (a decode step measured while the machine was busy, twice what it costs
    later, let 4x steps pass for 2x). So while measuring, one step in ``refresh_every`` carries no prompt tokens:
    the streams alone, weighted ``refresh_alpha``.

    The averages still move with noise, and one low sample can let a step of two tokens through where one is all
    that fits (the 7B shape here: 808 ms against 485 for one token and 279 for none, the worst gap of a run). So a
    step of ``n`` tokens that did cost more than two decode steps caps the budget at ``n - 1`` for ``hold`` steps.
    """

    fixed: int = 0
    initial: int = 1  # until both costs are measured
    alpha: float = 0.2  # weight of the newest step in the averages
    refresh_every: int = 16  # steps with prompt tokens between plain ones, while measuring
    refresh_alpha: float = 0.5  # weight of such a plain step: it is the only fresh news of the decode cost
    decode_s: float | None = None  # a step of generating streams alone
    per_token_s: float | None = None  # what each prompt token adds to such a step
    last: int = 0
    since_plain: int = 0  # steps with prompt tokens since the last plain one (or the last refresh asked for)
    refreshing: bool = False  # the next step was asked to carry no prompt tokens
    hold: int = 256  # steps with prompt tokens a cap lasts
    cap: int = 0  # at most this many tokens while capped_for > 0
    capped_for: int = 0

    def tokens(self, room: int) -> int:
        """The budget for the next step: at most ``room``, else at least 1 (a prompt always advances), but 0 in
        the plain step that refreshes the decode cost now and then."""
        if room <= 0:
            return 0
        if not self.fixed and self.decode_s is not None and self.since_plain >= self.refresh_every:
            # Once per refresh_every steps whatever comes of it: drafts may still make the step not plain, and a
            # prompt must not wait on that.
            self.since_plain, self.refreshing = 0, True
            return 0
        if self.fixed:
            n = self.fixed
        elif self.decode_s is None or self.per_token_s is None:
            n = self.initial
        else:
            # Whole tokens that fit in one more decode step: rounding up would let each step pass two decode steps
            # (the 7B shape on 2 cores: a prompt token costs 0.6 of a decode step; two of them made 2.5x steps).
            n = math.floor(self.decode_s / self.per_token_s + 0.1)
            # Grow gradually, from one token: neither one noisy step nor the first guess (from a prefill alone,
            # whose fixed costs hide what a token adds) may unleash a long step beside the streams.
            n = min(n, 2 * max(self.last, 1))
            if self.capped_for:
                n = min(n, self.cap)
        self.last = max(1, min(n, room))
        return self.last

    def observe(self, seconds: float, n_decode: int, n_prompt: int) -> None:
        """Record a finished step: ``n_decode`` generating streams and ``n_prompt`` prompt tokens."""
        if n_decode == 0:
            if n_prompt and self.per_token_s is None:
                self.per_token_s = seconds / n_prompt  # a first guess from a prefill alone
            return
        refreshed, self.refreshing = self.refreshing, False
        if n_prompt == 0:
            alpha = self.refresh_alpha if refreshed else self.alpha
            self.decode_s = seconds if self.decode_s is None else self.decode_s + alpha * (seconds - self.decode_s)
            self.since_plain = 0
            return
        self.since_plain += 1
        if self.decode_s is None:
            return
        self.capped_for = max(0, self.capped_for - 1)
        if n_prompt > 1 and seconds > 2 * self.decode_s:  # more than the gap may grow: fewer tokens for a while
            self.cap, self.capped_for = n_prompt - 1, self.hold
        # The step's cost beyond a plain decode step, per prompt token (never 0: a noisy step can cost less).
        sample = max(seconds - self.decode_s, 0.05 * self.decode_s) / n_prompt
        self.per_token_s = sample if self.per_token_s is None else self.per_token_s + self.alpha * (
            sample - self.per_token_s)
