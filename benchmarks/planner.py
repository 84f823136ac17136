"""Capacity planner: memory, speed and Kubernetes sizing of a llama-inference pod, from a model's shape.

    llama-inference plan --shape llama-2-7b --quant Q4_K_M --ctx-size 4096 --parallel 2 --n-threads 4
    llama-inference plan --gguf models/llama-2-7b.Q4_K_M.gguf --calibrate --target-rps 2
    llama-inference plan --gguf models/llama-2-7b.Q4_K_M.gguf --embedding-model-path models/all-MiniLM-L6-v2-f16.gguf
    llama-inference plan --gguf models/llama-2-7b.Q4_K_M.gguf --calibrate --target-rps 2 --cache-hit-share 0.5 \
        --router vllm-router

The server's settings (context, slots, threads, KV-cache type, mmap...) are a :class:`server.settings.Settings`,
the object ``serve`` runs with: same flags, same environment variables, same defaults, and the plan prints the
environment that makes ``serve`` run as planned.

Memory is modelled from llama.cpp's allocations: the weights (the GGUF's tensor data, or parameters x bits per
weight of the quantization), the KV cache (2 x layers x context x KV width x bytes per element), the compute
buffers (logits and activations of one micro-batch), and the process itself; with an embedding model
(``EMBEDDING_MODEL_PATH``, or the chat model itself with ``EMBEDDING_POOLING``) also that second model's file and
its own context's buffers and cells, shown as its share of the total. Speed comes from a calibration
run on this machine (``--calibrate``): a short real decode of the target GGUF when it is at hand (alone and with
every slot busy), else of the embedded model, scaled by size: decoding is bound by memory bandwidth (every token
reads all weights), prompt processing by arithmetic (2 FLOPs per parameter per token).

A fleet (``--target-rps`` with ``--calibrate``): the replicas that serve the target load, counting the prefill that
prompt-cache hits avoid (``--cache-hit-share``: a request prefills only the share of its prompt not found cached),
and with ``--router vllm-router`` the router's own pod in front of them (k8s/overlays/vllm-router), sized from
its measured memory and CPU.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from server.settings import Settings, kv_cache_bytes

GIB = 2**30

# Average bits per weight of llama.cpp's types on LLaMA-shaped models (llama.cpp's quantize table for 7B).
BITS_PER_WEIGHT = {
    "F32": 32.0, "F16": 16.0, "BF16": 16.0, "Q8_0": 8.5, "Q6_K": 6.56, "Q5_K_M": 5.69, "Q5_0": 5.5,
    "Q4_K_M": 4.85, "Q4_1": 5.0, "Q4_0": 4.55, "Q3_K_M": 3.91, "Q2_K": 3.35,
}
# Types whose weights llama.cpp's CPU backend repacks into its own layout at load (AVX2/AVX-512/AMX kernels):
# the repacked copy is anonymous memory, so with the file also memory-mapped the weights count twice.
REPACKED = {"Q4_0", "Q4_K_M", "Q8_0", "IQ4_NL"}
RUNTIME_BYTES = 0.25 * GIB  # Python, FastAPI, llama.cpp's code and buffers (measured: about 200-250 MB)


@dataclass(frozen=True)
class Shape:
    name: str
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    n_ff: int
    n_vocab: int
    n_ctx_train: int
    n_params: int
    # Sliding-window or recurrent memory cannot be kept whole in host memory: the server keeps no prompt cache
    # for such models (CACHE_RAM_MIB does not apply).
    prompt_cache_applies: bool = True

    @property
    def kv_width(self) -> int:
        """K (or V) values per token per layer: KV heads x head dimension."""
        return self.n_head_kv * (self.n_embd // self.n_head)


def _params(n_layer: int, n_embd: int, n_head: int, n_head_kv: int, n_ff: int, n_vocab: int,
            tied: bool = False) -> int:
    kv = n_head_kv * (n_embd // n_head)
    per_layer = 2 * n_embd * n_embd + 2 * n_embd * kv + 3 * n_embd * n_ff + 2 * n_embd
    return n_layer * per_layer + n_vocab * n_embd * (1 if tied else 2) + n_embd


SHAPES = {
    "llama-2-7b": Shape("llama-2-7b", 32, 4096, 32, 32, 11008, 32000, 4096,
                        _params(32, 4096, 32, 32, 11008, 32000)),
    "llama-2-13b": Shape("llama-2-13b", 40, 5120, 40, 40, 13824, 32000, 4096,
                         _params(40, 5120, 40, 40, 13824, 32000)),
    "llama-3-8b": Shape("llama-3-8b", 32, 4096, 32, 8, 14336, 128256, 8192,
                        _params(32, 4096, 32, 8, 14336, 128256)),
    "smollm2-135m": Shape("smollm2-135m", 30, 576, 9, 3, 1536, 49152, 8192,
                          _params(30, 576, 9, 3, 1536, 49152, tied=True)),
}


def shape_from_gguf(path: Path) -> tuple[Shape, str, int]:
    """(shape, quantization name, bytes of tensor data) read from a GGUF file's metadata."""
    shape, quant, data_bytes, _ = _read_gguf(path)
    return shape, quant, data_bytes


