"""Serving the OpenAI routes: requests into engine requests (grammar, tools, logprobs, ``n`` choices), and engine
events into OpenAI's answers and streams.

``n`` > 1 runs the choices in ``n`` slots, decoded together in the same batches; the prompt is computed once and
copied (see :class:`_Choices`). With a ``seed``, choice ``i`` samples with ``seed + i``, so the choices differ
and stay repeatable.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import Request, Response
from pydantic import BaseModel
from sse_starlette import ServerSentEvent

from server.engine.llama import LlamaModel
from server.engine.sampling import SamplingParams
from server.engine.scheduling import COPY_MIN_TOKENS
from server.engine.types import Event, FinalEvent, FinishReason, GenerationRequest, RequestHandle, TokenEvent
from server.errors import APIError, ErrorDetail, ErrorResponse, bad_request, unavailable
from server.fim import FimText, fim_prompt
from server.grammar import SchemaError
from server.openai_protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    ChoiceLogprobs,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    FunctionCallDelta,
    PromptTokensDetails,
    SamplingFields,
    TokenLogprobInfo,
    ToolCall,
    ToolCallDelta,
    TopLogprob,
    Usage,
)
from server.serving import GenerationService
from server.sse import TokenEventSourceResponse
from server.tools import (
    call_grammar,
    looks_like_call,
    new_call_id,
    parse_calls,
    template_messages,
    template_tools,
)

CLIENT_CLOSED = 499  # the client went away; only logged


def _finish(final: FinalEvent) -> str:
    return "length" if final.finish_reason is FinishReason.LENGTH else "stop"


def _usage(finals: list[FinalEvent]) -> Usage:
    prompt = finals[0].usage.prompt_tokens
    completion = sum(f.usage.completion_tokens for f in finals)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=finals[0].usage.cached_tokens))


# The most log-probability entries (tokens times alternatives plus one, over all choices) one non-streamed answer
# may hold: n=16 choices of 2000 tokens with 20 alternatives each would be 1.4 GB of objects.
MAX_ANSWER_LOGPROBS = 2**17


def check_answer_size(service: GenerationService, body: SamplingFields, max_tokens: int | None) -> None:
    """``n`` no larger than the slots (one request may not take every slot and queue place beyond them), and a
    non-streamed answer's log-probabilities bounded, before anything is tokenized."""
    if body.n > service.settings.parallel:
        raise bad_request(f"n is {body.n}, but this server decodes at most {service.settings.parallel} sequences at "
                          "once (PARALLEL)", param="n", code="invalid_value")
    top = body.logprobs_wanted()
    if top is None or body.stream:
        return
    tokens = max_tokens or service.settings.default_max_tokens
    entries = body.n * tokens * (top + 1)
    if entries > MAX_ANSWER_LOGPROBS:
        raise bad_request(f"n ({body.n}) x max_tokens ({tokens}) x (top logprobs ({top}) + 1) is {entries} "
                          f"log-probabilities; at most {MAX_ANSWER_LOGPROBS} fit one answer: lower one, or stream",
                          param="n", code="invalid_value")


async def json_answer(build: Callable[[], BaseModel]) -> Response:
    """A whole answer built and encoded off the event loop (a long one with log-probabilities takes a while)."""
    return Response(await asyncio.to_thread(lambda: build().model_dump_json()), media_type="application/json")


def _model(service: GenerationService) -> LlamaModel:
    model = service.engine.model
    if model is None:
        raise unavailable(service.engine.not_ready_reason())
    return model


class Logprobs:
    """Token log-probabilities in OpenAI's two shapes (chat's list of objects, completions' parallel lists)."""

    def __init__(self, model: LlamaModel) -> None:
        self._model = model

    def _token(self, token: int) -> tuple[str, list[int]]:
        data = self._model.token_to_piece(token)
        return data.decode("utf-8", "replace"), list(data)

    def chat(self, events: list[TokenEvent]) -> list[TokenLogprobInfo]:
        out = []
        for event in events:
            if event.logprob is None:
                continue
            text, raw = self._token(event.token)
            top = [TopLogprob(token=t, logprob=lp, bytes=b)
                   for t, b, lp in ((*self._token(tok), lp) for tok, lp in event.logprob.top)]
            out.append(TokenLogprobInfo(token=text, logprob=event.logprob.logprob, bytes=raw, top_logprobs=top))
        return out

    def completion(self, events: list[TokenEvent], offset: int = 0) -> CompletionLogprobs:
        out = CompletionLogprobs()
        for event in events:
            if event.logprob is None:
                continue
            text, _ = self._token(event.token)
            out.tokens.append(text)
            out.token_logprobs.append(event.logprob.logprob)
            out.top_logprobs.append({self._token(tok)[0]: lp for tok, lp in event.logprob.top})
            out.text_offset.append(offset)
            offset += len(text)
        return out


