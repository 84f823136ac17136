"""OpenAI's Responses API through the real openai SDK, on a real server with an API key over loopback: responses
created and streamed, structured output, a function-call round trip, the stateless refusals, auth, and a replay of
the first request Codex CLI sends. Every answer and stream event is also validated against the SDK's own models.
Greedy text of a 135M model differs across CPUs: properties are asserted, not text."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from httpx_sse import connect_sse
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from tests.conftest import LiveServer, metric, start_server, stop_server

KEY = "sk-responses-test-7f3a2b91"
SERVED = "SmolLM2-135M-Instruct.Q4_1"
MODEL = "gpt-5-codex"  # any name is accepted; answers name the served model
SYSTEM = "You are a helpful assistant."
ASK = "What is the capital of France?"
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 40},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TOOLS: list[Any] = [{"type": "function", "name": "get_weather", "description": "Current weather in a city",
                     "parameters": WEATHER, "strict": True}]
WEATHER_ASK = "What is the weather like in Paris today?"
GREEDY = {"temperature": 0}
EVENTS = TypeAdapter(ResponseStreamEvent)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    tmp = tmp_path_factory.mktemp("responses")
    keys = tmp / "keys.txt"
    keys.write_text(f"# the test key\n{KEY}\n")
    srv = start_server(tmp, "--api-key-file", str(keys), "--parallel", "2")
    yield srv
    stop_server(srv)


@pytest.fixture(scope="module")
def client(server: LiveServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120) as c:
        yield c


def _valid(response: Any) -> None:
    """The answer, as the server sent it, validates against the SDK's Response model (not only its lenient
    construction), and its usage and status agree."""
    raw = response.to_dict()
    Response.model_validate(raw)
    assert response.id.startswith("resp_") and response.object == "response" and response.model == SERVED
    usage = response.usage
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert 0 <= usage.input_tokens_details.cached_tokens <= usage.input_tokens
    assert usage.output_tokens_details.reasoning_tokens == 0
    if response.status == "incomplete":
        assert response.incomplete_details.reason == "max_output_tokens"
        assert usage.output_tokens == response.max_output_tokens
    else:
        assert response.status == "completed" and response.incomplete_details is None
    for item in response.output:
        if item.type == "message":
            assert item.id.startswith("msg_") and item.role == "assistant"
            assert [part.type for part in item.content] == ["output_text"] and item.content[0].annotations == []
        else:
            assert item.type == "function_call" and item.id.startswith("fc_") and item.call_id.startswith("call_")


def _stream_events(stream: Any) -> list[Any]:
    """Every event of an SDK stream, each also validated strictly against the SDK's event models."""
    events = list(stream)
    for event in events:
        data = event.to_dict(warnings=False)  # the SDK's parsed types do not serialize as the union they fill
        data.pop("snapshot", None)
        data.pop("parsed", None)
        EVENTS.validate_python(data)
    return events


def _check_order(events: list[Any]) -> None:
    """The lifecycle and item events in the order the API sends them, numbered from 0 without gaps."""
    assert [e.sequence_number for e in events] == list(range(len(events)))
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] in ("response.completed", "response.incomplete") and kinds.count(kinds[-1]) == 1
    added = [e.output_index for e in events if e.type == "response.output_item.added"]
    done = [e.output_index for e in events if e.type == "response.output_item.done"]
    assert added == done == list(range(len(added))) and added
    for event in events:
        if event.type in ("response.output_text.delta", "response.function_call_arguments.delta"):
            assert kinds.index("response.output_item.added") < kinds.index(event.type)
    final = events[-1].response
    item_ids = {e.item.id for e in events if e.type == "response.output_item.added"}
    assert {item.id for item in final.output} == item_ids
    for item in final.output:  # each item's own events: opened, filled, closed
        own = [e.type for e in events if getattr(e, "item_id", None) == item.id
               or getattr(getattr(e, "item", None), "id", None) == item.id]
        if item.type == "message":
            assert own[:2] == ["response.output_item.added", "response.content_part.added"]
            assert own[-3:] == ["response.output_text.done", "response.content_part.done",
                                "response.output_item.done"]
            assert set(own[2:-3]) <= {"response.output_text.delta"}
        else:
            assert own[0] == "response.output_item.added" and own[-2:] == [
                "response.function_call_arguments.done", "response.output_item.done"]
            assert set(own[1:-2]) <= {"response.function_call_arguments.delta"}


# ---- responses.create ----