def _read_gguf(path: Path) -> tuple[Shape, str, int, str]:
    """(shape, quantization name, bytes of tensor data, architecture) from a GGUF file's metadata."""
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(path)

    def value(key: str) -> int:
        f = reader.fields[key]
        return int(f.parts[f.data[0]][0])

    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    tokens = reader.fields["tokenizer.ggml.tokens"]
    n_params = sum(int(np.prod(t.shape)) for t in reader.tensors)
    data_bytes = sum(int(t.n_bytes) for t in reader.tensors)
    n_head = value(f"{arch}.attention.head_count")
    windowed = f"{arch}.attention.sliding_window" in reader.fields and value(f"{arch}.attention.sliding_window") > 0
    recurrent = any(key.startswith((f"{arch}.ssm.", f"{arch}.wkv.")) for key in reader.fields)  # Mamba, RWKV
    shape = Shape(
        name=path.name, n_layer=value(f"{arch}.block_count"), n_embd=value(f"{arch}.embedding_length"),
        n_head=n_head, n_head_kv=value(f"{arch}.attention.head_count_kv") if f"{arch}.attention.head_count_kv"
        in reader.fields else n_head, n_ff=value(f"{arch}.feed_forward_length"), n_vocab=len(tokens.data),
        n_ctx_train=value(f"{arch}.context_length"), n_params=n_params,
        prompt_cache_applies=not (windowed or recurrent),
    )
    try:
        quant = gguf.LlamaFileType(value("general.file_type")).name.removeprefix("MOSTLY_")
    except (KeyError, ValueError):
        quant = "unknown"
    return shape, quant, data_bytes, arch


@dataclass
class Memory:
    weights: float
    weights_repacked_copy: float
    kv_cache: float
    compute: float
    runtime: float
    prompt_cache: float = 0.0  # CACHE_RAM_MIB: filled up to its limit as conversations lose their slots
    # The embedding model's share (0 without one): its file (and repacked copy) with its vocabulary's tables, its
    # context's KV cells (a decoder only), its output buffer and its compute buffer (EmbeddingMemory).
    embedding_weights: float = 0.0
    embedding_kv_cache: float = 0.0
    embedding_outputs: float = 0.0
    embedding_compute: float = 0.0

    @property
    def embedding(self) -> float:
        return self.embedding_weights + self.embedding_kv_cache + self.embedding_outputs + self.embedding_compute

    @property
    def total(self) -> float:
        return (self.weights + self.weights_repacked_copy + self.kv_cache + self.compute + self.runtime
                + self.prompt_cache + self.embedding)


def repacked_beside_the_map(quant: str, n_embd: int, use_mmap: bool) -> bool:
    """Whether weights count twice: mapped (USE_MMAP) and repacked by the CPU backend into a copy of their own."""
    return use_mmap and quant in REPACKED and n_embd % 256 == 0


def predict_memory(shape: Shape, *, weights_bytes: float, quant: str, ctx_size: int, batch_size: int = 512,
                   kv_type: str = "f16", use_mmap: bool = True, cache_ram_bytes: float = 0.0) -> Memory:
    kv = kv_cache_bytes(shape.n_layer, ctx_size, shape.kv_width, kv_type)
    # Compute buffers: the logits of a micro-batch dominate (vocabulary x tokens x 4 bytes), plus activations.
    compute = 4 * batch_size * (shape.n_vocab + 4 * shape.n_embd + 2 * shape.n_ff)
    repacked = weights_bytes if repacked_beside_the_map(quant, shape.n_embd, use_mmap) else 0.0
    return Memory(weights=weights_bytes, weights_repacked_copy=repacked, kv_cache=kv, compute=compute,
                  runtime=RUNTIME_BYTES, prompt_cache=cache_ram_bytes)


# ---- the embedding model (server/engine/embedding.py's Embedder) ----

# Architectures llama.cpp keeps no KV cache for (llama_model::create_memory): encoders, whose context holds only
# its buffers. Any other architecture embeds as a decoder: KV cells for the batch, and an LM head.
ENCODER_ARCHS = frozenset({"bert", "modern-bert", "nomic-bert", "nomic-bert-moe", "neo-bert", "jina-bert-v2",
                           "jina-bert-v3", "eurobert", "gemma-embedding"})
EMBEDDING_MAX_SEQS = 64  # server.engine.embedding.MAX_SEQS: sequences one embedding decode may carry
# llama.cpp's tokenizer tables (token texts, maps, piece cache) beside the weights, per vocabulary entry: measured
# 324 bytes on all-MiniLM-L6-v2 (30522 entries) and 460 on SmolLM2-135M (49152), resident after load minus the
# model's and the context's buffers; rounded up.
VOCAB_BYTES_PER_TOKEN = 512
# A layer's activations per token of an embedding batch, over 4 x (n_ff + 3 x n_embd) bytes: 11018 bytes measured
# on all-MiniLM-L6-v2 (n_ff 1536, n_embd 384) from llama.cpp's compute buffer at batches of 256 to 8192 tokens.
EMBEDDING_ACTIVATION_FACTOR = 1.025


@dataclass(frozen=True)
class EmbeddingModel:
    """An embedding model as the planner sizes it: its shape and architecture, and its file (0 bytes: the chat
    model embeds, in a context of its own, with no second file)."""

    shape: Shape
    arch: str
    quant: str
    file_bytes: float

    @property
    def encoder(self) -> bool:
        return self.arch in ENCODER_ARCHS


# Named embedding models, for planning without the file (as SHAPES for chat models): the header and size of the
# GGUF that llama.cpp's convert_hf_to_gguf.py makes of all-MiniLM-L6-v2 (f16; tests/embedding_model.py).
EMBEDDING_SHAPES = {
    "all-minilm-l6-v2": EmbeddingModel(Shape("all-minilm-l6-v2", 6, 384, 12, 12, 1536, 30522, 512, 22_565_376),
                                       arch="bert", quant="F16", file_bytes=46_223_712),
}