class _Choices:
    """The ``n`` engine requests of one OpenAI request.

    With a prompt long enough for the engine to copy its cells from another slot (``COPY_MIN_TOKENS``), choice 0
    goes first and the others when its prompt is computed (its first event): the engine then starts them from a
    copy of choice 0's cells instead of computing the prompt ``n`` times.
    """

    def __init__(self, service: GenerationService, requests: list[GenerationRequest]) -> None:
        self.service = service
        self.requests = requests
        self.handles: list[RequestHandle] = []
        self.first_ready = asyncio.Event()
        first = requests[0]
        self.staggered = len(requests) > 1 and first.cache_prompt and len(first.prompt_tokens) >= COPY_MIN_TOKENS
        self._submit(requests[:1] if self.staggered else requests)

    def submit_rest(self) -> list[RequestHandle]:
        """Submit the choices after the first (staggered only); returns their handles."""
        if not self.staggered or len(self.handles) > 1:
            return []
        return self._submit(self.requests[1:])

    def _submit(self, requests: list[GenerationRequest]) -> list[RequestHandle]:
        start = len(self.handles)
        try:
            for request in requests:
                self.handles.append(self.service.submit(request))
        except Exception:
            self.cancel()
            raise
        return self.handles[start:]

    def cancel(self) -> None:
        for handle in self.handles:
            handle.cancel()


async def _submit(service: GenerationService, body: SamplingFields, prompt: str | list[int], max_tokens: int | None,
                  sampling: SamplingParams, prefix: str, http_request: Request, logged_prompt: object,
                  grammar_param: str, options: dict[str, Any]) -> tuple[_Choices, dict[str, object]]:
    request_id = service.new_id(prefix)
    first = await service.build(prompt, max_tokens=max_tokens, sampling=sampling, stop=body.stop_strings(),
                                request_id=request_id, max_tokens_param="max_tokens", grammar_param=grammar_param,
                                speculative=body.speculative, ignore_eos=body.ignore_eos,
                                **options)
    requests = [first] + [
        dataclasses.replace(first, sampling=dataclasses.replace(
            sampling, seed=None if sampling.seed is None else (sampling.seed + i) % (2**32 - 1)))
        for i in range(1, body.n)]
    fields = service.log_fields(first, logged_prompt)
    if body.n > 1:
        fields["n"] = body.n
    http_request.state.generation = fields
    return _Choices(service, requests), fields


async def _collect(service: GenerationService, choices: _Choices, http_request: Request,
                   fields: dict[str, object]) -> list[tuple[FinalEvent, list[TokenEvent]]] | None:
    """Every choice's final event and token events; None if the client went away (all choices cancelled)."""
    tokens: list[list[TokenEvent]] = [[] for _ in choices.requests]

    def wait(i: int, handle: RequestHandle) -> asyncio.Future[FinalEvent | None]:
        keep = handle.request.sampling.logprobs is not None

        def on_token(event: TokenEvent) -> None:
            if i == 0:
                choices.first_ready.set()
            if keep:
                tokens[i].append(event)

        return asyncio.ensure_future(service.complete(handle, http_request.receive, fields,
                                                      on_token=on_token))

    waits = [wait(i, h) for i, h in enumerate(choices.handles)]
    try:
        if choices.staggered:
            ready = asyncio.ensure_future(choices.first_ready.wait())
            await asyncio.wait({waits[0], ready}, return_when=asyncio.FIRST_COMPLETED)
            ready.cancel()
            if not waits[0].done() or waits[0].result() is not None:
                waits += [wait(i, h) for i, h in enumerate(choices.submit_rest(), start=1)]
        finals = await asyncio.gather(*waits)
    except BaseException:
        choices.cancel()
        for w in waits:
            w.cancel()
        raise
    if len(finals) < len(choices.requests) or any(f is None for f in finals):
        choices.cancel()
        return None
    return [(f, t) for f, t in zip(finals, tokens, strict=True) if f is not None]


