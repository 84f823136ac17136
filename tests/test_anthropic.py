"""Anthropic's Messages API through the real anthropic SDK, on a real server with an API key over loopback: messages,
streams, a tool-use round trip, token counts, auth and errors as the SDK's own exceptions, and a replay of the
request Claude Code sends. Greedy text of a 135M model differs across CPUs: properties are asserted, not text."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import jsonschema
import pytest
from httpx_sse import connect_sse
from llama_cpp import Llama

from server.api.anthropic.protocol import ContentBlockDelta, TextDelta
from server.api.anthropic.serving import _sse, _text_delta, error_event
from server.engine.types import ErrorEvent
from server.errors import ErrorDetail, error_body
from server.security import UNAUTHORIZED
from tests.conftest import LiveServer, start_server, stop_server

KEY = "sk-anthropic-test-5c2e91"
SERVED = "SmolLM2-135M-Instruct.Q4_1"
MODEL = "claude-sonnet-4-5"  # any name is accepted; answers name the served model
SYSTEM = "You are a helpful assistant."
ASK = [{"role": "user", "content": "What is the capital of France?"}]
SMOLLM2_RENDERED = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
    "<|im_start|>assistant\n"
)
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 40},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TOOLS = [{"name": "get_weather", "description": "Current weather in a city", "input_schema": WEATHER}]
WEATHER_ASK = [{"role": "user", "content": "What is the weather like in Paris today?"}]
STOP_REASONS = {"end_turn", "max_tokens", "stop_sequence", "tool_use"}
# This SDK no longer has sampling arguments (newer Claude models refuse them); the server still reads them.
GREEDY = {"temperature": 0}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    tmp = tmp_path_factory.mktemp("anthropic")
    keys = tmp / "keys.txt"
    keys.write_text(f"# the test key\n{KEY}\n")
    srv = start_server(tmp, "--api-key-file", str(keys), "--parallel", "2")
    yield srv
    stop_server(srv)


@pytest.fixture(scope="module")
def client(server: LiveServer) -> Iterator[anthropic.Anthropic]:
    """The SDK as users make it: the key goes in x-api-key."""
    with anthropic.Anthropic(base_url=server.url, api_key=KEY, max_retries=0, timeout=120) as c:
        yield c


def _consistent(message: Any, max_tokens: int) -> None:
    """A finished message's stop reason agrees with its usage."""
    assert message.stop_reason in STOP_REASONS
    if message.stop_reason == "max_tokens":
        assert message.usage.output_tokens == max_tokens
    else:
        assert message.usage.output_tokens < max_tokens


# ---- messages.create and count_tokens ----

def test_create_answers_text_with_usage_that_count_tokens_agrees_with(client: anthropic.Anthropic,
                                                                       vocab: Llama) -> None:
    counted = client.messages.count_tokens(model=MODEL, system=SYSTEM, messages=ASK)  # type: ignore[arg-type]
    assert counted.input_tokens == len(vocab.tokenize(SMOLLM2_RENDERED.encode(), add_bos=False, special=True))
    message = client.messages.create(model=MODEL, max_tokens=48, extra_body=GREEDY, system=SYSTEM, messages=ASK)  # type: ignore[arg-type]
    assert message.type == "message" and message.role == "assistant" and message.id.startswith("msg_")
    assert message.model == SERVED
    [block] = message.content
    assert block.type == "text" and block.text.strip()
    _consistent(message, 48)
    assert message.stop_sequence is None
    usage = message.usage
    assert usage.cache_creation_input_tokens == 0
    assert usage.input_tokens + (usage.cache_read_input_tokens or 0) == counted.input_tokens
    # The same prompt again: its prefix comes from the prompt cache, and usage says so.
    again = client.messages.create(model=MODEL, max_tokens=8, extra_body=GREEDY, system=SYSTEM, messages=ASK)  # type: ignore[arg-type]
    assert (again.usage.cache_read_input_tokens or 0) > 0
    assert again.usage.input_tokens + (again.usage.cache_read_input_tokens or 0) == counted.input_tokens


