"""Structured output, sampling extras, logit bias, logprobs, n, and /tokenize, through the official openai SDK
and plain HTTP on the real server and the embedded model."""

from __future__ import annotations

import json
import math
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import openai
import pytest
from llama_cpp import Llama
from pydantic import BaseModel, Field

MODEL = "SmolLM2-135M-Instruct.Q4_1"


class City(BaseModel):
    name: str = Field(max_length=30)
    country: str = Field(max_length=30)
    is_capital: bool


PROMPTS = [
    "Tell me about Paris.",
    "Describe the city of Tokyo in JSON.",
    "Give me facts about Lyon, France.",
    "What do you know about Nairobi?",
    "Name a city in Brazil.",
]


def test_parse_with_a_pydantic_model_succeeds_20_of_20(client: openai.OpenAI) -> None:
    cases = [(prompt, temperature) for prompt in PROMPTS for temperature in (0.0, 0.4, 0.8, 1.2)]

    def ask(case: tuple[str, float]) -> City | None:
        prompt, temperature = case
        reply = client.chat.completions.parse(
            model=MODEL, messages=[{"role": "user", "content": prompt}], response_format=City,
            temperature=temperature, max_tokens=200, seed=7)
        assert reply.choices[0].finish_reason == "stop"
        return reply.choices[0].message.parsed

    with ThreadPoolExecutor(4) as pool:
        parsed = list(pool.map(ask, cases))
    assert len(parsed) == 20
    assert all(isinstance(city, City) for city in parsed)
    assert all(len(city.name) <= 30 for city in parsed if city)


def test_json_object_output_parses(client: openai.OpenAI) -> None:
    """What the grammar guarantees, at any temperature: the answer is a JSON object, whole when it finished. What a
    135M model samples at 0.7 or 1.0 (whether it closes the object within the budget) is not the test's business;
    greedy, asked to copy a small object, it does."""
    prompt = 'Reply with exactly this JSON object and nothing else: {"colour": "red"}'
    for temperature in (0.0, 0.7, 1.0):
        reply = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": prompt}],
            response_format={"type": "json_object"}, temperature=temperature, max_tokens=100, seed=3)
        content = reply.choices[0].message.content or ""
        assert content.startswith("{"), content
        if temperature == 0.0:
            assert reply.choices[0].finish_reason == "stop", content
        if reply.choices[0].finish_reason == "stop":
            assert isinstance(json.loads(content), dict)


def test_a_cut_structured_answer_says_length(client: openai.OpenAI) -> None:
    schema = {"type": "object", "properties": {"story": {"type": "string"}}, "required": ["story"]}
    reply = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Write a long story."}], max_tokens=5, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": schema}})
    assert reply.choices[0].finish_reason == "length"
    assert (reply.choices[0].message.content or "").startswith('{')