def _error_event(event: Any) -> ServerSentEvent:
    error = ErrorResponse(error=ErrorDetail(message=event.message, code=event.code, type=event.type))
    return ServerSentEvent(data=error.model_dump_json())


# ---- /v1/completions ----

async def serve_completion(service: GenerationService, body: CompletionRequest, prompt: str | list[int],
                           http_request: Request, options: dict[str, Any]) -> Completion | Response:
    """``options``: further arguments of ``service.build`` (the route's cache scope). With a ``suffix`` the prompt
    is the text before the gap, and the two become a fill-in-the-middle prompt (``server/fim.py``)."""
    model = _model(service)
    check_answer_size(service, body, body.max_tokens)
    logged: object = body.prompt
    if body.suffix and isinstance(prompt, str):
        prompt = await fim_prompt(service, FimText(prefix=prompt, suffix=body.suffix))
        logged, options = {"prompt": body.prompt, "suffix": body.suffix}, {**options, "rendered": True}
    sampling = await asyncio.to_thread(lambda: body.to_sampling(model.n_vocab, body.grammar()))
    choices, fields = await _submit(service, body, prompt, body.max_tokens, sampling, "cmpl", http_request,
                                    logged, "response_format", options)
    created = int(time.time())
    logprobs = Logprobs(model) if body.logprobs is not None else None
    request_id = choices.requests[0].request_id
    if body.stream:
        return _streamed(service, choices, body, Completion, created, lambda i, handle, ready, finals:
                         _completion_stream(service, handle, i, created, fields, logprobs, finals, ready))
    results = await _collect(service, choices, http_request, fields)
    if results is None:
        return Response(status_code=CLIENT_CLOSED)
    def answer() -> Completion:
        answers = [CompletionChoice(index=i, text=final.text, finish_reason=_finish(final),  # type: ignore[arg-type]
                                    logprobs=logprobs.completion(tokens) if logprobs else None)
                   for i, (final, tokens) in enumerate(results)]
        return Completion(id=request_id, created=created, model=service.model_name, choices=answers,
                          usage=_usage([final for final, _ in results]))

    return await json_answer(answer)


async def _completion_stream(service: GenerationService, handle: RequestHandle, index: int, created: int,
                             fields: dict[str, object], logprobs: Logprobs | None, finals: list[FinalEvent],
                             ready: asyncio.Event | None = None) -> AsyncIterator[ServerSentEvent]:
    """One choice's chunks; its final event goes to ``finals``, and ``ready`` is set at its first event."""
    request_id = handle.request.request_id
    offset = 0
    pending: list[TokenEvent] = []

    def chunk(text: str, finish: str | None) -> str:
        nonlocal offset
        lp = None
        if logprobs is not None and (text or finish):
            lp = logprobs.completion(pending, offset)
            pending.clear()
            offset += len(text)
        choice = CompletionChoice(index=index, text=text, finish_reason=finish, logprobs=lp)  # type: ignore[arg-type]
        return Completion(id=request_id, created=created, model=service.model_name, choices=[choice]
                          ).model_dump_json()

    async for event in service.stream(handle, fields):
        if ready is not None:
            ready.set()
        if isinstance(event, TokenEvent):
            if event.logprob is not None:
                pending.append(event)
            if event.text:
                yield ServerSentEvent(data=chunk(event.text, None))
        elif isinstance(event, FinalEvent):
            finals.append(event)
            yield ServerSentEvent(data=chunk("", _finish(event)))
        else:
            yield _error_event(event)


_ChoiceStream = Callable[[int, RequestHandle, asyncio.Event | None, list[FinalEvent]], AsyncIterator[ServerSentEvent]]


