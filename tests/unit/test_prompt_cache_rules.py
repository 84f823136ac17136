"""The host-memory prompt cache's rules without a model: what it holds already, so a slot's cells are not copied
there twice."""

from __future__ import annotations

from server.engine.prompt_cache import PromptCache


def test_an_entry_covers_the_tokens_it_starts_with_in_its_own_scope_only() -> None:
    cache = PromptCache(limit_bytes=1000)
    assert cache.put([1, 2, 3, 4], "key-a", b"x" * 10)
    assert cache.covers([1, 2, 3, 4], "key-a") and cache.covers([1, 2], "key-a")
    assert not cache.covers([1, 2, 3, 4, 5], "key-a")  # more than it holds
    assert not cache.covers([1, 2, 9], "key-a")  # another continuation
    assert not cache.covers([1, 2], "key-b")  # another tenant's entry is not theirs to reuse
    cache.take(next(iter(cache._entries.values())))
    assert not cache.covers([1, 2], "key-a")  # taken back into a slot: nothing holds it now