def embedding_from_gguf(path: Path) -> EmbeddingModel:
    """An embedding model from its GGUF's header (the planner reads the chat model's the same way)."""
    shape, quant, _, arch = _read_gguf(path)
    return EmbeddingModel(shape, arch=arch, quant=quant, file_bytes=path.stat().st_size)


def chat_model_embeds(shape: Shape, quant: str, arch: str = "llama") -> EmbeddingModel:
    """EMBEDDING_POOLING without EMBEDDING_MODEL_PATH: the chat model's weights, a second context of its own."""
    return EmbeddingModel(shape, arch=arch, quant=quant, file_bytes=0)


@dataclass
class EmbeddingMemory:
    weights: float  # the file (twice where mapped and repacked) and its vocabulary's tables
    kv_cache: float
    outputs: float
    compute: float

    @property
    def total(self) -> float:
        return self.weights + self.kv_cache + self.outputs + self.compute


def predict_embedding_memory(model: EmbeddingModel, *, batch_size: int, flash_attn: bool = True,
                             use_mmap: bool = False) -> EmbeddingMemory:
    """The embedding model's memory beside the chat model's: the Embedder's context is n_ctx = n_batch =
    EMBEDDING_BATCH_SIZE tokens of up to EMBEDDING_MAX_SEQS sequences, one unified KV cache for a decoder (f16,
    the context's default), none for an encoder.

    Its buffers are estimated the way :func:`predict_memory` estimates the chat model's, from the shape and the
    batch, and calibrated on llama.cpp's own figures for all-MiniLM-L6-v2 f16 on this project's machine:

    - outputs: with embeddings on, llama.cpp makes every token of a batch an output and reserves n_vocab logits
      and an n_embd vector for each (llama_context::output_reserve), 4 x max(batch, EMBEDDING_MAX_SEQS) x
      (n_vocab + n_embd) bytes: 7.55 MiB at start (as llama.cpp logs it), grown by the first full batch to 60.4
      MiB at 512 tokens and 241.4 MiB at 2048 (the resident memory below bears it out). The largest share; it
      stays.
    - compute: a layer's activations, 4 x (n_ff + 3 x n_embd) bytes a token x EMBEDDING_ACTIVATION_FACTOR, and
      attention over the batch (the batch's own tokens for an encoder, the batch's cells for a decoder): its mask,
      2 bytes a token pair (f16) with flash attention, else 4 x (n_head + 1) bytes a pair (f32 scores per head and
      an f32 mask). Measured 5.88 MiB at 512 and 29.52 MiB at 2048 with flash attention (predicted 5.9 and 29.5),
      226.5 MiB at 2048 without (predicted 229.5). A decoder also computes every token's logits: the chat
      model's estimate for that batch where it is larger (SmolLM2-135M at 2048: 401.5 MiB measured, 426 predicted).
    - weights: the GGUF file's size, plus VOCAB_BYTES_PER_TOKEN for its tokenizer; repacked into a second copy
      where mapped, by the rule of the chat model's weights.

    Resident memory after a full batch, all-MiniLM-L6-v2 f16 alone: 123.5 MiB at 512 (predicted 125.3) and 331.2 MiB
    at 2048 (predicted 329.9)."""
    s = model.shape
    weights = model.file_bytes
    if model.file_bytes:
        weights += VOCAB_BYTES_PER_TOKEN * s.n_vocab
        if repacked_beside_the_map(model.quant, s.n_embd, use_mmap):
            weights += model.file_bytes
    outputs = 4 * max(batch_size, EMBEDDING_MAX_SEQS) * (s.n_vocab + s.n_embd)
    pair_bytes = 2 if flash_attn else 4 * (s.n_head + 1)
    layer = EMBEDDING_ACTIVATION_FACTOR * 4 * batch_size * (s.n_ff + 3 * s.n_embd) + pair_bytes * batch_size ** 2
    if model.encoder:
        kv, compute = 0.0, layer
    else:
        kv = kv_cache_bytes(s.n_layer, batch_size, s.kv_width, "f16")
        compute = max(layer, 4 * batch_size * (s.n_vocab + 4 * s.n_embd + 2 * s.n_ff))
    return EmbeddingMemory(weights=weights, kv_cache=kv, outputs=outputs, compute=compute)


# How close llama.cpp gets to the machine's limits, measured on this project's 2-core machine with a
# LLaMA-2-7B-shaped Q4_K_M (benchmarks/RESULTS.md): decoding reads the weights at about 80% of the memory
# bandwidth a plain multi-threaded read reaches, and its int8 (VNNI) kernels process prompts about 1.4x as fast
# as numpy's float32 matrix product.
DECODE_BANDWIDTH_EFFICIENCY = 0.8
PROMPT_KERNEL_SPEEDUP = 1.4
# Aggregate decode speed with n streams over one stream, when the target model was not measured: batching
# reads the weights once for all streams, so a bandwidth-bound model gains until arithmetic catches up.
DEFAULT_BATCH_SPEEDUP = {1: 1.0, 2: 1.25, 4: 1.5, 8: 1.7}
HEADROOM = 1.15  # allocator slack, page cache, growth of Python objects
UTILIZATION = 0.7  # share of a pod's capacity planned to be used (room for bursts)

# ---- a fleet behind a router ----

