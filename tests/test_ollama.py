"""Ollama's native API through the real ``ollama`` client, on a real server with an API key over loopback: list,
show, ps, version, chat and generate streamed and not, options, format, tools, the refusals, auth and Ollama's
error shape. Greedy text of a 135M model differs across CPUs: properties are asserted, not text."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import jsonschema
import ollama
import pytest

from server.api.ollama.serving import known_model, parameter_size
from server.settings import Settings
from tests.conftest import LiveServer, start_server, stop_server

KEY = "sk-ollama-test-7d1f20a4"
SERVED = "SmolLM2-135M-Instruct.Q4_1"
TAGGED = SERVED + ":latest"
MODEL = "llama3.2"  # any name is accepted without STRICT_MODEL_NAME; answers name the served model
ASK = [{"role": "user", "content": "What is the capital of France?"}]
GREEDY = {"temperature": 0}
WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 20}, "unit": {"type": "string",
                                                                       "enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                           "parameters": WEATHER}}]
# Ollama has no tool_choice: a client forces a call with a format of the call's shape.
CALL_FORMAT = {"type": "object", "properties": {"name": {"const": "get_weather"}, "arguments": WEATHER},
               "required": ["name", "arguments"], "additionalProperties": False}
WEATHER_ASK = [{"role": "user", "content": "What is the weather like in Paris today?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    tmp = tmp_path_factory.mktemp("ollama")
    keys = tmp / "keys.txt"
    keys.write_text(f"{KEY}\n")
    srv = start_server(tmp, "--api-key-file", str(keys), "--parallel", "2")
    yield srv
    stop_server(srv)


@pytest.fixture(scope="module")
def client(server: LiveServer) -> Iterator[ollama.Client]:
    with ollama.Client(host=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=300) as c:
        yield c


@pytest.fixture(scope="module")
def info(server: LiveServer) -> dict[str, Any]:
    return httpx.get(server.url + "/info", timeout=10).json()  # type: ignore[no-any-return]


def _durations(final: Any, elapsed_s: float) -> None:
    """The final object's counts and durations: nanoseconds, within the request's wall-clock time."""
    assert final.done is True and final.done_reason in {"stop", "length"}
    assert final.prompt_eval_count > 0 and final.eval_count > 0
    for name in ("total_duration", "prompt_eval_duration", "eval_duration", "load_duration"):
        assert isinstance(final[name], int) and final[name] >= 0, name
    assert final.prompt_eval_duration > 0 and final.eval_duration > 0
    # Nanoseconds: the server's total is most of what the client waited (seconds or milliseconds would not be).
    assert elapsed_s * 1e9 * 0.3 < final.total_duration <= elapsed_s * 1e9
    assert final.load_duration + final.prompt_eval_duration + final.eval_duration <= final.total_duration * 1.01
    datetime.fromisoformat(final.created_at)  # RFC 3339


# ---- the model: version, list, show, ps ----

def test_version_is_an_ollama_release(server: LiveServer) -> None:
    resp = httpx.get(server.url + "/api/version", headers={"Authorization": f"Bearer {KEY}"})
    version = resp.json()["version"]
    assert tuple(int(p) for p in version.split(".")) >= (0, 5, 0)


def test_list_names_the_served_model_with_its_file(client: ollama.Client, info: dict[str, Any],
                                                   model_path: Path) -> None:
    (entry,) = client.list().models
    assert entry.model == TAGGED
    assert entry.size == model_path.stat().st_size
    assert len(entry.digest) == 64 and int(entry.digest, 16) >= 0
    assert entry.modified_at.timestamp() == pytest.approx(model_path.stat().st_mtime, abs=1)
    d = entry.details
    assert (d.format, d.family, d.families, d.quantization_level) == ("gguf", "llama", ["llama"], "Q4_1")
    assert d.parameter_size == parameter_size(info["n_params"]) == "134.52M"
    assert client.list().models[0].digest == entry.digest  # stable


def test_show_has_the_gguf_metadata_template_and_capabilities(client: ollama.Client, info: dict[str, Any]) -> None:
    for name in (SERVED, TAGGED, MODEL):
        shown = client.show(name)
        assert shown.capabilities == ["completion", "tools"]  # no "insert": SmolLM2 has no FIM tokens
        m = shown.modelinfo
        assert m["general.architecture"] == "llama"
        assert m["general.parameter_count"] == info["n_params"]
        assert m["llama.context_length"] == info["n_ctx_train"] == 8192
        assert m["llama.block_count"] == 30 and m["tokenizer.ggml.add_bos_token"] is False
        assert "tokenizer.ggml.tokens" not in m  # the vocabulary is not metadata to show
        assert "<|im_start|>" in shown.template and shown.template == info["chat_template"]
        assert f"num_ctx {info['slot_ctx']}" in " ".join(shown.parameters.split())
        assert shown.details.quantization_level == "Q4_1"


def test_ps_shows_the_model_loaded_for_good(client: ollama.Client, info: dict[str, Any]) -> None:
    (running,) = client.ps().models
    assert running.model == TAGGED and running.size_vram == 0
    assert running.expires_at.year > 2100
    assert running.context_length == info["slot_ctx"]


# ---- chat and generate ----

def test_chat_answers_with_counts_in_nanoseconds(client: ollama.Client) -> None:
    t0 = time.monotonic()
    reply = client.chat(model=MODEL, messages=ASK, stream=False, options={**GREEDY, "num_predict": 8})
    elapsed = time.monotonic() - t0
    assert reply.model == TAGGED and reply.message.role == "assistant" and reply.message.content
    assert reply.eval_count <= 8
    assert (reply.done_reason == "length") == (reply.eval_count == 8)
    _durations(reply, elapsed)


def test_chat_streams_a_line_per_token_then_the_done_line(client: ollama.Client) -> None:
    t0 = time.monotonic()
    chunks = list(client.chat(model=MODEL, messages=ASK, stream=True, options={**GREEDY, "num_predict": 6}))
    elapsed = time.monotonic() - t0
    *tokens, final = chunks
    assert tokens and all(c.done is False and c.message.content for c in tokens)
    assert final.message.content == ""
    text = "".join(c.message.content for c in tokens)
    assert final.eval_count >= len(tokens) and final.eval_count <= 6
    if final.done_reason == "length" and text.isascii():  # every token a whole character or more
        assert final.eval_count == len(tokens) == 6
    _durations(final, elapsed)
    whole = client.chat(model=MODEL, messages=ASK, stream=False, options={**GREEDY, "num_predict": 6})
    assert whole.message.content == text  # greedy: the same answer, whole


def test_generate_streamed_and_not_respects_num_predict(client: ollama.Client) -> None:
    prompt, options = "Once upon a time, in a land far away,", {**GREEDY, "num_predict": 5}
    t0 = time.monotonic()
    whole = client.generate(model=MODEL, prompt=prompt, raw=True, stream=False, options=options)
    _durations(whole, time.monotonic() - t0)
    assert whole.done_reason == "length" and whole.eval_count == 5  # a story does not end in 5 tokens
    chunks = list(client.generate(model=MODEL, prompt=prompt, raw=True, stream=True, options=options))
    *tokens, final = chunks
    assert "".join(c.response for c in tokens) == whole.response
    assert final.done and final.eval_count == 5 and final.response == ""
    # Through the chat template (not raw) the prompt is longer: the template's markers and the user turn.
    templated = client.generate(model=MODEL, prompt=prompt, system="Be brief.", stream=False, options=options)
    assert templated.prompt_eval_count > whole.prompt_eval_count


def test_format_json_and_a_schema_constrain_the_answer(client: ollama.Client) -> None:
    schema = {"type": "object", "properties": {"capital": {"type": "string", "maxLength": 12}},
              "required": ["capital"], "additionalProperties": False}
    reply = client.chat(model=MODEL, messages=ASK, format=schema, stream=False, options={**GREEDY, "num_predict": 40})
    assert reply.done_reason == "stop"
    jsonschema.validate(json.loads(reply.message.content), schema)
    loose = client.generate(model=MODEL, prompt="Describe Paris as JSON.", format="json", stream=False,
                            options={**GREEDY, "num_predict": 12})
    assert loose.response.lstrip().startswith("{")
    if loose.done_reason == "stop":
        assert isinstance(json.loads(loose.response), dict)


def test_tools_answer_calls_with_object_arguments(client: ollama.Client) -> None:
    free = client.chat(model=MODEL, messages=WEATHER_ASK, tools=TOOLS, stream=False,
                       options={**GREEDY, "num_predict": 40})
    for call in free.message.tool_calls or []:  # the model may answer in text: the shape when it calls
        assert call.function.name == "get_weather" and isinstance(call.function.arguments, dict)
    forced = client.chat(model=MODEL, messages=WEATHER_ASK, tools=TOOLS, format=CALL_FORMAT, stream=False,
                         options={**GREEDY, "num_predict": 60})
    (call,) = forced.message.tool_calls
    assert call.function.name == "get_weather" and forced.message.content == ""
    jsonschema.validate(call.function.arguments, WEATHER)
    streamed = list(client.chat(model=MODEL, messages=WEATHER_ASK, tools=TOOLS, format=CALL_FORMAT, stream=True,
                                options={**GREEDY, "num_predict": 60}))
    calls = [c for chunk in streamed for c in chunk.message.tool_calls or []]
    assert [c.function.arguments for c in calls] == [call.function.arguments]
    assert not any(chunk.message.content for chunk in streamed)  # the call is not streamed as text too
    # The call and its result go back; the answer is text.
    history = [*WEATHER_ASK, {"role": "assistant", "content": "", "tool_calls": [call.model_dump()]},
               {"role": "tool", "tool_name": "get_weather", "content": '{"temperature": 21, "unit": "celsius"}'}]
    after = client.chat(model=MODEL, messages=history, tools=TOOLS, stream=False, options={**GREEDY, "num_predict": 8})
    assert after.done and after.prompt_eval_count > forced.prompt_eval_count


# ---- refusals, auth, the probe ----

def test_num_ctx_above_the_slot_context_is_refused(client: ollama.Client, info: dict[str, Any]) -> None:
    with pytest.raises(ollama.ResponseError) as caught:
        client.chat(model=MODEL, messages=ASK, options={"num_ctx": info["slot_ctx"] + 1})
    assert caught.value.status_code == 400
    assert f"slot context is {info['slot_ctx']}" in caught.value.error
    reply = client.chat(model=MODEL, messages=ASK, stream=False,
                        options={**GREEDY, "num_ctx": info["slot_ctx"], "num_predict": 1})
    assert reply.done and reply.eval_count == 1


def test_suffix_and_images_are_refused_by_name(client: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError) as caught:
        client.generate(model=MODEL, prompt="def add(a, b):\n", suffix="\n    return c\n")
    assert caught.value.status_code == 400
    assert "FIM" in caught.value.error and "tokenizer.ggml.fim_pre_token_id" in caught.value.error
    with pytest.raises(ollama.ResponseError) as caught:
        client.generate(model=MODEL, prompt="What is this?", images=[b"\x89PNG\r\n"])
    assert caught.value.status_code == 400 and "vision" in caught.value.error
    with pytest.raises(ollama.ResponseError) as caught:
        client.chat(model=MODEL, messages=[{**ASK[0], "images": [b"\x89PNG\r\n"]}])
    assert caught.value.status_code == 400 and "vision" in caught.value.error


def test_a_missing_key_is_a_401_in_ollamas_shape(server: LiveServer) -> None:
    with pytest.raises(ollama.ResponseError) as caught, ollama.Client(host=server.url) as keyless:
        keyless.list()
    assert caught.value.status_code == 401 and "API key" in caught.value.error
    resp = httpx.post(server.url + "/api/chat", json={"model": MODEL, "messages": ASK})
    assert resp.status_code == 401 and set(resp.json()) == {"error"} and isinstance(resp.json()["error"], str)


def test_head_probe_answers_without_a_key_and_json_needs_no_content_type(server: LiveServer) -> None:
    assert httpx.head(server.url + "/").status_code == 200
    body = json.dumps({"model": MODEL, "prompt": "Hi", "options": {"num_predict": 2}})  # streamed by default
    resp = httpx.post(server.url + "/api/generate", content=body, timeout=120,
                      headers={"Authorization": f"Bearer {KEY}", "Content-Type": "text/plain"})
    assert resp.status_code == 200 and resp.headers["content-type"] == "application/x-ndjson"
    lines = [json.loads(line) for line in resp.text.splitlines()]
    assert [line["done"] for line in lines] == [False] * (len(lines) - 1) + [True]


def test_a_validation_error_is_ollamas_shape(server: LiveServer) -> None:
    resp = httpx.post(server.url + "/api/chat", json={"messages": ASK}, headers={"Authorization": f"Bearer {KEY}"})
    assert resp.status_code == 400 and resp.json() == {"error": "model: Field required"}


def test_strict_model_names_take_the_tag() -> None:
    service = SimpleNamespace(model_name=SERVED, settings=Settings(strict_model_name=True, served_model_name=["s"]))
    assert all(known_model(n, service) for n in (SERVED, TAGGED, "s", "s:latest"))  # type: ignore[arg-type]
    assert not known_model("llama3.2", service) and not known_model(SERVED + ":7b", service)  # type: ignore[arg-type]