def test_system_as_blocks_with_cache_control_renders_as_the_string(client: anthropic.Anthropic) -> None:
    blocks = [{"type": "text", "text": SYSTEM, "cache_control": {"type": "ephemeral"}}]
    as_blocks = client.messages.count_tokens(model=MODEL, system=blocks, messages=ASK)  # type: ignore[arg-type]
    as_string = client.messages.count_tokens(model=MODEL, system=SYSTEM, messages=ASK)  # type: ignore[arg-type]
    assert as_blocks.input_tokens == as_string.input_tokens
    message = client.messages.create(model=MODEL, max_tokens=16, extra_body=GREEDY, system=blocks, messages=ASK)  # type: ignore[arg-type]
    assert message.content[0].type == "text" and message.content[0].text
    _consistent(message, 16)


def test_stop_sequence_ends_the_answer_and_is_named(client: anthropic.Anthropic) -> None:
    # Any English answer of 64 tokens holds an "e".
    message = client.messages.create(model=MODEL, max_tokens=64, extra_body=GREEDY, system=SYSTEM, messages=ASK,  # type: ignore[arg-type]
                                     stop_sequences=["zqxj", "e"])
    assert message.stop_reason == "stop_sequence" and message.stop_sequence == "e"
    assert "e" not in message.content[0].text  # type: ignore[union-attr]
    with client.messages.stream(model=MODEL, max_tokens=64, extra_body=GREEDY, system=SYSTEM, messages=ASK,  # type: ignore[arg-type]
                                stop_sequences=["zqxj", "e"]) as stream:
        final = stream.get_final_message()
    assert (final.stop_reason, final.stop_sequence) == ("stop_sequence", "e")
    # Without stop sequences the same answer ends otherwise.
    plain = client.messages.create(model=MODEL, max_tokens=64, extra_body=GREEDY, system=SYSTEM, messages=ASK)  # type: ignore[arg-type]
    assert plain.stop_reason in ("end_turn", "max_tokens") and plain.stop_sequence is None


# ---- messages.stream ----

def test_stream_text_events_in_order_and_the_sdk_rebuilds_the_message(client: anthropic.Anthropic) -> None:
    with client.messages.stream(model=MODEL, max_tokens=40, extra_body=GREEDY, system=SYSTEM, messages=ASK) as stream:  # type: ignore[arg-type]
        events = list(stream)
        final = stream.get_final_message()
    raw = [e.type for e in events if e.type not in ("text", "input_json")]  # the SDK's derived events aside
    assert raw[0] == "message_start" and raw[1] == "content_block_start"
    assert raw[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(raw[2:-3]) == {"content_block_delta"}
    deltas = [e.delta.text for e in events if e.type == "content_block_delta" and e.delta.type == "text_delta"]  # type: ignore[union-attr]
    assert len(deltas) >= 3  # as it is generated, not in one piece
    [block] = final.content
    assert block.type == "text" and block.text == "".join(deltas) and block.text.strip()
    assert final.id.startswith("msg_") and final.model == SERVED
    _consistent(final, 40)
    assert final.usage.input_tokens + (final.usage.cache_read_input_tokens or 0) == client.messages.count_tokens(
        model=MODEL, system=SYSTEM, messages=ASK).input_tokens  # type: ignore[arg-type]


# ---- tools ----

def test_tool_use_round_trip(client: anthropic.Anthropic) -> None:
    message = client.messages.create(model=MODEL, max_tokens=120, extra_body=GREEDY, messages=WEATHER_ASK, tools=TOOLS,  # type: ignore[arg-type]
                                     tool_choice={"type": "tool", "name": "get_weather"})
    assert message.stop_reason == "tool_use"
    [use] = message.content
    assert use.type == "tool_use" and use.name == "get_weather" and use.id.startswith("toolu_")
    jsonschema.validate(use.input, WEATHER)
    result = "31 degrees and sunny, says the zorblax station"
    history = [*WEATHER_ASK, {"role": "assistant", "content": [b.model_dump() for b in message.content]},
               {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id,
                                             "content": [{"type": "text", "text": result}]}]}]
    # The result is in the prompt: the history counts at least its tokens more than the question alone.
    before = client.messages.count_tokens(model=MODEL, messages=WEATHER_ASK, tools=TOOLS).input_tokens  # type: ignore[arg-type]
    after = client.messages.count_tokens(model=MODEL, messages=history, tools=TOOLS).input_tokens  # type: ignore[arg-type]
    assert after > before + 10
    with client.messages.stream(model=MODEL, max_tokens=60, extra_body=GREEDY, messages=history, tools=TOOLS,  # type: ignore[arg-type]
                                tool_choice={"type": "none"}) as stream:
        text = "".join(stream.text_stream)
        answer = stream.get_final_message()
    [block] = answer.content
    assert block.type == "text" and block.text == text and text.strip()
    assert answer.stop_reason in ("end_turn", "max_tokens")


