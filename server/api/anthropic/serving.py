"""Anthropic's Messages API translated onto the serving core: a request becomes the same chat prompt, grammar and
engine request as OpenAI's chat route makes (``GenerationService.chat_tokens``, ``build``, ``submit``), and the
engine's events become Anthropic's message or its event stream. Nothing here limits, authenticates or caches.

- ``system`` and the messages become chat messages: text blocks joined by a blank line, ``tool_use`` blocks the
  assistant's tool calls, ``tool_result`` blocks tool messages (in their order in the user's message), thinking
  blocks dropped; ``image`` and ``document`` blocks are refused with a 400 (this server has no vision).
- Custom ``tools`` become OpenAI function tools, rendered by ``server/tools.py`` as for OpenAI's route; other tool
  types are skipped. ``tool_choice`` ``any`` or ``tool`` is forced by the same grammar as OpenAI's required call.
- ``stop_reason``: ``tool_use`` for a call, ``max_tokens`` when cut, ``stop_sequence`` when a stop string ended it
  (which one, ``stop_sequence``, is read from the generated tokens at the cut), else ``end_turn``.
- ``usage.input_tokens`` counts the prompt tokens computed, ``cache_read_input_tokens`` those reused from the
  prompt cache: their sum is the prompt, as ``count_tokens`` counts it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request, Response
from pydantic import BaseModel
from sse_starlette import ServerSentEvent

from server.api.anthropic.protocol import (
    AnthropicErrorResponse,
    AnthropicUsage,
    ContentBlockDelta,
    ContentBlockStart,
    ContentBlockStop,
    CountTokensRequest,
    CountTokensResponse,
    DeltaUsage,
    DocumentBlock,
    ErrorBody,
    ImageBlock,
    InputJsonDelta,
    Message,
    MessageDelta,
    MessageDeltaBody,
    MessageRequest,
    MessageStart,
    MessageStop,
    Ping,
    PromptFields,
    StopReason,
    TextBlock,
    TextContent,
    ToolChoiceAny,
    ToolChoiceTool,
    ToolResultBlock,
    ToolUseBlock,
    ToolUseContent,
)
from server.engine.llama import LlamaModel
from server.engine.sampling import SamplingParams
from server.engine.types import ErrorEvent, FinalEvent, FinishReason, RequestHandle, TokenEvent
from server.errors import anthropic_error_type, bad_request, unavailable
from server.grammar import SchemaError
from server.openai_protocol import ChatMessage, FunctionCall, FunctionDefinition, Tool, ToolCall
from server.openai_serving import ArgumentsScanner  # the required call's scanner, shared with OpenAI's stream
from server.serving import GenerationService
from server.sse import TokenEventSourceResponse
from server.tools import HeldCall, call_grammar, parse_calls, template_messages, template_tools

CLIENT_CLOSED = 499  # the client went away; only logged
NO_VISION = "this server has no vision: {kind} blocks are not supported (send text)"
BLOCK_SEPARATOR = "\n\n"
# OpenAI's function names (server/openai_protocol.py), which the grammar and the tool prompt are built from.
_TOOL_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def new_message_id() -> str:
    return f"msg_{uuid.uuid4().hex[:24]}"


def new_tool_use_id() -> str:
    return f"toolu_{uuid.uuid4().hex[:24]}"


# ---- the prompt ----

@dataclasses.dataclass
class Plan:
    messages: list[dict[str, Any]]  # as the chat template gets them
    template_tools: list[dict[str, Any]] | None  # for a template that renders tools itself
    tools: list[Tool]  # the tools the model is told about, as OpenAI tools
    grammar: str | None  # the grammar of a forced call
    forced: bool


def _refuse_vision(block: object, param: str) -> None:
    if isinstance(block, ImageBlock | DocumentBlock):
        raise bad_request(NO_VISION.format(kind=block.type), param=param, code="unsupported_content")


def _tool_result_text(block: ToolResultBlock, param: str) -> str:
    if isinstance(block.content, list):
        for k, part in enumerate(block.content):
            _refuse_vision(part, f"{param}.content.{k}")
        text = BLOCK_SEPARATOR.join(part.text for part in block.content if isinstance(part, TextBlock))
    else:
        text = block.content or ""
    return f"Error: {text}" if block.is_error else text


def chat_messages(body: PromptFields) -> list[ChatMessage]:
    """The conversation as OpenAI chat messages (what ``server/tools.py`` renders)."""
    out: list[ChatMessage] = []
    system = body.system if isinstance(body.system, str) else BLOCK_SEPARATOR.join(b.text for b in body.system or [])
    if system:
        out.append(ChatMessage(role="system", content=system))
    for i, message in enumerate(body.messages):
        if isinstance(message.content, str):
            out.append(ChatMessage(role=message.role, content=message.content))
            continue
        texts: list[str] = []
        calls: list[ToolCall] = []
        produced = False
        for j, block in enumerate(message.content):
            param = f"messages.{i}.content.{j}"
            _refuse_vision(block, param)
            if isinstance(block, TextBlock):
                texts.append(block.text)
            elif isinstance(block, ToolUseBlock):
                if message.role != "assistant":
                    raise bad_request("tool_use blocks belong in an assistant message", param=param,
                                      code="invalid_value")
                calls.append(ToolCall(id=block.id, function=FunctionCall(
                    name=block.name, arguments=json.dumps(block.input, ensure_ascii=False))))
            elif isinstance(block, ToolResultBlock):
                if message.role != "user":
                    raise bad_request("tool_result blocks belong in a user message", param=param,
                                      code="invalid_value")
                if texts:  # text before a result keeps its place
                    out.append(ChatMessage(role="user", content=BLOCK_SEPARATOR.join(texts)))
                    texts = []
                out.append(ChatMessage(role="tool", tool_call_id=block.tool_use_id,
                                       content=_tool_result_text(block, param)))
                produced = True
            # thinking blocks: not part of the prompt
        if texts or calls or not produced:
            out.append(ChatMessage(role=message.role, content=BLOCK_SEPARATOR.join(texts), tool_calls=calls or None))
    return out


def openai_tools(body: PromptFields) -> list[Tool]:
    """The custom tools as OpenAI function tools (Anthropic's own tool types skipped)."""
    tools = []
    for i, tool in enumerate(body.tools or []):
        if not tool.custom:
            continue
        if not _TOOL_NAME.match(tool.name):
            raise bad_request(f"tool name {tool.name!r}: 1 to 64 letters, digits, '_', '-' or '.'",
                              param=f"tools.{i}.name", code="invalid_value")
        if tool.input_schema is None:
            raise bad_request("a custom tool needs an input_schema", param=f"tools.{i}.input_schema",
                              code="invalid_value")
        tools.append(Tool(type="function", function=FunctionDefinition(
            name=tool.name, description=tool.description, parameters=tool.input_schema)))
    return tools


def _forced(body: PromptFields, tools: list[Tool]) -> list[Tool]:
    """The tools one of which must be called: all for ``any``, the named one for ``tool``."""
    choice = body.tool_choice
    if isinstance(choice, ToolChoiceAny | ToolChoiceTool) and not tools:
        raise bad_request(f"tool_choice {choice.type} needs custom tools", param="tool_choice", code="invalid_value")
    if isinstance(choice, ToolChoiceTool):
        named = [t for t in tools if t.function.name == choice.name]
        if not named:
            raise bad_request(f"tool_choice names '{choice.name}', which is not in tools", param="tool_choice.name",
                              code="invalid_value")
        return named
    return tools if isinstance(choice, ToolChoiceAny) else []


def plan(service: GenerationService, body: PromptFields, *, with_grammar: bool = True) -> Plan:
    """The prompt's messages and tools, and the grammar of a forced call (CPU work: run off the event loop)."""
    native = service.chat_formatter().accepts_tools
    tools = openai_tools(body)
    active = tools if body.custom_tools() else []  # tool_choice none: the model is told of no tool
    forced = _forced(body, active)
    grammar = None
    if forced and with_grammar:
        try:
            grammar = call_grammar(forced)
        except SchemaError as exc:
            raise bad_request(f"tool input_schema: {exc}", param="tools", code="unsupported_schema") from exc
    return Plan(messages=template_messages(chat_messages(body), active, native),
                template_tools=template_tools(active) if native and active else None,
                tools=active, grammar=grammar, forced=bool(forced))


async def count_tokens(service: GenerationService, body: CountTokensRequest) -> CountTokensResponse:
    """The prompt's tokens, from the rendering a message request would get; nothing is generated."""
    prompt = await asyncio.to_thread(plan, service, body, with_grammar=False)
    tokens = await service.chat_tokens(prompt.messages, prompt.template_tools)
    return CountTokensResponse(input_tokens=len(tokens))


# ---- the answer ----

def _model(service: GenerationService) -> LlamaModel:
    model = service.engine.model
    if model is None:
        raise unavailable(service.engine.not_ready_reason())
    return model


def _usage(final: FinalEvent) -> AnthropicUsage:
    cached = final.usage.cached_tokens
    return AnthropicUsage(input_tokens=final.usage.prompt_tokens - cached, output_tokens=final.usage.completion_tokens,
                 cache_read_input_tokens=cached)


class _StopFinder:
    """Which stop sequence ended an answer: the engine cuts the text where one begins, so it is the one the
    generated tokens' text holds at the cut. Tokens are kept only when the request has stop sequences."""

    def __init__(self, model: LlamaModel, stops: tuple[str, ...]) -> None:
        self.model, self.stops = model, stops
        self.tokens: list[int] = []

    def push(self, event: TokenEvent) -> None:
        if self.stops and event.token >= 0:  # -1: the held-back tail, no token of its own
            self.tokens.append(event.token)

    def reason(self, final: FinalEvent) -> tuple[StopReason, str | None]:
        if final.finish_reason is FinishReason.LENGTH:
            return "max_tokens", None
        if self.stops:
            rest = self.model.detokenize(self.tokens)[len(final.text):]
            matched = next((s for s in self.stops if rest.startswith(s)), None)
            if matched is not None:
                return "stop_sequence", matched
        return "end_turn", None


def _tool_uses(prompt: Plan, final: FinalEvent) -> list[ToolUseContent]:
    """The answer's tool calls, when it is (only) calls of the tools."""
    if not prompt.tools or final.finish_reason is FinishReason.LENGTH:
        return []
    return [ToolUseContent(id=new_tool_use_id(), name=call.function.name, input=json.loads(call.function.arguments))
            for call in parse_calls(final.text, prompt.tools) or []]


async def serve_messages(service: GenerationService, body: MessageRequest, http_request: Request,
                         options: dict[str, Any]) -> Response:
    """``options``: further arguments of ``service.build`` (the caller's cache scope)."""
    model = _model(service)
    prompt = await asyncio.to_thread(plan, service, body)
    tokens = await service.chat_tokens(prompt.messages, prompt.template_tools)
    sampling = SamplingParams(temperature=body.temperature, top_k=body.top_k or 0,
                              top_p=1.0 if body.top_p is None else body.top_p, min_p=0.0, grammar=prompt.grammar)
    stops = tuple(body.stop_sequences or ())
    request = await service.build(tokens, max_tokens=body.max_tokens, sampling=sampling, stop=stops,
                                  request_id=new_message_id(), max_tokens_param="max_tokens",
                                  grammar_param="tools", rendered=True, **options)
    fields = service.log_fields(request, prompt.messages)  # never the metadata
    http_request.state.generation = fields
    handle = service.submit(request)
    finder = _StopFinder(model, stops)
    if body.stream:
        return TokenEventSourceResponse(_MessageStream(service, handle, prompt, finder).events(fields))
    final = await service.complete(handle, http_request.receive, fields, on_token=finder.push if stops else None)
    if final is None:
        return Response(status_code=CLIENT_CLOSED)
    content: list[TextContent | ToolUseContent] = list(_tool_uses(prompt, final))
    if content:
        stop_reason, stop_sequence = "tool_use", None
    else:
        content = [TextContent(text=final.text)]
        stop_reason, stop_sequence = finder.reason(final)
    message = Message(id=request.request_id, model=service.model_name, content=content, stop_reason=stop_reason,
                      stop_sequence=stop_sequence, usage=_usage(final))
    return Response(message.model_dump_json(), media_type="application/json")


def _sse(event: BaseModel) -> ServerSentEvent:
    return ServerSentEvent(data=event.model_dump_json(), event=event.type)  # type: ignore[attr-defined]


def _text_delta(index: int, text: str) -> bytes:
    """A ``text_delta`` event, encoded once here: one per token, the hot path of every stream (the same bytes as
    ``_sse(ContentBlockDelta(index=index, delta=TextDelta(text=text)))``)."""
    return (b'event: content_block_delta\r\ndata: {"type":"content_block_delta","index":' + str(index).encode()
            + b',"delta":{"type":"text_delta","text":' + json.dumps(text, ensure_ascii=False).encode()
            + b"}}\r\n\r\n")


def error_event(event: ErrorEvent) -> ServerSentEvent:
    """A failure after the stream began, as Anthropic's ``error`` event."""
    return _sse(AnthropicErrorResponse(error=ErrorBody(type=anthropic_error_type(event.status), message=event.message)))


class _MessageStream:
    """Anthropic's event stream of one answer: ``message_start``, ``ping``, then its content blocks (each
    ``content_block_start``, deltas, ``content_block_stop``), ``message_delta`` (stop reason and usage) and
    ``message_stop``; an ``error`` event ends a stream that failed.

    Text streams as it is generated. A forced call streams as a ``tool_use`` block whose input arrives in
    ``input_json_delta`` pieces as the grammar makes the model write it; with ``auto`` an answer that may be a
    call is held back until it is whole, then sent as ``tool_use`` blocks or as text."""

    def __init__(self, service: GenerationService, handle: RequestHandle, prompt: Plan, finder: _StopFinder) -> None:
        self.service, self.handle, self.prompt, self.finder = service, handle, prompt, finder
        self.index = -1  # the last block started
        self.open = False  # a block is started and not yet stopped

    def _start(self, block: TextContent | ToolUseContent) -> ServerSentEvent:
        self.index += 1
        self.open = True
        return _sse(ContentBlockStart(index=self.index, content_block=block))

    def _stop(self) -> list[ServerSentEvent]:
        if not self.open:
            return []
        self.open = False
        return [_sse(ContentBlockStop(index=self.index))]

    def _end(self, final: FinalEvent, stop_reason: StopReason, stop_sequence: str | None) -> list[ServerSentEvent]:
        usage = _usage(final)
        return [*self._stop(),
                _sse(MessageDelta(delta=MessageDeltaBody(stop_reason=stop_reason, stop_sequence=stop_sequence),
                                  usage=DeltaUsage(output_tokens=usage.output_tokens, input_tokens=usage.input_tokens,
                                                   cache_read_input_tokens=usage.cache_read_input_tokens,
                                                   cache_creation_input_tokens=0))),
                _sse(MessageStop())]

    async def events(self, fields: dict[str, object]) -> AsyncIterator[ServerSentEvent | bytes]:
        request = self.handle.request
        start = Message(id=request.request_id, model=self.service.model_name, content=[], stop_reason=None,
                        usage=AnthropicUsage(input_tokens=len(request.prompt_tokens), output_tokens=0))
        yield _sse(MessageStart(message=start))
        yield _sse(Ping())
        body = self._forced_call(fields) if self.prompt.forced else self._text(fields)
        async for sse in body:
            yield sse

    async def _text(self, fields: dict[str, object]) -> AsyncIterator[ServerSentEvent | bytes]:
        holder = HeldCall(bool(self.prompt.tools))
        async for event in self.service.stream(self.handle, fields):
            if isinstance(event, TokenEvent):
                self.finder.push(event)
                if not event.text:
                    continue
                text = holder.push(event.text)
                if not text:
                    continue
                if not self.open:
                    yield self._start(TextContent(text=""))
                yield _text_delta(self.index, text)
            elif isinstance(event, FinalEvent):
                uses = _tool_uses(self.prompt, event)
                if uses:
                    for sse in self._stop():
                        yield sse
                    for use in uses:
                        yield self._start(use.model_copy(update={"input": {}}))
                        yield _sse(ContentBlockDelta(index=self.index, delta=InputJsonDelta(
                            partial_json=json.dumps(use.input, ensure_ascii=False))))
                        for sse in self._stop():
                            yield sse
                    for sse in self._end(event, "tool_use", None):
                        yield sse
                    return
                if not self.open and (holder.held or self.index < 0):  # an answer has at least one block
                    yield self._start(TextContent(text=""))
                if holder.held:
                    yield _text_delta(self.index, holder.held)
                for sse in self._end(event, *self.finder.reason(event)):
                    yield sse
            else:
                yield error_event(event)

    async def _forced_call(self, fields: dict[str, object]) -> AsyncIterator[ServerSentEvent | bytes]:
        scanner = ArgumentsScanner()
        async for event in self.service.stream(self.handle, fields):
            if isinstance(event, TokenEvent):
                self.finder.push(event)
                known = scanner.name is not None
                arguments = scanner.push(event.text)
                if scanner.name is not None and not known:
                    yield self._start(ToolUseContent(id=new_tool_use_id(), name=scanner.name, input={}))
                if arguments:
                    yield _sse(ContentBlockDelta(index=self.index, delta=InputJsonDelta(partial_json=arguments)))
            elif isinstance(event, FinalEvent):
                if scanner.name is None:  # cut before the call began: what there is, as text
                    yield self._start(TextContent(text=""))
                    if scanner.text:
                        yield _text_delta(self.index, scanner.text)
                    reason = self.finder.reason(event)
                else:
                    reason = ("tool_use", None) if scanner.done else self.finder.reason(event)
                for sse in self._end(event, *reason):
                    yield sse
            else:
                yield error_event(event)
