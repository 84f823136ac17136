"""Tool calls: the tools and the call history rendered into the chat prompt, a grammar for a required call, and
the model's answer parsed back into OpenAI ``tool_calls``.

A chat template that reads a ``tools`` variable (Qwen 2.5, Llama 3.1, Hermes...) gets the tools, the assistant
messages' ``tool_calls`` and the ``tool`` messages as they are, and renders them its own way. A template without
one (SmolLM2, LLaMA 2) gets the generic format:

- the tools are listed in the system message, one JSON object per function (name, description, parameters),
  with the instruction to answer a call as one JSON object ``{"name": ..., "arguments": {...}}``;
- an assistant message's tool calls become its content, one such JSON object per line;
- tool results become a ``user`` message, each result as ``<tool_response name="...">...</tool_response>``
  (consecutive results in one message, so templates that want roles to alternate accept it).

The model's answer is a call when it is such a JSON object (or a list of them), bare, in a ```` ```json ````
fence or in ``<tool_call>...</tool_call>`` blocks, naming one of the tools. When a call is required
(``tool_choice`` ``required`` or a named function) a grammar built from the functions' parameter schemas makes
the answer exactly one such object.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from server.grammar import SchemaError, schema_to_grammar
from server.openai_protocol import ChatMessage, FunctionCall, Tool, ToolCall

SYSTEM_PROMPT = (
    "You can call functions. These are the functions available, as JSON:\n{functions}\n"
    'To call a function, answer with only a JSON object of the form {{"name": <function name>, "arguments": '
    "<an object of its arguments>}}, and nothing else. Otherwise answer normally."
)
OPEN_TAG, CLOSE_TAG, FENCE = "<tool_call>", "</tool_call>", "```"


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _definition(tool: Tool) -> dict[str, Any]:
    f = tool.function
    out: dict[str, Any] = {"name": f.name}
    if f.description:
        out["description"] = f.description
    out["parameters"] = f.parameters or {"type": "object", "properties": {}}
    return out


def _arguments_value(arguments: str) -> Any:
    """Templates render arguments with ``tojson``: hand them the parsed object when the text is JSON."""
    try:
        return json.loads(arguments)
    except (ValueError, RecursionError):  # '[' * 5000 nests past the parser's recursion
        return arguments


def _call_text(call: ToolCall) -> str:
    return json.dumps({"name": call.function.name, "arguments": _arguments_value(call.function.arguments)},
                      ensure_ascii=False)


def template_tools(tools: list[Tool]) -> list[dict[str, Any]]:
    """The ``tools`` variable for templates that have one (OpenAI's shape, as llama-server passes it)."""
    return [{"type": "function", "function": _definition(t)} for t in tools]


def template_messages(messages: list[ChatMessage], tools: list[Tool], native: bool) -> list[dict[str, Any]]:
    """The messages as the chat template gets them: ``native`` when the template reads ``tools`` itself."""
    names: dict[str, str] = {}
    out: list[dict[str, Any]] = []
    for m in messages:
        # 'developer' is OpenAI's newer name for 'system'; chat templates know 'system'.
        entry: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
        for call in m.tool_calls or []:
            names[call.id] = call.function.name
        if m.tool_calls and native:
            entry["tool_calls"] = [
                {"id": c.id, "type": "function",
                 "function": {"name": c.function.name, "arguments": _arguments_value(c.function.arguments)}}
                for c in m.tool_calls]
        elif m.tool_calls:
            entry["content"] = "\n".join([entry["content"]] * bool(entry["content"])
                                         + [_call_text(c) for c in m.tool_calls])
        if m.role == "tool":
            name = names.get(m.tool_call_id or "", m.name or "")
            if native:
                entry.update(tool_call_id=m.tool_call_id or "", name=name)
            else:
                response = f'<tool_response name="{name}">\n{entry["content"]}\n</tool_response>'
                if out and out[-1].get("tool_responses"):
                    out[-1]["content"] += "\n" + response
                    continue
                entry = {"role": "user", "content": response, "tool_responses": True}
        out.append(entry)
    for entry in out:
        entry.pop("tool_responses", None)
    if tools and not native:
        prompt = SYSTEM_PROMPT.format(functions="\n".join(json.dumps(_definition(t), ensure_ascii=False)
                                                          for t in tools))
        if out and out[0]["role"] == "system":
            out[0]["content"] = f"{out[0]['content']}\n\n{prompt}" if out[0]["content"] else prompt
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


def call_grammar(tools: list[Tool]) -> str:
    """A grammar whose every sentence is one call of one of ``tools``, its arguments valid for that function."""
    defs: dict[str, Any] = {}
    options = []
    for tool in tools:
        params = dict(tool.function.parameters or {"type": "object", "properties": {}})
        for key in ("$defs", "definitions"):  # references resolve from the root: hoist the definitions there
            for name, sub in params.pop(key, {}).items():
                if name in defs and defs[name] != sub:
                    raise SchemaError(f"two functions define '{name}' differently in {key}", keyword=key)
                defs[name] = sub
        options.append({"type": "object", "properties": {"name": {"const": tool.function.name}, "arguments": params},
                        "required": ["name", "arguments"], "additionalProperties": False})
    schema: dict[str, Any] = options[0] if len(options) == 1 else {"anyOf": options}
    if defs:
        schema = {**schema, "$defs": defs}
        schema = json.loads(json.dumps(schema).replace('"#/definitions/', '"#/$defs/'))
    return schema_to_grammar(schema)


def _blocks(text: str) -> list[str]:
    """The texts of the ``<tool_call>...</tool_call>`` blocks, each stripped. A scan with ``str.find``, linear in
    the text: a backtracking regex here took seconds on an open tag followed by blanks, with the GIL held."""
    blocks: list[str] = []
    pos = 0
    while (start := text.find(OPEN_TAG, pos)) >= 0:
        end = text.find(CLOSE_TAG, start + len(OPEN_TAG))
        if end < 0:
            break
        blocks.append(text[start + len(OPEN_TAG):end].strip())
        pos = end + len(CLOSE_TAG)
    return blocks


def _unfenced(text: str) -> str:
    """``text`` without a Markdown code fence around it (```` ```json ... ``` ````), when it has one."""
    if len(text) < 2 * len(FENCE) or not (text.startswith(FENCE) and text.endswith(FENCE)):
        return text
    inner = text[len(FENCE):-len(FENCE)]
    return inner.removeprefix("json").strip()


def _candidates(text: str) -> list[str]:
    return _blocks(text) or [_unfenced(text.strip())]


def parse_calls(text: str, tools: list[Tool]) -> list[ToolCall] | None:
    """The tool calls ``text`` makes, or None when it is not (only) calls of these tools."""
    names = {t.function.name for t in tools}
    calls: list[ToolCall] = []
    for candidate in _candidates(text):
        try:
            value = json.loads(candidate)
        except (ValueError, RecursionError):
            return None
        for item in value if isinstance(value, list) else [value]:
            if not isinstance(item, dict) or item.get("name") not in names:
                return None
            arguments = item.get("arguments", item.get("parameters", {}))
            if isinstance(arguments, str):
                arguments = _arguments_value(arguments)
            if not isinstance(arguments, dict):
                return None
            calls.append(ToolCall(id=new_call_id(), function=FunctionCall(
                name=item["name"], arguments=json.dumps(arguments, ensure_ascii=False))))
    return calls or None


class HeldCall:
    """A stream's text while it may still be a tool call: held back until it is plainly not one (then passed on,
    the held part with it) or until the answer ends (``held`` is then the whole answer, to parse)."""

    def __init__(self, tools: bool) -> None:
        self._holding: bool | None = None if tools else False
        self.held = ""

    def push(self, text: str) -> str:
        """What to pass on now: ``text`` (with what was held), or "" while it is held."""
        if self._holding is False:
            return text
        self.held += text
        if self._holding is None:
            self._holding = looks_like_call(self.held)
        if self._holding is not False:
            return ""
        text, self.held = self.held, ""
        return text


def looks_like_call(text: str) -> bool | None:
    """Whether an answer that begins with ``text`` may be a call, so a stream holds it back until the end;
    None while it cannot tell yet (nothing but blanks, or part of ``<tool_call>``)."""
    head = text.lstrip()
    if head.startswith(("{", "[", FENCE, OPEN_TAG)):
        return True
    if not head or OPEN_TAG.startswith(head):
        return None
    return False
