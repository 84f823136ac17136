"""The load generator's statistics, the planner's arithmetic, and a short `bench` run against the real server."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from benchmarks.loadgen import RequestResult, iter_sse_data, percentile, summarize
from benchmarks.planner import (
    EMBEDDING_MAX_SEQS,
    EMBEDDING_SHAPES,
    GIB,
    HEADROOM,
    ROUTER_RSS_BYTES,
    SHAPES,
    VOCAB_BYTES_PER_TOKEN,
    Calibration,
    Plan,
    chat_model_embeds,
    embedding_from_gguf,
    gib_string,
    make_plan,
    predict_embedding_memory,
    predict_memory,
    render,
    router_pod,
)
from server.cli import build_parser, settings_from_args
from server.engine.core import resolve_cache_type
from server.engine.embedding import MAX_SEQS
from server.model_files import embedded_model_path
from server.settings import Settings
from tests.conftest import REPO, LiveServer, free_port
from tests.embedding_model import convert_with_llama_cpp, minilm_checkpoint
from tests.swa_model import write_swa_model


def test_percentile_interpolates_like_numpy() -> None:
    values = [10.0, 20.0, 30.0, 40.0, 50.0]
    assert percentile(values, 0.5) == 30.0
    assert percentile(values, 0.95) == pytest.approx(48.0)  # rank 3.8 -> 40 + 0.8 x 10
    assert percentile(values, 0.99) == pytest.approx(49.6)
    assert percentile([7.0], 0.99) == 7.0


def test_summary_of_hand_made_requests() -> None:
    # Two streams: tokens at t = 1.0, 1.5, 2.0 and 0.5, 1.0 (started at 0); one 429.
    a = RequestResult(status=200, start=0.0, token_times=[1.0, 1.5, 2.0], end=2.1)
    b = RequestResult(status=200, start=0.0, token_times=[0.5, 1.0], end=1.2)
    c = RequestResult(status=429, start=0.0, end=0.01)
    stats = summarize(2, [a, b, c], wall_s=2.5)
    assert (stats.requests, stats.ok, stats.errors) == (3, 2, {"429": 1})
    assert stats.tokens == 5 and stats.aggregate_tps == 2.0
    assert stats.ttft_ms["p50"] == 750.0  # median of 1000 and 500 ms
    assert stats.itl_ms["p50"] == 500.0  # every gap is 0.5 s
    assert stats.e2e_ms["p50"] == 1650.0
    assert stats.per_stream_tps_p50 == 2.0  # 2 gaps / 1 s and 1 gap / 0.5 s


def test_sse_parser_handles_split_and_crlf_events() -> None:
    buffer = bytearray(b'event: token\r\ndata: {"type": "token"}\r\n\r\ndata: [DO')
    assert iter_sse_data(buffer) == ['{"type": "token"}']
    buffer += b"NE]\n\n"
    assert iter_sse_data(buffer) == ["[DONE]"] and buffer == bytearray()


def test_planner_memory_for_llama_2_7b_by_hand() -> None:
    shape = SHAPES["llama-2-7b"]
    assert shape.n_params == 6_738_415_616  # LLaMA 2 7B's published parameter count
    mem = predict_memory(shape, weights_bytes=4.0 * GIB, quant="Q4_K_M", ctx_size=4096, use_mmap=False)
    assert mem.kv_cache == 2 * 32 * 4096 * 4096 * 2 == 2 * GIB  # K and V, 32 layers, 4096 tokens x 4096 wide, f16
    assert mem.weights_repacked_copy == 0  # mmap off: the repacked weights are the only copy
    assert mem.compute == 4 * 512 * (32000 + 4 * 4096 + 2 * 11008)
    q8 = predict_memory(shape, weights_bytes=4.0 * GIB, quant="Q4_K_M", ctx_size=4096, kv_type="q8_0")
    assert q8.kv_cache == pytest.approx(GIB * 34 / 32)
    assert q8.weights_repacked_copy == 4.0 * GIB  # mmap on: file pages and the repacked copy


def test_planner_speed_and_replicas_by_hand() -> None:
    calib = Calibration(bytes_per_second=25e9, flops_per_second=4e11, seconds_per_token_fixed=0.0,
                        batch_speedup={1: 1.0, 2: 1.25}, threads=2)
    settings = Settings(ctx_size=4096, parallel=2, n_threads=2)
    plan = make_plan(SHAPES["llama-2-7b"], quant="Q4_K_M", settings=settings, weights_bytes=4e9, calibration=calib,
                     prompt_tokens=100, output_tokens=200, target_rps=0.1)
    assert plan.decode_tps == 5.0  # 25 GB/s x 0.8 efficiency / 4 GB per token
    assert plan.aggregate_tps == 6.25
    ttft = 100 / (4e11 * 1.4 / (2 * 6_738_415_616))
    assert plan.ttft_s == round(ttft, 2)
    capacity = 1 / (ttft / 2 + 200 / 6.25)
    assert plan.capacity_rps_per_pod == round(capacity, 3)
    assert plan.replicas == -(-0.1 // (capacity * 0.7))  # ceil
    assert plan.requests_cpu == "2"
    assert any("100 prompt tokens and 200 generated" in a for a in plan.assumptions)
    assert any("2 streams assumed 1.25x" in a for a in plan.assumptions)


def test_planner_uses_rates_measured_on_the_target_model() -> None:
    calib = Calibration(bytes_per_second=25e9, flops_per_second=4e11, model="llama.gguf", threads=2,
                        weights_bytes=4e9, measured_tps={1: 5.5, 4: 13.2})
    plan = make_plan(SHAPES["llama-2-7b"], quant="Q4_K_M", settings=Settings(ctx_size=4096, parallel=4),
                     weights_bytes=4e9, calibration=calib)
    assert (plan.decode_tps, plan.aggregate_tps) == (5.5, 13.2)
    assert any("measured on this machine on llama.gguf with 2 threads" in a for a in plan.assumptions)


def test_fleet_replicas_count_the_prefill_that_cache_hits_avoid() -> None:
    """A request prefills only the (1 - share) of its prompt not found cached; the replicas for the target follow."""
    calib = Calibration(bytes_per_second=25e9, flops_per_second=4e11, seconds_per_token_fixed=0.0,
                        batch_speedup={1: 1.0, 2: 1.25}, threads=2)
    settings = Settings(ctx_size=4096, parallel=2, n_threads=2)

    def fleet(share: float, router: str | None = "vllm-router") -> Plan:
        return make_plan(SHAPES["llama-2-7b"], quant="Q4_K_M", settings=settings, weights_bytes=4e9,
                         calibration=calib, prompt_tokens=1000, output_tokens=200, target_rps=0.5,
                         cache_hit_share=share, router=router)

    cold, warm = fleet(0.0), fleet(0.8)
    # By hand: prompts at 4e11 x 1.4 / (2 x 6,738,415,616) = 41.55 tok/s, so 1000 tokens prefill in 24.07 s; with
    # 0.8 of them cached, 200 tokens in 4.81 s. 200 tokens at 6.25 tok/s aggregate (2 streams) take 32 s.
    assert cold.ttft_s == warm.ttft_s == cold.prefill_s == 24.07
    assert warm.prefill_s == 4.81
    assert cold.capacity_rps_per_pod == 0.023  # 1 / (24.07 / 2 + 32) = 1 / 44.03
    assert warm.capacity_rps_per_pod == 0.029  # 1 / (4.81 / 2 + 32) = 1 / 34.41
    assert cold.replicas == 32  # ceil(0.5 / (0.02271 x 0.7)) = ceil(31.45)
    assert warm.replicas == 25  # ceil(0.5 / (0.02906 x 0.7)) = ceil(24.58)
    assert any("80% of prompt tokens found cached" in a and "prefills 200 of its 1000 prompt tokens: 4.81 s "
               "instead of 24.07 s" in a for a in warm.assumptions)
    assert any("the fleet tests found >= 0.9 of later turns' history cached" in a for a in warm.assumptions)
    assert not any("cached" in a for a in cold.assumptions)
    text = render(warm)
    assert "time to first token 24.07 s (4.81 s with 80% of the prompt cached)" in text
    assert "fleet: 25 replicas for 0.5 requests/s, 80% of prompt tokens found cached, behind vllm-router" in text
    # 0.5 requests/s x (1.5 ms + 200 tokens x 5 us) = 0.00125 cores: the 0.1-core floor.
    assert "router pod (vllm-router, one replica: 83 MiB resident measured, 0.00125 cores at the target):" in text
    assert '  resources: {requests: {cpu: 100m, memory: 128Mi}, limits: {cpu: "1", memory: 256Mi}}' in text
    # Cache hits without a router: a plain Service spreads the turns, and the plan says so.
    assert any("a plain Service spreads" in n for n in fleet(0.8, router=None).notes)
    with pytest.raises(ValueError, match="below 1"):
        fleet(1.0)


def test_router_pod_by_hand() -> None:
    """vllm-router's pod, from its measured memory (83 MiB) and CPU (1.5 ms a request + 5 us a token)."""
    idle = router_pod()
    # 83 MiB x 1.15 = 95.5 MiB -> 128Mi (whole 64 MiB), twice that as the limit; CPU at its 0.1-core floor.
    assert (idle.requests_memory, idle.limits_memory, idle.requests_cpu, idle.limits_cpu) == (
        "128Mi", "256Mi", "100m", "1")
    assert idle.rss_mib == 83 and idle.cpu_cores_at_target is None
    light = router_pod(target_rps=10, output_tokens=200)  # 10 x (1.5 ms + 200 x 5 us) = 0.025 cores: the floor
    assert light.cpu_cores_at_target == 0.025 and light.requests_cpu == "100m"
    busy = router_pod(target_rps=50, output_tokens=1000)  # 50 x (1.5 ms + 5 ms) = 0.325 cores, / 0.7 = 0.46
    assert busy.cpu_cores_at_target == 0.325 and busy.requests_cpu == "500m" and busy.requests_memory == "128Mi"
    with pytest.raises(ValueError, match="unknown router"):
        router_pod("nginx")


