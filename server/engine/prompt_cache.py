"""Prompt cache in host memory: the KV cells of conversations that lost their slot, kept to be put back.

With ``PARALLEL`` slots, a slot holds the cells of the last request it served; a new conversation that takes it
would throw them away, and a user coming back to that conversation would pay its whole prefill again.
llama.cpp's own ``llama-server`` keeps such cells in host memory (``--cache-ram``); so does this: before a slot
is given to another prompt, its cells are serialized (``llama_state_seq_get_data``) into this cache, and a new
request whose prompt shares enough more with an entry than with any slot (:func:`worth_restoring`) gets them
back (``llama_state_seq_set_data``). Bounded in bytes. When room is needed, the scope holding the most bytes
gives up its oldest entry first: one tenant (API key) that floods the cache evicts its own entries, not everyone
else's, and with a single scope that is plain least-recently-stored.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from server.engine.scheduling import common_prefix


class Blob(Protocol):
    def __len__(self) -> int: ...


@dataclass(eq=False)
class Entry:
    tokens: list[int]  # the tokens whose cells ``data`` holds, in order
    scope: str  # cache_scope of the request that filled them: shared only within it
    data: Blob


# Putting an entry back copies all its cells; computing a token costs far more than copying its cells (a 7B
# shape here: 13 MiB, 48 tokens, copied in 5-56 ms against ~50 ms of prefill a token; the 135M model about 100x
# too). So an entry is worth restoring when it saves at least one token per this many it holds.
RESTORE_TOKENS_PER_SAVED = 64


def worth_restoring(n_tokens: int, gain: int) -> bool:
    """Whether putting back an entry of ``n_tokens``, to save ``gain`` prompt tokens over the best a slot offers,
    pays (and so whether cells a slot gives up are worth keeping)."""
    return gain > 0 and gain * RESTORE_TOKENS_PER_SAVED >= n_tokens


class PromptCache:
    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        self._entries: OrderedDict[int, Entry] = OrderedDict()  # oldest first
        self.bytes = 0
        self._scope_bytes: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, tokens: Sequence[int], scope: str, data: Blob) -> bool:
        """Keep ``data`` (the cells of ``tokens``); entries it makes redundant (a prefix of ``tokens``, same scope)
        go, then the oldest until it fits. False when it can never fit."""
        if len(data) > self.limit_bytes:
            return False
        tokens = list(tokens)
        for key, e in list(self._entries.items()):
            if e.scope == scope and len(e.tokens) <= len(tokens) and tokens[:len(e.tokens)] == e.tokens:
                self._drop(key)
        while self._entries and self.bytes + len(data) > self.limit_bytes:
            self._drop(self._victim(scope))
        entry = Entry(tokens, scope, data)
        self._entries[id(entry)] = entry
        self.bytes += len(data)
        self._scope_bytes[scope] = self._scope_bytes.get(scope, 0) + len(data)
        return True

    def covers(self, tokens: Sequence[int], scope: str) -> bool:
        """Whether an entry of ``scope`` already holds the cells of ``tokens`` (it starts with all of them)."""
        n = len(tokens)
        return any(e.scope == scope and len(e.tokens) >= n and e.tokens[:n] == list(tokens)
                   for e in self._entries.values())

    def scope_bytes(self, scope: str) -> int:
        return self._scope_bytes.get(scope, 0)

    def _victim(self, inserting: str) -> int:
        """The oldest entry of the scope holding the most bytes (the inserting scope on a tie)."""
        largest = max(self._scope_bytes, key=lambda sc: (self._scope_bytes[sc], sc == inserting))
        return next(key for key, e in self._entries.items() if e.scope == largest)

    def best(self, prompt: Sequence[int], scope: str) -> tuple[Entry | None, int]:
        """The entry sharing the longest prefix with ``prompt`` (same scope), and that length."""
        best: Entry | None = None
        n_best = 0
        for e in self._entries.values():
            if e.scope == scope:
                n = common_prefix(e.tokens, prompt)
                if n > n_best:
                    best, n_best = e, n
        return best, n_best

    def take(self, entry: Entry) -> None:
        """Remove ``entry``: its cells are going back into a slot (which stores them again when it moves on)."""
        self._drop(id(entry))

    def _drop(self, key: int) -> None:
        entry = self._entries.pop(key)
        self.bytes -= len(entry.data)
        left = self._scope_bytes[entry.scope] - len(entry.data)
        if left:
            self._scope_bytes[entry.scope] = left
        else:
            del self._scope_bytes[entry.scope]
