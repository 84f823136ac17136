"""Shared fixtures: the real embedded model, a real server on loopback, and an in-process app."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from fastapi.testclient import TestClient
from llama_cpp import Llama

from convert.safetensors_io import write_safetensors
from server.app import create_app
from server.model_files import embedded_model_path
from server.settings import Settings

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def model_path() -> Path:
    return embedded_model_path()


@dataclass
class LiveServer:
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_server(tmp: Path, *args: str, env: dict[str, str] | None = None, wait_ready: bool = True) -> LiveServer:
    """Run ``llama-inference serve`` in a subprocess on a free loopback port."""
    port = free_port()
    log_path = tmp / f"server-{port}.log"
    full_env = {**os.environ, **(env or {})}
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "server", "serve", "--host", "127.0.0.1", "--port", str(port), *args],
            stdout=log_file, stderr=subprocess.STDOUT, env=full_env, cwd=REPO,
        )
    server = LiveServer(url=f"http://127.0.0.1:{port}", process=proc, log_path=log_path)
    if wait_ready:
        wait_until_ready(server)
    return server


def wait_until_ready(server: LiveServer, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"server exited with {server.process.returncode}:\n{server.log()}")
        try:
            if httpx.get(server.url + "/ready", timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"server not ready after {timeout}s:\n{server.log()}")


def metric(text: str, name: str, labels: str = "") -> float:
    """A sample's value in a Prometheus exposition (``/metrics``), 0 where the series is absent."""
    key = f"{name}{{{labels}}}" if labels else name
    for line in text.splitlines():
        if line.startswith(key + " "):
            return float(line.split()[-1])
    return 0.0


def stop_server(server: LiveServer, timeout: float = 20.0) -> int:
    if server.process.poll() is None:
        server.process.terminate()
        try:
            server.process.wait(timeout)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait()
    return server.process.returncode


@pytest.fixture(scope="session")
def live_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """One real server for the session: 4 slots, the embedded model."""
    server = start_server(tmp_path_factory.mktemp("live"), "--parallel", "4", "--queue-size", "4")
    yield server
    stop_server(server)


@pytest.fixture(scope="session")
def http(live_server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=live_server.url, timeout=60.0) as client:
        yield client


@pytest.fixture(scope="module")
def client(live_server: LiveServer) -> Iterator[openai.OpenAI]:
    """The official OpenAI SDK on the session's server."""
    with openai.OpenAI(base_url=live_server.url + "/v1", api_key="unused", max_retries=0, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def vocab(model_path: Path) -> Iterator[Llama]:
    """llama.cpp's own tokenizer of the embedded model (vocabulary only)."""
    llm = Llama(str(model_path), vocab_only=True, verbose=False)
    yield llm
    llm.close()


@pytest.fixture
def make_client() -> Iterator[Callable[..., TestClient]]:
    """In-process app through Starlette's TestClient (lifespan included), waiting for the model to load."""
    clients: list[TestClient] = []

    def make(wait_ready: bool = True, **settings: object) -> TestClient:
        # localhost: the app serves loopback Host names only (ALLOWED_HOSTS), not TestClient's "testserver".
        client = TestClient(create_app(Settings(**settings)), base_url="http://localhost")  # type: ignore[arg-type]
        client.__enter__()
        clients.append(client)
        if wait_ready:
            client.app.state.engine.loaded.wait(60)  # type: ignore[attr-defined]
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


# ---- A tiny random LLaMA with a trained SentencePiece tokenizer (converter and Nix tests) ----

PARAGRAPHS = [
    "The lighthouse stood on the edge of the cliff, its beam sweeping across the dark water every twelve "
    "seconds. Sailors had trusted it for 150 years.",
    "def fibonacci(n: int) -> int:\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "Prices rose 3.75% in 2024; naïve forecasts missed it. Émile said: «c'est la vie» — 日本語のテキストも。 🎉",
    "<|im_start|>user\nHello there!<|im_end|>\n<|im_start|>assistant\n",
]

TRAIN_TEXT = " ".join(PARAGRAPHS[:3]) * 3 + " " + " ".join(
    f"The {w} of the {v} is {n} and the {v} of the {w} was {n + 1}." for w, v, n in
    [("sea", "ship", 3), ("harbour", "light", 7), ("keeper", "tower", 11), ("storm", "night", 19)]
) * 20


@pytest.fixture(scope="session")
def tiny_spm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import sentencepiece as spm

    d = tmp_path_factory.mktemp("tiny-spm")
    corpus = d / "corpus.txt"
    corpus.write_text("\n".join(TRAIN_TEXT.split(". ")))
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(d / "tokenizer"), vocab_size=400, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity",
        add_dummy_prefix=True, remove_extra_whitespaces=False, split_digits=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2,
    )
    vocab = spm.SentencePieceProcessor(model_file=str(d / "tokenizer.model")).vocab_size()
    config = {"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": vocab,
              "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
              "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2}
    (d / "config.json").write_text(json.dumps(config))
    (d / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True, "add_eos_token": False}))
    rng = np.random.default_rng(7)
    e, f, hd = 64, 128, 16
    weights: dict[str, np.ndarray] = {
        "model.embed_tokens.weight": rng.normal(0, 0.5, (vocab, e)),
        "model.norm.weight": 1 + rng.normal(0, 0.1, e),
        "lm_head.weight": rng.normal(0, 0.2, (vocab, e)),
    }
    for i in range(2):
        p = f"model.layers.{i}."
        weights |= {
            p + "input_layernorm.weight": 1 + rng.normal(0, 0.1, e),
            p + "post_attention_layernorm.weight": 1 + rng.normal(0, 0.1, e),
            p + "self_attn.q_proj.weight": rng.normal(0, 0.3, (4 * hd, e)),
            p + "self_attn.k_proj.weight": rng.normal(0, 0.3, (2 * hd, e)),
            p + "self_attn.v_proj.weight": rng.normal(0, 0.3, (2 * hd, e)),
            p + "self_attn.o_proj.weight": rng.normal(0, 0.2, (e, 4 * hd)),
            p + "mlp.gate_proj.weight": rng.normal(0, 0.2, (f, e)),
            p + "mlp.up_proj.weight": rng.normal(0, 0.2, (f, e)),
            p + "mlp.down_proj.weight": rng.normal(0, 0.2, (e, f)),
        }
    write_safetensors(d / "model.safetensors", {k: v.astype(np.float32) for k, v in weights.items()}, "F32")
    return d


