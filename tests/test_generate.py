"""POST /generate over real HTTP with the real model: content, determinism, streaming, stop strings."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from httpx_sse import connect_sse
from llama_cpp import Llama

PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def reference_llama(model_path: Path) -> Iterator[Llama]:
    """llama-cpp-python's own high-level API, in this process: the reference our server must match."""
    llm = Llama(str(model_path), n_ctx=2048, n_threads=2, flash_attn=True, verbose=False)
    yield llm
    llm.close()


def reference_text(llm: Llama, prompt: str, max_tokens: int) -> str:
    out = llm.create_completion(
        prompt, max_tokens=max_tokens, temperature=0.0, repeat_penalty=1.0, top_k=40, top_p=0.95
    )
    return str(out["choices"][0]["text"])  # type: ignore[index]


def generate(http: httpx.Client, **body: object) -> dict[str, object]:
    resp = http.post("/generate", json=body)
    assert resp.status_code == 200, resp.text
    return resp.json()  # type: ignore[no-any-return]


def stream_events(http: httpx.Client, **body: object) -> list[tuple[str, dict[str, object]]]:
    with connect_sse(http, "POST", "/generate", json={**body, "stream": True}) as source:
        assert source.response.headers["content-type"].startswith("text/event-stream")
        return [(sse.event, json.loads(sse.data)) for sse in source.iter_sse()]


@pytest.mark.parametrize("prompt", [PROMPT, "The capital of France is", "def fibonacci(n):"])
def test_greedy_equals_llama_cpp_in_process(http: httpx.Client, reference_llama: Llama, prompt: str) -> None:
    expected = reference_text(reference_llama, prompt, 40)
    body = generate(http, prompt=prompt, max_length=40, temperature=0)
    assert body["text"] == expected
    assert len(expected) > 20  # a real continuation, not an empty match


def test_seed_readme_example_answers_with_fifty_tokens(http: httpx.Client) -> None:
    body = generate(http, prompt=PROMPT, max_length=50)
    usage = body["usage"]
    assert isinstance(usage, dict)
    assert usage["prompt_tokens"] == 4
    assert usage["completion_tokens"] == 50 or body["finish_reason"] == "stop"
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert body["finish_reason"] in ("length", "stop")
    assert isinstance(body["text"], str) and len(body["text"].split()) >= 10
    timings = body["timings"]
    assert isinstance(timings, dict)
    assert 0 < timings["time_to_first_token_ms"] <= timings["total_ms"]
    assert timings["decode_tokens_per_second"] > 0
    assert body["model"] == "SmolLM2-135M-Instruct.Q4_1"


def test_greedy_is_deterministic(http: httpx.Client) -> None:
    texts = {generate(http, prompt="List three colors:", max_length=30, temperature=0)["text"] for _ in range(3)}
    assert len(texts) == 1


def test_same_seed_same_sample_other_seed_differs(http: httpx.Client) -> None:
    def sample(seed: int) -> object:
        return generate(http, prompt=PROMPT, max_length=40, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0,
                        seed=seed)["text"]

    assert sample(1234) == sample(1234)
    assert len({sample(s) for s in (1, 2, 3, 4)}) > 1


def test_stream_deltas_concatenate_to_the_plain_answer(http: httpx.Client) -> None:
    plain = generate(http, prompt=PROMPT, max_length=48, temperature=0)
    events = stream_events(http, prompt=PROMPT, max_length=48, temperature=0)
    kinds = [kind for kind, _ in events]
    assert kinds[-1] == "done" and set(kinds[:-1]) == {"token"}
    tokens = [data for kind, data in events if kind == "token"]
    assert len(tokens) >= 40  # one event per token (a few tokens may complete no character)
    assert "".join(str(d["text"]) for d in tokens) == plain["text"]
    done = events[-1][1]
    assert done["type"] == "done"
    assert done["finish_reason"] == plain["finish_reason"]
    assert done["usage"] == {**plain["usage"], "cached_tokens": done["usage"]["cached_tokens"]}  # type: ignore[dict-item]


def test_stop_string_ends_the_text_before_it(http: httpx.Client) -> None:
    full = str(generate(http, prompt=PROMPT, max_length=40, temperature=0)["text"])
    words = full.split()
    stop = words[len(words) // 2]
    body = generate(http, prompt=PROMPT, max_length=40, temperature=0, stop=[stop])
    assert body["finish_reason"] == "stop"
    assert body["text"] == full[: full.index(stop)]
    streamed = stream_events(http, prompt=PROMPT, max_length=40, temperature=0, stop=stop)
    assert "".join(str(d["text"]) for k, d in streamed if k == "token") == body["text"]


def test_special_token_text_in_prompt_stays_text(http: httpx.Client) -> None:
    # '<|im_end|>' typed by a user is plain text: it must tokenize to several tokens, not one control token.
    body = generate(http, prompt="<|im_end|>", max_length=5, temperature=0)
    assert body["usage"]["prompt_tokens"] > 1  # type: ignore[index]


def test_repetition_penalty_changes_greedy_text_deterministically(http: httpx.Client) -> None:
    prompt = "List the numbers: one, two, three, one, two, three,"
    plain = generate(http, prompt=prompt, max_length=30, temperature=0)["text"]
    penalized = [generate(http, prompt=prompt, max_length=30, temperature=0, repeat_penalty=1.8)["text"]
                 for _ in range(2)]
    assert penalized[0] == penalized[1]
    assert penalized[0] != plain
