"""Hostile and broken clients at scale: schema fuzzing, overload, a disconnect storm, a bounded soak."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Iterator

import httpx
import psutil
import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from tests.conftest import LiveServer, start_server, stop_server

SLOTS, QUEUE = 2, 2


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """Few slots, a short queue and short generations: easy to overload, quick to fuzz."""
    server = start_server(tmp_path_factory.mktemp("reliability"), "--parallel", str(SLOTS), "--queue-size",
                          str(QUEUE), "--max-tokens-limit", "16", "--default-max-tokens", "8")
    yield server
    stop_server(server)


def metric(client: httpx.Client, name: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def wait_idle(client: httpx.Client, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metric(client, "llama_slots_busy") == 0 and metric(client, "llama_queue_depth") == 0:
            return
        time.sleep(0.05)
    raise AssertionError("slots still busy")


# ---- schemathesis against our own OpenAPI document ----

@pytest.fixture
def api_schema(small: LiveServer) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_url(small.url + "/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_api_conforms_to_its_schema_and_never_fails(case: schemathesis.Case) -> None:
    response = case.call(timeout=60)
    assert response.status_code < 500, (case.method, case.path, case.body, response.text)
    case.validate_response(response)


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

def test_fifty_streaming_clients_drop_and_everything_is_freed(tmp_path_factory: pytest.TempPathFactory) -> None:
    server = start_server(tmp_path_factory.mktemp("storm"), "--parallel", "4", "--queue-size", "64")
    try:
        proc = psutil.Process(server.process.pid)
        threads_before = proc.num_threads()
        stop = threading.Barrier(51)

        def client(i: int) -> None:
            with httpx.Client(base_url=server.url, timeout=60) as c:
                body = {"prompt": f"Storm {i}", "max_length": 2000, "ignore_eos": True, "stream": True}
                try:
                    with c.stream("POST", "/generate", json=body) as resp:
                        for _ in resp.iter_lines():
                            break  # first bytes (a token, or the headers of a queued stream), then drop
                finally:
                    stop.wait(30)

        workers = [threading.Thread(target=client, args=(i,)) for i in range(50)]
        for w in workers:
            w.start()
        stop.wait(60)
        for w in workers:
            w.join(30)
        with httpx.Client(base_url=server.url, timeout=30) as c:
            wait_idle(c, timeout=20)
            assert metric(c, "llama_kv_cache_tokens") == 0  # cancelled requests gave back their KV cells
            assert c.post("/generate", json={"prompt": "Calm again", "max_length": 4}).status_code == 200
            cancelled = sum(float(line.split()[-1]) for line in c.get("/metrics").text.splitlines()
                            if line.startswith('llama_requests_total{outcome="cancelled"}'))
        assert cancelled >= 45
        time.sleep(0.5)
        assert proc.num_threads() <= threads_before + 2  # no thread left behind per client
    finally:
        stop_server(server)


# ---- soak ----

def test_soak_of_500_mixed_requests_keeps_memory_flat(small: LiveServer) -> None:
    proc = psutil.Process(small.process.pid)
    rng = random.Random(1)
    samples: list[int] = []
    bad_bodies = [{"prompt": ""}, {"prompt": 5}, {"max_length": 3}, {"prompt": "x", "temperature": 99}]

    def one(client: httpx.Client, i: int) -> int:
        kind = rng.choice(["plain", "stream", "cancel", "invalid", "openai"])
        if kind == "plain":
            return client.post("/generate", json={"prompt": f"Soak {i}", "max_length": 4}).status_code
        if kind == "stream":
            with client.stream("POST", "/generate", json={"prompt": f"Soak {i}", "max_length": 4,
                                                          "stream": True}) as resp:
                resp.read()
                return resp.status_code
        if kind == "cancel":
            try:
                client.post("/generate", json={"prompt": f"Soak {i}", "max_length": 16, "ignore_eos": True},
                            timeout=0.02)
            except httpx.TimeoutException:
                return 499
            return 200
        if kind == "invalid":
            return client.post("/generate", json=rng.choice(bad_bodies)).status_code
        return client.post("/v1/completions", json={"model": "SmolLM2-135M-Instruct.Q4_1", "prompt": f"Soak {i}",
                                                    "max_tokens": 4}).status_code

    statuses = []
    deadline = time.monotonic() + 600
    with httpx.Client(base_url=small.url, timeout=60) as client:
        for i in range(500):
            assert time.monotonic() < deadline, "soak took too long"
            statuses.append(one(client, i))
            if i % 25 == 0:
                samples.append(proc.memory_info().rss)
        wait_idle(client)
    assert set(statuses) <= {200, 400, 429, 499}
    assert statuses.count(200) > 200
    warm = samples[4:]  # after 100 requests
    growth_mb = (max(warm[-4:]) - min(warm[:4])) / 1e6
    assert growth_mb < 40, f"RSS grew {growth_mb:.0f} MB over the soak: {[s // 10**6 for s in samples]}"
