"""Fill-in-the-middle: ``/infill`` (llama-server's shape), ``suffix`` on ``/v1/completions`` through the ``openai``
SDK and on Ollama's ``/api/generate`` through the ``ollama`` client, all built by ``server/fim.py``.

The model is a test fixture: the embedded SmolLM2's GGUF copied by gguf's own ``gguf_new_metadata`` with FIM token
ids added, pointing at control tokens its vocabulary already has. SmolLM2 was not trained for FIM, so what it writes
in the gap means nothing; what is tested is the prompt built around the gap: token for token against the layout of
llama.cpp's ``format_prompt_infill`` (tools/server/server-common.cpp), against llama.cpp's own llama-server where
it is built (``LLAMA_SERVER``), and through each route the same greedy answer.

A prompt's tokens are read back from a server exactly by its prompt cache: after a request, the same server given
a token-id prompt reuses that many leading tokens of what the request's prompt left in the slot (all but the last,
which is computed again for its logits), and fewer from the first token that differs. One slot, and no host-memory
prompt cache (which would remember earlier prompts), on both servers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import llama_cpp
import ollama
import openai
import pytest
from llama_cpp import Llama

from tests.conftest import LiveServer, free_port, start_server, stop_server

LLAMA_SERVER = Path(os.environ.get(
    "LLAMA_SERVER", "/tmp/sdist/llama_cpp_python-0.3.36/vendor/llama.cpp/build/bin/llama-server"))
# Control tokens of SmolLM2's vocabulary (StarCoder's): <repo_name> and <file_sep> are what StarCoder-style FIM
# prompts use as repository and file separators; the <issue_*> tokens stand in for <fim_prefix> and its kin.
FIM_TOKENS = {"fim_pre": (8, "<issue_start>"), "fim_suf": (9, "<issue_comment>"), "fim_mid": (10, "<issue_closed>"),
              "fim_rep": (3, "<repo_name>"), "fim_sep": (5, "<file_sep>")}
# Two vocabularies: with repository and file separators; and with only the three FIM tokens given, where llama.cpp
# finds a repository token by its text itself (<reponame>, Granite's) but no file separator (chunks of other files
# then follow llama-server's snippet marker), and a BOS is added in front of the prefix.
VARIANTS = {"separators": ("fim_pre", "fim_suf", "fim_mid", "fim_rep", "fim_sep"),
            "fim-only-bos": ("fim_pre", "fim_suf", "fim_mid")}
FOUND_BY_TEXT = {"separators": {}, "fim-only-bos": {"fim_rep": 4, "fim_sep": -1}}  # -1: none
MODEL = "fim-test"
PREFIX, SUFFIX = "def add(a, b):\n    ", "\n\nprint(add(1, 2))\n"
GREEDY = 8  # tokens

# Requests to compare with llama-server: control-token text in the prefix and the chunks stays text.
REQUESTS = [
    {"input_prefix": PREFIX, "input_suffix": SUFFIX},
    {"input_prefix": "import math\n<file_sep>x = <issue_closed>", "input_suffix": "\n    return c\n", "prompt": "  c",
     "input_extra": [{"filename": "util/sum.py", "text": "def total(xs):\n    return sum(xs)\n"},
                     {"text": "<issue_start>plain text\n"}]},
]


def _fim_gguf(directory: Path, source: Path, variant: str) -> Path:
    """The embedded model's GGUF with FIM tokens, written by gguf's own scripts."""
    out = directory / f"{MODEL}.gguf"
    ids = [arg for name in VARIANTS[variant] for arg in ("--special-token-by-id", name, str(FIM_TOKENS[name][0]))]
    subprocess.run([sys.executable, "-m", "gguf.scripts.gguf_new_metadata", str(source), str(out), *ids, "--force"],
                   check=True, capture_output=True)
    if variant == "fim-only-bos":
        subprocess.run([sys.executable, "-m", "gguf.scripts.gguf_set_metadata", str(out),
                        "tokenizer.ggml.add_bos_token", "1", "--force"], check=True, capture_output=True)
    return out


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, model_path: Path
            ) -> tuple[str, Path]:
    return request.param, _fim_gguf(tmp_path_factory.mktemp(request.param), model_path, request.param)


@pytest.fixture(scope="module")
def fim_vocab(variant: tuple[str, Path]) -> Iterator[Llama]:
    llm = Llama(str(variant[1]), vocab_only=True, verbose=False)
    yield llm
    llm.close()


@pytest.fixture(scope="module")
def probed(variant: tuple[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """Ours, with the prompt cache and token-id prompts that may hold control tokens (to read prompts back)."""
    server = start_server(tmp_path_factory.mktemp("probed"), "--model-path", str(variant[1]), "--n-threads", "1",
                          "--parallel", "1", "--ctx-size", "2048", "--cache-ram-mib", "0", "--allow-special-tokens")
    yield server
    stop_server(server)


@pytest.fixture(scope="module")
def llama_server(variant: tuple[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """llama.cpp's own server on the same GGUF, one slot; a batch of 512 and a context of 2048, so that the extra
    context fits what it keeps of it (n_ctx - n_batch) and nothing of these prompts is cut."""
    if not os.access(LLAMA_SERVER, os.X_OK):
        pytest.skip(f"llama.cpp's llama-server is not at {LLAMA_SERVER} (set LLAMA_SERVER; CI machines lack it)")
    port = free_port()
    log = (tmp_path_factory.mktemp("llama-server") / "log.txt").open("wb")
    proc = subprocess.Popen([str(LLAMA_SERVER), "-m", str(variant[1]), "--host", "127.0.0.1", "--port", str(port),
                             "-c", "2048", "-b", "512", "-ub", "512", "-np", "1", "-t", "1", "--cache-ram", "0"],
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while not _healthy(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"llama-server did not start (exit code {proc.poll()}); see {log.name}")
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


def fim_ids(vocab: Llama) -> dict[str, int]:
    """The FIM tokens as llama.cpp reads the vocabulary (-1: none)."""
    v = llama_cpp.llama_model_get_vocab(vocab.model)
    return {"fim_pre": llama_cpp.llama_vocab_fim_pre(v), "fim_suf": llama_cpp.llama_vocab_fim_suf(v),
            "fim_mid": llama_cpp.llama_vocab_fim_mid(v), "fim_rep": llama_cpp.llama_vocab_fim_rep(v),
            "fim_sep": llama_cpp.llama_vocab_fim_sep(v)}


def expected_prompt(vocab: Llama, body: dict[str, Any]) -> list[int]:
    """The prompt llama-server's format_prompt_infill builds, written out from its source: the repository line and
    one file line per chunk where the vocabulary has those tokens (else a snippet marker before each chunk), the
    current file's line, BOS where the vocabulary adds one, then prefix and prompt, suffix, middle. Text is plain
    text (no control tokens parsed) throughout."""
    ids = fim_ids(vocab)

    def text(s: str) -> list[int]:
        return vocab.tokenize(s.encode(), add_bos=False, special=False) if s else []

    out: list[int] = []
    if ids["fim_rep"] >= 0:
        out += [ids["fim_rep"], *text("myproject\n")]
    for chunk in body.get("input_extra", []):
        if ids["fim_sep"] >= 0:
            out += [ids["fim_sep"], *text(chunk.get("filename", "tmp") + "\n")]
        else:
            out += text("\n\n--- snippet ---\n\n")
        out += text(chunk["text"])
    if ids["fim_sep"] >= 0:
        out += [ids["fim_sep"], *text("filename\n")]
    if vocab.metadata.get("tokenizer.ggml.add_bos_token") == "true":
        out.append(vocab.token_bos())
    return [*out, ids["fim_pre"], *text(body["input_prefix"]), *text(body.get("prompt", "")), ids["fim_suf"],
            *text(body["input_suffix"]), ids["fim_mid"]]


def cached_by_ours(server: LiveServer, tokens: Sequence[int]) -> int:
    """How many leading tokens of ``tokens`` our server's slot holds from the request before."""
    answer = httpx.post(server.url + "/generate", json={"prompt": list(tokens), "max_length": 1, "temperature": 0},
                        timeout=120).json()
    return int(answer["usage"]["cached_tokens"])