def _streamed(service: GenerationService, choices: _Choices, body: SamplingFields,
              chunk_type: type[Completion] | type[ChatCompletionChunk], created: int,
              choice_stream: _ChoiceStream) -> TokenEventSourceResponse:
    """The SSE response of a streamed request: each choice's chunks from ``choice_stream(i, handle, ready,
    finals)`` (``ready`` is set at choice 0's first event), then a usage chunk of ``chunk_type`` when asked."""
    finals: list[FinalEvent] = []
    request_id = choices.requests[0].request_id

    def usage_chunk() -> str:
        return chunk_type(id=request_id, created=created, model=service.model_name, choices=[],
                          usage=_usage(finals)).model_dump_json()

    def stream(i: int, handle: RequestHandle) -> AsyncIterator[ServerSentEvent]:
        return choice_stream(i, handle, choices.first_ready if i == 0 else None, finals)

    return TokenEventSourceResponse(_merged(choices, stream, finals, usage_chunk if body.include_usage else None))


async def _merged(choices: _Choices, stream: Callable[[int, RequestHandle], AsyncIterator[ServerSentEvent]],
                  finals: list[FinalEvent], usage_chunk: Callable[[], str] | None) -> AsyncIterator[ServerSentEvent]:
    """The choices' chunks as they come (``stream(i, handle)`` makes choice i's), then usage (when asked and
    every choice finished) and ``[DONE]``. Leaving early (the client went away) cancels every choice."""
    queue: asyncio.Queue[ServerSentEvent | None] = asyncio.Queue()
    tasks: list[asyncio.Task[None]] = []

    async def pump(i: int, events: AsyncIterator[ServerSentEvent]) -> None:
        try:
            async for sse in events:
                await queue.put(sse)
        finally:
            if i == 0:
                choices.first_ready.set()  # however choice 0 ended, the others are not waited for in vain
            queue.put_nowait(None)

    async def start_rest() -> None:
        await choices.first_ready.wait()
        try:
            handles = choices.submit_rest()
        except APIError as exc:
            await queue.put(ServerSentEvent(data=ErrorResponse(error=exc.detail).model_dump_json()))
            for _ in choices.requests[1:]:
                queue.put_nowait(None)  # these choices never run
            handles = []
        for i, handle in enumerate(handles, start=1):
            tasks.append(asyncio.create_task(pump(i, stream(i, handle))))
        queue.put_nowait(None)

    tasks += [asyncio.create_task(pump(i, stream(i, h))) for i, h in enumerate(choices.handles)]
    running = len(tasks)
    if choices.staggered:
        tasks.append(asyncio.create_task(start_rest()))
        running += len(choices.requests)  # the other choices' streams, and start_rest itself, minus choice 0's
    try:
        while running:
            sse = await queue.get()
            if sse is None:
                running -= 1
            else:
                yield sse
    finally:
        for task in tasks:
            task.cancel()
        choices.cancel()
    if usage_chunk is not None and len(finals) == len(choices.requests):
        yield ServerSentEvent(data=usage_chunk())
    yield ServerSentEvent(data="[DONE]")


# ---- /v1/chat/completions ----

@dataclasses.dataclass
class _ChatPlan:
    messages: list[dict[str, Any]]
    template_tools: list[dict[str, Any]] | None
    grammar: str | None
    grammar_param: str
    parse_tools: bool  # the answer may be a tool call
    forced: bool  # the answer must be a tool call


def _plan(service: GenerationService, body: ChatCompletionRequest) -> _ChatPlan:
    native = service.chat_formatter().accepts_tools
    tools = body.active_tools()
    forced = body.forced_tools()
    if forced:
        try:
            grammar, param = call_grammar(forced), "tools"
        except SchemaError as exc:
            raise bad_request(f"function parameters: {exc}", param="tools", code="unsupported_schema") from exc
    else:
        grammar, param = body.grammar(), "response_format"
    return _ChatPlan(
        messages=template_messages(body.messages, tools, native),
        template_tools=template_tools(tools) if native and tools else None,
        grammar=grammar, grammar_param=param, parse_tools=bool(tools), forced=bool(forced))


def _tool_answer(plan: _ChatPlan, body: ChatCompletionRequest, final: FinalEvent
                 ) -> tuple[str | None, list[ToolCall] | None, str]:
    """(content, tool_calls, finish_reason) of a finished answer."""
    if plan.parse_tools and final.finish_reason is not FinishReason.LENGTH:
        calls = parse_calls(final.text, body.active_tools())
        if calls:
            return None, calls, "tool_calls"
    return final.text, None, _finish(final)