def test_completions_take_a_json_schema(client: openai.OpenAI) -> None:
    schema = {"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"],
              "additionalProperties": False}
    out = client.completions.create(
        model=MODEL, prompt="What is 2 + 2? Answer in JSON:", max_tokens=40, temperature=0,
        extra_body={"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}}})
    value = json.loads(out.choices[0].text)
    jsonschema.validate(value, schema)


@pytest.mark.parametrize(("keyword", "schema"), [
    ("minimum", {"type": "object", "properties": {"age": {"type": "integer", "minimum": 0}}}),
    ("patternProperties", {"type": "object", "patternProperties": {"^a": {"type": "string"}}}),
    ("format", {"type": "string", "format": "email"}),
    ("not", {"not": {"type": "string"}}),
    ("minItems", {"type": "array", "minItems": 3, "maxItems": 2}),
    ("enum", {"enum": []}),
    ("required", {"type": "object", "required": "name"}),
])
def test_a_schema_keyword_the_grammar_cannot_enforce_is_refused_by_name(
    client: openai.OpenAI, keyword: str, schema: dict[str, object]
) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=5,
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
    assert refused.value.param == "response_format"
    assert f"'{keyword}'" in refused.value.message or f"format '{schema.get('format')}'" in refused.value.message


def test_generate_takes_a_grammar_and_a_json_schema(http: httpx.Client) -> None:
    out = http.post("/generate", json={"prompt": "Is the sky blue? Answer:", "max_length": 10, "temperature": 1.0,
                                       "grammar": 'root ::= " yes" | " no"'}).json()
    assert out["text"] in (" yes", " no") and out["finish_reason"] == "stop"
    schema = {"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]}},
              "required": ["colour"]}
    out = http.post("/generate", json={"prompt": "The sky's colour as JSON:", "max_length": 30, "temperature": 0.8,
                                       "json_schema": schema}).json()
    jsonschema.validate(json.loads(out["text"]), schema)


def test_a_grammar_that_allows_only_unlikely_tokens_still_holds(http: httpx.Client) -> None:
    # None of the likeliest tokens is allowed here, so the grammar masks the whole vocabulary.
    for temperature in (0.0, 1.0):
        out = http.post("/generate", json={"prompt": "Once upon a time", "max_length": 20, "temperature": temperature,
                                           "grammar": 'root ::= "zqxj" [0-9]'}).json()
        assert out["text"][:4] == "zqxj" and out["text"][4:].isdigit() and out["finish_reason"] == "stop"


def test_generate_refuses_a_bad_grammar(http: httpx.Client) -> None:
    bad = http.post("/generate", json={"prompt": "x", "grammar": "root ::= undefined-rule"})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_grammar"
    both = http.post("/generate", json={"prompt": "x", "grammar": 'root ::= "a"', "json_schema": {}})
    assert both.status_code == 400 and both.json()["error"]["param"] == "json_schema"
    keyword = http.post("/generate", json={"prompt": "x", "json_schema": {"type": "integer", "multipleOf": 3}})
    assert keyword.status_code == 400 and "multipleOf" in keyword.json()["error"]["message"]



def test_a_grammar_that_allows_no_token_fails_the_request_not_the_server(http: httpx.Client) -> None:
    # Accepting a token the grammar refuses aborts the process inside llama.cpp; the sampler stops first.
    out = http.post("/generate", json={"prompt": "x", "max_length": 3, "grammar": r"root ::= [^\x00-\U0010FFFF]"})
    assert out.status_code == 400 and "grammar allows no token" in out.json()["error"]["message"]
    assert out.json()["error"]["code"] == "invalid_grammar"
    assert out.json()["error"]["type"] == "invalid_request_error"
    assert http.post("/generate", json={"prompt": "x", "max_length": 2}).status_code == 200


def test_grammars_that_would_overflow_llama_cpp_are_refused(http: httpx.Client) -> None:
    # llama.cpp parses groups recursively: about 20000 nested groups (or maxLength 20000, which the converter
    # nests as deep) crash the process instead of failing.
    deep = http.post("/generate", json={"prompt": "x", "grammar": "root ::= " + "(" * 20000 + '"a"' + ")" * 20000})
    assert deep.status_code == 400 and deep.json()["error"]["code"] == "invalid_grammar"
    long = http.post("/generate", json={"prompt": "x", "json_schema": {"type": "string", "maxLength": 20000}})
    assert long.status_code == 400 and "maxLength" in long.json()["error"]["message"]
    assert http.get("/health").status_code == 200
    out = http.post("/generate", json={"prompt": "x", "max_length": 3, "json_schema": {"type": "string",
                                                                                       "maxLength": 1000}})
    assert out.status_code == 200 and out.json()["text"].startswith('"')


# ---- sampling extras, logit bias, logprobs, n ----

def test_top_k_and_min_p_are_applied(client: openai.OpenAI) -> None:
    prompt = "Once upon a time"
    greedy = client.completions.create(model=MODEL, prompt=prompt, max_tokens=20, temperature=0).choices[0].text
    for extra in ({"top_k": 1}, {"min_p": 1.0}):
        hot = client.completions.create(model=MODEL, prompt=prompt, max_tokens=20, temperature=1.5, seed=11,
                                        extra_body=extra).choices[0].text
        assert hot == greedy, extra  # one candidate left: sampling hot gives the greedy text
    loose = client.completions.create(model=MODEL, prompt=prompt, max_tokens=20, temperature=1.5, seed=11)
    assert loose.choices[0].text != greedy


def test_seed_is_applied(client: openai.OpenAI) -> None:
    def sample(seed: int) -> str:
        return client.completions.create(model=MODEL, prompt="My favourite word is", max_tokens=12,
                                         temperature=1.5, seed=seed).choices[0].text
    assert sample(21) == sample(21)
    assert len({sample(21), sample(22), sample(23)}) > 1


def test_repetition_penalty_is_applied(client: openai.OpenAI) -> None:
    prompt = "one two one two one two one two"
    plain = client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0).choices[0].text
    penalised = client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0,
                                          extra_body={"repetition_penalty": 1.8}).choices[0].text
    assert penalised != plain