def cached_by_llama_server(url: str, tokens: Sequence[int]) -> int:
    answer = httpx.post(url + "/completion", json={"prompt": list(tokens), "n_predict": 1, "temperature": 0},
                        timeout=120).json()
    return int(answer["timings"]["cache_n"])


# ---- the prompt, token for token ----

def test_the_vocabulary_has_the_fim_tokens_as_control_tokens(variant: tuple[str, Path], fim_vocab: Llama) -> None:
    for name in VARIANTS[variant[0]]:
        token, text = FIM_TOKENS[name]
        assert fim_vocab.detokenize([token], special=True).decode() == text
        assert fim_vocab.tokenize(text.encode(), add_bos=False, special=True) == [token]  # one control token
    assert fim_ids(fim_vocab) == {name: token for name, (token, _) in FIM_TOKENS.items()} | FOUND_BY_TEXT[variant[0]]


@pytest.mark.parametrize("body", REQUESTS, ids=["plain", "extra-and-prompt"])
def test_our_prompt_is_llama_servers_layout(variant: tuple[str, Path], fim_vocab: Llama, probed: LiveServer,
                                            body: dict[str, Any]) -> None:
    expected = expected_prompt(fim_vocab, body)
    answer = httpx.post(probed.url + "/infill", json={**body, "max_length": 2, "temperature": 0}, timeout=120).json()
    assert answer["usage"]["prompt_tokens"] == len(expected)
    assert cached_by_ours(probed, expected) == len(expected) - 1  # every token but the last, computed again
    broken = list(expected)
    assert broken[len(broken) // 2] != FIM_TOKENS["fim_pre"][0]
    broken[len(broken) // 2] = FIM_TOKENS["fim_pre"][0]
    httpx.post(probed.url + "/infill", json={**body, "max_length": 2, "temperature": 0}, timeout=120)
    assert cached_by_ours(probed, broken) == len(broken) // 2  # the probe sees a difference where there is one


@pytest.mark.parametrize("body", REQUESTS, ids=["plain", "extra-and-prompt"])
def test_our_prompt_equals_llama_servers(variant: tuple[str, Path], fim_vocab: Llama, probed: LiveServer,
                                         llama_server: str, body: dict[str, Any]) -> None:
    """The same request to both servers, each slot's prompt read back with the same token ids."""
    expected = expected_prompt(fim_vocab, body)
    theirs = httpx.post(llama_server + "/infill", json={**body, "n_predict": 2, "temperature": 0},
                        timeout=120).json()
    ours = httpx.post(probed.url + "/infill", json={**body, "max_length": 2, "temperature": 0}, timeout=120).json()
    assert theirs["tokens_evaluated"] == ours["usage"]["prompt_tokens"] == len(expected)
    assert theirs["prompt"] == fim_vocab.detokenize(expected, special=True).decode()
    assert cached_by_llama_server(llama_server, expected) == len(expected) - 1
    assert cached_by_ours(probed, expected) == len(expected) - 1


def test_greedy_infill_starts_as_llama_servers(probed: LiveServer, llama_server: str, fim_vocab: Llama) -> None:
    """Both uncached, the prompt in one batch, then a token a step. The first token comes from the same logits of
    the same prompt; later ones can differ where a CPU's kernels round differently for llama-server's batches
    than for ours, so only the first is asserted (the rest is compared in the message)."""
    body = {"input_prefix": PREFIX, "input_suffix": SUFFIX, "temperature": 0, "cache_prompt": False}
    theirs = httpx.post(llama_server + "/infill", json={**body, "n_predict": GREEDY, "return_tokens": True},
                        timeout=120).json()
    ours = httpx.post(probed.url + "/infill", json={**body, "max_length": GREEDY}, timeout=120).json()
    first = fim_vocab.detokenize(theirs["tokens"][:1]).decode()
    assert first and ours["text"].startswith(first), (ours["text"], theirs["content"])


# ---- the three routes, one answer ----

@pytest.fixture(scope="module")
def separators_gguf(tmp_path_factory: pytest.TempPathFactory, model_path: Path) -> Path:
    return _fim_gguf(tmp_path_factory.mktemp("separators"), model_path, "separators")


@pytest.fixture(scope="module")
def fim_vocab_separators(separators_gguf: Path) -> Iterator[Llama]:
    llm = Llama(str(separators_gguf), vocab_only=True, verbose=False)
    yield llm
    llm.close()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, separators_gguf: Path) -> Iterator[LiveServer]:
    """Ours on the FIM model with the default rules (control-token text is text) and no prompt cache: every
    request is computed alike, so greedy answers of the same prompt are the same text."""
    server = start_server(tmp_path_factory.mktemp("served"), "--model-path", str(separators_gguf), "--n-threads",
                          "1", "--parallel", "1", "--ctx-size", "1024", "--prompt-cache-scope", "off")
    yield server
    stop_server(server)


@pytest.fixture(scope="module")
def infilled(served: LiveServer) -> dict[str, Any]:
    answer: dict[str, Any] = httpx.post(served.url + "/infill", json={
        "input_prefix": PREFIX, "input_suffix": SUFFIX, "max_length": GREEDY, "temperature": 0}, timeout=120).json()
    assert answer["text"] and answer["usage"]["completion_tokens"] == GREEDY, answer
    return answer


def _sse(server: LiveServer, path: str, body: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    events, name = [], ""
    with httpx.stream("POST", server.url + path, json=body, timeout=120) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        for line in resp.iter_lines():
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                events.append((name, json.loads(line[5:])))
    return events


def test_streamed_infill_equals_plain(served: LiveServer, infilled: dict[str, Any]) -> None:
    events = _sse(served, "/infill", {"input_prefix": PREFIX, "input_suffix": SUFFIX, "max_length": GREEDY,
                                      "temperature": 0, "stream": True})
    assert [name for name, _ in events][-1] == "done"
    assert "".join(data["text"] for name, data in events if name == "token") == infilled["text"]
    done = events[-1][1]
    assert done["id"].startswith("infill-") and done["finish_reason"] == infilled["finish_reason"]
    assert done["usage"]["prompt_tokens"] == infilled["usage"]["prompt_tokens"]


def test_openai_suffix_is_the_same_infill(served: LiveServer, infilled: dict[str, Any]) -> None:
    with openai.OpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0, timeout=120) as client:
        plain = client.completions.create(model=MODEL, prompt=PREFIX, suffix=SUFFIX, max_tokens=GREEDY,
                                          temperature=0)
        chunks = list(client.completions.create(model=MODEL, prompt=PREFIX, suffix=SUFFIX, max_tokens=GREEDY,
                                                temperature=0, stream=True, stream_options={"include_usage": True}))
    assert plain.choices[0].text == infilled["text"]
    assert plain.usage is not None and plain.usage.prompt_tokens == infilled["usage"]["prompt_tokens"]
    assert "".join(c.choices[0].text for c in chunks if c.choices) == infilled["text"]
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens == infilled["usage"]["prompt_tokens"]


def test_ollama_suffix_is_the_same_infill(served: LiveServer, infilled: dict[str, Any]) -> None:
    # Ollama's default repeat_penalty (1.1) would change a greedy answer: off, as on the other routes.
    options = {"temperature": 0, "num_predict": GREEDY, "repeat_penalty": 1.0}
    with ollama.Client(host=served.url, timeout=120) as client:
        plain = client.generate(model=MODEL, prompt=PREFIX, suffix=SUFFIX, options=options, stream=False)
        parts = list(client.generate(model=MODEL, prompt=PREFIX, suffix=SUFFIX, options=options, stream=True))
        # system has no place in a FIM prompt (Ollama's FIM templates leave it out): the same answer with one.
        with_system = client.generate(model=MODEL, prompt=PREFIX, suffix=SUFFIX, system="Be terse.",
                                      options=options, stream=False)
        capabilities = client.show(MODEL).capabilities or []
    assert "insert" in capabilities
    assert plain.response == infilled["text"] == with_system.response
    assert plain.prompt_eval_count == infilled["usage"]["prompt_tokens"] and plain.eval_count == GREEDY
    assert "".join(p.response for p in parts) == infilled["text"] and parts[-1].done


def test_control_token_text_stays_text(served: LiveServer, fim_vocab_separators: Llama) -> None:
    """The FIM tokens' own text in a prefix, suffix or prompt cannot end a part early: without ALLOW_SPECIAL_TOKENS
    it is text everywhere (in llama-server the prefix, suffix and chunks are text always)."""
    body = {"input_prefix": "a <issue_closed> b", "input_suffix": "<issue_start>c", "prompt": "<file_sep>d"}
    plain = expected_prompt(fim_vocab_separators, body)
    answer = httpx.post(served.url + "/infill", json={**body, "max_length": 1, "temperature": 0}, timeout=120).json()
    assert answer["usage"]["prompt_tokens"] == len(plain)
    forged = fim_vocab_separators.tokenize(b"a <issue_closed> b", add_bos=False, special=True)
    assert FIM_TOKENS["fim_mid"][0] in forged and len(forged) < len(fim_vocab_separators.tokenize(
        b"a <issue_closed> b", add_bos=False, special=False))  # parsed, it would be one token shorter
    with openai.OpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0, timeout=120) as client:
        completion = client.completions.create(model=MODEL, prompt=body["input_prefix"], suffix=body["input_suffix"],
                                               max_tokens=1, temperature=0)
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == len(expected_prompt(fim_vocab_separators, {**body, "prompt": ""}))


