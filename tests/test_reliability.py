"""Hostile and broken clients at scale: schema fuzzing, overload, a disconnect storm, a bounded soak."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Iterator

import httpx
import psutil
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance

from benchmarks.soak import run_soak
from tests.conftest import LiveServer, metric, start_server, stop_server

SLOTS, QUEUE = 2, 2
SOAK_CACHE_MIB = 8


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """Few slots, a short queue and short generations: easy to overload, quick to fuzz. A small prompt cache in
    host memory, full within the soak's warm-up: from then on each entry kept drops an older one."""
    server = start_server(tmp_path_factory.mktemp("reliability"), "--parallel", str(SLOTS), "--queue-size",
                          str(QUEUE), "--max-tokens-limit", "16", "--default-max-tokens", "8",
                          "--cache-ram-mib", str(SOAK_CACHE_MIB),
                          # The chat model embeds too, so the embedding routes are fuzzed for real, not only their 501.
                          "--embedding-pooling", "mean")
    yield server
    stop_server(server)


def wait_idle(client: httpx.Client, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = client.get("/metrics").text
        if metric(text, "llama_slots_busy") == 0 and metric(text, "llama_queue_depth") == 0:
            return
        time.sleep(0.05)
    raise AssertionError("slots still busy")


# ---- schemathesis against our own OpenAPI document ----
# (driven through its Python API: its pytest plugin does not run under pytest 9)


def test_api_conforms_to_its_schema_and_never_fails(small: LiveServer) -> None:
    schema = schemathesis.openapi.from_url(small.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    # Every dialect's routes are fuzzed: the seed's, OpenAI's, Anthropic's, Ollama's, llama-server's FIM, embeddings.
    assert {op.path for op in operations} >= {"/generate", "/v1/completions", "/v1/chat/completions", "/health",
                                              "/v1/messages", "/v1/messages/count_tokens", "/v1/responses",
                                              "/api/chat", "/api/generate", "/api/show", "/api/embed", "/infill",
                                              "/v1/embeddings", "/tokenize"}
    calls = 0
    for operation, mode in [(op, m) for op in operations for m in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)]:

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
                  database=None)
        def check(case: schemathesis.Case) -> None:
            nonlocal calls
            calls += 1
            response = case.call(timeout=60)
            assert response.status_code < 500, (case.method, case.path, case.body, response.text)
            # Every check but one: schema-valid requests may still be refused by the server's runtime limits
            # (max tokens, the context window), which no static schema can state.
            case.validate_response(response, excluded_checks=[positive_data_acceptance])

        try:
            check()
        except Unsatisfiable:
            assert mode is GenerationMode.NEGATIVE  # an operation without inputs has no invalid requests
    assert calls >= 100


# ---- overload ----

def test_burst_of_ten_times_capacity_is_answered_fast_and_server_recovers(small: LiveServer) -> None:
    n = 10 * (SLOTS + QUEUE)

    async def one(client: httpx.AsyncClient, i: int) -> tuple[int, float]:
        start = time.perf_counter()
        resp = await client.post("/generate", json={"prompt": f"Burst {i}:", "max_length": 16, "ignore_eos": True})
        return resp.status_code, time.perf_counter() - start

    async def burst() -> list[tuple[int, float]]:
        async with httpx.AsyncClient(base_url=small.url, timeout=60, limits=httpx.Limits(max_connections=n)) as c:
            return await asyncio.gather(*(one(c, i) for i in range(n)))

    results = asyncio.run(burst())
    codes = [code for code, _ in results]
    assert set(codes) <= {200, 429, 503}
    assert codes.count(200) >= SLOTS + QUEUE and codes.count(429) >= n // 2
    assert max(seconds for code, seconds in results if code != 200) < 5.0
    assert max(seconds for _, seconds in results) < 60.0  # none hangs
    with httpx.Client(base_url=small.url, timeout=30) as client:
        wait_idle(client)
        assert client.post("/generate", json={"prompt": "After the storm", "max_length": 4}).status_code == 200


# ---- disconnect storm ----

def storm(url: str, clients: int = 50) -> None:
    """``clients`` streaming requests that each read their first bytes, then drop the connection."""
    barrier = threading.Barrier(clients + 1)

    def client(i: int) -> None:
        with httpx.Client(base_url=url, timeout=60) as c:
            body = {"prompt": f"Storm {i}", "max_length": 2000, "ignore_eos": True, "stream": True}
            try:
                with c.stream("POST", "/generate", json=body) as resp:
                    for _ in resp.iter_lines():
                        break  # a token (or a queued stream's headers), then drop
            finally:
                barrier.wait(60)

    workers = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for w in workers:
        w.start()
    barrier.wait(90)
    for w in workers:
        w.join(30)


def test_fifty_streaming_clients_drop_and_everything_is_freed(tmp_path_factory: pytest.TempPathFactory) -> None:
    server = start_server(tmp_path_factory.mktemp("storm"), "--parallel", "4", "--queue-size", "64")
    try:
        proc = psutil.Process(server.process.pid)
        threads_before = proc.num_threads()
        # Tokenizing runs in asyncio's default thread pool, which may grow to min(32, CPUs + 4) threads.
        pool_size = min(32, (os.cpu_count() or 1) + 4)
        with httpx.Client(base_url=server.url, timeout=30) as c:
            storm(server.url)
            wait_idle(c, timeout=20)
            storm(server.url)
            wait_idle(c, timeout=20)
            # Cancelled requests leave their slots free; each slot keeps only its last request's cells for reuse
            # (a short prompt and the few tokens made before the drop was noticed), not 100 requests' worth.
            assert metric(c.get("/metrics").text, "llama_slots_busy") == 0
            assert metric(c.get("/metrics").text, "llama_kv_cache_tokens") <= 4 * 64
            assert c.post("/generate", json={"prompt": "Calm again", "max_length": 4}).status_code == 200
            cancelled = sum(float(line.split()[-1]) for line in c.get("/metrics").text.splitlines()
                            if line.startswith('llama_requests_finished_total{finish_reason="cancelled"}'))
        assert cancelled >= 90
        # 100 dropped clients, yet the threads stay within the pool's bound: none is left per client.
        assert proc.num_threads() <= threads_before + pool_size
    finally:
        stop_server(server)


# ---- soak ----

def test_soak_of_500_mixed_requests_keeps_memory_flat(small: LiveServer) -> None:
    result = run_soak(small.url, small.process.pid, 500, deadline_s=600)
    assert set(result.statuses) <= {200, 400, 429, 499}
    assert result.statuses.count(200) > 200 and result.statuses.count(400) > 50
    growth_mb = result.growth_after_warmup() / 1e6
    assert growth_mb < 40, f"RSS grew {growth_mb:.0f} MB: {[s // 10**6 for s in result.rss_samples]}"
    with httpx.Client(base_url=small.url, timeout=30) as client:
        wait_idle(client)
        # The prompt cache was in use all along, and stayed within its bound.
        assert 0 < metric(client.get("/metrics").text, "llama_prompt_cache_bytes") <= SOAK_CACHE_MIB * 2**20