def test_streamed_forced_tool_call_is_reassembled_by_the_sdk(client: anthropic.Anthropic) -> None:
    with client.messages.stream(model=MODEL, max_tokens=120, extra_body=GREEDY, messages=WEATHER_ASK, tools=TOOLS,  # type: ignore[arg-type]
                                tool_choice={"type": "any"}) as stream:
        events = list(stream)
        final = stream.get_final_message()
    starts = [e for e in events if e.type == "content_block_start"]
    assert [s.content_block.type for s in starts] == ["tool_use"]  # type: ignore[union-attr]
    pieces = [e.delta.partial_json for e in events  # type: ignore[union-attr]
              if e.type == "content_block_delta" and e.delta.type == "input_json_delta"]
    assert len(pieces) >= 3  # the input arrives as it is generated
    [use] = final.content
    assert use.type == "tool_use" and use.name == "get_weather" and use.id.startswith("toolu_")
    assert use.id == starts[0].content_block.id  # type: ignore[union-attr]
    assert use.input == json.loads("".join(pieces))
    jsonschema.validate(use.input, WEATHER)
    assert final.stop_reason == "tool_use"


def test_server_tool_types_are_skipped(client: anthropic.Anthropic) -> None:
    server_tool = {"type": "web_search_20250305", "name": "web_search", "max_uses": 3}
    with_it = client.messages.count_tokens(model=MODEL, messages=WEATHER_ASK, tools=[*TOOLS, server_tool])  # type: ignore[arg-type]
    without = client.messages.count_tokens(model=MODEL, messages=WEATHER_ASK, tools=TOOLS)  # type: ignore[arg-type]
    assert with_it.input_tokens == without.input_tokens


# ---- auth and errors, as the SDK's own exceptions ----

def test_a_wrong_or_missing_key_raises_authentication_error(server: LiveServer) -> None:
    with anthropic.Anthropic(base_url=server.url, api_key="sk-anthropic-test-wrong-key", max_retries=0) as bad:
        with pytest.raises(anthropic.AuthenticationError) as caught:
            bad.messages.create(model=MODEL, max_tokens=4, messages=ASK)  # type: ignore[arg-type]
    assert caught.value.status_code == 401
    envelope = {"type": "error", "error": {"type": "authentication_error", "message": UNAUTHORIZED}}
    assert caught.value.body == envelope
    assert httpx.post(server.url + "/v1/messages/count_tokens", json={"messages": ASK}).json() == envelope
    # The key as a bearer token works too (the SDK's auth_token).
    with anthropic.Anthropic(base_url=server.url, auth_token=KEY, max_retries=0) as bearer:
        assert bearer.messages.count_tokens(model=MODEL, messages=ASK).input_tokens > 0  # type: ignore[arg-type]


