"""Every setting of the server, in one place.

Each field is read from an environment variable of the same name in upper case (``MODEL_PATH``, ``PORT``,
``N_THREADS``...) and is also a command-line flag of ``llama-inference serve`` (``--model-path``, ``--port``...):
both come from the same fields, with the same description and bounds.
"""

from __future__ import annotations

import ipaddress
import json
import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

# Bytes of one K or V value in the KV cache, per CACHE_TYPE (q8_0: 32 values in 34 bytes).
KV_BYTES_PER_VALUE = {"f16": 2.0, "q8_0": 34 / 32, "f32": 4.0}


def kv_cache_bytes(n_layer: int, n_ctx: int, kv_width: int, cache_type: str) -> float:
    """The KV cache's size: K and V, each ``kv_width`` values per token per layer, of a resolved CACHE_TYPE."""
    return 2 * n_layer * n_ctx * kv_width * KV_BYTES_PER_VALUE[cache_type]


def prompt_cache_bytes(cache_ram_mib: int | str, kv_bytes: float) -> int:
    """The host-memory prompt cache's bound for a CACHE_RAM_MIB value and a KV cache of ``kv_bytes``; 0: off."""
    return int(kv_bytes) if cache_ram_mib == "auto" else int(cache_ram_mib) * 2**20


MIN_KEY_CHARS = 16  # a guessable key is no key


def key_lines(text: str) -> list[tuple[int, str]]:
    """The keys of an API key file with their line numbers: one a line, blank lines and ``#`` comments skipped."""
    return [(number, line.strip()) for number, line in enumerate(text.splitlines(), start=1)
            if line.strip() and not line.strip().startswith("#")]