def test_create_with_a_string_input_answers_text_with_consistent_usage(client: openai.OpenAI,
                                                                        server: LiveServer) -> None:
    before = httpx.get(server.url + "/metrics").text
    response = client.responses.create(model=MODEL, input=ASK, instructions=SYSTEM, max_output_tokens=48,
                                       **GREEDY)
    _valid(response)
    assert response.output_text.strip()
    assert [item.type for item in response.output] == ["message"]
    assert response.output[0].content[0].text == response.output_text
    assert 0 < response.usage.output_tokens <= 48
    assert response.instructions == SYSTEM and response.tools == [] and response.store is False
    after = httpx.get(server.url + "/metrics").text
    series = 'code="",route="/v1/responses",status="200"'
    assert metric(after, "llama_http_requests_total", series) == metric(before, "llama_http_requests_total",
                                                                        series) + 1


def test_items_with_instructions_render_every_role_and_skip_other_items(client: openai.OpenAI) -> None:
    items: list[Any] = [
        {"role": "developer", "content": "Answer in one short sentence."},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hello!"}]},
        {"type": "reasoning", "id": "rs_1", "summary": []},  # another server's reasoning: skipped
        {"type": "message", "role": "assistant", "id": "msg_1", "status": "completed",
         "content": [{"type": "output_text", "text": "Hello! How can I help?", "annotations": []}]},
        {"role": "user", "content": ASK},
    ]
    with_instructions = client.responses.create(model=MODEL, input=items, instructions=SYSTEM,
                                                max_output_tokens=24, **GREEDY)
    _valid(with_instructions)
    without = client.responses.create(model=MODEL, input=items, max_output_tokens=1, **GREEDY)
    last_only = client.responses.create(model=MODEL, input=items[-1:], max_output_tokens=1, **GREEDY)
    # The instructions and the history are in the prompt, the reasoning item is not (it has no text to add).
    assert with_instructions.usage.input_tokens > without.usage.input_tokens > last_only.usage.input_tokens
    no_reasoning = client.responses.create(model=MODEL, input=[i for i in items if i.get("type") != "reasoning"],
                                           max_output_tokens=1, **GREEDY)
    assert no_reasoning.usage.input_tokens == without.usage.input_tokens


def test_text_format_json_schema_answers_valid_json(client: openai.OpenAI) -> None:
    schema = {"type": "object", "properties": {"capital": {"type": "string", "maxLength": 30},
                                               "country": {"type": "string", "maxLength": 30}},
              "required": ["capital", "country"], "additionalProperties": False}
    response = client.responses.create(
        model=MODEL, input=ASK, max_output_tokens=96, **GREEDY,
        text={"format": {"type": "json_schema", "name": "capital", "schema": schema, "strict": True}})
    _valid(response)
    assert response.status == "completed"
    jsonschema.validate(json.loads(response.output_text), schema)
    assert response.text.format.type == "json_schema"
    obj = client.responses.create(model=MODEL, input=ASK + " Answer in JSON.", max_output_tokens=96, **GREEDY,
                                  text={"format": {"type": "json_object"}})
    if obj.status == "completed":
        assert isinstance(json.loads(obj.output_text), dict)
    else:
        assert obj.output_text.lstrip().startswith("{")


def test_a_small_max_output_tokens_gives_an_incomplete_response(client: openai.OpenAI) -> None:
    response = client.responses.create(model=MODEL, input="Tell me a long story about a dragon.",
                                       max_output_tokens=3, **GREEDY)
    _valid(response)
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    assert response.usage.output_tokens == 3 and response.output[0].status == "incomplete"
    with client.responses.stream(model=MODEL, input="Tell me a long story about a dragon.", max_output_tokens=3,
                                 **GREEDY) as stream:
        events = _stream_events(stream)
    _check_order(events)
    assert events[-1].type == "response.incomplete"
    assert events[-1].response.incomplete_details.reason == "max_output_tokens"


# ---- responses.stream ----

def test_stream_text_events_in_order_and_the_sdk_rebuilds_the_response(client: openai.OpenAI) -> None:
    with client.responses.stream(model=MODEL, input=ASK, instructions=SYSTEM, max_output_tokens=128,
                                 **GREEDY) as stream:
        events = _stream_events(stream)
        final = stream.get_final_response() if events[-1].type == "response.completed" else events[-1].response
    _check_order(events)
    kinds = [e.type for e in events]
    assert kinds[2:4] == ["response.output_item.added", "response.content_part.added"]
    assert kinds[-4:-1] == ["response.output_text.done", "response.content_part.done", "response.output_item.done"]
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert deltas and {(e.item_id, e.output_index, e.content_index) for e in deltas} == {
        (final.output[0].id, 0, 0)}
    text = "".join(e.delta for e in deltas)
    assert text.strip() and final.output_text == text
    assert next(e for e in events if e.type == "response.output_text.done").text == text
    _valid(final)
    assert final.usage.output_tokens >= len(deltas)