# The share of prompt tokens a request finds in the prompt cache (--cache-hit-share): its prefill time scales by
# (1 - share). What the fleet tests measured (tests/test_fleet.py: three replicas behind vllm-router 0.1.17, five
# conversations of four turns behind a shared system prompt): with `sticky_least_loaded` and an X-Session-ID, and
# with `cache_aware` and its balance thresholds lowered to a pod's few slots, at least 0.9 of each later turn's
# history was found cached; round robin finds less (a later turn lands on the replica that holds its history about
# one time in N replicas; elsewhere only the shared system prompt is cached), and so does a plain Service. The
# share is over all of a request's prompt tokens, first turns included: turns adding the same number of tokens each
# to a conversation of N turns, of whose history a share h is found, give h x (N - 1) / (N + 1) (0.54 for four
# turns at h = 0.9), more with a long shared system prompt cached on every replica.
CACHE_ROUTERS = {"vllm-router": "sticky_least_loaded with X-Session-ID, or cache_aware with lowered thresholds"}

# vllm-router 0.1.17's own pod (the wheel pyproject's test extra pins, as k8s/overlays/vllm-router runs it from
# flox/llama-router), measured on this project's 2-core machine: .venv/bin/vllm-router started with
# `--policy sticky_least_loaded`, the overlay's health-check flags (/ready every 2 s) and `--worker-urls` of two
# stand-in workers on loopback (stdlib HTTP servers streaming OpenAI chat chunks), relaying streamed
# /v1/chat/completions with a new X-Session-ID each; its resident memory read with psutil (memory_info().rss of the
# process and its children: it has none, the Rust router runs inside the Python launcher) every 50 ms, its CPU
# from cpu_times() (user + system):
#   idle, 5 s after /readiness answered (0.7 s after start)               76.7 MiB
#   400 streams of 200 chunks, 16 at a time                               peak 79.4 MiB, 1.80 ms CPU a request
#   200 streams of 1000 chunks, 8 at a time                               peak 80.4 MiB, 4.75 ms CPU a request
#   3000 streams of 50 chunks, 64 at a time (3000 sticky sessions)        peak 82.6 MiB, 0.99 ms CPU a request
# Most of the memory is CPython under the launcher and the Rust extension's 62 MB file, mapped; the streams and the
# sessions add a few MiB. cache_aware keeps a prefix tree per worker on top, bounded by --max-tree-size characters
# (2^25 by default), not measured here.
ROUTER_RSS_BYTES = 83 * 2**20  # the highest peak, rounded up
ROUTER_CPU_S_PER_REQUEST = 1.5e-3  # about 1.1 ms a request measured, rounded up
ROUTER_CPU_S_PER_TOKEN = 5e-6  # about 3.7 us a streamed chunk (one token) measured, rounded up
ROUTER_MIN_CPU = 0.1  # cores: the health checks of every worker, pod discovery, bursts of new connections
ROUTER_CPU_LIMIT = 1  # one core: a burst is never throttled below what one Tokio thread relays
MIB = 2**20


@dataclass
class RouterPod:
    """The router's pod: requests and limits (Kubernetes quantities), and what they come from."""

    name: str
    rss_mib: float  # measured (ROUTER_RSS_BYTES)
    cpu_cores_at_target: float | None  # its CPU at the target load (None without --target-rps)
    requests_cpu: str
    requests_memory: str
    limits_cpu: str
    limits_memory: str


def router_pod(name: str = "vllm-router", *, target_rps: float | None = None, output_tokens: int = 200,
               utilization: float = UTILIZATION) -> RouterPod:
    """vllm-router's pod: memory requested = the measured peak x HEADROOM, in whole 64 MiB, and twice that as the
    limit (sessions and streams grow it little; a cache_aware tree more); CPU requested = its CPU at the target load
    (a request's fixed cost and each streamed token's) over ``utilization``, at least ROUTER_MIN_CPU, in 50m steps;
    one core as the limit."""
    if name not in CACHE_ROUTERS:
        raise ValueError(f"unknown router {name!r}; known: {', '.join(CACHE_ROUTERS)}")
    memory_mib = math.ceil(ROUTER_RSS_BYTES * HEADROOM / (64 * MIB)) * 64
    cores = None
    cpu = ROUTER_MIN_CPU
    if target_rps is not None:
        cores = target_rps * (ROUTER_CPU_S_PER_REQUEST + output_tokens * ROUTER_CPU_S_PER_TOKEN)
        cpu = max(cpu, cores / utilization)
    millicores = math.ceil(round(cpu * 1000, 6) / 50) * 50
    return RouterPod(name=name, rss_mib=round(ROUTER_RSS_BYTES / MIB, 1),
                     cpu_cores_at_target=None if cores is None else round(cores, 6),
                     requests_cpu=f"{millicores}m", requests_memory=f"{memory_mib}Mi",
                     limits_cpu=str(ROUTER_CPU_LIMIT), limits_memory=f"{2 * memory_mib}Mi")


