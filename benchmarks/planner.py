"""Capacity planner: memory, speed and Kubernetes sizing of a llama-inference pod, from a model's shape.

    llama-inference plan --shape llama-2-7b --quant Q4_K_M --ctx-size 4096 --parallel 2 --cores 4
    llama-inference plan --gguf models/llama-2-7b.Q4_K_M.gguf --calibrate --target-rps 2

Memory is modelled from llama.cpp's allocations: the weights (the GGUF's tensor data, or parameters x bits per
weight of the quantization), the KV cache (2 x layers x context x KV width x bytes per element), the compute
buffers (logits and activations of one micro-batch), and the process itself. Speed comes from a calibration
run on this machine (``--calibrate``): decoding is bound by memory bandwidth (every token reads all weights),
prompt processing by arithmetic (2 FLOPs per parameter per token), so the rates measured on the embedded model
scale to another model by its size.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

GIB = 2**30

# Average bits per weight of llama.cpp's types on LLaMA-shaped models (llama.cpp's quantize table for 7B).
BITS_PER_WEIGHT = {
    "F32": 32.0, "F16": 16.0, "BF16": 16.0, "Q8_0": 8.5, "Q6_K": 6.56, "Q5_K_M": 5.69, "Q5_0": 5.5,
    "Q4_K_M": 4.85, "Q4_1": 5.0, "Q4_0": 4.55, "Q3_K_M": 3.91, "Q2_K": 3.35,
}
KV_BYTES = {"f16": 2.0, "q8_0": 34 / 32, "f32": 4.0}
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
    shape = Shape(
        name=path.name, n_layer=value(f"{arch}.block_count"), n_embd=value(f"{arch}.embedding_length"),
        n_head=n_head, n_head_kv=value(f"{arch}.attention.head_count_kv") if f"{arch}.attention.head_count_kv"
        in reader.fields else n_head, n_ff=value(f"{arch}.feed_forward_length"), n_vocab=len(tokens.data),
        n_ctx_train=value(f"{arch}.context_length"), n_params=n_params,
    )
    try:
        quant = gguf.LlamaFileType(value("general.file_type")).name.removeprefix("MOSTLY_")
    except (KeyError, ValueError):
        quant = "unknown"
    return shape, quant, data_bytes


@dataclass
class Memory:
    weights: float
    weights_repacked_copy: float
    kv_cache: float
    compute: float
    runtime: float

    @property
    def total(self) -> float:
        return self.weights + self.weights_repacked_copy + self.kv_cache + self.compute + self.runtime


def predict_memory(shape: Shape, *, weights_bytes: float, quant: str, ctx_size: int, batch_size: int = 512,
                   kv_type: str = "f16", use_mmap: bool = True) -> Memory:
    kv = 2 * shape.n_layer * ctx_size * shape.kv_width * KV_BYTES[kv_type]
    # Compute buffers: the logits of a micro-batch dominate (vocabulary x tokens x 4 bytes), plus activations.
    compute = 4 * batch_size * (shape.n_vocab + 4 * shape.n_embd + 2 * shape.n_ff)
    repacked = weights_bytes if (use_mmap and quant in REPACKED and shape.n_embd % 256 == 0) else 0.0
    return Memory(weights=weights_bytes, weights_repacked_copy=repacked, kv_cache=kv, compute=compute,
                  runtime=RUNTIME_BYTES)


# How close llama.cpp gets to the machine's limits, measured on this project's 2-core machine with a
# LLaMA-2-7B-shaped Q4_K_M (benchmarks/RESULTS.md): decoding reads the weights at about 80% of the memory
# bandwidth a plain multi-threaded read reaches, and its int8 (VNNI) kernels process prompts about 1.4x as fast
# as numpy's float32 matrix product.
DECODE_BANDWIDTH_EFFICIENCY = 0.8
PROMPT_KERNEL_SPEEDUP = 1.4


@dataclass
class Calibration:
    """This machine's rates: memory bandwidth, matrix-product speed, and llama-inference's fixed cost per
    decoded token (measured on the embedded model, whose weights are too small to matter)."""

    bytes_per_second: float  # memory read bandwidth with the calibration threads
    flops_per_second: float  # float32 matrix product
    seconds_per_token_fixed: float = 0.0
    batch_speedup: dict[int, float] = field(default_factory=lambda: {1: 1.0, 2: 1.25, 4: 1.5, 8: 1.7})

    def decode_tps(self, weights_bytes: float) -> float:
        read_s = weights_bytes / (self.bytes_per_second * DECODE_BANDWIDTH_EFFICIENCY)
        return 1 / (self.seconds_per_token_fixed + read_s)

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
    memory_gib: dict[str, float]
    decode_tps: float | None
    aggregate_tps: float | None
    ttft_s: float | None
    requests_memory: str
    limits_memory: str
    requests_cpu: str
    capacity_rps_per_pod: float | None
    replicas: int | None


def gib_string(value: float) -> str:
    return f"{math.ceil(value / GIB)}Gi"


def make_plan(shape: Shape, *, quant: str, weights_bytes: float | None = None, ctx_size: int = 4096,
              parallel: int = 2, cores: int = 4, kv_type: str = "f16", use_mmap: bool = True,
              calibration: Calibration | None = None, calibration_cores: int = 2, prompt_tokens: int = 100,
              output_tokens: int = 200, target_rps: float | None = None, utilization: float = 0.7) -> Plan:
    if weights_bytes is None:
        weights_bytes = shape.n_params * BITS_PER_WEIGHT[quant] / 8
    mem = predict_memory(shape, weights_bytes=weights_bytes, quant=quant, ctx_size=ctx_size, kv_type=kv_type,
                         use_mmap=use_mmap)
    decode = aggregate = ttft = capacity = None
    replicas = None
    if calibration is not None:
        # Decoding is bandwidth-bound and scales little with cores; prompt processing scales with them.
        decode = calibration.decode_tps(weights_bytes)
        aggregate = decode * calibration.speedup(parallel)
        ttft = prompt_tokens / (calibration.prompt_tps(shape.n_params) * cores / calibration_cores)
        seconds_per_request = ttft / parallel + output_tokens / aggregate
        capacity = 1 / seconds_per_request
        if target_rps is not None:
            replicas = max(1, math.ceil(target_rps / (capacity * utilization)))
    headroom = 1.15  # allocator slack, page cache of the mapped file's hot pages, growth of Python objects
    return Plan(
        shape=shape.name, quant=quant, ctx_size=ctx_size, parallel=parallel, cores=cores,
        memory_gib={k: round(v / GIB, 2) for k, v in {**asdict(mem), "total": mem.total}.items()},
        decode_tps=None if decode is None else round(decode, 2),
        aggregate_tps=None if aggregate is None else round(aggregate, 2),
        ttft_s=None if ttft is None else round(ttft, 2),
        requests_memory=gib_string(mem.total * headroom), limits_memory=gib_string(mem.total * headroom),
        requests_cpu=str(cores), capacity_rps_per_pod=None if capacity is None else round(capacity, 3),
        replicas=replicas,
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


def calibrate(model_path: Path, threads: int = 2, n_tokens: int = 64) -> Calibration:
    """Measure this machine: memory bandwidth, matrix-product speed, and the embedded model's decode rate
    (which, with weights this small, is mostly the fixed cost of a step)."""
    import time

    from server.engine.llama import Batch, LlamaContext, LlamaModel
    from server.engine.sampling import Sampler, SamplingParams

    shape, _, weights_bytes = shape_from_gguf(model_path)
    model = LlamaModel(model_path)
    ctx = LlamaContext(model, n_ctx=1024, n_batch=512, n_seq_max=1, n_threads=threads, n_threads_batch=threads)
    sampler = Sampler(SamplingParams(temperature=0), model.n_vocab)
    try:
        prompt = (model.tokenize("The history of lighthouses is long and full of stories. " * 40))[:400]
        batch = Batch(512)
        for _ in range(2):  # warm-up, then measured
            ctx.clear()
            batch.clear()
            batch.add(prompt, 0, 0, True)
            start = time.perf_counter()
            ctx.decode(batch)
            prompt_s = time.perf_counter() - start
        pos, token = len(prompt), sampler.sample(ctx.ptr, batch.n_tokens - 1)
        start = time.perf_counter()
        for _ in range(n_tokens):
            batch.clear()
            batch.add_one(token, pos, 0)
            ctx.decode(batch)
            token = sampler.sample(ctx.ptr, 0)
            pos += 1
        decode_s = (time.perf_counter() - start) / n_tokens
    finally:
        sampler.close()
        ctx.close()
        model.close()
    del prompt_s
    bandwidth = memory_bandwidth(threads)
    fixed = max(0.0, decode_s - weights_bytes / (bandwidth * DECODE_BANDWIDTH_EFFICIENCY))
    return Calibration(bytes_per_second=bandwidth, flops_per_second=matmul_flops(), seconds_per_token_fixed=fixed)


def render(plan: Plan) -> str:
    m = plan.memory_gib
    lines = [
        f"model {plan.shape} {plan.quant}, context {plan.ctx_size} in {plan.parallel} slots, {plan.cores} cores",
        "",
        "| memory | GiB |",
        "|---|---|",
        f"| weights | {m['weights']} |",
        f"| repacked copy of the weights (mmap on) | {m['weights_repacked_copy']} |",
        f"| KV cache | {m['kv_cache']} |",
        f"| compute buffers | {m['compute']} |",
        f"| runtime | {m['runtime']} |",
        f"| **total** | **{m['total']}** |",
        "",
    ]
    if plan.decode_tps is not None:
        lines += [
            f"decode: {plan.decode_tps} tok/s per stream alone, {plan.aggregate_tps} tok/s aggregate with "
            f"{plan.parallel} streams; time to first token {plan.ttft_s} s",
            f"capacity: {plan.capacity_rps_per_pod} requests/s per pod" +
            (f"; replicas for the target: {plan.replicas}" if plan.replicas is not None else ""),
            "",
        ]
    lines += [
        "Kubernetes:",
        f"  resources: {{requests: {{cpu: \"{plan.requests_cpu}\", memory: {plan.requests_memory}}}, "
        f"limits: {{cpu: \"{plan.requests_cpu}\", memory: {plan.limits_memory}}}}}",
        "  env: " + f"N_THREADS={plan.cores} CTX_SIZE={plan.ctx_size} PARALLEL={plan.parallel}",
        "",
        "the seed (transformers, LLaMA 2 7B): memory 8-16 GB, CPU 2-4 cores per pod",
    ]
    return "\n".join(lines)