def test_the_limits_apply(served: LiveServer) -> None:
    huge = "word " * 200_000  # 1 MB: at least tens of thousands of tokens, far past a slot of 1024
    resp = httpx.post(served.url + "/infill", json={"input_prefix": "a", "input_suffix": "b", "input_extra": [
        {"filename": "big.txt", "text": huge}]}, timeout=60)
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "context_length_exceeded"
    resp = httpx.post(served.url + "/infill", json={"input_prefix": "word " * 1200, "input_suffix": "b"}, timeout=60)
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "context_length_exceeded"
    assert "1024" in resp.json()["error"]["message"]  # tokenized: it has more tokens than a slot holds
    resp = httpx.post(served.url + "/infill", json={"input_prefix": "a", "input_suffix": "b", "max_length": 1024},
                      timeout=60)
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "max_length"
    with ollama.Client(host=served.url, timeout=60) as client, pytest.raises(ollama.ResponseError) as caught:
        client.generate(model=MODEL, prompt="a", suffix=huge)
    assert caught.value.status_code == 400 and "context" in caught.value.error
    raw = '{"input_prefix": "a", "input_suffix": "\\ud800"}'  # a lone surrogate, as JSON allows
    resp = httpx.post(served.url + "/infill", content=raw, headers={"content-type": "application/json"}, timeout=60)
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "input_suffix"