def test_logit_bias_minus_100_keeps_a_token_out(client: openai.OpenAI, vocab: Llama) -> None:
    prompt = "The capital of France is"
    plain = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0, logprobs=0)
    assert plain.choices[0].logprobs is not None
    first = plain.choices[0].logprobs.tokens[0]  # type: ignore[index]
    [token] = vocab.tokenize(first.encode(), add_bos=False, special=False)
    banned = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0, logprobs=0,
                                       logit_bias={str(token): -100})
    assert banned.choices[0].logprobs is not None
    assert first not in banned.choices[0].logprobs.tokens  # type: ignore[operator]
    with pytest.raises(openai.BadRequestError) as outside:
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, logit_bias={"99999999": -100})
    assert outside.value.param == "logit_bias"


def test_ignore_eos_generates_max_tokens_past_end_of_generation(client: openai.OpenAI, vocab: Llama) -> None:
    eos = vocab.token_eos()
    bias = {str(eos): 100}  # end-of-generation is the likeliest token at every step
    stopped = client.completions.create(model=MODEL, prompt="Hello", max_tokens=8, temperature=0, logit_bias=bias)
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.usage is not None and stopped.usage.completion_tokens <= 1
    kept = client.completions.create(model=MODEL, prompt="Hello", max_tokens=8, temperature=0, logit_bias=bias,
                                     extra_body={"ignore_eos": True})
    assert kept.choices[0].finish_reason == "length"
    assert kept.usage is not None and kept.usage.completion_tokens == 8


def test_top_logprobs_are_consistent_with_greedy_choice(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "What is the capital of France?"}], max_tokens=12,
        temperature=0, logprobs=True, top_logprobs=5)
    content = reply.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == reply.usage.completion_tokens  # type: ignore[union-attr]
    assert "".join(t.token for t in content) == reply.choices[0].message.content
    for entry in content:
        assert len(entry.top_logprobs) == 5
        values = [alt.logprob for alt in entry.top_logprobs]
        assert values == sorted(values, reverse=True)
        assert entry.top_logprobs[0].token == entry.token  # greedy takes the likeliest token
        assert math.isclose(entry.top_logprobs[0].logprob, entry.logprob)
        assert sum(math.exp(v) for v in values) <= 1.0 + 1e-6
        assert entry.bytes == list(entry.token.encode())
    plain = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "What is the capital of France?"}], max_tokens=12,
        temperature=0)
    assert plain.choices[0].logprobs is None  # only computed when asked


def test_streamed_chat_carries_logprobs(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Say hello."}], max_tokens=8, temperature=0,
        logprobs=True, top_logprobs=2, stream=True))
    entries = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content or []]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert entries and "".join(e.token for e in entries) == text
    assert all(len(e.top_logprobs) == 2 for e in entries)


def test_n_returns_that_many_choices(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Name an animal."}], max_tokens=10, temperature=1.0,
        n=3, seed=5)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert all(c.message.content for c in reply.choices)
    assert len({c.message.content for c in reply.choices}) > 1
    assert reply.usage is not None
    assert reply.usage.completion_tokens <= 30
    out = client.completions.create(model=MODEL, prompt="Hello", max_tokens=4, n=2, temperature=0)
    assert len(out.choices) == 2 and out.choices[0].text == out.choices[1].text


