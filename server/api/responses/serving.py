"""OpenAI's Responses API translated onto the serving core: a request becomes the same chat prompt, grammar and
engine request as the chat route makes (``GenerationService.chat_tokens``, ``build``, ``submit``), and the
engine's events become a Response object or its event stream. Nothing here limits, authenticates or caches.

- ``instructions`` is the system message; ``input`` text is one user message; ``message`` items keep their role
  (``developer`` is rendered as ``system``), their text parts joined by a blank line; ``function_call`` items become
  the assistant's tool calls (consecutive ones in one message), ``function_call_output`` items tool messages.
  Other item types (``reasoning``, ``local_shell_call``...) are skipped; image, file and audio parts are refused
  with a 400 (this server has no vision).
- ``function`` tools are rendered by ``server/tools.py`` as for the chat route; other tool types are skipped.
  ``tool_choice`` ``required`` or a named function is forced by the same grammar as chat's required call;
  ``text.format`` ``json_schema``/``json_object`` by the schema's grammar.
- ``status`` is ``incomplete`` (``incomplete_details.reason`` ``max_output_tokens``) when the answer was cut.
- ``usage.input_tokens`` is the whole prompt, ``input_tokens_details.cached_tokens`` the part whose KV cache
  was reused.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request, Response
from pydantic import BaseModel
from sse_starlette import ServerSentEvent

from server.api.responses.protocol import (
    ArgumentsDelta,
    ArgumentsDone,
    ContentPartEvent,
    ErrorEventBody,
    FunctionCallItem,
    FunctionCallOutput,
    FunctionCallOutputItem,
    FunctionChoice,
    FunctionToolEcho,
    IncompleteDetails,
    InputText,
    InputTokensDetails,
    MediaPart,
    MessageItem,
    OutputItemEvent,
    OutputMessage,
    OutputText,
    Refusal,
    ResponseError,
    ResponseLifecycle,
    ResponseRequest,
    ResponseUsage,
    TextDone,
)
from server.api.responses.protocol import Response as ResponseObject
from server.engine.sampling import SamplingParams
from server.engine.types import ErrorEvent, FinalEvent, FinishReason, RequestHandle, TokenEvent
from server.errors import bad_request, unavailable
from server.grammar import JSON_OBJECT_GRAMMAR, SchemaError
from server.openai_protocol import ChatMessage, FunctionCall, FunctionDefinition, Tool, ToolCall, grammar_of_schema
from server.openai_serving import ArgumentsScanner  # the required call's scanner, shared with the chat stream
from server.serving import GenerationService
from server.sse import TokenEventSourceResponse
from server.tools import HeldCall, call_grammar, new_call_id, parse_calls, template_messages, template_tools

CLIENT_CLOSED = 499  # the client went away; only logged
NO_VISION = "this server has no vision: {kind} parts are not supported (send text)"
STATELESS = ("this server is stateless: {field} is not supported (nothing is stored; send the whole conversation "
             "as input items)")
PART_SEPARATOR = "\n\n"
# OpenAI's function names (server/openai_protocol.py), which the grammar and the tool prompt are built from.
_TOOL_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


# ---- the prompt ----

@dataclasses.dataclass
class Plan:
    messages: list[dict[str, Any]]  # as the chat template gets them
    template_tools: list[dict[str, Any]] | None  # for a template that renders tools itself
    tools: list[Tool]  # the tools the model is told about
    grammar: str | None  # a forced call's, or text.format's
    grammar_param: str
    forced: bool


def refuse_state(body: ResponseRequest) -> None:
    """A 400 for what needs a stored response or prompt: this server keeps none."""
    for field, value in (("previous_response_id", body.previous_response_id), ("conversation", body.conversation),
                         ("prompt", body.prompt), ("background", body.background or None)):
        if value is not None:
            raise bad_request(STATELESS.format(field=field), param=field, code="unsupported_parameter")


def _parts_text(parts: str | list[Any], param: str) -> str:
    if isinstance(parts, str):
        return parts
    texts = []
    for k, part in enumerate(parts):
        if isinstance(part, MediaPart):
            raise bad_request(NO_VISION.format(kind=part.type), param=f"{param}.{k}", code="unsupported_content")
        texts.append(part.text if isinstance(part, InputText) else part.refusal if isinstance(part, Refusal) else "")
    return PART_SEPARATOR.join(texts)


def chat_messages(body: ResponseRequest) -> list[ChatMessage]:
    """The conversation as OpenAI chat messages (what ``server/tools.py`` renders)."""
    out: list[ChatMessage] = []
    if body.instructions:
        out.append(ChatMessage(role="system", content=body.instructions))
    if isinstance(body.input, str):
        out.append(ChatMessage(role="user", content=body.input))
        return out
    calls: set[str] = set()
    for i, item in enumerate(body.input):
        if isinstance(item, MessageItem):
            out.append(ChatMessage(role=item.role, content=_parts_text(item.content, f"input.{i}.content")))
        elif isinstance(item, FunctionCallItem):
            call = ToolCall(id=item.call_id, function=FunctionCall(name=item.name, arguments=item.arguments))
            calls.add(item.call_id)
            last = out[-1] if out else None
            if last is not None and last.role == "assistant":  # parallel calls, or text then calls: one turn
                last.tool_calls = [*(last.tool_calls or []), call]
            else:
                out.append(ChatMessage(role="assistant", content="", tool_calls=[call]))
        elif isinstance(item, FunctionCallOutputItem):
            if item.call_id not in calls:
                raise bad_request(f"no function_call item with call_id {item.call_id!r} comes before this output "
                                  "(this server is stateless: send the calls too)", param=f"input.{i}.call_id",
                                  code="invalid_value")
            out.append(ChatMessage(role="tool", tool_call_id=item.call_id,
                                   content=_parts_text(item.output, f"input.{i}.output")))
        # any other item type: skipped
    if len(out) == (1 if body.instructions else 0):
        raise bad_request("input has no message or function call item", param="input", code="invalid_value")
    return out


def function_tools(body: ResponseRequest) -> list[Tool]:
    """The ``function`` tools as OpenAI chat tools (other tool types skipped)."""
    tools = []
    for i, tool in enumerate(body.tools or []):
        if tool.type != "function":
            continue
        if tool.name is None or not _TOOL_NAME.match(tool.name):
            raise bad_request(f"function name {tool.name!r}: 1 to 64 letters, digits, '_', '-' or '.'",
                              param=f"tools.{i}.name", code="invalid_value")
        tools.append(Tool(type="function", function=FunctionDefinition(
            name=tool.name, description=tool.description, parameters=tool.parameters, strict=tool.strict)))
    return tools


def _forced(body: ResponseRequest, tools: list[Tool]) -> list[Tool]:
    """The tools one of which must be called: all for ``required``, the named one for a function choice."""
    choice = body.tool_choice
    if choice not in (None, "auto", "none") and not tools:
        raise bad_request("tool_choice needs function tools", param="tool_choice", code="invalid_value")
    if isinstance(choice, FunctionChoice):
        named = [t for t in tools if t.function.name == choice.name]
        if not named:
            raise bad_request(f"tool_choice names '{choice.name}', which is not in tools", param="tool_choice.name",
                              code="invalid_value")
        return named
    return tools if choice == "required" else []


def _format_grammar(body: ResponseRequest) -> str | None:
    fmt = body.text.format if body.text else None
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return JSON_OBJECT_GRAMMAR
    if fmt.schema_ is None:
        raise bad_request("text.format json_schema needs a schema", param="text.format.schema", code="invalid_value")
    return grammar_of_schema(fmt.schema_, "text.format.schema")


def plan(service: GenerationService, body: ResponseRequest) -> Plan:
    """The prompt's messages and tools, and the grammar (CPU work: run off the event loop)."""
    native = service.chat_formatter().accepts_tools
    tools = function_tools(body)
    active = [] if body.tool_choice == "none" else tools
    forced = _forced(body, active)
    fmt = _format_grammar(body)
    if forced and fmt is not None:
        raise bad_request("text.format cannot be combined with a required function call", param="text.format",
                          code="unsupported_parameter")
    grammar, param = fmt, "text.format"
    if forced:
        try:
            grammar, param = call_grammar(forced), "tools"
        except SchemaError as exc:
            raise bad_request(f"function parameters: {exc}", param="tools", code="unsupported_schema") from exc
    return Plan(messages=template_messages(chat_messages(body), active, native),
                template_tools=template_tools(active) if native and active else None,
                tools=active, grammar=grammar, grammar_param=param, forced=bool(forced))


