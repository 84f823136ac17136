"""The pure rules that keep hostile requests bounded: no model, no server, each case a table row.

Each bound is checked twice: the hostile input is refused (or parsed) fast, and an ordinary input beside it still
passes, so a rule that refused everything would fail here too.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from server.engine.prompt_cache import PromptCache
from server.grammar import MAX_ALTERNATIVES, MAX_COUNT, MAX_SCHEMA_DEPTH, SchemaError, check_pattern, schema_to_grammar
from server.openai_protocol import MAX_LOGIT_BIAS, ChatCompletionRequest, FunctionDefinition, Tool
from server.settings import Settings
from server.tools import parse_calls

WEATHER = Tool(type="function", function=FunctionDefinition(name="weather", parameters={"type": "object"}))


def _timed(f, *args):  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    try:
        return f(*args), time.perf_counter() - start
    except Exception as exc:  # noqa: BLE001 - the caller looks at what was raised
        return exc, time.perf_counter() - start


# ---- tool calls parsed from model output: linear, whatever the model writes ----

@pytest.mark.parametrize("text", [
    "<tool_call>" + " " * 2000 + "x",
    "<tool_call>" + " " * 200_000 + "x",
    "```json" + " " * 200_000,
    "<tool_call>" * 20_000,
])
def test_a_hostile_answer_is_parsed_in_linear_time(text: str) -> None:
    result, seconds = _timed(parse_calls, text, [WEATHER])
    assert result is None
    assert seconds < 0.05, f"{seconds:.3f} s"


def test_the_2000_space_answer_of_the_issue_is_parsed_within_10_ms() -> None:
    parse_calls("<tool_call>" + " " * 2000 + "x", [WEATHER])  # warm up
    _, seconds = _timed(parse_calls, "<tool_call>" + " " * 2000 + "x", [WEATHER])
    assert seconds < 0.01


@pytest.mark.parametrize(("text", "arguments"), [
    ('{"name": "weather", "arguments": {"city": "Oslo"}}', [{"city": "Oslo"}]),
    ('<tool_call>\n{"name": "weather", "arguments": {"city": "Oslo"}}\n</tool_call>', [{"city": "Oslo"}]),
    ('<tool_call>{"name": "weather", "arguments": {"a": 1}}</tool_call> and '
     '<tool_call> {"name": "weather", "arguments": {"a": 2}} </tool_call>', [{"a": 1}, {"a": 2}]),
    ('```json\n{"name": "weather", "arguments": {"city": "Rome"}}\n```', [{"city": "Rome"}]),
    ('```\n[{"name": "weather", "arguments": {}}]\n```', [{}]),
    ('  {"name": "weather", "parameters": {"x": true}}  ', [{"x": True}]),
])
def test_calls_are_found_bare_fenced_and_in_blocks(text: str, arguments: list[dict[str, object]]) -> None:
    import json

    calls = parse_calls(text, [WEATHER])
    assert calls is not None
    assert [json.loads(c.function.arguments) for c in calls] == arguments
    assert all(c.function.name == "weather" for c in calls)


@pytest.mark.parametrize("text", [
    "The weather is fine.",
    '{"name": "other", "arguments": {}}',
    "<tool_call>{not json}</tool_call>",
    "```json\n{\"name\": \"weather\", \"arguments\": []}\n```",
    "``````",
])
def test_answers_that_are_not_calls_of_these_tools_are_text(text: str) -> None:
    assert parse_calls(text, [WEATHER]) is None


def test_an_unclosed_block_falls_back_to_the_whole_answer() -> None:
    calls = parse_calls('{"name": "weather", "arguments": {"q": "<tool_call>"}}', [WEATHER])
    assert calls is not None and '"<tool_call>"' in calls[0].function.arguments


# ---- JSON schemas: refused by name before the converter builds anything large ----

@pytest.mark.parametrize(("pattern", "why"), [
    ("^a{10000000}$", "repeats 10000000 times"),
    ("^[a-z]{1,1000000}$", "repeats 1000000 times"),
    ("^(a{1000}){1000}$", "grammar elements"),
    ("^((ab|cd){100}){100}$", "grammar elements"),
    ("(" * 100 + "a" + ")" * 100, "nests groups"),
    ("a" * 5000, "characters"),
    ("^" + "\\." * 2000 + "{1000}$", "grammar elements"),  # the converter repeats the whole literal run
])
def test_a_pattern_that_would_expand_past_the_limit_is_refused_at_once(pattern: str, why: str) -> None:
    result, seconds = _timed(schema_to_grammar, {"type": "string", "pattern": pattern})
    assert isinstance(result, SchemaError), result
    assert result.keyword == "pattern" and why in str(result)
    assert seconds < 0.05, f"{seconds:.3f} s"


@pytest.mark.parametrize("pattern", [
    "^[a-z]{1,20}$", r"^\d{3}-\d{4}$", "^(ab|cd){1,10}x?$", r"^[\]a-z]{2,}$", "^a{2}b{0,3}$", "^(x|y)+$",
])
def test_ordinary_patterns_still_convert(pattern: str) -> None:
    check_pattern(pattern, "#")
    assert "root ::=" in schema_to_grammar({"type": "string", "pattern": pattern})


def _nested(depth: int) -> dict[str, object]:
    schema: dict[str, object] = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "array", "items": schema}
    return schema


@pytest.mark.parametrize(("schema", "keyword"), [
    (_nested(MAX_SCHEMA_DEPTH + 1), "depth"),
    (_nested(5000), "depth"),  # once a RecursionError and a 500 with a 1000-frame traceback
    ({"enum": [f"v{i}" for i in range(MAX_ALTERNATIVES + 1)]}, "enum"),
    ({"anyOf": [{"const": i} for i in range(MAX_ALTERNATIVES + 1)]}, "anyOf"),
    ({"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(MAX_ALTERNATIVES + 1)}},
     "properties"),
    ({"type": "string", "maxLength": MAX_COUNT + 1}, "maxLength"),
])
def test_schemas_past_a_limit_are_refused_by_name(schema: dict[str, object], keyword: str) -> None:
    result, seconds = _timed(schema_to_grammar, schema)
    assert isinstance(result, SchemaError) and result.keyword == keyword, result
    assert seconds < 0.05


def test_a_count_in_other_digits_is_a_schema_error_not_a_crash() -> None:
    with pytest.raises(SchemaError):  # '²' passes str.isdigit and int() refuses it: once a 500
        schema_to_grammar({"type": "string", "pattern": "^a{²}$"})


def test_the_patterns_of_a_schema_are_bounded_together() -> None:
    one = {"type": "string", "pattern": "^" + "ab" * 300 + "{10}$"}  # each well under the limit alone
    assert "root ::=" in schema_to_grammar(one)
    many = {"type": "object", "properties": {f"p{i}": one for i in range(20)}}
    result, seconds = _timed(schema_to_grammar, many)
    assert isinstance(result, SchemaError) and "together" in str(result)
    assert seconds < 0.05


def test_schemas_at_the_limits_convert() -> None:
    assert "root ::=" in schema_to_grammar(_nested(MAX_SCHEMA_DEPTH - 1))
    assert "root ::=" in schema_to_grammar({"enum": [f"v{i}" for i in range(MAX_ALTERNATIVES)]})


def test_a_huge_raw_grammar_is_refused() -> None:
    from server.grammar import MAX_GRAMMAR_BYTES, GrammarError, check_depth

    with pytest.raises(GrammarError, match="characters"):
        check_depth('root ::= "' + "a" * MAX_GRAMMAR_BYTES + '"')
    check_depth('root ::= "' + "a" * 1000 + '"')


# ---- logit_bias: bounded, and odd keys are a 400, not a 500 ----

@pytest.mark.parametrize("bias", [
    {"²": 1.0}, {"١٢": 1.0}, {"12345678901234": 1.0}, {str(i): 1.0 for i in range(MAX_LOGIT_BIAS + 1)},
])
def test_logit_bias_keys_and_sizes_are_checked(bias: dict[str, float]) -> None:
    with pytest.raises(ValidationError, match="logit_bias"):
        ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "hi"}], "logit_bias": bias})
    ok = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "hi"}],
                                               "logit_bias": {"15": 5.0, "-0": 1.0}})
    assert ok.bias_pairs(100) == ((15, 5.0), (0, 1.0))


# ---- the prompt cache: one scope that floods it evicts its own entries ----

def test_a_flooding_scope_evicts_itself_not_the_others() -> None:
    cache = PromptCache(limit_bytes=1000)
    assert cache.put([1, 2, 3], "victim", b"v" * 300)
    for i in range(50):
        assert cache.put([100 + i], "flood", b"f" * 100)
    entry, n = cache.best([1, 2, 3, 4], "victim")
    assert entry is not None and n == 3, "the flood evicted another scope's entry"
    assert cache.scope_bytes("victim") == 300 and cache.scope_bytes("flood") == 700
    assert cache.bytes == 1000
    # The flood's newest entries are the ones it kept.
    assert cache.best([149], "flood")[1] == 1 and cache.best([100], "flood")[1] == 0


def test_with_one_scope_the_oldest_entry_goes_first() -> None:
    cache = PromptCache(limit_bytes=300)
    for i in range(4):
        cache.put([i], "", b"x" * 100)
    assert [cache.best([i], "")[1] for i in range(4)] == [0, 1, 1, 1]
    cache.take(cache.best([1], "")[0])  # type: ignore[arg-type]
    assert cache.bytes == 200 and cache.scope_bytes("") == 200


def test_the_largest_scope_gives_way_even_when_another_inserts() -> None:
    cache = PromptCache(limit_bytes=1000)
    cache.put([1], "big", b"b" * 600)
    cache.put([2], "small", b"s" * 300)
    cache.put([3], "small", b"s" * 300)  # needs room: "big" holds the most, its entry goes
    assert cache.scope_bytes("big") == 0 and cache.scope_bytes("small") == 600


# ---- API keys and exposure ----

@pytest.mark.parametrize(("content", "message"), [
    ("# keys for the pod\n\n", "holds no key"),
    ("short-key\n", "line 1 of API key file"),
    ("# a comment\n" + "k" * 32 + "\n  tiny\n", "line 3 of API key file"),
])
def test_a_key_file_of_comments_or_short_keys_refuses(tmp_path: Path, content: str, message: str) -> None:
    keys = tmp_path / "keys"
    keys.write_text(content)
    with pytest.raises(ValidationError, match=message):
        Settings(api_key_file=keys)


def test_comment_lines_are_not_keys(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("# rotated 2026-12-01\n" + "a" * 32 + "\n\n#" + "b" * 32 + "\n")
    assert Settings(api_key_file=keys).api_keys() == ["a" * 32]
    with pytest.raises(ValidationError, match="shorter than 16"):
        Settings(api_key="sk-123")


@pytest.mark.parametrize(("settings", "refused"), [
    ({}, False),
    ({"host": "localhost"}, False),
    ({"host": "::1"}, False),
    ({"host": "127.0.0.2"}, False),
    ({"host": "0.0.0.0"}, True),
    ({"host": "::"}, True),
    ({"host": "10.0.0.5"}, True),
    ({"host": "0.0.0.0", "api_key": "k" * 32}, False),
    ({"host": "0.0.0.0", "allow_unauthenticated": True}, False),
])
def test_a_server_open_beyond_loopback_without_a_key_refuses(settings: dict[str, object], refused: bool) -> None:
    problem = Settings(**settings).exposure_problem()  # type: ignore[arg-type]
    assert (problem is not None) == refused
    if refused:
        assert "API_KEY_FILE" in problem and "ALLOW_UNAUTHENTICATED" in problem  # type: ignore[operator]


def test_trusted_proxies_must_be_addresses() -> None:
    with pytest.raises(ValidationError, match="not an address"):
        Settings(trusted_proxies=["gateway.local"])
    assert Settings(trusted_proxies=["10.0.0.0/8", "fd00::1"]).trusted_proxies == ["10.0.0.0/8", "fd00::1"]