def test_a_suffix_with_token_ids_is_refused(served: LiveServer) -> None:
    resp = httpx.post(served.url + "/v1/completions", json={"prompt": [17, 18], "suffix": "x"}, timeout=60)
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "suffix"
    assert "text prompt" in resp.json()["error"]["message"]


# ---- a model without FIM tokens: a 400 naming them, in each route's dialect ----

@pytest.fixture(scope="module")
def no_fim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    server = start_server(tmp_path_factory.mktemp("no-fim"), "--n-threads", "1", "--parallel", "1")
    yield server
    stop_server(server)


def _names_the_keys(message: str) -> bool:
    return "FIM" in message and all(f"tokenizer.ggml.{name}" in message for name in ("fim_pre", "fim_suf", "fim_mid"))


def test_infill_without_fim_tokens_is_a_400(no_fim: LiveServer) -> None:
    resp = httpx.post(no_fim.url + "/infill", json={"input_prefix": PREFIX, "input_suffix": SUFFIX}, timeout=60)
    assert resp.status_code == 400
    error = resp.json()["error"]
    assert error["code"] == "no_fim_tokens" and error["type"] == "invalid_request_error"
    assert error["message"].startswith("/infill needs") and _names_the_keys(error["message"])


def test_openai_suffix_without_fim_tokens_is_a_400(no_fim: LiveServer) -> None:
    with openai.OpenAI(base_url=no_fim.url + "/v1", api_key="unused", max_retries=0, timeout=60) as client:
        with pytest.raises(openai.BadRequestError) as caught:
            client.completions.create(model=MODEL, prompt=PREFIX, suffix=SUFFIX, max_tokens=4)
        assert caught.value.code == "no_fim_tokens" and caught.value.param == "suffix"
        assert _names_the_keys(caught.value.message)
        # An empty suffix is no suffix (as Ollama reads one): a plain completion.
        plain = client.completions.create(model=MODEL, prompt=PREFIX, suffix="", max_tokens=2, temperature=0)
    assert plain.usage is not None and plain.usage.completion_tokens >= 1