# ---- the answer ----

def _usage(final: FinalEvent) -> ResponseUsage:
    u = final.usage
    return ResponseUsage(input_tokens=u.prompt_tokens, input_tokens_details=InputTokensDetails(
        cached_tokens=u.cached_tokens), output_tokens=u.completion_tokens,
        total_tokens=u.prompt_tokens + u.completion_tokens)


def _envelope(service: GenerationService, body: ResponseRequest, response_id: str, created: int) -> ResponseObject:
    """The Response as it stands before any output: what every answer and lifecycle event is built from."""
    choice = body.tool_choice or "auto"
    fmt = body.text.format if body.text and body.text.format else None
    return ResponseObject(
        id=response_id, created_at=created, status="in_progress", instructions=body.instructions,
        max_output_tokens=body.max_output_tokens, model=service.model_name, output=[],
        parallel_tool_calls=body.parallel_tool_calls, reasoning=body.reasoning, store=False,
        temperature=body.temperature, top_p=body.top_p, user=body.user, metadata=body.metadata or {},
        text={"format": fmt.model_dump(by_alias=True, exclude_none=True) if fmt else {"type": "text"}},
        tool_choice=choice if isinstance(choice, str) else choice.model_dump(),
        tools=[FunctionToolEcho(name=t.function.name, description=t.function.description,
                                parameters=t.function.parameters, strict=t.function.strict)
               for t in function_tools(body)])


