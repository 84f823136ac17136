"""Continuous batching with the real model: concurrency, cancellation, overload, prompt-cache reuse."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import LiveServer, metric, start_server, stop_server

PROMPTS = [
    "Once upon a time",
    "The three most important inventions in history are",
    "Here is a recipe for pancakes:",
    "def quicksort(items):",
]


def wait_for_metric(client: httpx.Client, name: str, want: float, timeout: float = 5.0) -> float:
    deadline = time.monotonic() + timeout
    value = metric(client.get("/metrics").text, name)
    while value != want and time.monotonic() < deadline:
        time.sleep(0.02)
        value = metric(client.get("/metrics").text, name)
    return value


async def generate_async(client: httpx.AsyncClient, prompt: str, max_length: int) -> dict[str, object]:
    resp = await client.post("/generate", json={"prompt": prompt, "max_length": max_length, "temperature": 0,
                                                "cache_prompt": False})
    assert resp.status_code == 200, resp.text
    return resp.json()  # type: ignore[no-any-return]


def test_concurrent_greedy_equals_alone(http: httpx.Client, live_server: LiveServer) -> None:
    # Without prompt-cache reuse, so that both runs compute every prompt token the same way.
    alone = [http.post("/generate", json={"prompt": p, "max_length": 40, "temperature": 0,
                                          "cache_prompt": False}).json()["text"] for p in PROMPTS]

    async def together() -> list[dict[str, object]]:
        async with httpx.AsyncClient(base_url=live_server.url, timeout=120) as client:
            return await asyncio.gather(*(generate_async(client, p, 40) for p in PROMPTS))

    before = metric(http.get("/metrics").text, "llama_decode_steps_total")
    results = asyncio.run(together())
    steps = metric(http.get("/metrics").text, "llama_decode_steps_total") - before
    for got, want in zip(results, alone, strict=True):
        assert got["text"] == want
    # 4 x 40 tokens decoded together take far fewer than 160 steps: they shared batches.
    assert steps < 100


def test_long_prompt_prefilled_in_chunks_gives_the_same_text(tmp_path: Path) -> None:
    server = start_server(tmp_path, "--batch-size", "32", "--parallel", "2")
    try:
        prompt = "The history of the lighthouse began long ago. " * 12  # ~120 tokens: 4 chunks of 32
        with httpx.Client(base_url=server.url, timeout=60) as client:
            chunked = client.post("/generate", json={"prompt": prompt, "max_length": 24, "temperature": 0}).json()
    finally:
        stop_server(server)
    server2 = start_server(tmp_path, "--batch-size", "512", "--parallel", "2")
    try:
        with httpx.Client(base_url=server2.url, timeout=60) as client:
            whole = client.post("/generate", json={"prompt": prompt, "max_length": 24, "temperature": 0}).json()
    finally:
        stop_server(server2)
    assert chunked["usage"]["prompt_tokens"] > 96
    assert chunked["text"] == whole["text"]


def test_dropped_stream_frees_its_slot_and_the_next_request_is_served(
    http: httpx.Client, live_server: LiveServer
) -> None:
    cancelled_before = metric(http.get("/metrics").text, "llama_requests_finished_total",
                              'finish_reason="cancelled"')
    with httpx.Client(base_url=live_server.url, timeout=60) as client:
        with client.stream("POST", "/generate", json={"prompt": "Tell me a long story.", "max_length": 1500,
                                                      "ignore_eos": True, "stream": True}) as response:
            seen = 0
            for line in response.iter_lines():
                if line.startswith("data:"):
                    seen += 1
                if seen >= 5:
                    break  # leaving the block closes the connection mid-stream
    assert wait_for_metric(http, "llama_slots_busy", 0.0) == 0.0
    text = http.get("/metrics").text
    assert metric(text, "llama_requests_finished_total", 'finish_reason="cancelled"') == cancelled_before + 1
    assert metric(text, "llama_generated_tokens_total") > 0
    after = http.post("/generate", json={"prompt": "Hello", "max_length": 8, "temperature": 0})
    assert after.status_code == 200 and after.json()["usage"]["completion_tokens"] >= 1


@pytest.mark.parametrize(("path", "body"), [
    ("/generate", {"prompt": "Write an essay.", "max_length": 2000, "ignore_eos": True}),
    ("/v1/completions", {"model": "any", "prompt": "Write an essay.", "max_tokens": 2000, "ignore_eos": True}),
])
def test_client_that_gives_up_on_a_plain_request_cancels_it(http: httpx.Client, live_server: LiveServer,
                                                            path: str, body: dict[str, object]) -> None:
    cancelled_before = metric(http.get("/metrics").text, "llama_requests_finished_total",
                              'finish_reason="cancelled"')
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(live_server.url + path, json=body, timeout=0.5)
    assert wait_for_metric(http, "llama_slots_busy", 0.0) == 0.0
    assert metric(http.get("/metrics").text, "llama_requests_finished_total",
                  'finish_reason="cancelled"') == cancelled_before + 1


@pytest.fixture(scope="module")
def small_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """2 slots and a queue of 2: easy to overload."""
    server = start_server(tmp_path_factory.mktemp("small"), "--parallel", "2", "--queue-size", "2")
    yield server
    stop_server(server)


def test_burst_beyond_slots_and_queue_gets_fast_429_and_the_rest_complete(small_server: LiveServer) -> None:
    async def one(client: httpx.AsyncClient, i: int) -> tuple[int, float, httpx.Response]:
        start = time.perf_counter()
        resp = await client.post("/generate", json={"prompt": f"Story number {i}:", "max_length": 64,
                                                    "temperature": 0})
        return resp.status_code, time.perf_counter() - start, resp

    async def burst() -> list[tuple[int, float, httpx.Response]]:
        async with httpx.AsyncClient(base_url=small_server.url, timeout=120) as client:
            return await asyncio.gather(*(one(client, i) for i in range(10)))

    results = asyncio.run(burst())
    ok = [r for r in results if r[0] == 200]
    rejected = [r for r in results if r[0] == 429]
    assert len(ok) + len(rejected) == 10
    assert len(ok) >= 4 and len(rejected) >= 1  # 2 slots + 2 queued were accepted; the rest refused
    for _, seconds, resp in rejected:
        assert seconds < 2.0  # answered at once, not after waiting
        assert resp.headers["retry-after"].isdigit()
        assert resp.json()["error"]["code"] == "server_overloaded"
    for _, _, resp in ok:
        assert resp.json()["usage"]["completion_tokens"] >= 1
    with httpx.Client(base_url=small_server.url) as client:
        assert wait_for_metric(client, "llama_slots_busy", 0.0) == 0.0
        assert metric(client.get("/metrics").text, "llama_queue_depth") == 0.0


def test_shared_prefix_reuses_the_cached_prompt(small_server: LiveServer) -> None:
    system = ("You are a helpful assistant who answers questions about the sea, ships, lighthouses and the "
              "weather in short and friendly sentences. ") * 4
    with httpx.Client(base_url=small_server.url, timeout=60) as client:
        first = client.post("/generate", json={"prompt": system + "What is a lighthouse?", "max_length": 8,
                                               "temperature": 0}).json()
        second = client.post("/generate", json={"prompt": system + "Why is the sea salty?", "max_length": 8,
                                                "temperature": 0}).json()
        again = client.post("/generate", json={"prompt": system + "Why is the sea salty?", "max_length": 8,
                                               "temperature": 0}).json()
    prefix_tokens = first["usage"]["prompt_tokens"] - 8  # the question adds a handful of tokens
    assert first["usage"]["cached_tokens"] < prefix_tokens
    assert second["usage"]["cached_tokens"] >= prefix_tokens - 2
    # The same prompt again: everything but the last token comes from the cache, and the answer is the same.
    assert again["usage"]["cached_tokens"] == again["usage"]["prompt_tokens"] - 1
    assert again["text"] == second["text"]