def test_plan_takes_the_fleet_flags() -> None:
    args = [sys.executable, "-m", "server", "plan", "--shape", "llama-2-7b"]
    proc = subprocess.run([*args, "--cache-hit-share", "0.5", "--router", "vllm-router", "--json"],
                          capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    plan = json.loads(proc.stdout)
    assert plan["cache_hit_share"] == 0.5 and plan["replicas"] is None  # no --calibrate: no speed, no replicas
    assert plan["router"] == {"name": "vllm-router", "rss_mib": 83.0, "cpu_cores_at_target": None,
                              "requests_cpu": "100m", "requests_memory": "128Mi", "limits_cpu": "1",
                              "limits_memory": "256Mi"}
    for bad in ("1", "-0.1", "most"):
        refused = subprocess.run([*args, "--cache-hit-share", bad], capture_output=True, text=True, timeout=60,
                                 cwd=REPO)
        assert refused.returncode == 2 and "--cache-hit-share" in refused.stderr, refused.stderr


class StandInWorker(BaseHTTPRequestHandler):
    """A worker as vllm-router sees one: 200 on its health routes, a streamed chat completion of CHUNKS chunks."""

    protocol_version = "HTTP/1.1"
    CHUNKS = 200

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        body = json.dumps({"load": 0} if self.path.startswith("/get_load") else {"status": "ok"}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        events = [json.dumps({"object": "chat.completion.chunk", "choices": [
            {"index": 0, "delta": {"content": f" t{i}"}, "finish_reason": None}]}) for i in range(self.CHUNKS)]
        for event in [*events, "[DONE]"]:
            data = f"data: {event}\n\n".encode()
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.write(b"0\r\n\r\n")


@contextmanager
def stand_in_workers(n: int) -> Iterator[list[str]]:
    servers = [ThreadingHTTPServer(("127.0.0.1", 0), StandInWorker) for _ in range(n)]
    for server in servers:
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield [f"http://127.0.0.1:{server.server_address[1]}" for server in servers]
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()


ROUTER = Path(sys.executable).parent / "vllm-router"


@pytest.mark.skipif(not ROUTER.exists() and shutil.which("vllm-router") is None,
                    reason="vllm-router is not installed (the test extra pins it)")
def test_the_planned_router_pod_holds_the_pinned_router() -> None:
    """The router's memory as the planner's figure was measured (ROUTER_RSS_BYTES): the pinned vllm-router in
    front of two stand-in workers, relaying 100 streams of 200 chunks 8 at a time with a session each, its resident
    memory read every 50 ms. Its peak, with the planner's headroom, fits the pod's planned request."""
    import psutil

    with stand_in_workers(2) as workers:
        port = free_port()
        proc = subprocess.Popen([str(ROUTER if ROUTER.exists() else shutil.which("vllm-router")), "--host",
                                 "127.0.0.1", "--port", str(port), "--policy", "sticky_least_loaded",
                                 "--worker-urls", *workers, "--health-check-endpoint", "/ready",
                                 "--health-check-interval-secs", "2"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url, peak, done = f"http://127.0.0.1:{port}", [0], threading.Event()
        router = psutil.Process(proc.pid)

        def sample() -> None:
            while not done.is_set():
                with_children = [router, *router.children(recursive=True)]
                peak[0] = max(peak[0], sum(p.memory_info().rss for p in with_children))
                time.sleep(0.05)

        def stream(i: int) -> int:
            with httpx.stream("POST", url + "/v1/chat/completions", headers={"X-Session-ID": f"s{i}"}, json={
                    "model": "m", "stream": True, "messages": [{"role": "user", "content": "x " * 500}]},
                    timeout=60) as resp:
                return sum(1 for line in resp.iter_lines() if line.startswith("data:"))

        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                try:
                    if httpx.get(url + "/readiness", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.1)
            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            with ThreadPoolExecutor(8) as pool:
                counts = list(pool.map(stream, range(100)))
            done.set()
            sampler.join()
        finally:
            done.set()
            proc.terminate()
            proc.wait(10)
    assert counts == [StandInWorker.CHUNKS + 1] * 100  # every chunk and [DONE] relayed
    requested = int(router_pod().requests_memory.removesuffix("Mi")) * 2**20
    assert peak[0] * HEADROOM <= requested, f"{peak[0] / 2**20:.1f} MiB resident"
    assert peak[0] <= ROUTER_RSS_BYTES * 1.25, f"{peak[0] / 2**20:.1f} MiB: measure again, move ROUTER_RSS_BYTES"


MINILM = EMBEDDING_SHAPES["all-minilm-l6-v2"]


@pytest.fixture(scope="module")
def minilm_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """all-MiniLM-L6-v2 converted by llama.cpp's own converter (tests/embedding_model.py; skips without it)."""
    checkpoint = minilm_checkpoint(tmp_path_factory.mktemp("minilm"))
    return convert_with_llama_cpp(checkpoint, tmp_path_factory.mktemp("gguf") / "all-MiniLM-L6-v2-f16.gguf")


def test_planner_embedding_memory_by_hand() -> None:
    """An encoder (all-MiniLM-L6-v2: 6 layers, 384 wide, 12 heads, n_ff 1536, 30522 tokens) keeps no KV cache; its
    file and tokenizer, every token's logits and vector, one layer's activations and the attention mask over the
    batch make its memory. The chat model embedding (a decoder) adds no file but KV cells for the batch."""
    assert EMBEDDING_MAX_SEQS == MAX_SEQS  # the Embedder's context, as the planner sizes it
    mem = predict_embedding_memory(MINILM, batch_size=512)
    assert mem.weights == 46_223_712 + VOCAB_BYTES_PER_TOKEN * 30522
    assert mem.kv_cache == 0
    assert mem.outputs == 4 * 512 * (30522 + 384)  # 60.4 MiB
    assert mem.compute == pytest.approx(1.025 * 4 * 512 * (1536 + 3 * 384) + 2 * 512 * 512)  # 5.9 MiB (f16 mask)
    assert mem.total == pytest.approx(0.122 * GIB, rel=0.01)
    # Without flash attention: f32 scores per head and an f32 mask, 4 x (12 + 1) bytes a token pair.
    plain = predict_embedding_memory(MINILM, batch_size=2048, flash_attn=False)
    assert plain.compute == pytest.approx(1.025 * 4 * 2048 * (1536 + 3 * 384) + 4 * 13 * 2048 * 2048)
    # Fewer tokens than sequences: llama.cpp still reserves an output for each of the 64.
    assert predict_embedding_memory(MINILM, batch_size=16).outputs == 4 * 64 * (30522 + 384)
    # f16 weights are not repacked, so mapping them does not count them twice.
    assert predict_embedding_memory(MINILM, batch_size=512, use_mmap=True).weights == mem.weights

    smol = chat_model_embeds(SHAPES["smollm2-135m"], "Q4_1")
    decoder = predict_embedding_memory(smol, batch_size=512)
    assert decoder.weights == 0  # the chat model's own weights, already counted
    assert decoder.kv_cache == 2 * 30 * 512 * 192 * 2  # K and V, 30 layers, 512 cells x 192 wide, f16
    assert decoder.compute == 4 * 512 * (49152 + 4 * 576 + 2 * 1536)  # every token's logits, as the chat estimate


def test_plan_counts_the_embedding_model_and_recomputes_the_pods_memory() -> None:
    """The plan's memory grows by the embedding model's file and buffers, its share is stated, the pod's
    request and limit are recomputed from the new total, and the environment carries the embedding settings."""
    base = Settings(ctx_size=4096, parallel=2, n_threads=4, use_mmap=False)
    alone = make_plan(SHAPES["llama-2-7b"], quant="Q4_K_M", settings=base)
    assert alone.embedding is None and alone.memory_gib["embedding_weights"] == 0
    assert not any(k.startswith("EMBEDDING_") for k in alone.env)
    for batch, limit in ((512, "8Gi"), (8192, "9Gi")):
        settings = base.model_copy(update={"embedding_batch_size": batch})
        plan = make_plan(SHAPES["llama-2-7b"], quant="Q4_K_M", settings=settings, embedding=MINILM,
                         embedding_path="/models/all-minilm-l6-v2.F16.gguf")
        extra = predict_embedding_memory(MINILM, batch_size=batch)
        assert extra.weights == MINILM.file_bytes + VOCAB_BYTES_PER_TOKEN * 30522 and extra.kv_cache == 0
        m = plan.memory_gib
        assert m["total"] == pytest.approx(alone.memory_gib["total"] + extra.total / GIB, abs=0.01)
        assert (m["embedding_weights"], m["embedding_outputs"], m["embedding_compute"]) == (
            round(extra.weights / GIB, 2), round(extra.outputs / GIB, 2), round(extra.compute / GIB, 2))
        total = (alone.memory_gib["total"] * GIB + extra.total)
        assert plan.requests_memory == plan.limits_memory == gib_string(total * 1.15) == limit
        assert plan.embedding is not None and plan.embedding["share"] == pytest.approx(extra.total / total, abs=0.002)
        assert plan.env["EMBEDDING_MODEL_PATH"] == "/models/all-minilm-l6-v2.F16.gguf"
        assert plan.env["EMBEDDING_BATCH_SIZE"] == str(batch)
    assert alone.limits_memory == "8Gi"  # 8192 tokens a decode take the 7B pod from 8Gi to 9Gi
    # EMBEDDING_POOLING without a model: the chat model embeds, in a context with its own KV cells.
    pooled = make_plan(SHAPES["llama-2-7b"], quant="Q4_K_M",
                       settings=base.model_copy(update={"embedding_pooling": "mean"}))
    assert pooled.embedding is not None and pooled.embedding["model"] == "the chat model"
    assert pooled.memory_gib["embedding_weights"] == 0 and pooled.memory_gib["embedding_kv_cache"] == 0.25
    assert pooled.env["EMBEDDING_POOLING"] == "mean" and "EMBEDDING_MODEL_PATH" not in pooled.env


def test_plan_reads_the_embedding_gguf_and_prints_its_share(minilm_gguf: Path) -> None:
    """`plan --embedding-model-path FILE` (EMBEDDING_MODEL_PATH, as serve takes it) reads the header as for the
    chat model: the named shape all-minilm-l6-v2 is that file; the output states the embedding model's share."""
    model = embedding_from_gguf(minilm_gguf)
    assert model.shape.name == minilm_gguf.name and model.arch == "bert" and model.encoder
    assert (model.shape.n_layer, model.shape.n_embd, model.shape.n_head, model.shape.n_ff, model.shape.n_vocab,
            model.shape.n_params, model.quant) == (6, 384, 12, 1536, 30522, MINILM.shape.n_params, MINILM.quant)
    assert abs(model.file_bytes - MINILM.file_bytes) < 4096
    args = ["--gguf", str(embedded_model_path()), "--ctx-size", "2048", "--parallel", "2"]
    proc = subprocess.run([sys.executable, "-m", "server", "plan", *args, "--embedding-model-path", str(minilm_gguf),
                           "--embedding-batch-size", "1024"], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    extra = predict_embedding_memory(model, batch_size=1024)
    assert f"| embedding model: weights ({minilm_gguf.name} F16) | {round(extra.weights / GIB, 2)} |" in proc.stdout
    assert "embedding model: KV cache" not in proc.stdout  # an encoder
    assert f"embedding model {minilm_gguf.name} F16: {round(extra.total / GIB, 2)} GiB of the" in proc.stdout
    assert f"EMBEDDING_MODEL_PATH={minilm_gguf} EMBEDDING_BATCH_SIZE=1024" in proc.stdout
    # The same from the environment, as serve reads it; a path that is no file is refused with one line.
    env = {**os.environ, "EMBEDDING_MODEL_PATH": str(minilm_gguf)}
    as_json = subprocess.run([sys.executable, "-m", "server", "plan", *args, "--json"], capture_output=True,
                             text=True, timeout=60, cwd=REPO, env=env)
    assert json.loads(as_json.stdout)["embedding"]["batch_size"] == Settings().embedding_batch_size
    missing = subprocess.run([sys.executable, "-m", "server", "plan", "--embedding-model-path", "/nonexistent.gguf"],
                             capture_output=True, text=True, timeout=60, cwd=REPO)
    assert missing.returncode != 0 and "embedding GGUF file not found: /nonexistent.gguf" in missing.stderr


def test_planner_embedding_buffers_are_llama_cpps(minilm_gguf: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The estimate against llama.cpp itself, on the real all-MiniLM-L6-v2 in the server's embedding context: the
    compute buffer it reserves (its log), and the resident memory once a full batch has been embedded (the output
    buffer grows to every token's logits then), within a few percent."""
    import asyncio
    import logging

    import psutil

    from server.engine.embedding import Embedder, EmbeddingHandle, EmbeddingRequest
    from server.engine.llama import LlamaModel, route_native_logs

    route_native_logs()
    process = psutil.Process()
    for batch in (512, 2048):
        caplog.clear()
        before = process.memory_info().rss
        with caplog.at_level(logging.DEBUG, logger="llama_cpp.native"):
            model = LlamaModel(minilm_gguf, use_mmap=False)
            embedder = Embedder(model, own_model=True, pooling=None, n_batch=batch, n_threads=2, n_threads_batch=2,
                                flash_attn=True)
        try:
            logged = [float(line.split("=")[1].split()[0]) for line in caplog.messages
                      if "CPU compute buffer size" in line]
            predicted = predict_embedding_memory(embedding_from_gguf(minilm_gguf), batch_size=batch)
            assert logged and logged[-1] * 2**20 == pytest.approx(predicted.compute, rel=0.02), (logged, batch)
            loop = asyncio.new_event_loop()
            tokens = tuple(model.tokenize("the keeper climbs the lighthouse stairs at dusk " * 80)[:512])
            handle = EmbeddingHandle(request=EmbeddingRequest(inputs=(tokens,) * (batch // 512)), loop=loop,
                                     future=loop.create_future())
            embedder.enqueue(handle)
            while embedder.pending():
                embedder.step(None)
            loop.close()
            grown = process.memory_info().rss - before
            assert grown == pytest.approx(predicted.total, rel=0.1), (batch, grown / 2**20, predicted.total / 2**20)
        finally:
            embedder.close()


def test_plan_env_is_what_serve_runs_with(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """plan and serve read the same flags into the same Settings; plan's env line, given to serve, gives the
    same settings back, with CACHE_TYPE and CACHE_RAM_MIB resolved as the engine resolves them."""
    flags = ["--ctx-size", "4096", "--parallel", "2", "--n-threads", "3", "--no-use-mmap"]
    proc = subprocess.run([sys.executable, "-m", "server", "plan", "--shape", "llama-2-7b", *flags, "--json"],
                          capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    env = json.loads(proc.stdout)["env"]
    assert env == {"CTX_SIZE": "4096", "PARALLEL": "2", "N_THREADS": "3", "BATCH_SIZE": "512",
                   "CACHE_TYPE": "q8_0", "USE_MMAP": "false", "FLASH_ATTN": "true", "CACHE_RAM_MIB": "1088"}
    serve = settings_from_args(build_parser().parse_args(["serve", *flags]))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    from_env = Settings()
    resolved = {"cache_type", "cache_ram_mib"}
    assert from_env.model_dump(exclude=resolved) == serve.model_dump(exclude=resolved)
    # serve's CACHE_TYPE=auto becomes q8_0 for this model (an f16 cache would take 2 GiB), as the plan says...
    assert resolve_cache_type(serve.cache_type, 2 * GIB, serve.flash_attn) == from_env.cache_type == "q8_0"
    # ... and its CACHE_RAM_MIB=auto a prompt cache as large as that q8_0 KV cache: 32 layers x 2 x 4096 tokens
    # x 4096 values x 34/32 bytes.
    kv_bytes = 2 * 32 * 4096 * 4096 * 34 / 32
    assert serve.cache_ram_mib == "auto"
    assert serve.prompt_cache_bytes(kv_bytes) == from_env.prompt_cache_bytes(kv_bytes) == 1088 * 2**20
    text = subprocess.run([sys.executable, "-m", "server", "plan", "--shape", "llama-2-7b", *flags,
                           "--target-rps", "2"], capture_output=True, text=True, timeout=60, cwd=REPO).stdout
    assert "env: " + " ".join(f"{k}={v}" for k, v in env.items()) in text
    assert "replicas: not computed: --target-rps needs the speed of this machine; add --calibrate" in text
    assert "(none: USE_MMAP=false) | 0.0 |" in text and "KV cache q8_0" in text


def test_plan_sizes_the_prompt_cache_as_the_server_does(live_server: LiveServer, model_path: Path) -> None:
    """CACHE_RAM_MIB=auto: the plan (from the GGUF's metadata) and the server (from llama.cpp's model) come to the
    same MiB for the same context; a sliding-window model, for which the server keeps no prompt cache, gets
    none in the plan either."""
    def plan(gguf: Path) -> dict:  # type: ignore[type-arg]
        proc = subprocess.run([sys.executable, "-m", "server", "plan", "--gguf", str(gguf), "--json"],
                              capture_output=True, text=True, timeout=60, cwd=REPO)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)  # type: ignore[no-any-return]

    mib = plan(model_path)["env"]["CACHE_RAM_MIB"]
    assert int(mib) > 0
    assert f"prompt cache {mib} MiB" in live_server.log()  # both on the default CTX_SIZE
    windowed = plan(write_swa_model(Path(live_server.log_path).parent / "swa.gguf", model_path, n_swa=16))
    assert windowed["env"]["CACHE_RAM_MIB"] == "0"
    assert windowed["memory_gib"]["prompt_cache"] == 0
    assert any("prompt cache: none (a sliding-window or recurrent model" in a for a in windowed["assumptions"])


def test_plan_calibrates_on_the_target_gguf_with_progress(model_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "server", "plan", "--gguf", str(model_path), "--ctx-size", "2048",
                           "--parallel", "2", "--calibrate", "--calibration-threads", "2"],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert "calibrating: decoding 32 tokens x 2 streams with 2 threads" in proc.stderr
    assert f"measured on this machine on {model_path.name} with 2 threads: 1 stream" in proc.stdout
    assert f"MODEL_PATH={model_path} CTX_SIZE=2048 PARALLEL=2" in proc.stdout


def test_bench_smoke_run_against_the_live_server(live_server: LiveServer, tmp_path: Path) -> None:
    out = tmp_path / "bench"
    proc = subprocess.run(
        [sys.executable, "-m", "server", "bench", "--url", live_server.url, "--concurrency", "1,2", "--requests",
         "4", "--max-tokens", "8", "--prompt-words", "12", "--pid", str(live_server.process.pid), "--out", str(out),
         "--quiet"], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    data = json.loads((out / "results.json").read_text())
    levels = data["servers"]["llama-inference"]
    assert [lv["concurrency"] for lv in levels] == [1, 2]
    for lv in levels:
        assert lv["ok"] == 4 and lv["errors"] == {}
        assert lv["tokens"] == 4 * 8  # ignore_eos: exactly max_tokens each
        assert lv["ttft_ms"]["p50"] > 0 and lv["aggregate_tps"] > 0
        assert lv["server_peak_rss_mb"] > 100
    assert (out / "throughput_latency.png").stat().st_size > 10_000
    report = (out / "results.md").read_text()
    assert "| 2 | 4 | 4 | - |" in report
    assert f"{live_server.url} (native API, model SmolLM2-135M-Instruct.Q4_1); prompts of about 12 words, 8 tokens" \
        in report
    assert "nan" not in report and "{" not in report and "**server CPU %**" in report


def test_bench_openai_api_reads_the_model_id_and_reports_errors_cleanly(live_server: LiveServer,
                                                                          tmp_path: Path) -> None:
    out = tmp_path / "bench"
    base = [sys.executable, "-m", "server", "bench", "--url", live_server.url, "--api", "openai", "--concurrency",
            "1", "--requests", "2", "--max-tokens", "4", "--out", str(out), "--quiet"]
    proc = subprocess.run(base, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    [level] = json.loads((out / "results.json").read_text())["servers"]["llama-inference"]
    assert level["ok"] == 2 and level["errors"] == {}
    # A request the server refuses: the table counts it and says why; no NaN, no Python dict.
    proc = subprocess.run([*base, "--max-tokens", "100000"], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 1
    report = (out / "results.md").read_text()
    assert "| 1 | 2 | 0 | 2 x 400 | 0.0 | - | -/-/- |" in report
    assert "error 400: max_tokens is 100000; this server allows at most 4096" in report
    assert json.loads((out / "results.json").read_text())["servers"]["llama-inference"][0]["ttft_ms"]["p50"] is None