def _finished(envelope: ResponseObject, output: list[OutputMessage | FunctionCallOutput], final: FinalEvent,
              cut: bool) -> ResponseObject:
    return envelope.model_copy(update={
        "status": "incomplete" if cut else "completed", "output": output, "usage": _usage(final),
        "incomplete_details": IncompleteDetails(reason="max_output_tokens") if cut else None})


def _calls(prompt: Plan, final: FinalEvent) -> list[FunctionCallOutput]:
    """The answer's function calls, when it is (only) calls of the tools."""
    if not prompt.tools:
        return []
    return [FunctionCallOutput(id=_new_id("fc"), call_id=call.id, name=call.function.name,
                               arguments=call.function.arguments, status="completed")
            for call in parse_calls(final.text, prompt.tools) or []]


async def serve_responses(service: GenerationService, body: ResponseRequest, http_request: Request,
                          options: dict[str, Any]) -> Response:
    """``options``: further arguments of ``service.build`` (the caller's cache scope)."""
    if service.engine.model is None:
        raise unavailable(service.engine.not_ready_reason())
    refuse_state(body)
    prompt = await asyncio.to_thread(plan, service, body)
    tokens = await service.chat_tokens(prompt.messages, prompt.template_tools)
    sampling = SamplingParams(temperature=body.temperature, top_k=0, top_p=body.top_p, min_p=0.0,
                              grammar=prompt.grammar)
    request = await service.build(tokens, max_tokens=body.max_output_tokens, sampling=sampling,
                                  request_id=_new_id("resp"), max_tokens_param="max_output_tokens",
                                  grammar_param=prompt.grammar_param, rendered=True, **options)
    fields = service.log_fields(request, prompt.messages)  # never the metadata
    http_request.state.generation = fields
    envelope = _envelope(service, body, request.request_id, int(time.time()))
    handle = service.submit(request)
    if body.stream:
        return TokenEventSourceResponse(_ResponseStream(service, handle, prompt, envelope).events(fields))
    final = await service.complete(handle, http_request.receive, fields)
    if final is None:
        return Response(status_code=CLIENT_CLOSED)
    output: list[OutputMessage | FunctionCallOutput] = list(_calls(prompt, final))
    cut = not output and final.finish_reason is FinishReason.LENGTH
    if not output:
        output = [OutputMessage(id=_new_id("msg"), status="incomplete" if cut else "completed",
                                content=[OutputText(text=final.text)])]
    return Response(_finished(envelope, output, final, cut).model_dump_json(), media_type="application/json")