def test_an_image_block_raises_bad_request_saying_there_is_no_vision(client: anthropic.Anthropic) -> None:
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}
    with pytest.raises(anthropic.BadRequestError) as caught:
        client.messages.create(model=MODEL, max_tokens=8, messages=[  # type: ignore[arg-type]
            {"role": "user", "content": [{"type": "text", "text": "What is in this picture?"}, image]}])
    body = caught.value.body
    assert isinstance(body, dict) and body["type"] == "error"
    assert body["error"]["type"] == "invalid_request_error" and "no vision" in body["error"]["message"]
    with pytest.raises(anthropic.BadRequestError):  # in a tool result too
        client.messages.count_tokens(model=MODEL, messages=[  # type: ignore[arg-type]
            *WEATHER_ASK, {"role": "assistant", "content": [
                {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": [image]}]}])


def test_invalid_requests_and_limits_answer_in_anthropic_envelope(server: LiveServer) -> None:
    with httpx.Client(base_url=server.url, headers={"x-api-key": KEY}, timeout=60) as http:
        missing = http.post("/v1/messages", json={"model": MODEL, "messages": ASK})
        assert missing.status_code == 400
        assert missing.json() == {"type": "error", "error": {"type": "invalid_request_error",
                                                             "message": "max_tokens: Field required"}}
        too_many = http.post("/v1/messages", json={"model": MODEL, "max_tokens": 10**6, "messages": ASK})
        assert too_many.status_code == 400 and "max_tokens" in too_many.json()["error"]["message"]
        assert http.post("/v1/messages/batches", json={}).json()["error"]["type"] == "not_found_error"
        # The other routes keep their own envelope.
        openai_401 = httpx.post(server.url + "/v1/chat/completions", json={})
        assert openai_401.json() == {"error": {"message": UNAUTHORIZED, "type": "authentication_error",
                                               "param": None, "code": "invalid_api_key"}}


def test_the_envelope_by_status_and_path() -> None:
    detail = ErrorDetail(message="server busy", type="rate_limit_error", code="server_overloaded")
    assert error_body(429, detail, "/v1/messages") == {"type": "error", "error": {"type": "rate_limit_error",
                                                                                    "message": "server busy"}}
    assert error_body(503, detail, "/v1/messages/count_tokens")["error"]["type"] == "overloaded_error"
    assert error_body(500, detail, "/v1/messages")["error"]["type"] == "api_error"
    assert error_body(429, detail, "/v1/messagesx") == {"error": detail.model_dump()}
    assert error_body(429, detail, "/v1/chat/completions") == {"error": detail.model_dump()}
    sse = error_event(ErrorEvent(message="the server is shutting down", status=503, code="shutting_down"))
    assert sse.event == "error" and json.loads(sse.data) == {
        "type": "error", "error": {"type": "overloaded_error", "message": "the server is shutting down"}}


@pytest.mark.parametrize("text", ["Paris", 'a "quote"\n', "\u2028\x00\x7f", "日本語 🎉", "\\"])
def test_the_hot_path_text_delta_is_the_event_model_s_bytes(text: str) -> None:
    assert _text_delta(3, text) == _sse(ContentBlockDelta(index=3, delta=TextDelta(text=text))).encode()


# ---- Claude Code ----

CLAUDE_CODE_TOOLS = [
    {"name": "Bash", "description": "Executes a given bash command in a persistent shell session.",
     "input_schema": {"type": "object", "properties": {
         "command": {"type": "string", "description": "The command to execute"},
         "timeout": {"type": "number", "description": "Optional timeout in milliseconds (max 600000)"},
         "description": {"type": "string", "description": "Clear, concise description of what this command does"}},
         "required": ["command"], "additionalProperties": False, "$schema": "http://json-schema.org/draft-07/schema#"}},
    {"name": "Read", "description": "Reads a file from the local filesystem.",
     "input_schema": {"type": "object", "properties": {
         "file_path": {"type": "string", "description": "The absolute path to the file to read"},
         "offset": {"type": "number"}, "limit": {"type": "number"}},
         "required": ["file_path"], "additionalProperties": False, "$schema": "http://json-schema.org/draft-07/schema#"}},
    {"name": "TodoWrite", "description": "Create and manage a structured task list for your current session.",
     "input_schema": {"type": "object", "properties": {"todos": {"type": "array", "items": {
         "type": "object", "properties": {
             "content": {"type": "string", "minLength": 1},
             "status": {"type": "string", "enum": ["pending", "in_progress", "completed"]}},
         "required": ["content", "status"], "additionalProperties": False}}},
         "required": ["todos"], "additionalProperties": False, "$schema": "http://json-schema.org/draft-07/schema#"}},
]
# The shape of Claude Code's main request (its system blocks, reminders, tools, metadata and stream), with a
# max_tokens that fits this server (CLAUDE_CODE_MAX_OUTPUT_TOKENS; Claude Code's own default is 32000).
CLAUDE_CODE_REQUEST: dict[str, Any] = {
    "model": "claude-sonnet-4-5-20250929",
    "max_tokens": 64,
    "temperature": 1,
    "system": [
        {"type": "text", "text": "You are Claude Code, Anthropic's official CLI for Claude.",
         "cache_control": {"type": "ephemeral"}},
        {"type": "text", "text": "You are an interactive CLI tool that helps users with software engineering tasks. "
         "Use the instructions below and the tools available to you to assist the user.",
         "cache_control": {"type": "ephemeral"}},
    ],
    "messages": [{"role": "user", "content": [
        {"type": "text", "text": "<system-reminder>\nThis is a reminder that your todo list is currently empty. "
         "DO NOT mention this to the user explicitly.\n</system-reminder>"},
        {"type": "text", "text": "What does the file README.md say?", "cache_control": {"type": "ephemeral"}},
    ]}],
    "tools": CLAUDE_CODE_TOOLS,
    "metadata": {"user_id": "user_3f1c0e5a_account__session_6a1d2c7e-9b3f-4e21-8d5a-0c9e4b7f1a23"},
    "stream": True,
}
CLAUDE_CODE_HEADERS = {
    "anthropic-version": "2023-06-01",
    "anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14,fine-grained-tool-streaming-2025-05-14",
    "anthropic-dangerous-direct-browser-access": "true",
    "x-app": "cli",
    "user-agent": "claude-cli/2.0.14 (external, cli)",
}


def _check_event_stream(events: list[tuple[str, dict[str, Any]]]) -> None:
    """Anthropic's event grammar: message_start, ping, blocks started, delta'd and stopped in index order,
    message_delta, message_stop; each event named as its payload's type."""
    assert all(name == data["type"] for name, data in events)
    names = [name for name, _ in events]
    assert names[:2] == ["message_start", "ping"] and names[-2:] == ["message_delta", "message_stop"]
    start = events[0][1]["message"]
    assert start["content"] == [] and start["role"] == "assistant" and start["stop_reason"] is None
    assert start["usage"]["input_tokens"] > 0
    index, open_block = -1, None
    for name, data in events[2:-2]:
        if name == "content_block_start":
            assert open_block is None and data["index"] == index + 1
            index, open_block = data["index"], data["content_block"]["type"]
        elif name == "content_block_delta":
            assert data["index"] == index and open_block is not None
            assert data["delta"]["type"] == {"text": "text_delta", "tool_use": "input_json_delta"}[open_block]
        else:
            assert name in ("content_block_stop", "ping") and (name == "ping" or data["index"] == index)
            open_block = None if name == "content_block_stop" else open_block
    assert open_block is None and index >= 0
    delta = events[-2][1]
    assert delta["delta"]["stop_reason"] in STOP_REASONS and delta["usage"]["output_tokens"] > 0


def test_claude_code_request_replayed_is_answered_with_a_valid_stream(server: LiveServer,
                                                                      client: anthropic.Anthropic) -> None:
    headers = {**CLAUDE_CODE_HEADERS, "x-api-key": KEY, "content-type": "application/json"}
    with httpx.Client(base_url=server.url, timeout=120) as http, connect_sse(
            http, "POST", "/v1/messages?beta=true", json=CLAUDE_CODE_REQUEST, headers=headers) as source:
        assert source.response.status_code == 200
        assert source.response.headers["content-type"].startswith("text/event-stream")
        events = [(sse.event, json.loads(sse.data)) for sse in source.iter_sse()]
    _check_event_stream(events)
    # The same through the SDK's beta client (?beta=true and the anthropic-beta header are its own).
    body = {k: v for k, v in CLAUDE_CODE_REQUEST.items() if k not in ("stream", "temperature")}
    with client.beta.messages.stream(**body, betas=["claude-code-20250219", "interleaved-thinking-2025-05-14"],
                                     thinking={"type": "enabled", "budget_tokens": 1024},
                                     extra_body={"temperature": 1}) as stream:
        final = stream.get_final_message()
    assert final.stop_reason in STOP_REASONS and final.content
    for block in final.content:
        assert block.type in ("text", "tool_use")
        if block.type == "tool_use":
            assert block.name in {t["name"] for t in CLAUDE_CODE_TOOLS} and isinstance(block.input, dict)
    log = Path(server.log_path).read_text(errors="replace")
    assert "user_3f1c0e5a" not in log  # metadata.user_id is logged nowhere