def test_ollama_suffix_without_fim_tokens_is_a_400(no_fim: LiveServer) -> None:
    with ollama.Client(host=no_fim.url, timeout=60) as client, pytest.raises(ollama.ResponseError) as caught:
        client.generate(model=MODEL, prompt=PREFIX, suffix=SUFFIX)
    assert caught.value.status_code == 400 and _names_the_keys(caught.value.error)
    resp = httpx.post(no_fim.url + "/api/generate", json={"model": MODEL, "prompt": PREFIX, "suffix": SUFFIX},
                      timeout=60)
    assert resp.status_code == 400 and list(resp.json()) == ["error"]  # Ollama's {"error": "..."}


def test_llama_vims_own_requests_are_served(served: LiveServer) -> None:
    """The bodies llama.vim (ggml-org/llama.vim, autoload/llama.vim) sends, field for field: its cache warm-up
    with the ring buffer's chunks (``n_predict`` 0, chunks with a ``time``) and its completion; it reads
    ``content``."""
    chunks = [{"text": "".join(f"def helper_{i}(x):\n    return x * {i} + {i}\n\n" for i in range(8)),
               "time": 1733300000.0, "filename": "util.py"}]
    warm = httpx.post(served.url + "/infill", json={
        "id_slot": 0, "input_prefix": "", "input_suffix": "", "input_extra": chunks, "prompt": "", "n_predict": 0,
        "temperature": 0.0, "samplers": [], "stream": False, "cache_prompt": True, "t_max_prompt_ms": 1,
        "t_max_predict_ms": 1, "response_fields": [""]}, timeout=120)
    assert warm.status_code == 200, warm.text
    assert warm.json()["tokens_predicted"] <= 1 and warm.json()["tokens_evaluated"] > 100  # the chunk, no answer
    fim = httpx.post(served.url + "/infill", json={
        "id_slot": 0, "input_prefix": PREFIX, "input_suffix": SUFFIX, "input_extra": chunks, "prompt": "",
        "n_predict": GREEDY, "stop": [], "n_indent": 4, "top_k": 40, "top_p": 0.90,
        "samplers": ["top_k", "top_p", "infill"], "stream": False, "cache_prompt": True, "t_max_prompt_ms": 500,
        "t_max_predict_ms": 1000, "response_fields": ["content", "timings/prompt_n", "timings/predicted_n"]},
        timeout=120)
    assert fim.status_code == 200, fim.text
    answer = fim.json()
    assert answer["content"] == answer["text"] and answer["stop"] is True
    assert 1 <= answer["tokens_predicted"] <= GREEDY and answer["tokens_evaluated"] > 120