@dataclass
class Calibration:
    """This machine's rates: memory bandwidth, matrix-product speed, llama-inference's fixed cost per decoded
    token, and the decode rates measured on ``model`` (alone, and with several streams batched)."""

    bytes_per_second: float  # memory read bandwidth with the calibration threads
    flops_per_second: float  # float32 matrix product
    seconds_per_token_fixed: float = 0.0
    batch_speedup: dict[int, float] = field(default_factory=lambda: dict(DEFAULT_BATCH_SPEEDUP))
    model: str = ""  # the GGUF decoded
    threads: int = 2
    weights_bytes: float = 0.0  # of that GGUF
    measured_tps: dict[int, float] = field(default_factory=dict)  # streams -> aggregate tok/s measured

    def measured(self, weights_bytes: float) -> bool:
        """Whether the decode rates were measured on this very model (same tensor bytes)."""
        return bool(self.measured_tps) and abs(self.weights_bytes - weights_bytes) <= 0.01 * weights_bytes

    def decode_tps(self, weights_bytes: float) -> float:
        if self.measured(weights_bytes) and 1 in self.measured_tps:
            return self.measured_tps[1]
        read_s = weights_bytes / (self.bytes_per_second * DECODE_BANDWIDTH_EFFICIENCY)
        return 1 / (self.seconds_per_token_fixed + read_s)

    def aggregate_tps(self, weights_bytes: float, parallel: int) -> float:
        if self.measured(weights_bytes) and parallel in self.measured_tps:
            return self.measured_tps[parallel]
        return self.decode_tps(weights_bytes) * self.speedup(parallel)

    def prompt_tps(self, n_params: int) -> float:
        return self.flops_per_second * PROMPT_KERNEL_SPEEDUP / (2 * n_params)

    def speedup(self, parallel: int) -> float:
        known = sorted(self.batch_speedup)
        below = max((k for k in known if k <= parallel), default=1)
        return self.batch_speedup[below]


@dataclass
class Plan:
    shape: str
    quant: str
    ctx_size: int
    parallel: int
    cores: int
    cache_type: str
    use_mmap: bool
    memory_gib: dict[str, float]
    decode_tps: float | None
    aggregate_tps: float | None
    ttft_s: float | None
    requests_memory: str
    limits_memory: str
    requests_cpu: str
    capacity_rps_per_pod: float | None
    replicas: int | None
    env: dict[str, str]  # what `serve` must run with for this plan to hold
    assumptions: list[str]
    notes: list[str]
    # The embedding model's share, where one is served: its name, whether it is an encoder, its batch, its memory
    # in all (GiB; by part in memory_gib's embedding_* keys) and that as a fraction of the total.
    embedding: dict[str, Any] | None = None
    # A fleet: the load the replicas are for, the share of prompt tokens found cached, a request's prefill after
    # those hits (ttft_s is the prefill of the whole prompt), and the router's pod in front of the replicas.
    target_rps: float | None = None
    cache_hit_share: float = 0.0
    prefill_s: float | None = None
    router: dict[str, Any] | None = None


def gib_string(value: float) -> str:
    return f"{math.ceil(value / GIB)}Gi"


def resolved_cache_type(shape: Shape, settings: Settings) -> str:
    """The KV-cache type the server will use for this model (it resolves ``auto`` the same way)."""
    from server.engine.core import resolve_cache_type

    f16_bytes = kv_cache_bytes(shape.n_layer, settings.ctx_size, shape.kv_width, "f16")
    return resolve_cache_type(settings.cache_type, f16_bytes, settings.flash_attn)


def deploy_env(settings: Settings, cache_type: str, cache_ram_mib: int,
               model_path: str | None = None, embedding: bool = False,
               embedding_path: str | None = None) -> dict[str, str]:
    """The environment of a ``serve`` that runs as planned: every setting the plan depends on, spelled out."""
    env = {"MODEL_PATH": model_path} if model_path else {}
    env.update({
        "CTX_SIZE": str(settings.ctx_size), "PARALLEL": str(settings.parallel), "N_THREADS": str(settings.n_threads),
        "BATCH_SIZE": str(settings.batch_size), "CACHE_TYPE": cache_type,
        "USE_MMAP": str(settings.use_mmap).lower(), "FLASH_ATTN": str(settings.flash_attn).lower(),
        "CACHE_RAM_MIB": str(cache_ram_mib),
    })
    if embedding:
        if embedding_path:
            env["EMBEDDING_MODEL_PATH"] = embedding_path
        if settings.embedding_pooling:
            env["EMBEDDING_POOLING"] = settings.embedding_pooling
        env["EMBEDDING_BATCH_SIZE"] = str(settings.embedding_batch_size)
    return env


