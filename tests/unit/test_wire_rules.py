"""The wire rules of the new surfaces without a server: how each dialect's body is read (embeddings' input shapes,
/infill's llama-server fields, Ollama's embed body), the embedding settings, and the precision vectors are
written with."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from server.api.embeddings.protocol import EmbeddingRequest
from server.api.ollama.protocol import EmbedRequest
from server.embeddings import json_floats, off_loop_size
from server.protocol import InfillRequest
from server.settings import Settings


@pytest.mark.parametrize(("given", "inputs"), [
    ("one text", ["one text"]),
    (["a", "b"], ["a", "b"]),
    ([1, 2, 3], [[1, 2, 3]]),  # one list of token ids is one input
    ([[1, 2], [3]], [[1, 2], [3]]),
    ([], []),  # refused later, by the core, with the input's name
])
def test_an_embedding_input_of_each_shape_is_a_list_of_inputs(given: object, inputs: list[object]) -> None:
    assert EmbeddingRequest.model_validate({"input": given}).inputs() == inputs


@pytest.mark.parametrize("body", [
    {"input": 3},  # not text, not a list
    {"input": ["a", 1]},  # mixed
    {"input": [[1, "2"]]},
    {"input": "x", "encoding_format": "int8"},
    {"input": "x", "dimensions": 0},
    {"input": "x", "dimensions": "64"},  # strict: a number, not its text
    {},
])
def test_an_embedding_body_of_the_wrong_type_is_refused(body: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        EmbeddingRequest.model_validate(body)


def test_unknown_embedding_fields_are_ignored_as_clients_send_them() -> None:
    body = EmbeddingRequest.model_validate({"input": "x", "user": "u-1", "extra_body_field": True})
    assert body.inputs() == ["x"] and body.encoding_format == "float"


@pytest.mark.parametrize(("n_predict", "max_length", "expected"), [
    (None, None, None),  # the server's default
    (16, None, 16),
    (0, None, 1),  # llama.vim's cache warm-up: the prompt and one token
    (-1, None, None),
    (16, 4, 4),  # the seed's own field wins
])
def test_infill_reads_llama_servers_n_predict(n_predict: int | None, max_length: int | None,
                                              expected: int | None) -> None:
    body = {"input_prefix": "a", "input_suffix": "b", "n_predict": n_predict, "max_length": max_length}
    assert InfillRequest.model_validate({k: v for k, v in body.items() if v is not None}).max_length == expected


def test_infill_accepts_the_fields_editors_send_and_chunks_with_their_time() -> None:
    body = InfillRequest.model_validate({
        "input_prefix": "def f(", "input_suffix": ")\n", "id_slot": 0, "samplers": ["top_k", "infill"],
        "t_max_prompt_ms": 500, "t_max_predict_ms": 1000, "n_indent": 4, "response_fields": ["content"],
        "input_extra": [{"filename": "a.py", "text": "x = 1\n", "time": 1733300000.0}]})
    assert body.input_extra[0].filename == "a.py" and body.input_extra[0].text == "x = 1\n"
    with pytest.raises(ValidationError):
        InfillRequest.model_validate({"input_prefix": "a"})  # the suffix is required, as in llama-server


def test_ollama_embed_takes_a_text_or_texts() -> None:
    assert EmbedRequest.model_validate({"model": "m", "input": "x"}).input == "x"
    assert EmbedRequest.model_validate({"model": "m", "input": ["x", "y"], "truncate": True}).input == ["x", "y"]
    with pytest.raises(ValidationError):
        EmbedRequest.model_validate({"model": "m", "input": [1, 2]})


def test_embedding_settings_read_as_serve_reads_them() -> None:
    assert not Settings().embeddings_on
    assert Settings(embedding_pooling="mean").embeddings_on  # the chat model embeds
    assert Settings(embedding_dimensions="512, 256").embedding_dimensions == [512, 256]
    with pytest.raises(ValidationError):
        Settings(embedding_dimensions="0")
    with pytest.raises(ValidationError):
        Settings(embedding_pooling="max")  # not a pooling llama.cpp has


def test_vectors_are_written_to_a_float32s_own_precision_and_small_answers_on_the_loop() -> None:
    rng = np.random.default_rng(0)
    vector = rng.standard_normal(384).astype(np.float32)
    vector /= np.linalg.norm(vector)
    written = json_floats(vector)
    assert all(isinstance(x, float) for x in written)
    assert max(abs(a - float(b)) for a, b in zip(written, vector, strict=True)) <= 5e-9
    assert max(len(repr(x)) for x in written) <= len("-0.12345678")
    assert not off_loop_size([vector] * 16) and off_loop_size([vector] * 64)