def test_function_call_round_trip(client: openai.OpenAI) -> None:
    first = client.responses.create(model=MODEL, input=WEATHER_ASK, tools=TOOLS, max_output_tokens=64,
                                    tool_choice={"type": "function", "name": "get_weather"}, **GREEDY)
    _valid(first)
    assert first.status == "completed"
    [call] = first.output
    assert call.type == "function_call" and call.name == "get_weather" and call.status == "completed"
    arguments = json.loads(call.arguments)
    jsonschema.validate(arguments, WEATHER)
    result = {"city": arguments["city"], "temperature": 21, "unit": arguments["unit"], "sky": "sunny"}
    history: list[Any] = [{"role": "user", "content": WEATHER_ASK}, call.model_dump(exclude_none=True),
                          {"type": "function_call_output", "call_id": call.call_id, "output": json.dumps(result)}]
    # The result's answer, read through responses.stream: text, with the call and its result in the prompt.
    with client.responses.stream(model=MODEL, input=history, tools=TOOLS, tool_choice="none", max_output_tokens=64,
                                 **GREEDY) as stream:
        events = _stream_events(stream)
        second = stream.get_final_response() if events[-1].type == "response.completed" else events[-1].response
    _check_order(events)
    _valid(second)
    assert [item.type for item in second.output] == ["message"] and second.output_text.strip()
    unanswered = client.responses.create(model=MODEL, input=history[:2], tools=TOOLS, tool_choice="none",
                                         max_output_tokens=1, **GREEDY)
    assert second.usage.input_tokens > unanswered.usage.input_tokens + len(json.dumps(result)) // 8
    # An output whose call_id names no call before it is refused: the server keeps no calls of its own.
    wrong = [*history[:2], {**history[2], "call_id": "call_unknown"}]
    with pytest.raises(openai.BadRequestError) as exc:
        client.responses.create(model=MODEL, input=wrong, tools=TOOLS, max_output_tokens=8)
    assert "call_unknown" in exc.value.message and exc.value.body["param"] == "input.2.call_id"


def test_streamed_forced_function_call_is_reassembled_by_the_sdk(client: openai.OpenAI) -> None:
    with client.responses.stream(model=MODEL, input=WEATHER_ASK, tools=TOOLS, tool_choice="required",
                                 max_output_tokens=64, **GREEDY) as stream:
        events = _stream_events(stream)
        final = stream.get_final_response()
    _check_order(events)
    [call] = final.output
    assert call.type == "function_call" and call.name == "get_weather" and call.status == "completed"
    added = next(e for e in events if e.type == "response.output_item.added").item
    assert (added.id, added.call_id, added.arguments) == (call.id, call.call_id, "")
    deltas = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
    assert len(deltas) > 1 and "".join(deltas) == call.arguments
    done = next(e for e in events if e.type == "response.function_call_arguments.done")
    assert done.arguments == call.arguments and done.item_id == call.id
    jsonschema.validate(json.loads(call.arguments), WEATHER)
    assert call.parsed_arguments == json.loads(call.arguments)  # strict tool: the SDK parsed it too


# ---- refusals ----

def test_stored_state_and_images_are_refused_with_a_clear_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as exc:
        client.responses.create(model=MODEL, input=ASK, previous_response_id="resp_123", max_output_tokens=8)
    assert "stateless" in exc.value.message and exc.value.body["param"] == "previous_response_id"
    image = [{"role": "user", "content": [{"type": "input_text", "text": "What is this?"},
                                          {"type": "input_image", "image_url": "data:image/png;base64,AAAA"}]}]
    with pytest.raises(openai.BadRequestError) as exc:
        client.responses.create(model=MODEL, input=image, max_output_tokens=8)
    assert "vision" in exc.value.message and exc.value.body["param"] == "input.0.content.1"
    # store: true is the SDK's default: accepted, nothing kept.
    stored = client.responses.create(model=MODEL, input=ASK, store=True, max_output_tokens=2)
    assert stored.store is False


def test_a_wrong_or_missing_key_raises_authentication_error(server: LiveServer) -> None:
    for key in ("sk-wrong-key-0123456789", KEY[:-1]):
        with openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0) as bad:
            with pytest.raises(openai.AuthenticationError) as exc:
                bad.responses.create(model=MODEL, input=ASK, max_output_tokens=4)
        assert exc.value.body["code"] == "invalid_api_key"
    assert httpx.post(server.url + "/v1/responses", json={"input": ASK}).status_code == 401


# ---- Codex CLI's first request, replayed ----