def make_plan(shape: Shape, *, quant: str, settings: Settings, weights_bytes: float | None = None,
              model_path: str | None = None, calibration: Calibration | None = None, prompt_tokens: int = 100,
              output_tokens: int = 200, target_rps: float | None = None,
              utilization: float = UTILIZATION, embedding: EmbeddingModel | None = None,
              embedding_path: str | None = None, cache_hit_share: float = 0.0, router: str | None = None) -> Plan:
    """Memory, speed and sizing of a pod that runs ``serve`` with ``settings`` on this model, and on ``embedding``
    beside it where given (with EMBEDDING_POOLING and no embedding model, the chat model embeds); with
    ``target_rps``, the replicas for that load, each request prefilling the (1 - ``cache_hit_share``) of its prompt
    not found cached, and ``router``'s pod in front of them."""
    if not 0 <= cache_hit_share < 1:
        raise ValueError(f"cache_hit_share must be at least 0 and below 1, not {cache_hit_share}")
    assumptions: list[str] = []
    notes: list[str] = []
    if embedding is None and settings.embedding_pooling and settings.embedding_model_path is None:
        embedding = chat_model_embeds(shape, quant)
    if weights_bytes is None:
        weights_bytes = shape.n_params * BITS_PER_WEIGHT[quant] / 8
        assumptions.append(f"weights: {shape.n_params / 1e9:.2f} B parameters x {BITS_PER_WEIGHT[quant]} bits "
                           f"({quant}'s average on LLaMA-shaped models); pass --gguf FILE for the exact size")
    else:
        assumptions.append(f"weights: {weights_bytes / GIB:.2f} GiB of tensor data read from the GGUF")
    cache_type = resolved_cache_type(shape, settings)
    if settings.cache_type == "auto":
        assumptions.append(f"KV cache {cache_type}: CACHE_TYPE=auto picks q8_0 when an f16 cache would pass 1 GiB")
    # In whole MiB, as the plan's environment spells it out (auto: the KV cache's size, rounded up).
    kv_bytes = kv_cache_bytes(shape.n_layer, settings.ctx_size, shape.kv_width, cache_type)
    cache_ram_mib = math.ceil(settings.prompt_cache_bytes(kv_bytes) / 2**20) if shape.prompt_cache_applies else 0
    cache_ram = cache_ram_mib * 2**20
    mem = predict_memory(shape, weights_bytes=weights_bytes, quant=quant, ctx_size=settings.ctx_size,
                         batch_size=settings.batch_size, kv_type=cache_type, use_mmap=settings.use_mmap,
                         cache_ram_bytes=cache_ram)
    share = None
    if embedding is not None:
        emb = predict_embedding_memory(embedding, batch_size=settings.embedding_batch_size,
                                       flash_attn=settings.flash_attn, use_mmap=settings.use_mmap)
        mem.embedding_weights, mem.embedding_kv_cache = emb.weights, emb.kv_cache
        mem.embedding_outputs, mem.embedding_compute = emb.outputs, emb.compute
        name = "the chat model" if not embedding.file_bytes else f"{embedding.shape.name} {embedding.quant}"
        share = {"model": name, "encoder": embedding.encoder, "batch_size": settings.embedding_batch_size,
                 "memory_gib": round(emb.total / GIB, 2), "share": round(emb.total / mem.total, 3)}
        batch = settings.embedding_batch_size
        assumptions.append(
            f"embeddings: {name} in a context of its own, EMBEDDING_BATCH_SIZE={batch} tokens a decode: "
            + ("its file" + (" (twice: mapped and repacked)" if repacked_beside_the_map(
                embedding.quant, embedding.shape.n_embd, settings.use_mmap) else "")
               + f" and its tokenizer's tables ({VOCAB_BYTES_PER_TOKEN} bytes a vocabulary entry), "
               if embedding.file_bytes else "no second file, ")
            + ("no KV cache (an encoder), " if embedding.encoder else f"{batch} KV cells f16 (a decoder), ")
            + f"an output buffer of every token's logits and vector ({batch} x (vocabulary + width) x 4 bytes), "
            f"compute buffers calibrated on all-MiniLM-L6-v2 (llama.cpp's figures)")
    if not shape.prompt_cache_applies:
        assumptions.append("prompt cache: none (a sliding-window or recurrent model, whose cells the server does "
                           "not keep in host memory)")
    elif cache_ram:
        assumptions.append(f"prompt cache: {cache_ram / GIB:.2f} GiB (CACHE_RAM_MIB={settings.cache_ram_mib}) "
                           "counted whole (it fills as conversations lose their slots)")
    assumptions.append(f"memory headroom x{HEADROOM} over the sum (allocator slack, page cache); runtime "
                       f"{RUNTIME_BYTES / GIB:.2f} GiB")
    decode = aggregate = ttft = capacity = prefill = None
    replicas = None
    if calibration is not None:
        decode = calibration.decode_tps(weights_bytes)
        aggregate = calibration.aggregate_tps(weights_bytes, settings.parallel)
        if calibration.measured(weights_bytes):
            assumptions.append(f"decode measured on this machine on {calibration.model} with {calibration.threads} "
                               f"threads: " + ", ".join(f"{n} stream{'s' if n > 1 else ''} {tps:.2f} tok/s"
                                                        for n, tps in sorted(calibration.measured_tps.items())))
        else:
            assumptions.append(
                f"decode scaled from {calibration.model or 'the embedded model'} measured with {calibration.threads} "
                f"threads: memory bandwidth {calibration.bytes_per_second / 1e9:.1f} GB/s at "
                f"{DECODE_BANDWIDTH_EFFICIENCY:.0%}, fixed {calibration.seconds_per_token_fixed * 1e3:.1f} ms/token; "
                f"{settings.parallel} streams assumed {calibration.speedup(settings.parallel):g}x one stream")
        # Prompt processing is arithmetic-bound and scales with threads; decoding is bandwidth-bound and does not.
        ttft = prompt_tokens / (calibration.prompt_tps(shape.n_params) * settings.n_threads / calibration.threads)
        assumptions.append(f"requests of {prompt_tokens} prompt tokens and {output_tokens} generated tokens "
                           f"(--prompt-tokens, --output-tokens); prompts at {calibration.flops_per_second / 1e9:.0f} "
                           f"GFLOP/s x {PROMPT_KERNEL_SPEEDUP} scaled to {settings.n_threads} threads")
        # The prompt's cached share is not prefilled again (the prompt cache, or the slot's own cells).
        prefill = ttft * (1 - cache_hit_share)
        if cache_hit_share:
            assumptions.append(
                f"prefill: {cache_hit_share:.0%} of prompt tokens found cached (--cache-hit-share), so a request "
                f"prefills {prompt_tokens * (1 - cache_hit_share):.0f} of its {prompt_tokens} prompt tokens: "
                f"{prefill:.2f} s instead of {ttft:.2f} s")
        seconds_per_request = prefill / settings.parallel + output_tokens / aggregate
        capacity = 1 / seconds_per_request
        if target_rps is not None:
            replicas = max(1, math.ceil(target_rps / (capacity * utilization)))
            assumptions.append(f"replicas run at {utilization:.0%} of their capacity")
    elif target_rps is not None:
        notes.append("replicas: not computed: --target-rps needs the speed of this machine; add --calibrate")
    if cache_hit_share:
        if router is not None:
            assumptions.append(f"cache hits hold behind {router} keeping each conversation on its replica "
                               f"({CACHE_ROUTERS[router]}: the fleet tests found >= 0.9 of later turns' history "
                               "cached; round robin finds less)")
        elif replicas is None or replicas > 1:
            notes.append("cache hits: a plain Service spreads a conversation's turns without regard to their cache; "
                         "put a router in front (--router vllm-router, k8s/overlays/vllm-router) or plan with a "
                         "lower --cache-hit-share")
    pod = None
    if router is not None:
        pod = router_pod(router, target_rps=target_rps, output_tokens=output_tokens, utilization=utilization)
        assumptions.append(
            f"router pod: {router} 0.1.17 measured at {pod.rss_mib:g} MiB resident at most (sticky_least_loaded, "
            f"up to 64 streams at once; cache_aware's prefix trees come on top), memory x{HEADROOM} in whole 64 "
            f"MiB, twice that as the limit; CPU {ROUTER_CPU_S_PER_REQUEST * 1e3:g} ms a request + "
            f"{ROUTER_CPU_S_PER_TOKEN * 1e6:g} us a token at {utilization:.0%}, at least {ROUTER_MIN_CPU:g} core")
    return Plan(
        shape=shape.name, quant=quant, ctx_size=settings.ctx_size, parallel=settings.parallel,
        cores=settings.n_threads, cache_type=cache_type, use_mmap=settings.use_mmap,
        memory_gib={k: round(v / GIB, 2) for k, v in {**asdict(mem), "total": mem.total}.items()},
        decode_tps=None if decode is None else round(decode, 2),
        aggregate_tps=None if aggregate is None else round(aggregate, 2),
        ttft_s=None if ttft is None else round(ttft, 2),
        requests_memory=gib_string(mem.total * HEADROOM), limits_memory=gib_string(mem.total * HEADROOM),
        requests_cpu=str(settings.n_threads), capacity_rps_per_pod=None if capacity is None else round(capacity, 3),
        replicas=replicas, env=deploy_env(settings, cache_type, cache_ram_mib, model_path, embedding is not None,
                                          embedding_path),
        assumptions=assumptions, notes=notes, embedding=share, target_rps=target_rps,
        cache_hit_share=cache_hit_share, prefill_s=None if prefill is None else round(prefill, 2),
        router=None if pod is None else asdict(pod),
    )