async def serve_chat(service: GenerationService, body: ChatCompletionRequest, http_request: Request,
                     options: dict[str, Any]) -> ChatCompletion | Response:
    model = _model(service)
    check_answer_size(service, body, body.limit())
    plan = await asyncio.to_thread(_plan, service, body)
    tokens = await service.chat_tokens(plan.messages, plan.template_tools)
    sampling = await asyncio.to_thread(body.to_sampling, model.n_vocab, plan.grammar)
    choices, fields = await _submit(service, body, tokens, body.limit(), sampling, "chatcmpl", http_request,
                                    plan.messages, plan.grammar_param, {**options, "rendered": True})
    created = int(time.time())
    logprobs = Logprobs(model) if body.logprobs else None
    request_id = choices.requests[0].request_id
    if body.stream:
        return _streamed(service, choices, body, ChatCompletionChunk, created, lambda i, handle, ready, finals:
                         _ChatStream(service, handle, i, body, plan, created, logprobs, ready).events(fields, finals))
    results = await _collect(service, choices, http_request, fields)
    if results is None:
        return Response(status_code=CLIENT_CLOSED)
    def answer() -> ChatCompletion:
        answers = []
        for i, (final, events) in enumerate(results):
            content, calls, finish = _tool_answer(plan, body, final)
            answers.append(ChatChoice(
                index=i, message=AssistantMessage(content=content, tool_calls=calls), finish_reason=finish,  # type: ignore[arg-type]
                logprobs=ChoiceLogprobs(content=logprobs.chat(events)) if logprobs else None))
        return ChatCompletion(id=request_id, created=created, model=service.model_name, choices=answers,
                              usage=_usage([final for final, _ in results]))

    return await json_answer(answer)


_CALL_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"([^"]*)"\s*,\s*"arguments"\s*:\s*')
# The head is looked for again as each token arrives: past this many characters without one, it never comes
# (the grammar bounds its blanks and names), and the search stops instead of growing with the answer.
CALL_HEAD_LIMIT = 1024


class ArgumentsScanner:
    """Follows a required call as the grammar makes the model write it, ``{"name": "f", "arguments": {...}}``,
    and hands out its name once known and the arguments' text as it arrives, as OpenAI streams a call."""

    def __init__(self) -> None:
        self.text = ""
        self.name: str | None = None
        self.done = False  # the arguments object is closed
        self._pos = 0
        self._depth = 0
        self._in_string = self._escape = False

    def push(self, text: str) -> str:
        """Add generated text; returns the arguments' text it completes (empty before the name is known)."""
        self.text += text
        if self.name is None:
            if len(self.text) > CALL_HEAD_LIMIT:
                return ""
            head = _CALL_HEAD.match(self.text)
            if head is None:
                return ""
            self.name, self._pos = head.group(1), head.end()
        start = self._pos
        while self._pos < len(self.text) and not self.done:
            c = self.text[self._pos]
            self._pos += 1
            if self._in_string:
                self._escape, self._in_string = (False, True) if self._escape else (c == "\\", c != '"')
            elif c == '"':
                self._in_string = True
            elif c in "{[":
                self._depth += 1
            elif c in "}]":
                self._depth -= 1
                self.done = self._depth == 0
        return self.text[start:self._pos]