def test_n_choices_compute_a_long_prompt_once(client: openai.OpenAI, http: httpx.Client) -> None:
    def cached() -> float:
        lines = http.get("/metrics").text.splitlines()
        return sum(float(line.split()[-1]) for line in lines if line.startswith("llama_prompt_tokens_cached_total"))

    system = "You are a careful assistant who answers in one short sentence. " * 6  # well over 32 tokens
    messages = [{"role": "system", "content": system}, {"role": "user", "content": "Name a colour."}]
    for stream in (False, True):
        before = cached()
        reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=1.0, n=3,  # type: ignore[arg-type]
                                               seed=9, stream=stream)
        if stream:
            chunks = list(reply)  # type: ignore[arg-type]
            assert sorted(c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason) == [0, 1, 2]
        else:
            assert len(reply.choices) == 3  # type: ignore[union-attr]
            prompt_tokens = reply.usage.prompt_tokens  # type: ignore[union-attr]
        # Choices 1 and 2 start from a copy of choice 0's prompt cells (all but the last token).
        assert cached() - before >= 2 * (prompt_tokens - 1) - 1


def idle(http: httpx.Client) -> None:
    """Wait until the cancelled requests have left the engine."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        ready = http.get("/ready").json()
        if ready["slots_busy"] == 0 and ready["queue_depth"] == 0:
            return
        time.sleep(0.05)
    raise AssertionError(f"the engine is still busy: {ready}")


def test_more_choices_than_slots_are_refused_whole(client: openai.OpenAI, http: httpx.Client) -> None:
    # The live server decodes 4 sequences at once: 16 choices would take every slot and queue place.
    long = [{"role": "system", "content": "Answer in one short sentence, please. " * 8},
            {"role": "user", "content": "Name a colour."}]
    with pytest.raises(openai.BadRequestError, match="at most 4 sequences"):
        client.chat.completions.create(model=MODEL, messages=long, max_tokens=4, n=16)  # type: ignore[arg-type]
    streamed = http.post("/v1/chat/completions", json={"model": MODEL, "messages": long, "max_tokens": 4, "n": 16,
                                                       "stream": True})
    assert streamed.status_code == 400 and streamed.json()["error"]["param"] == "n"  # before the stream begins
    idle(http)
    ok = client.chat.completions.create(model=MODEL, messages=long, max_tokens=4, n=4)  # type: ignore[arg-type]
    assert len(ok.choices) == 4  # as many as the slots


def test_n_choices_stream_interleaved_with_their_index(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Name an animal."}], max_tokens=8, temperature=0, n=3,
        stream=True, stream_options={"include_usage": True}))
    texts = {i: "".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == i)
             for i in range(3)}
    finishes = sorted(c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason)
    assert finishes == [0, 1, 2]
    assert texts[0] and texts[0] == texts[1] == texts[2]  # greedy: the same text three times
    assert chunks[-1].usage is not None and chunks[-1].choices == []
    plain = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Name an animal."}], max_tokens=8, temperature=0)
    assert texts[0] == plain.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == 3 * plain.usage.completion_tokens  # type: ignore[union-attr]


# ---- /tokenize, /detokenize ----

def test_tokenize_and_detokenize_match_llama_cpp(http: httpx.Client, vocab: Llama) -> None:
    text = "Hello world, 媽 and 🤗 <|im_end|>"
    tokens = http.post("/tokenize", json={"content": text}).json()["tokens"]
    assert tokens == vocab.tokenize(text.encode(), add_bos=False, special=True)
    plain = http.post("/tokenize", json={"content": text, "parse_special": False, "add_special": True}).json()
    assert plain["tokens"] == vocab.tokenize(text.encode(), add_bos=True, special=False)
    assert http.post("/detokenize", json={"tokens": tokens}).json() == {"content": text}
    pieces = http.post("/tokenize", json={"content": "🤗", "with_pieces": True}).json()["tokens"]
    assert [p["id"] for p in pieces] == vocab.tokenize("🤗".encode(), add_bos=False, special=True)
    assert bytes(b for p in pieces for b in (p["piece"] if isinstance(p["piece"], list) else p["piece"].encode())
                 ) == "🤗".encode()
    bad = http.post("/detokenize", json={"tokens": [10**8]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