def memory_bandwidth(threads: int, size: int = 2**30) -> float:
    """Bytes per second that ``threads`` threads read from a buffer larger than any cache."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    data = np.ones(size // 4, dtype=np.float32)
    parts = np.array_split(data, threads * 8)
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(np.add.reduce, parts))  # warm-up: fault the pages in
        start = time.perf_counter()
        for _ in range(3):
            list(pool.map(np.add.reduce, parts))
        elapsed = (time.perf_counter() - start) / 3
    return data.nbytes / elapsed


def matmul_flops(n: int = 2048) -> float:
    import time

    import numpy as np

    rng = np.random.default_rng(0)
    a, b = rng.random((n, n), dtype=np.float32), rng.random((n, n), dtype=np.float32)
    a @ b
    start = time.perf_counter()
    for _ in range(3):
        a @ b
    return 2 * n**3 / ((time.perf_counter() - start) / 3)


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def measure_decode(model_path: Path, *, threads: int, streams: tuple[int, ...], n_tokens: int, cache_type: str,
                   progress: Callable[[str], None]) -> dict[int, float]:
    """Aggregate decode tok/s of ``model_path`` with each number of streams batched together, as the server's
    engine decodes them (one llama_decode per step, one token per stream)."""
    import time

    from server.engine.llama import Batch, LlamaContext, LlamaModel

    progress(f"calibrating: loading {model_path.name}")
    model = LlamaModel(model_path, use_mmap=True)  # mapped: loads fastest; decode speed is the same
    rates: dict[int, float] = {}
    try:
        prompt = model.tokenize("The history of lighthouses is long and full of stories. " * 4)[:32]
        for n in streams:
            ctx = LlamaContext(model, n_ctx=n * 256, n_batch=max(64, 32 * n), n_seq_max=n, n_threads=threads,
                               n_threads_batch=threads, cache_type=cache_type, flash_attn=True)
            try:
                batch = Batch(max(64, 32 * n))
                for seq in range(n):
                    batch.add(prompt, 0, seq, True)
                ctx.decode(batch)
                progress(f"calibrating: decoding {n_tokens} tokens x {n} stream{'s' if n > 1 else ''} "
                         f"with {threads} threads")
                start = time.perf_counter()
                for step in range(n_tokens):
                    batch.clear()
                    for seq in range(n):
                        batch.add([prompt[step % len(prompt)]], len(prompt) + step, seq, True)
                    ctx.decode(batch)
                rates[n] = n * n_tokens / (time.perf_counter() - start)
            finally:
                ctx.close()
    finally:
        model.close()
    return rates


def calibrate(model_path: Path, threads: int = 2, n_tokens: int = 32, streams: tuple[int, ...] = (1,),
              cache_type: str = "f16", progress: Callable[[str], None] = _stderr) -> Calibration:
    """Measure this machine: memory bandwidth, matrix-product speed, and ``model_path``'s decode rate alone and
    with each number of ``streams``. Progress goes to ``progress`` (stderr)."""
    shape, _, weights_bytes = shape_from_gguf(model_path)
    rates = measure_decode(model_path, threads=threads, streams=tuple(sorted({1, *streams})), n_tokens=n_tokens,
                           cache_type=cache_type, progress=progress)
    progress(f"calibrating: memory bandwidth with {threads} threads")
    bandwidth = memory_bandwidth(threads)
    progress("calibrating: matrix-product speed")
    flops = matmul_flops()
    fixed = max(0.0, 1 / rates[1] - weights_bytes / (bandwidth * DECODE_BANDWIDTH_EFFICIENCY))
    progress(f"calibrated on {model_path.name}: " + ", ".join(f"{n} x {r / n:.2f} tok/s" for n, r in rates.items()) +
             f"; {bandwidth / 1e9:.1f} GB/s; {flops / 1e9:.0f} GFLOP/s")
    return Calibration(bytes_per_second=bandwidth, flops_per_second=flops, seconds_per_token_fixed=fixed,
                       model=model_path.name, threads=threads, weights_bytes=weights_bytes, measured_tps=rates)


def render(plan: Plan) -> str:
    m = plan.memory_gib
    copy_label = "repacked copy beside the mapped file (USE_MMAP=true)" if plan.use_mmap else \
        "repacked copy beside the mapped file (none: USE_MMAP=false)"
    lines = [
        f"model {plan.shape} {plan.quant}, context {plan.ctx_size} in {plan.parallel} slots, {plan.cores} threads, "
        f"KV cache {plan.cache_type}, mmap {'on' if plan.use_mmap else 'off'}",
        "",
        "| memory | GiB |",
        "|---|---|",
        f"| weights | {m['weights']} |",
        f"| {copy_label} | {m['weights_repacked_copy']} |",
        f"| KV cache ({plan.cache_type}) | {m['kv_cache']} |",
        f"| compute buffers | {m['compute']} |",
        f"| runtime | {m['runtime']} |",
        f"| prompt cache in host memory (CACHE_RAM_MIB) | {m['prompt_cache']} |",
    ]
    e = plan.embedding
    if e is not None:
        lines += [f"| embedding model: weights ({e['model']}) | {m['embedding_weights']} |"]
        if not e["encoder"]:
            lines += [f"| embedding model: KV cache ({e['batch_size']} cells, f16) | {m['embedding_kv_cache']} |"]
        lines += [
            f"| embedding model: output buffer ({e['batch_size']} tokens' logits and vectors) | "
            f"{m['embedding_outputs']} |",
            f"| embedding model: compute buffers | {m['embedding_compute']} |",
        ]
    lines += [f"| **total** | **{m['total']}** |", ""]
    if e is not None:
        lines += [f"embedding model {e['model']}: {e['memory_gib']} GiB of the {m['total']} GiB total "
                  f"({e['share']:.0%}), EMBEDDING_BATCH_SIZE={e['batch_size']}", ""]
    if plan.decode_tps is not None:
        cached = f" ({plan.prefill_s} s with {plan.cache_hit_share:.0%} of the prompt cached)" \
            if plan.cache_hit_share else ""
        lines += [
            f"decode: {plan.decode_tps} tok/s per stream alone, {plan.aggregate_tps} tok/s aggregate with "
            f"{plan.parallel} streams; time to first token {plan.ttft_s} s{cached}",
            f"capacity: {plan.capacity_rps_per_pod} requests/s per pod" +
            (f"; replicas for the target: {plan.replicas}" if plan.replicas is not None else ""),
            "",
        ]
        if plan.replicas is not None:
            lines += [f"fleet: {plan.replicas} replica{'s' if plan.replicas > 1 else ''} for {plan.target_rps:g} "
                      f"requests/s, {plan.cache_hit_share:.0%} of prompt tokens found cached" +
                      (f", behind {plan.router['name']}" if plan.router else ""), ""]
    else:
        lines += ["speed: not predicted; add --calibrate to measure this machine (about 30 s)", ""]
    lines += [*plan.notes, "", "assumptions:", *(f"- {a}" for a in plan.assumptions), ""] if plan.notes else \
        ["assumptions:", *(f"- {a}" for a in plan.assumptions), ""]
    lines += [
        "Kubernetes:",
        f"  resources: {{requests: {{cpu: \"{plan.requests_cpu}\", memory: {plan.requests_memory}}}, "
        f"limits: {{cpu: \"{plan.requests_cpu}\", memory: {plan.limits_memory}}}}}",
        "  env: " + " ".join(f"{k}={v}" for k, v in plan.env.items()),
        "",
    ]
    r = plan.router
    if r is not None:
        at = "" if r["cpu_cores_at_target"] is None else f", {r['cpu_cores_at_target']:g} cores at the target"
        lines += [
            f"router pod ({r['name']}, one replica: {r['rss_mib']:g} MiB resident measured{at}):",
            f"  resources: {{requests: {{cpu: {r['requests_cpu']}, memory: {r['requests_memory']}}}, "
            f"limits: {{cpu: \"{r['limits_cpu']}\", memory: {r['limits_memory']}}}}}",
            "",
        ]
    lines += [
        "the seed (transformers, LLaMA 2 7B): memory 8-16 GB, CPU 2-4 cores per pod",
    ]
    return "\n".join(lines)
