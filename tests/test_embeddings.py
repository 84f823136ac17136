"""Embeddings against the truth: all-MiniLM-L6-v2's real weights, converted by llama.cpp's own converter, served
beside the chat model, and compared with ``sentence-transformers`` on the same checkpoint; the real clients
(``openai`` on its base64 default and with floats, ``langchain-openai``, ``ollama``); the limits, each a 400 in the
route's dialect; a chat stream kept at its pace while 64 documents are embedded; and the chat model embedding
itself, against llama-cpp-python's own ``Llama.embed``."""

from __future__ import annotations

import json
import statistics
import threading
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import ollama
import openai
import pytest

from tests.conftest import LiveServer, metric, start_server, stop_server
from tests.embedding_model import convert_with_llama_cpp, minilm_checkpoint

KEY = "sk-embeddings-test-5a0c9e21"
MODEL = "all-MiniLM-L6-v2"  # any name: STRICT_MODEL_NAME is off
TEXTS = [
    "A man is eating food.",
    "The quick brown fox jumps over the lazy dog.",
    "Ceci est une phrase en français, avec des accents : élève, garçon, où.",
    "Москва — столица России.",
    "東京は日本の首都です。",
    "def add(a: int, b: int) -> int:\n    return a + b  # the sum",
    "SELECT name, COUNT(*) FROM users GROUP BY name HAVING COUNT(*) > 1;",
    "emoji 🚀🔥 and symbols ≤ ≥ ∑ √",
    # long: ~220 word pieces (sentence-transformers cuts at 256, so both see all of it)
    " ".join(["The lighthouse keeper climbed the winding stairs each evening to light the lamp for ships."] * 14),
    "a",
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return minilm_checkpoint(tmp_path_factory.mktemp("minilm"))


@pytest.fixture(scope="module")
def minilm_gguf(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return convert_with_llama_cpp(checkpoint, tmp_path_factory.mktemp("gguf") / "all-MiniLM-L6-v2-f16.gguf")


@pytest.fixture(scope="module")
def reference(checkpoint: Path) -> np.ndarray:
    """sentence-transformers' own vectors for TEXTS (its Normalize module: unit length)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(str(checkpoint), device="cpu")
        return np.asarray(model.encode(TEXTS, normalize_embeddings=True))


@pytest.fixture(scope="module")
def server(minilm_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    live = start_server(tmp_path_factory.mktemp("embed"), "--parallel", "2", "--embedding-model-path",
                        str(minilm_gguf), "--embedding-dimensions", "256,128", "--embedding-max-inputs", "100",
                        env={"API_KEY": KEY})
    yield live
    stop_server(live)


@pytest.fixture(scope="module")
def client(server: LiveServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0) as c:
        yield c


def post(server: LiveServer, path: str, body: dict) -> httpx.Response:  # type: ignore[type-arg]
    return httpx.post(server.url + path, json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=120)


def vectors(client: openai.OpenAI, inputs: object, **options: object) -> np.ndarray:
    """The float vectors the server answers for ``inputs``, in input order."""
    answer = client.embeddings.create(model=MODEL, input=inputs, encoding_format="float", **options)  # type: ignore[arg-type]
    return np.array([d.embedding for d in answer.data])


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_vectors_match_sentence_transformers_on_every_input(client: openai.OpenAI, reference: np.ndarray) -> None:
    # The SDK's default asks for base64 and decodes it: the float32 bytes the server wrote.
    default = client.embeddings.create(model=MODEL, input=TEXTS)
    floats = client.embeddings.create(model=MODEL, input=TEXTS, encoding_format="float")
    ours = np.array([d.embedding for d in default.data])
    assert [d.index for d in default.data] == list(range(len(TEXTS)))
    assert ours.shape == reference.shape == (len(TEXTS), 384)
    sims = cosines(ours, reference)
    assert sims.min() >= 0.99, dict(zip(TEXTS, sims.round(4), strict=True))
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)  # L2-normalised, as llama-server
    np.testing.assert_allclose(np.array([d.embedding for d in floats.data]), ours, atol=1e-8)  # 8 decimals
    assert default.usage.prompt_tokens == default.usage.total_tokens > 220 + 9 * 3
    # Meaning, not only numbers: the two sentences about the same thing are the nearest pair of a trio.
    trio = np.array([d.embedding for d in client.embeddings.create(model=MODEL,
        input=["How do I bake bread?", "A recipe for baking a loaf of bread", "Stock market prices fell today"],
        encoding_format="float").data])
    assert trio[0] @ trio[1] > trio[0] @ trio[2] + 0.3


def test_token_id_inputs_are_embedded_as_given(client: openai.OpenAI, checkpoint: Path) -> None:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
    tokenizer.no_padding()  # the checkpoint's tokenizer pads to 128
    ids = [tokenizer.encode(text).ids for text in TEXTS[:3]]  # with [CLS] ... [SEP], as the text is tokenized
    by_ids = client.embeddings.create(model=MODEL, input=ids, encoding_format="float")
    by_text = client.embeddings.create(model=MODEL, input=TEXTS[:3], encoding_format="float")
    np.testing.assert_allclose([d.embedding for d in by_ids.data], [d.embedding for d in by_text.data], atol=1e-5)
    one = client.embeddings.create(model=MODEL, input=ids[0], encoding_format="float")  # one list of ids: one input
    assert len(one.data) == 1 and one.usage.prompt_tokens == len(ids[0])


def test_dimensions_cut_and_renormalise_only_to_the_widths_served(client: openai.OpenAI) -> None:
    full = np.array(client.embeddings.create(model=MODEL, input=TEXTS[:2], encoding_format="float").data[0].embedding)
    cut = np.array(client.embeddings.create(model=MODEL, input=TEXTS[:2], dimensions=128).data[0].embedding)
    assert cut.shape == (128,)
    np.testing.assert_allclose(cut, full[:128] / np.linalg.norm(full[:128]), atol=1e-5)
    assert vectors(client, "x", dimensions=384).shape == (1, 384)  # its own width
    with pytest.raises(openai.BadRequestError) as refused:
        client.embeddings.create(model=MODEL, input="x", dimensions=100)
    assert refused.value.body["param"] == "dimensions" and "256" in refused.value.body["message"]  # type: ignore[index]


def test_langchain_openai_embeds_through_the_server(server: LiveServer, reference: np.ndarray) -> None:
    from langchain_openai import OpenAIEmbeddings

    # Its default tokenizes with tiktoken and sends tiktoken's ids (refused below: another vocabulary); a local
    # server wants the text itself.
    with httpx.Client(timeout=120) as transport:
        lc = OpenAIEmbeddings(model="all-MiniLM-L6-v2", base_url=server.url + "/v1", api_key=KEY,
                              check_embedding_ctx_length=False, max_retries=0, http_client=transport)
        docs = np.array(lc.embed_documents(TEXTS[:4]))
        query = np.array(lc.embed_query(TEXTS[0]))
    assert cosines(docs, reference[:4]).min() >= 0.99
    assert float(query @ reference[0]) >= 0.99


def test_foreign_token_ids_and_long_inputs_are_refused_by_name(server: LiveServer, client: openai.OpenAI) -> None:
    tiktoken_ids = [[9906, 1917, 100256]]  # what langchain's default sends: ids of another vocabulary
    with pytest.raises(openai.BadRequestError) as foreign:
        client.embeddings.create(model=MODEL, input=tiktoken_ids)
    body = foreign.value.body
    assert body["code"] == "invalid_token" and "100256" in body["message"]  # type: ignore[index]
    assert "check_embedding_ctx_length=False" in body["message"]  # type: ignore[index]
    long = "word " * 600  # ~600 tokens, past MiniLM's 512
    answer = post(server, "/v1/embeddings", {"input": ["short", long]})
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert error["param"] == "input[1]" and error["code"] == "context_length_exceeded"
    assert "602 tokens" in error["message"] and "512" in error["message"]
    for bad, param in (({"input": ""}, "input"), ({"input": []}, "input"), ({"input": [[]]}, "input"),
                       ({"input": ["x"] * 101}, "input")):
        refused = post(server, "/v1/embeddings", bad)
        assert refused.status_code == 400, (bad, refused.text)
        assert refused.json()["error"]["param"] == param, refused.text
    # Ollama's route answers in Ollama's envelope, and cuts nothing either.
    ollama_refused = post(server, "/api/embed", {"model": "all-minilm", "input": long})
    assert ollama_refused.status_code == 400 and "512" in ollama_refused.json()["error"]
    # The server is whole after all that: a good request still answers.
    assert len(client.embeddings.create(model=MODEL, input="still here").data) == 1


def test_ollama_client_embeds_with_the_same_vectors(server: LiveServer, client: openai.OpenAI) -> None:
    with ollama.Client(host=server.url, headers={"Authorization": f"Bearer {KEY}"}) as ol:
        answer = ol.embed(model="all-minilm", input=TEXTS[:3])
        legacy = ol.embeddings(model="all-minilm", prompt=TEXTS[0])
    theirs = np.array(answer.embeddings)
    ours = vectors(client, TEXTS[:3])
    np.testing.assert_allclose(theirs, ours, atol=1e-5)
    assert answer.model == "all-minilm" and answer.prompt_eval_count and answer.prompt_eval_count > 10
    np.testing.assert_allclose(legacy.embedding, ours[0], atol=1e-5)


def test_models_list_and_metrics_show_the_embedding_model(server: LiveServer, client: openai.OpenAI) -> None:
    ids = [m.id for m in client.models.list().data]
    assert ids == ["SmolLM2-135M-Instruct.Q4_1", "all-MiniLM-L6-v2-f16"]
    assert client.models.retrieve("all-MiniLM-L6-v2-f16").id == "all-MiniLM-L6-v2-f16"
    before = httpx.get(server.url + "/metrics").text
    client.embeddings.create(model=MODEL, input=TEXTS[:5])
    after = httpx.get(server.url + "/metrics").text
    assert metric(after, "llama_embedding_inputs_total") - metric(before, "llama_embedding_inputs_total") == 5
    assert metric(after, "llama_embedding_requests_total", 'outcome="ok"') > metric(
        before, "llama_embedding_requests_total", 'outcome="ok"')
    assert metric(after, "llama_embedding_tokens_total") > metric(before, "llama_embedding_tokens_total")
    # The chat slots are untouched: chat answers beside the embedding model.
    chat = client.chat.completions.create(model="x", messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    assert chat.usage is not None and chat.usage.completion_tokens >= 1


def _stream_times(url: str, times: list[float], started: threading.Event) -> None:
    with httpx.Client(base_url=url, timeout=120, headers={"Authorization": f"Bearer {KEY}"}) as http:
        with http.stream("POST", "/generate", json={"prompt": "Once upon a time", "max_length": 400,
                                                    "temperature": 0, "ignore_eos": True, "stream": True}) as r:
            for line in r.iter_lines():
                if line.startswith("data:") and '"token"' in line:
                    times.append(time.perf_counter())
                    if len(times) == 30:
                        started.set()
    started.set()


def test_a_chat_stream_keeps_its_pace_while_64_documents_are_embedded(server: LiveServer,
                                                                      client: openai.OpenAI) -> None:
    docs = [f"Document {i}: " + "the keeper of the old lighthouse climbs the stairs at dusk and lights the lamp "
            "for the fishing boats coming home across the bay. " * 2 for i in range(64)]
    alone = vectors(client, docs)
    times: list[float] = []
    started = threading.Event()
    runner = threading.Thread(target=_stream_times, args=(server.url, times, started))
    runner.start()
    started.wait(60)
    t0 = time.perf_counter()
    beside = client.embeddings.create(model=MODEL, input=docs, encoding_format="float")
    t1 = time.perf_counter()
    runner.join(120)
    assert len(beside.data) == 64 and beside.usage.prompt_tokens > 64 * 40
    steady = [b - a for a, b in zip(times[5:30], times[6:31], strict=False)]
    during = [b - a for a, b in zip(times, times[1:], strict=False) if t0 <= a and b <= t1]
    median = statistics.median(steady)
    # The stream kept producing tokens all along (the 64 documents in one step would be one gap of ~15 steady
    # gaps here), its largest gap a few steady gaps long (the pace aims at 2; generous: the CPU is shared).
    assert len(during) >= 10, (len(during), t1 - t0)
    assert max(during) <= max(6 * median, 0.05), (max(during), median, sorted(during)[-5:])
    # Embedded a few at a time beside the stream, the vectors are those embedded all at once (up to the rounding
    # of another batch shape's kernels).
    assert cosines(np.array([d.embedding for d in beside.data]), alone).min() >= 0.9999


def test_two_clients_embedding_at_once_get_the_vectors_they_get_alone(client: openai.OpenAI) -> None:
    sets = [TEXTS[:5], TEXTS[5:]]
    alone = [vectors(client, s) for s in sets]
    with ThreadPoolExecutor(2) as pool:
        together = list(pool.map(lambda s: vectors(client, s), sets * 3))
    for i, answer in enumerate(together):  # up to the rounding of another batch shape's kernels
        assert cosines(answer, alone[i % 2]).min() >= 0.9999


def test_a_server_without_an_embedding_model_says_so(http: httpx.Client) -> None:
    answer = http.post("/v1/embeddings", json={"input": "hello"})
    assert answer.status_code == 501
    assert "EMBEDDING_MODEL_PATH" in answer.json()["error"]["message"]
    ollama_answer = http.post("/api/embed", json={"model": "x", "input": "hello"})
    assert ollama_answer.status_code == 501 and "EMBEDDING_MODEL_PATH" in ollama_answer.json()["error"]


def test_the_chat_model_embeds_itself_when_given_a_pooling(tmp_path: Path, model_path: Path) -> None:
    """EMBEDDING_POOLING without a model: the chat model's own context is not touched (its cached prompt still
    serves the next turn), and the vectors are llama-cpp-python's own ``Llama.embed`` on the same GGUF."""
    live = start_server(tmp_path, "--parallel", "2", "--n-threads", "1", "--embedding-pooling", "mean")
    try:
        with httpx.Client(base_url=live.url, timeout=120) as http:
            prompt = "The keeper of the lighthouse said: " * 8
            first = http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 2, "temperature": 0})
            assert first.status_code == 200
            answer = http.post("/v1/embeddings", json={"input": TEXTS[:3]})
            assert answer.status_code == 200, answer.text
            ours = np.array([d["embedding"] for d in answer.json()["data"]])
            again = http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 2, "temperature": 0})
            models = [m["id"] for m in http.get("/v1/models").json()["data"]]
            shown = http.post("/api/show", json={"model": "x"}).json()
        assert ours.shape == (3, 576)  # SmolLM2-135M's width
        assert again.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
        assert models == ["SmolLM2-135M-Instruct.Q4_1"]  # one model, serving both
        assert "embedding" in shown["capabilities"] and "completion" in shown["capabilities"]
    finally:
        stop_server(live)
    from llama_cpp import LLAMA_POOLING_TYPE_MEAN, Llama

    llm = Llama(str(model_path), embedding=True, pooling_type=LLAMA_POOLING_TYPE_MEAN, n_ctx=512, n_threads=1,
                verbose=False)
    try:
        theirs = np.array(llm.embed(TEXTS[:3], normalize=True))
    finally:
        llm.close()
    assert cosines(ours, theirs).min() >= 0.999, cosines(ours, theirs)


def test_the_json_of_a_large_answer_is_one_document(server: LiveServer) -> None:
    answer = post(server, "/v1/embeddings", {"input": ["x"] * 100, "encoding_format": "base64"})
    assert answer.status_code == 200
    body = json.loads(answer.content)
    assert len(body["data"]) == 100 and all(isinstance(d["embedding"], str) for d in body["data"])
    assert len(np.frombuffer(__import__("base64").b64decode(body["data"][0]["embedding"]), "<f4")) == 384