CODEX_INSTRUCTIONS = "\n\n".join([
    "You are Codex, based on GPT-5. You are running as a coding agent in the Codex CLI on a user's computer.",
    "## General\n\n- The arguments to `shell` will be passed to execvp(). Most terminal commands should be prefixed "
    "with [\"bash\", \"-lc\"].\n- Always set the `workdir` param when using the shell function. Do not use `cd` "
    "unless absolutely necessary.\n- When searching for text or files, prefer using `rg` or `rg --files` "
    "respectively because `rg` is much faster than alternatives like `grep`.",
    "## Editing constraints\n\n- Default to ASCII when editing or creating files.\n- Add succinct code comments "
    "that explain what is going on if code is not self-explanatory.\n- You may be in a dirty git worktree. NEVER "
    "revert existing changes you did not make unless explicitly requested.",
    "## Plan tool\n\nWhen using the planning tool:\n- Skip using the planning tool for straightforward tasks.\n"
    "- Do not make single-step plans.\n- When you made a plan, update it after having performed one of the "
    "sub-tasks that you shared on the plan.",
    "## Presenting your work and final message\n\nYou are producing plain text that will later be styled by the "
    "CLI. Follow these rules exactly. Be very concise; friendly coding teammate tone.",
] * 3)
CODEX_TOOLS: list[dict[str, Any]] = [
    {"type": "function", "name": "shell", "description": "Runs a shell command and returns its output.",
     "strict": False, "parameters": {"type": "object", "properties": {
         "command": {"type": "array", "items": {"type": "string"}, "description": "The command to execute"},
         "workdir": {"type": "string", "description": "The working directory to execute the command in"},
         "timeout_ms": {"type": "number", "description": "The timeout for the command in milliseconds"}},
         "required": ["command"], "additionalProperties": False}},
    {"type": "function", "name": "update_plan", "description": "Updates the task plan.", "strict": False,
     "parameters": {"type": "object", "properties": {
         "explanation": {"type": "string"},
         "plan": {"type": "array", "items": {"type": "object", "properties": {
             "step": {"type": "string"}, "status": {"type": "string"}}, "required": ["step", "status"],
             "additionalProperties": False}}}, "required": ["plan"], "additionalProperties": False}},
    {"type": "custom", "name": "apply_patch", "description": "Use the `apply_patch` tool to edit files.",
     "format": {"type": "grammar", "syntax": "lark", "definition": "start: begin_patch hunk+ end_patch"}},
    {"type": "local_shell"},
    {"type": "web_search"},
]
CODEX_REQUEST: dict[str, Any] = {
    "model": "gpt-5-codex",
    "instructions": CODEX_INSTRUCTIONS,
    "input": [
        {"type": "message", "role": "developer", "content": [{"type": "input_text", "text":
            "<permissions instructions>Filesystem sandboxing: workspace-write. Approvals: on-request."
            "</permissions instructions>"}]},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text":
            "<environment_context>\n  <cwd>/home/user/project</cwd>\n  <shell>bash</shell>\n"
            "</environment_context>"}]},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text":
            "List the files in this directory."}]},
    ],
    "tools": CODEX_TOOLS,
    "tool_choice": "auto",
    "parallel_tool_calls": False,
    "reasoning": {"effort": "medium", "summary": "auto"},
    "store": False,
    "stream": True,
    "include": [],
    "prompt_cache_key": "0199a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b",
    "text": {"verbosity": "medium"},
}
CODEX_HEADERS = {"OpenAI-Beta": "responses=experimental", "originator": "codex_cli_rs",
                 "session_id": "0199a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b", "accept": "text/event-stream",
                 "user-agent": "codex_cli_rs/0.46.0 (Ubuntu 24.4.0; x86_64) xterm-256color"}


def test_codex_first_request_replayed_is_answered_with_a_valid_stream(server: LiveServer) -> None:
    headers = {**CODEX_HEADERS, "Authorization": f"Bearer {KEY}", "content-type": "application/json"}
    with httpx.Client(base_url=server.url, timeout=180) as http, connect_sse(
            http, "POST", "/v1/responses", json=CODEX_REQUEST, headers=headers) as source:
        assert source.response.status_code == 200
        assert source.response.headers["content-type"].startswith("text/event-stream")
        raw = [(sse.event, json.loads(sse.data)) for sse in source.iter_sse()]
    for name, data in raw:
        assert name == data["type"]
        EVENTS.validate_python(data)
    events = [EVENTS.validate_python(data) for _, data in raw]
    _check_order(events)
    final = events[-1].response
    # The non-function tools were skipped, not refused; the function tools are echoed.
    assert [tool.name for tool in final.tools] == ["shell", "update_plan"]
    assert final.parallel_tool_calls is False and final.tool_choice == "auto"
    assert final.usage.input_tokens > len(CODEX_INSTRUCTIONS) // 8  # the long instructions are in the prompt
    for item in final.output:
        if item.type == "function_call":
            assert item.name in ("shell", "update_plan") and isinstance(json.loads(item.arguments), dict)
        else:
            assert item.type == "message" and item.content[0].text == "".join(
                d["delta"] for _, d in raw if d["type"] == "response.output_text.delta" and d["item_id"] == item.id)
