"""The embedding core's rules without a model: how much an embedding step may take beside the streams, and which
inputs are refused before they reach the engine (each naming its index)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from server.embeddings import _tokenize
from server.engine.embedding import EmbeddingPace
from server.errors import APIError


def test_the_pace_fits_an_embedding_step_in_one_decode_step() -> None:
    pace = EmbeddingPace(initial=32)
    assert pace.tokens(None) == 32 and pace.tokens(0.01) == 32  # nothing measured yet
    pace.observe(0.020, 200)  # 0.1 ms a token
    assert pace.tokens(0.010) == 100  # a 10 ms decode step: 100 tokens beside it
    assert pace.tokens(None) == 32
    pace.observe(1.0, 1)  # one slow step moves the average, not the whole of it
    assert 0 < pace.tokens(0.010) < 100
    assert pace.tokens(1e-9) == 1  # never 0: an input always advances


def _embedder(limit: int = 8, n_vocab: int = 100) -> SimpleNamespace:
    # The model's tokenizer stands in as one token a word, with [CLS] (1) and [SEP] (2) around them.
    model = SimpleNamespace(n_vocab=n_vocab, tokenize=lambda text, **_: [1, *(10 for _ in text.split()), 2])
    return SimpleNamespace(model=model, max_input_tokens=limit, limit_reason="its context")


def refused(inputs: list, **kw: int) -> APIError:  # type: ignore[type-arg]
    with pytest.raises(APIError) as caught:
        _tokenize(_embedder(), inputs, kw.get("max_total", 1000), "input")  # type: ignore[arg-type]
    return caught.value


def test_inputs_are_tokenized_with_their_special_tokens_and_ids_kept_as_given() -> None:
    assert _tokenize(_embedder(), ["a b", "c"], 1000, "input") == ((1, 10, 10, 2), (1, 10, 2))  # type: ignore[arg-type]
    assert _tokenize(_embedder(), [[5, 6, 99]], 1000, "input") == ((5, 6, 99),)  # type: ignore[arg-type]


def test_what_cannot_be_embedded_whole_is_refused_by_its_index() -> None:
    long = refused(["fine", "w " * 7])  # 9 tokens past a limit of 8
    assert long.status_code == 400 and long.detail.param == "input[1]" and long.detail.code == "context_length_exceeded"
    assert "9 tokens" in long.detail.message and "at most 8" in long.detail.message
    foreign = refused([[1, 2], [3, 100]])
    assert foreign.detail.param == "input[1]" and foreign.detail.code == "invalid_token"
    assert "100" in foreign.detail.message
    assert refused([[-1]]).detail.code == "invalid_token"
    assert refused([""]).detail.param == "input" and refused([[]]).detail.code == "invalid_value"
    total = refused(["a b c", "a b c"], max_total=8)  # 5 + 5 tokens
    assert total.detail.code == "too_many_tokens"
    surrogate = refused(["ok", "\ud800"])
    assert surrogate.detail.param == "input[1]"