def _default_threads() -> int:
    """Threads for llama.cpp: the CPUs this process may run on (cgroup-aware through the affinity mask)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


class Settings(BaseSettings):
    """Server settings. Environment variables and CLI flags are generated from these fields."""

    model_config = SettingsConfigDict(env_prefix="", case_sensitive=False, extra="ignore")

    # Model
    model_path: Path | None = Field(
        default=None,
        description="GGUF file to serve, or a Hugging Face repository REPO[@REVISION][:QUANT] pulled into the Hub "
        "cache on first start and checked against its SHA-256 at each start. Unset: the embedded "
        "SmolLM2-135M-Instruct Q4_1 (a toy for trying the server).",
    )
    served_model_name: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Names the API answers to (comma-separated); the first is the one it shows. "
        "Unset: the GGUF file's name without '.gguf'.",
    )
    strict_model_name: bool = Field(
        default=False,
        description="Answer 404 to a request naming another model. Off: any name is accepted (one model is "
        "served) and the answer names the real one.",
    )

    chat_template: str | None = Field(
        default=None,
        description="Jinja chat template (file path or text) for /v1/chat/completions. Unset: the GGUF's own.",
    )

    # HTTP
    host: str = Field(default="127.0.0.1", description="Address to listen on (0.0.0.0 in a pod).")
    port: int = Field(default=8000, ge=1, le=65535, description="TCP port to listen on.")

    # llama.cpp context
    ctx_size: int = Field(
        default=8192, ge=64, le=1 << 20,
        description="KV-cache size in tokens, shared by all slots; each slot gets ctx_size / parallel.",
    )
    parallel: int = Field(default=4, ge=1, le=64, description="Parallel sequences (slots) decoded together.")
    batch_size: int = Field(
        default=512, ge=16, le=8192,
        description="Most tokens given to one llama_decode call; long prompts are prefilled in chunks of this size.",
    )
    prefill_budget: int = Field(
        default=0, ge=0, le=8192,
        description="Most prompt tokens prefilled in one step while other streams are generating, so a long "
        "prompt never stalls them. 0 (auto): measured as the engine runs, so that such a step costs about two "
        "decode steps (a running stream's inter-token gap at most doubles).",
    )
    cache_ram_mib: Literal["auto"] | int = Field(
        default="auto",
        description="Host memory (MiB) for a prompt cache: the KV cells of a conversation whose slot goes to "
        "another prompt are kept there and put back when the conversation returns, as llama-server's "
        "--cache-ram does (8 GiB there). auto: as much as the KV cache itself (a second set of slots, in host "
        "memory). The planner counts it in the pod's memory. 0: off.",
    )
    waiting_served_ratio: float = Field(
        default=1.0, ge=0.0, le=100.0,
        description="When more prompts wait to be prefilled than this times the streams generating (those past "
        "their first token), a step takes the short waiting prompts whole (64 tokens in all), pausing the streams "
        "once, so a queue of short prompts starts together instead of a token a step each "
        "(text-generation-inference's setting of that name). Longer prompts still go by PREFILL_BUDGET. 0: never.",
    )
    watchdog_timeout_s: float = Field(
        default=120.0, gt=0.0, le=86_400.0,
        description="/health fails when the engine has work but has finished no step for this long (a hung "
        "llama_decode): the liveness probe then restarts the pod. Longer than the slowest prefill step.",
    )
    n_threads: int = Field(default_factory=_default_threads, ge=1, le=512, description="Threads for decoding.")
    n_threads_batch: int | None = Field(
        default=None, ge=1, le=512, description="Threads for prompt processing. Unset: same as n_threads."
    )
    use_mmap: bool = Field(
        default=False,
        description="Memory-map the model file. Off by default: llama.cpp repacks most quantized weights into "
        "its own layout, and a mapped file would then stay resident beside the copy (7B: 8.8 GiB instead of 5.9).",
    )
    cache_type: Literal["auto", "f16", "q8_0", "f32"] = Field(
        default="auto",
        description="KV-cache element type. q8_0 halves the cache's memory (needs flash attention); auto picks "
        "q8_0 when an f16 cache would take more than 1 GiB (LLaMA 2 7B at 4096 tokens), else f16.",
    )
    flash_attn: bool = Field(default=True, description="Flash attention (llama.cpp's CPU kernel; less memory).")
    kv_unified: bool = Field(
        default=False,
        description="One KV cache shared by all slots (llama-server's default) instead of one per slot: a step is "
        "one micro-batch, and a prompt prefix another slot holds is shared without copying. Each slot still uses "
        "at most ctx_size / parallel tokens.",
    )

    # Speculative decoding
    speculative: Literal["off", "ngram", "draft"] = Field(
        default="off",
        description="Speculative decoding by default for every request (a request's 'speculative' field "
        "overrides): 'ngram' drafts from the prompt and text so far (prompt lookup), 'draft' from DRAFT_MODEL_PATH. "
        "Greedy output is the same (but for near-ties, which batched kernels round differently); it pays on "
        "answers that copy their input (rewrites, extraction, code edits), and pauses while drafts keep failing.",
    )
    draft_max: int = Field(default=8, ge=1, le=64, description="Most tokens drafted for one stream in one step.")
    ngram_size: int = Field(
        default=3, ge=1, le=16,
        description="Longest suffix of the text so far looked up in the prompt and the text for an n-gram draft "
        "(shorter ones, down to 2, are tried next).",
    )
    draft_model_path: Path | None = Field(
        default=None,
        description="A small GGUF model with the served model's vocabulary that drafts tokens (with SPECULATIVE=draft "
        "or a request's 'speculative': true).",
    )

    # Embeddings
    embedding_model_path: Path | None = Field(
        default=None,
        description="GGUF embedding model (all-MiniLM, nomic-embed-text, EmbeddingGemma...) served by /v1/embeddings "
        "and Ollama's /api/embed beside the chat model, in a llama.cpp context of its own, or a Hugging Face "
        "repository REPO[@REVISION][:QUANT] as for MODEL_PATH. Unset: no embeddings, unless EMBEDDING_POOLING is set "
        "(then the chat model embeds).",
    )
    embedding_pooling: Literal["mean", "cls", "last"] | None = Field(
        default=None,
        description="How an input's token outputs make its embedding. Unset: the embedding GGUF's own "
        "(pooling_type). Set without EMBEDDING_MODEL_PATH: the chat model serves embeddings, pooled this way.",
    )
    embedding_batch_size: int = Field(
        default=512, ge=16, le=8192,
        description="Most tokens of one embedding decode (many inputs, each a sequence, as llama-server's "
        "--ubatch-size); an input longer than this or than the embedding model's context is refused with a 400, "
        "never cut: raise it for a model with a longer context (nomic-embed-text: 2048, or 8192). Memory grows with "
        "it: llama.cpp keeps every token's outputs (all-MiniLM: 124 MiB resident at 512, 331 MiB at 2048; `plan` "
        "counts it).",
    )
    embedding_max_inputs: int = Field(
        default=2048, ge=1, le=100_000, description="Most inputs one embedding request may carry (OpenAI's bound).")
    embedding_max_tokens: int = Field(
        default=262_144, ge=1, le=1 << 24, description="Most tokens, all inputs together, of one embedding request.")
    embedding_dimensions: Annotated[list[int], NoDecode] = Field(
        default_factory=list,
        description="Widths a request's 'dimensions' may cut an embedding to (comma-separated), for a model trained "
        "for it (Matryoshka: nomic-embed-text v1.5, EmbeddingGemma...). Unset: 'dimensions' must be the full width.",
    )

    # Requests
    queue_size: int = Field(
        default=16, ge=0, le=100_000,
        description="Requests that may wait for a free slot; beyond that the server answers 429 at once.",
    )
    max_tokens_limit: int = Field(
        default=4096, ge=1, le=1 << 20, description="Largest max_length (tokens to generate) a request may ask for."
    )
    default_max_tokens: int = Field(
        default=256, ge=1, le=1 << 20, description="Tokens to generate when a request does not say."
    )

    drain_timeout_s: float = Field(
        default=30.0, ge=0.0, le=3600.0,
        description="On SIGTERM, how long requests in flight may take to finish before the server exits.",
    )

    queue_timeout_s: float = Field(
        default=120.0, gt=0.0, le=86_400.0,
        description="A request waiting this long for a free slot is answered 503 instead of waiting on.",
    )
    allow_special_tokens: bool = Field(
        default=False,
        description="Parse control-token text in /generate and /v1/completions prompts (e.g. '<|im_end|>') as "
        "control tokens. Off: such text stays text, so users cannot forge turns.",
    )

    # Security
    api_key: SecretStr | None = Field(
        default=None, description="If set, generation routes require 'Authorization: Bearer <key>'."
    )
    api_key_file: Path | None = Field(
        default=None, description="A file with API keys, one per line (e.g. a mounted Kubernetes secret)."
    )
    cors_origins: list[str] = Field(
        default_factory=list, description="Origins allowed by CORS (none by default). JSON list in the environment."
    )
    max_body_bytes: int = Field(
        default=4 * 2**20, ge=1024, le=2**30, description="Largest request body accepted; larger ones get 413."
    )
    allowed_hosts: list[str] = Field(
        default_factory=lambda: ["localhost", "127.0.0.1", "[::1]"],
        description="Host header values accepted (a JSON list; '*' any, '*.example.com' subdomains); others get "
        "400, which stops DNS rebinding. In a pod: the Service's names. /health, /ready and /metrics accept any host.",
    )
    prompt_cache_scope: Literal["key", "off"] = Field(
        default="key",
        description="Prompt-prefix reuse between requests: 'key' only between requests with the same API key "
        "(with no keys configured, between all requests), 'off' never (no timing or cached_tokens signal at all).",
    )
    tenant_header: str | None = Field(
        default=None,
        description="A header set by a trusted gateway (e.g. X-Tenant-Id) whose value also separates prompt "
        "caches, for deployments where one API key serves several tenants. Honoured only on connections from "
        "TRUSTED_PROXIES; given twice, the request gets 400.",
    )
    trusted_proxies: list[str] = Field(
        default_factory=lambda: ["127.0.0.1/32", "::1/128"],
        description="Addresses or networks (a JSON list, e.g. [\"10.0.0.0/8\"]) of the gateways whose TENANT_HEADER "
        "is believed; from any other client it is ignored.",
    )
    allow_unauthenticated: bool = Field(
        default=False,
        description="Serve without an API key on an address other than loopback. Off: such a server refuses to "
        "start, since whoever reaches the port could use it and would share one prompt-cache scope with everyone.",
    )
    max_header_bytes: int = Field(
        default=64 * 2**10, ge=1024, le=16 * 2**20,
        description="Largest request line plus headers; larger ones get 431 before they are parsed.",
    )
    header_timeout_s: float = Field(
        default=10.0, gt=0.0, le=3600.0,
        description="A connection whose request headers have not all arrived this long after it opened (or "
        "after its previous answer) gets 408 and is closed.",
    )
    body_timeout_s: float = Field(
        default=60.0, gt=0.0, le=3600.0,
        description="A request body not fully received this long after its headers is cut off.",
    )
    write_timeout_s: float = Field(
        default=30.0, gt=0.0, le=3600.0,
        description="A connection whose client takes none of the answer's bytes for this long (its window full: "
        "it stopped reading) is closed; a stream to it ends and its slot is freed.",
    )
    limit_concurrency: int = Field(
        default=512, ge=1, le=1_000_000,
        description="Most open connections (and requests in progress); beyond it new requests get 503.",
    )
    ui: bool = Field(default=True, description="Serve the web playground at /.")

    # Logging
    log_level: Literal["debug", "info", "warning", "error"] = Field(default="info", description="Log level.")
    log_json: bool = Field(default=False, description="Write logs as JSON lines.")
    log_prompts: bool = Field(default=False, description="Include prompts in the per-request log lines.")

    @field_validator("served_model_name", "embedding_dimensions", mode="before")
    @classmethod
    def _names(cls, value: object) -> object:
        """A comma-separated string (SERVED_MODEL_NAME=a,b) or a JSON list, as a list of names."""
        if isinstance(value, str):
            text = value.strip()
            return json.loads(text) if text.startswith("[") else [n.strip() for n in text.split(",") if n.strip()]
        return value

    @field_validator("cache_ram_mib", mode="before")
    @classmethod
    def _cache_ram(cls, value: object) -> object:
        """``auto`` or whole MiB from 0 to 1 TiB, with one message for both (the union would give two)."""
        if value == "auto":
            return value
        try:
            mib = int(str(value).strip())
        except ValueError:
            mib = -1
        if not 0 <= mib <= 1_048_576:
            raise ValueError(f"should be auto or a whole number of MiB from 0 (off) to 1048576, not {value!r}")
        return mib

    @field_validator("api_key")
    @classmethod
    def _key_not_blank(cls, key: SecretStr | None) -> SecretStr | None:
        """Authentication fails closed: a key that is set but blank refuses start-up instead of turning auth off."""
        if key is not None and not key.get_secret_value().strip():
            raise ValueError("API_KEY is set but empty; refusing to start without authentication")
        if key is not None and len(key.get_secret_value().strip()) < MIN_KEY_CHARS:
            raise ValueError(f"API_KEY is shorter than {MIN_KEY_CHARS} characters; use a random key "
                             "(e.g. openssl rand -hex 32)")
        return key

    @field_validator("api_key_file")
    @classmethod
    def _key_file_holds_a_key(cls, path: Path | None) -> Path | None:
        """Authentication fails closed: a key file that is missing, unreadable or empty refuses start-up."""
        if path is None:
            return None
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise ValueError(f"cannot read API key file {path}: {reason}") from exc
        keys = key_lines(text)
        if not keys:
            raise ValueError(f"API key file {path} holds no key (one per line); refusing to start without "
                             "authentication")
        short = next((number for number, key in keys if len(key) < MIN_KEY_CHARS), None)
        if short is not None:
            raise ValueError(f"the key on line {short} of API key file {path} is shorter than {MIN_KEY_CHARS} "
                             "characters; use random keys (e.g. openssl rand -hex 32)")
        return path

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.ctx_size // self.parallel < 16:
            raise ValueError(
                f"ctx_size {self.ctx_size} leaves {self.ctx_size // self.parallel} tokens per slot "
                f"for {self.parallel} slots; raise ctx_size or lower parallel"
            )
        if self.parallel > self.batch_size:
            raise ValueError(f"parallel {self.parallel} is more than batch_size {self.batch_size}: every "
                             "generating slot needs a token of each batch; raise batch_size or lower parallel")
        if self.cache_type == "q8_0" and not self.flash_attn:
            raise ValueError("cache_type q8_0 needs flash_attn on")
        if self.default_max_tokens > self.max_tokens_limit:
            raise ValueError("default_max_tokens must not exceed max_tokens_limit")
        if self.speculative == "draft" and self.draft_model_path is None:
            raise ValueError("speculative is 'draft' but no draft_model_path is set")
        if self.draft_model_path is not None and not self.draft_model_path.is_file():
            raise ValueError(f"draft_model_path {self.draft_model_path} is not a file")
        if any(d < 1 for d in self.embedding_dimensions):
            raise ValueError("embedding_dimensions must be positive widths")
        return self

    @property
    def embeddings_on(self) -> bool:
        """Whether /v1/embeddings is served: an embedding model given, or the chat model with a pooling."""
        return self.embedding_model_path is not None or self.embedding_pooling is not None

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        for item in value:
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError as exc:
                raise ValueError(f"{item!r} is not an address or network") from exc
        return value

    def exposure_problem(self) -> str | None:
        """Why this server must not start: it listens beyond loopback with no API key, and was not told that is
        meant (ALLOW_UNAUTHENTICATED). None when it may."""
        if self.api_key is not None or self.api_key_file is not None or self.allow_unauthenticated:
            return None
        host = self.host.strip("[]")
        try:
            loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if loopback:
            return None
        return (f"refusing to listen on {self.host} without an API key: anyone who reaches the port could use the "
                "server. Set API_KEY_FILE (or API_KEY), listen on 127.0.0.1, or set ALLOW_UNAUTHENTICATED=true "
                "if a gateway in front authenticates")

    def api_keys(self) -> list[str]:
        """Every accepted key: API_KEY and the lines of API_KEY_FILE (read now, so a rotated secret applies on
        restart)."""
        keys = [self.api_key.get_secret_value().strip()] if self.api_key else []
        if self.api_key_file is not None:
            keys += [key for _, key in key_lines(self.api_key_file.read_text(encoding="utf-8"))]
        return keys

    def prompt_cache_bytes(self, kv_bytes: float) -> int:
        """The prompt cache's bound (CACHE_RAM_MIB) for a KV cache of ``kv_bytes``; 0 when off."""
        return prompt_cache_bytes(self.cache_ram_mib, kv_bytes)

    @property
    def slot_ctx(self) -> int:
        """Tokens of context each slot may use (prompt and generated together)."""
        return self.ctx_size // self.parallel

    @property
    def threads_batch(self) -> int:
        return self.n_threads_batch or self.n_threads