# ---- the stream ----

class _ResponseStream:
    """The Responses event stream of one answer: ``response.created``, ``response.in_progress``, then its output
    items (each ``response.output_item.added``, its content or arguments as deltas, ``response.output_item.done``),
    and ``response.completed`` (or ``response.incomplete``) with the whole Response; a failure after the stream
    began ends it with ``error`` and ``response.failed``. Every event has its ``sequence_number``.

    Text streams as it is generated. A forced call streams as a ``function_call`` item whose arguments arrive in
    deltas as the grammar makes the model write them; with ``auto`` an answer that may be a call is held back
    until it is whole, then sent as ``function_call`` items or as text."""

    def __init__(self, service: GenerationService, handle: RequestHandle, prompt: Plan,
                 envelope: ResponseObject) -> None:
        self.service, self.handle, self.prompt, self.envelope = service, handle, prompt, envelope
        self.seq = 0
        self.output: list[OutputMessage | FunctionCallOutput] = []
        self.text = ""  # the open message's text
        self.message: OutputMessage | None = None  # the message item being streamed

    def _sse(self, event: BaseModel) -> ServerSentEvent:
        event.sequence_number = self.seq  # type: ignore[attr-defined]
        self.seq += 1
        return ServerSentEvent(data=event.model_dump_json(), event=event.type)  # type: ignore[attr-defined]

    def _delta(self, text: str) -> bytes:
        """An ``output_text.delta`` event, encoded once here: one per token, the hot path of every stream (the
        same fields as ``TextDelta``)."""
        assert self.message is not None
        self.text += text
        seq, self.seq = self.seq, self.seq + 1
        return (b'event: response.output_text.delta\r\ndata: {"type":"response.output_text.delta","item_id":"'
                + self.message.id.encode() + b'","output_index":' + str(len(self.output) - 1).encode()
                + b',"content_index":0,"delta":' + json.dumps(text, ensure_ascii=False).encode()
                + b',"logprobs":[],"sequence_number":' + str(seq).encode() + b"}\r\n\r\n")

    def _lifecycle(self, kind: str, response: ResponseObject) -> ServerSentEvent:
        return self._sse(ResponseLifecycle(type=kind, response=response))  # type: ignore[arg-type]

    def _open_message(self) -> list[ServerSentEvent]:
        self.message = OutputMessage(id=_new_id("msg"), status="in_progress", content=[])
        self.output.append(self.message)
        self.text = ""
        index = len(self.output) - 1
        return [self._sse(OutputItemEvent(type="response.output_item.added", output_index=index, item=self.message)),
                self._sse(ContentPartEvent(type="response.content_part.added", item_id=self.message.id,
                                           output_index=index, content_index=0, part=OutputText(text="")))]

    def _close_message(self, cut: bool) -> list[ServerSentEvent]:
        if self.message is None:
            return []
        index = len(self.output) - 1
        part = OutputText(text=self.text)
        done = self.message.model_copy(update={"status": "incomplete" if cut else "completed", "content": [part]})
        self.output[index], self.message = done, None
        return [self._sse(TextDone(item_id=done.id, output_index=index, content_index=0, text=self.text)),
                self._sse(ContentPartEvent(type="response.content_part.done", item_id=done.id, output_index=index,
                                           content_index=0, part=part)),
                self._sse(OutputItemEvent(type="response.output_item.done", output_index=index, item=done))]

    def _call_added(self, name: str) -> ServerSentEvent:
        call = FunctionCallOutput(id=_new_id("fc"), call_id=new_call_id(), name=name, arguments="",
                                  status="in_progress")
        self.output.append(call)
        return self._sse(OutputItemEvent(type="response.output_item.added", output_index=len(self.output) - 1,
                                         item=call))

    def _call_delta(self, arguments: str) -> ServerSentEvent:
        call = self.output[-1]
        assert isinstance(call, FunctionCallOutput)
        call.arguments += arguments
        return self._sse(ArgumentsDelta(item_id=call.id, output_index=len(self.output) - 1, delta=arguments))

    def _call_done(self, complete: bool) -> list[ServerSentEvent]:
        index = len(self.output) - 1
        call = self.output[index]
        assert isinstance(call, FunctionCallOutput)
        call.status = "completed" if complete else "incomplete"
        return [self._sse(ArgumentsDone(item_id=call.id, output_index=index, name=call.name,
                                        arguments=call.arguments)),
                self._sse(OutputItemEvent(type="response.output_item.done", output_index=index, item=call))]

    def _end(self, final: FinalEvent, cut: bool) -> ServerSentEvent:
        response = _finished(self.envelope, self.output, final, cut)
        return self._lifecycle("response.incomplete" if cut else "response.completed", response)

    def _failed(self, event: ErrorEvent) -> list[ServerSentEvent]:
        failed = self.envelope.model_copy(update={"status": "failed", "output": self.output,
                                                  "error": ResponseError(code="server_error", message=event.message)})
        return [self._sse(ErrorEventBody(code=event.code, message=event.message)),
                self._lifecycle("response.failed", failed)]

    async def events(self, fields: dict[str, object]) -> AsyncIterator[ServerSentEvent | bytes]:
        yield self._lifecycle("response.created", self.envelope)
        yield self._lifecycle("response.in_progress", self.envelope)
        body = self._forced_call(fields) if self.prompt.forced else self._text(fields)
        async for sse in body:
            yield sse

    async def _text(self, fields: dict[str, object]) -> AsyncIterator[ServerSentEvent | bytes]:
        holder = HeldCall(bool(self.prompt.tools))
        async for event in self.service.stream(self.handle, fields):
            if isinstance(event, TokenEvent):
                if not event.text:
                    continue
                text = holder.push(event.text)
                if not text:
                    continue
                if self.message is None:
                    for sse in self._open_message():
                        yield sse
                yield self._delta(text)
            elif isinstance(event, FinalEvent):
                calls = _calls(self.prompt, event) if holder.held else []
                for call in calls:
                    self.output.append(call.model_copy(update={"arguments": "", "status": "in_progress"}))
                    yield self._sse(OutputItemEvent(type="response.output_item.added",
                                                    output_index=len(self.output) - 1, item=self.output[-1]))
                    yield self._call_delta(call.arguments)
                    for sse in self._call_done(True):
                        yield sse
                cut = not calls and event.finish_reason is FinishReason.LENGTH
                if not calls:
                    if self.message is None:  # an answer has at least one item
                        for sse in self._open_message():
                            yield sse
                    if holder.held:
                        yield self._delta(holder.held)
                    for sse in self._close_message(cut):
                        yield sse
                yield self._end(event, cut)
            else:
                for sse in self._failed(event):
                    yield sse

    async def _forced_call(self, fields: dict[str, object]) -> AsyncIterator[ServerSentEvent | bytes]:
        scanner = ArgumentsScanner()
        async for event in self.service.stream(self.handle, fields):
            if isinstance(event, TokenEvent):
                known = scanner.name is not None
                arguments = scanner.push(event.text)
                if scanner.name is not None and not known:
                    yield self._call_added(scanner.name)
                if arguments:
                    yield self._call_delta(arguments)
            elif isinstance(event, FinalEvent):
                if scanner.name is None:  # cut before the call began: what there is, as text
                    for sse in self._open_message():
                        yield sse
                    if scanner.text:
                        yield self._delta(scanner.text)
                    for sse in self._close_message(True):
                        yield sse
                    yield self._end(event, True)
                    continue
                for sse in self._call_done(scanner.done):
                    yield sse
                yield self._end(event, not scanner.done)
            else:
                for sse in self._failed(event):
                    yield sse