class _ChatStream:
    """One choice of OpenAI's chat stream: a role chunk; content chunks, or a tool call as OpenAI streams one (a
    chunk with its id and name, then its arguments in pieces); a finish chunk. A required call streams as it is
    generated; with ``auto`` an answer that may be a call is held back until it is whole."""

    def __init__(self, service: GenerationService, handle: RequestHandle, index: int, body: ChatCompletionRequest,
                 plan: _ChatPlan, created: int, logprobs: Logprobs | None, ready: asyncio.Event | None = None
                 ) -> None:
        self.service, self.handle, self.index, self.body, self.plan = service, handle, index, body, plan
        self.created, self.logprobs, self.ready = created, logprobs, ready
        self.pending: list[TokenEvent] = []

    def _chunk(self, delta: ChatDelta, finish: str | None = None, with_logprobs: bool = True) -> ServerSentEvent:
        lp = None
        if self.logprobs is not None and with_logprobs and self.pending:
            lp = ChoiceLogprobs(content=self.logprobs.chat(self.pending))
            self.pending = []
        choice = ChatChunkChoice(index=self.index, delta=delta, finish_reason=finish, logprobs=lp)  # type: ignore[arg-type]
        chunk = ChatCompletionChunk(id=self.handle.request.request_id, created=self.created,
                                    model=self.service.model_name, choices=[choice])
        if delta.tool_calls:
            return ServerSentEvent(data=chunk.model_dump_json(exclude_none=True))
        return ServerSentEvent(data=chunk.model_dump_json())

    def _calls(self, calls: list[ToolCall]) -> list[ServerSentEvent]:
        out = []
        for i, call in enumerate(calls):
            out.append(self._chunk(ChatDelta(tool_calls=[ToolCallDelta(
                index=i, id=call.id, type="function", function=FunctionCallDelta(name=call.function.name,
                                                                                 arguments=""))]), with_logprobs=False))
            out.append(self._chunk(ChatDelta(tool_calls=[ToolCallDelta(
                index=i, function=FunctionCallDelta(arguments=call.function.arguments))]), with_logprobs=False))
        return out

    async def events(self, fields: dict[str, object], finals: list[FinalEvent]) -> AsyncIterator[ServerSentEvent]:
        """The choice's chunks; its final event goes to ``finals``."""
        yield self._chunk(ChatDelta(role="assistant", content=""))
        if self.plan.forced:
            async for sse in self._forced_call(fields, finals):
                yield sse
            return
        holding: bool | None = None if self.plan.parse_tools else False
        held = ""
        async for event in self._events(fields):
            if isinstance(event, TokenEvent):
                if holding is not False:
                    held += event.text
                    if holding is None:
                        holding = looks_like_call(held)
                    if holding is not False:
                        continue
                    event = TokenEvent(token=event.token, text=held)
                    held = ""
                yield self._chunk(ChatDelta(content=event.text))
            elif isinstance(event, FinalEvent):
                finals.append(event)
                content, calls, finish = _tool_answer(self.plan, self.body, event)
                if calls:
                    for sse in self._calls(calls):
                        yield sse
                elif held:
                    yield self._chunk(ChatDelta(content=held))
                yield self._chunk(ChatDelta(), finish)
            else:
                yield _error_event(event)

    async def _events(self, fields: dict[str, object]) -> AsyncIterator[Event]:
        """The choice's events: ``ready`` set at the first, tokens with logprobs kept in ``pending`` for the next
        chunk, tokens without text (a character still incomplete) not passed on."""
        async for event in self.service.stream(self.handle, fields):
            if self.ready is not None:
                self.ready.set()
            if isinstance(event, TokenEvent):
                if event.logprob is not None:
                    self.pending.append(event)
                if not event.text:
                    continue
            yield event

    async def _forced_call(self, fields: dict[str, object], finals: list[FinalEvent]
                           ) -> AsyncIterator[ServerSentEvent]:
        scanner = ArgumentsScanner()
        call_id = new_call_id()

        def piece(arguments: str, first: bool = False) -> ServerSentEvent:
            delta = ToolCallDelta(index=0, function=FunctionCallDelta(arguments=arguments))
            if first:
                delta = ToolCallDelta(index=0, id=call_id, type="function",
                                      function=FunctionCallDelta(name=scanner.name, arguments=arguments))
            return self._chunk(ChatDelta(tool_calls=[delta]))

        async for event in self._events(fields):
            if isinstance(event, TokenEvent):
                known = scanner.name is not None
                arguments = scanner.push(event.text)
                if scanner.name is not None and not known:
                    yield piece(arguments, first=True)
                elif arguments:
                    yield piece(arguments)
            elif isinstance(event, FinalEvent):
                finals.append(event)
                if scanner.name is None:  # cut before the call began: what there is, as text
                    if scanner.text:
                        yield self._chunk(ChatDelta(content=scanner.text))
                    yield self._chunk(ChatDelta(), _finish(event))
                else:
                    yield self._chunk(ChatDelta(), "tool_calls" if scanner.done else _finish(event))
            else:
                yield _error_event(event)

