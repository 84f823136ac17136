"""Ollama's native API translated onto the serving core: ``/api/chat`` renders its messages as OpenAI's chat route
does (``server/tools.py``, ``GenerationService.chat_tokens``), ``/api/generate`` a prompt through the same chat
template (or as it is with ``raw``), both admitted by ``GenerationService.build``; the engine's events become
Ollama's objects, streamed as newline-delimited JSON. Nothing here limits, authenticates or caches.

- ``options.num_ctx`` larger than a slot's context is refused (Ollama would cut the prompt; this server never
  does); smaller or equal is served with the slot's context. ``num_predict`` is ``max_tokens``.
- ``format``: ``"json"`` is the JSON-object grammar, a schema its grammar (``server/grammar.py``), as OpenAI's
  ``response_format``.
- ``tools`` are OpenAI function tools; an answer that is a call (``server/tools.py``'s rule) comes back as
  ``message.tool_calls`` with the arguments as an object. Ollama has no ``tool_choice``: a client forces a call
  with a ``format`` schema of the call's shape (``{"name": ..., "arguments": {...}}``).
- Durations are nanoseconds: ``load_duration`` is the wait for a slot (the model is always loaded),
  ``prompt_eval_duration`` the prompt's computation up to the first token, ``eval_duration`` the rest.
- ``suffix``: the prompt is the text before the gap and the suffix the text after it, built into a
  fill-in-the-middle prompt from the model's FIM tokens (``server/fim.py``, as ``/infill`` and OpenAI's
  ``suffix``), neither chat template nor ``system`` (as Ollama's FIM templates use neither); a 400 on a model
  without those tokens.
- ``images`` are refused (no vision).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fastapi import Request, Response
from fastapi.responses import StreamingResponse

from server.api.ollama.protocol import (
    DEFAULT_REPEAT_LAST_N,
    DEFAULT_REPEAT_PENALTY,
    DEFAULT_TEMPERATURE,
    DEFAULT_TOP_K,
    DEFAULT_TOP_P,
    AnswerMessage,
    ChatRequest,
    ChatResponse,
    ModelDetails,
    ModelEntry,
    OllamaGenerateRequest,
    OllamaGenerateResponse,
    OllamaToolCall,
    Options,
    RunningModel,
    ShowResponse,
    ToolCallFunction,
    _Generation,
)
from server.engine.llama import LlamaModel, ModelInfo
from server.engine.sampling import SamplingParams
from server.engine.types import ErrorEvent, FinalEvent, FinishReason, GenerationRequest, RequestHandle, TokenEvent
from server.errors import APIError, bad_request, unavailable
from server.fim import FimText, fim_prompt
from server.grammar import JSON_OBJECT_GRAMMAR
from server.openai_protocol import ChatMessage, FunctionCall, Tool, grammar_of_schema
from server.openai_protocol import ToolCall as OpenAIToolCall
from server.serving import GenerationService
from server.tools import HeldCall, new_call_id, parse_calls, template_messages, template_tools

CLIENT_CLOSED = 499  # the client went away; only logged
NDJSON = "application/x-ndjson"
NO_VISION = "this server has no vision: images are not supported (send text)"
TAG = ":latest"
# Far ahead: a model here stays loaded while the server runs (Ollama writes its keep_alive deadline).
NEVER_EXPIRES = "2318-11-18T00:00:00Z"


def rfc3339(when: datetime | None = None) -> str:
    return (when or datetime.now(UTC)).isoformat().replace("+00:00", "Z")


def _ns(ms: float) -> int:
    return max(0, round(ms * 1_000_000))


# ---- the model, as Ollama describes one ----

def _model(service: GenerationService) -> tuple[LlamaModel, ModelInfo]:
    model, info = service.engine.model, service.engine.info
    if model is None or info is None:
        raise unavailable(service.engine.not_ready_reason())
    return model, info


def served_tag(service: GenerationService) -> str:
    return service.model_name + TAG


def known_model(name: str, service: GenerationService) -> bool:
    """Any name while one model is served (as on the OpenAI routes); with STRICT_MODEL_NAME the served names,
    bare or tagged ``:latest``."""
    served = (service.model_name, *service.settings.served_model_name)
    return not service.settings.strict_model_name or name.removesuffix(TAG) in served


def check_model(name: str, service: GenerationService) -> None:
    if not known_model(name, service):
        raise APIError(404, f"model '{name}' not found", type="not_found_error", param="model",
                       code="model_not_found")


def parameter_size(n: int) -> str:
    """Ollama's spelling of a parameter count (its format.HumanNumber): 134515008 is "134.52M", 6.74e9 "6.7B"."""
    for unit, scale, decimals in (("B", 10**9, 1), ("M", 10**6, 2), ("K", 10**3, 2)):
        if n >= scale:
            value = n / scale
            return f"{value:.0f}{unit}" if value == int(value) else f"{value:.{decimals}f}{unit}"
    return str(n)


def quantization(model: LlamaModel) -> str:
    import gguf

    try:
        return gguf.LlamaFileType(int(model.meta("general.file_type") or -1)).name.removeprefix("MOSTLY_")
    except ValueError:
        return "unknown"


def details(model: LlamaModel, info: ModelInfo) -> ModelDetails:
    return ModelDetails(family=info.architecture, families=[info.architecture],
                        parameter_size=parameter_size(info.n_params), quantization_level=quantization(model))


def model_entry(service: GenerationService) -> ModelEntry:
    """The served model as ``/api/tags`` lists it. The digest is a sha256 of the file's name, size and
    modification time: stable while the file is, and one ``stat`` instead of hashing gigabytes."""
    model, info = _model(service)
    path = Path(info.path)
    try:
        stat = path.stat()
        size, mtime_ns = stat.st_size, stat.st_mtime_ns
    except OSError:  # replaced or removed since it was loaded; the loaded copy still serves
        size, mtime_ns = 0, 0
    digest = hashlib.sha256(f"{path.name}\0{size}\0{mtime_ns}".encode()).hexdigest()
    return ModelEntry(name=served_tag(service), model=served_tag(service),
                      modified_at=rfc3339(datetime.fromtimestamp(mtime_ns / 1e9, UTC)), size=size, digest=digest,
                      details=details(model, info))


def running_model(service: GenerationService) -> RunningModel:
    return RunningModel(**model_entry(service).model_dump(), expires_at=NEVER_EXPIRES,
                        context_length=service.engine.slot_ctx)


def _typed(value: str) -> Any:
    """A metadata value with its JSON type back (llama.cpp hands every value over as text)."""
    if value in ("true", "false"):
        return value == "true"
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def show(service: GenerationService) -> ShowResponse:
    """``/api/show``: the GGUF's metadata (``model_info``), the chat template, the parameters a request starts
    from, and what the model can do here."""
    model, info = _model(service)
    meta = {key: _typed(value) for key, value in model.metadata().items() if key != "tokenizer.chat_template"}
    meta.setdefault("general.parameter_count", info.n_params)
    meta.setdefault(f"{info.architecture}.context_length", info.n_ctx_train)
    capabilities = ["completion", "tools"]  # tools: the template's own format, or the generic one (server/tools.py)
    if not model.missing_fim_tokens():
        capabilities.append("insert")
    s = service.settings
    if s.embedding_pooling is not None and s.embedding_model_path is None:  # the chat model embeds (/api/embed)
        capabilities.append("embedding")
    parameters = {"num_ctx": service.engine.slot_ctx, "num_predict": s.default_max_tokens,
                  "temperature": DEFAULT_TEMPERATURE, "top_k": DEFAULT_TOP_K, "top_p": DEFAULT_TOP_P,
                  "repeat_penalty": DEFAULT_REPEAT_PENALTY, "repeat_last_n": DEFAULT_REPEAT_LAST_N}
    entry = model_entry(service)
    return ShowResponse(
        modelfile=f"# served by llama-inference\nFROM {Path(info.path).name}\n",
        parameters="\n".join(f"{key:<30} {value}" for key, value in parameters.items()),
        template=info.chat_template or "", details=entry.details, model_info=meta, capabilities=capabilities,
        modified_at=entry.modified_at)


# ---- requests ----

def _options(body: _Generation, service: GenerationService) -> Options:
    options = body.options or Options()
    if options.num_ctx is not None and options.num_ctx > service.engine.slot_ctx:
        raise bad_request(
            f"options.num_ctx is {options.num_ctx}, but this server's slot context is {service.engine.slot_ctx} "
            "tokens (CTX_SIZE / PARALLEL); prompts are never truncated to fit: lower num_ctx to at most "
            f"{service.engine.slot_ctx}", param="options.num_ctx", code="context_length_exceeded")
    return options


def _grammar(body: _Generation) -> str | None:
    if body.format == "json":
        return JSON_OBJECT_GRAMMAR
    if isinstance(body.format, dict):
        return grammar_of_schema(body.format, "format")
    return None


def _sampling(options: Options, grammar: str | None) -> SamplingParams:
    o = options
    return SamplingParams(
        temperature=DEFAULT_TEMPERATURE if o.temperature is None else o.temperature,
        top_k=DEFAULT_TOP_K if o.top_k is None else o.top_k, top_p=DEFAULT_TOP_P if o.top_p is None else o.top_p,
        min_p=o.min_p or 0.0, repeat_penalty=DEFAULT_REPEAT_PENALTY if o.repeat_penalty is None else o.repeat_penalty,
        penalty_last_n=DEFAULT_REPEAT_LAST_N if o.repeat_last_n is None else o.repeat_last_n,
        presence_penalty=o.presence_penalty or 0.0, frequency_penalty=o.frequency_penalty or 0.0,
        seed=None if o.seed is None or o.seed < 0 else o.seed, grammar=grammar)


def chat_messages(body: ChatRequest) -> list[ChatMessage]:
    """The conversation as OpenAI chat messages (what ``server/tools.py`` renders): a tool result without
    ``tool_name`` answers the earliest call of the assistant's last message not yet answered."""
    out: list[ChatMessage] = []
    pending: list[str] = []
    for i, m in enumerate(body.messages):
        if m.images:
            raise bad_request(NO_VISION, param=f"messages.{i}.images", code="unsupported_content")
        calls = [OpenAIToolCall(id=c.id or new_call_id(), function=FunctionCall(
            name=c.function.name, arguments=json.dumps(c.function.arguments, ensure_ascii=False)))
            for c in m.tool_calls or []]
        if calls:
            pending = [c.function.name for c in calls]
        name = m.tool_name
        if m.role == "tool" and name is None and pending:
            name = pending.pop(0)
        out.append(ChatMessage(role=m.role, content=m.content, tool_calls=calls or None,
                               name=name if m.role == "tool" else None))
    return out


@dataclasses.dataclass
class Plan:
    tokens: list[int]
    tools: list[Tool]  # the tools an answer may call
    logged: object  # the prompt as the log shows it (LOG_PROMPTS)
    rendered: bool = True  # the server's own rendering (a template's or FIM's control tokens), not a client's text


async def _chat_plan(service: GenerationService, body: ChatRequest) -> Plan:
    tools = list(body.tools or [])

    def prepare() -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:  # off the loop, as chat's _plan
        native = service.chat_formatter().accepts_tools
        return template_messages(chat_messages(body), tools, native), (
            template_tools(tools) if native and tools else None)

    messages, rendered_tools = await asyncio.to_thread(prepare)
    tokens = await service.chat_tokens(messages, rendered_tools)
    return Plan(tokens=tokens, tools=tools, logged=messages)


async def _generate_plan(service: GenerationService, body: OllamaGenerateRequest) -> Plan:
    if body.images:
        raise bad_request(NO_VISION, param="images", code="unsupported_content")
    if body.template:
        raise bad_request("template is not supported: this server renders the model's own chat template (or "
                          "none, with raw)", param="template", code="unsupported_parameter")
    if body.context:
        raise bad_request("context is not supported: send the conversation's messages to /api/chat",
                          param="context", code="unsupported_parameter")
    if body.suffix:
        tokens = await fim_prompt(service, FimText(prefix=body.prompt, suffix=body.suffix))
        return Plan(tokens=tokens, tools=[], logged={"prompt": body.prompt, "suffix": body.suffix})
    if body.raw:
        tokens = await service.tokenize(body.prompt)
        return Plan(tokens=tokens, tools=[], logged=body.prompt, rendered=False)
    messages = [{"role": "system", "content": body.system}] if body.system else []
    messages.append({"role": "user", "content": body.prompt})
    return Plan(tokens=await service.chat_tokens(messages), tools=[], logged=messages)


def _loaded(service: GenerationService, body: _Generation, chat: bool) -> Response:
    """The answer to a request with nothing to generate: how Ollama's clients load (or unload, ``keep_alive``
    0) a model. The model is loaded already and stays so."""
    reason = "unload" if body.keep_alive in (0, "0", "0s") else "load"
    fields: dict[str, Any] = {"model": served_tag(service), "created_at": rfc3339(), "done": True,
                              "done_reason": reason}
    answer = (ChatResponse(**fields, message=AnswerMessage(content="")) if chat
              else OllamaGenerateResponse(**fields, response=""))
    return Response(answer.model_dump_json(exclude_none=True), media_type="application/json")


async def serve(service: GenerationService, body: ChatRequest | OllamaGenerateRequest, http_request: Request,
                options: dict[str, Any]) -> Response:
    """``/api/chat`` and ``/api/generate``. ``options``: further arguments of ``service.build`` (the caller's
    cache scope)."""
    chat = isinstance(body, ChatRequest)
    check_model(body.model, service)
    if (not body.messages) if isinstance(body, ChatRequest) else (not body.prompt and not body.suffix):
        return _loaded(service, body, chat)
    _model(service)
    sampling_options = _options(body, service)
    plan = await (_chat_plan(service, body) if isinstance(body, ChatRequest) else _generate_plan(service, body))
    grammar = await asyncio.to_thread(_grammar, body)
    num_predict = sampling_options.num_predict
    request = await service.build(
        plan.tokens, max_tokens=None if num_predict is None or num_predict < 0 else num_predict,
        sampling=_sampling(sampling_options, grammar), stop=tuple(sampling_options.stop or ()),
        request_id=service.new_id("ollama"), max_tokens_param="options.num_predict", grammar_param="format",
        rendered=plan.rendered, **options)
    fields = service.log_fields(request, plan.logged)
    http_request.state.generation = fields
    handle = service.submit(request)
    answer = _Answer(service, request, plan, chat)
    if body.stream:
        return StreamingResponse(answer.lines(handle, fields), media_type=NDJSON)
    final = await service.complete(handle, http_request.receive, fields)
    if final is None:
        return Response(status_code=CLIENT_CLOSED)
    return Response(answer.final(final, whole=True), media_type="application/json")


class _Answer:
    """One answer's objects: a line per token while streaming (encoded here once, the hot path), and the final
    object with ``done``, ``done_reason`` and the counts and durations."""

    def __init__(self, service: GenerationService, request: GenerationRequest, plan: Plan, chat: bool) -> None:
        self.service, self.request, self.plan, self.chat = service, request, plan, chat
        self.model = served_tag(service)
        self._head = b'{"model":' + json.dumps(self.model).encode() + b',"created_at":"'
        self._body = (b'","message":{"role":"assistant","content":' if chat else b'","response":')
        self._tail = b'},"done":false}\n' if chat else b',"done":false}\n'

    def token(self, text: str) -> bytes:
        """A streamed token's line (the same bytes as the response models' JSON, without the nulls)."""
        return (self._head + rfc3339().encode() + self._body + json.dumps(text, ensure_ascii=False).encode()
                + self._tail)

    def _calls(self, final: FinalEvent) -> list[OllamaToolCall]:
        if not self.plan.tools or final.finish_reason is FinishReason.LENGTH:
            return []
        return [OllamaToolCall(id=c.id, function=ToolCallFunction(index=i, name=c.function.name,
                                                           arguments=json.loads(c.function.arguments)))
                for i, c in enumerate(parse_calls(final.text, self.plan.tools) or [])]

    def final(self, final: FinalEvent, *, whole: bool, text: str = "") -> bytes:
        """The last object; ``whole``: the answer's text and calls go in it (not streamed)."""
        t = final.timings
        calls = self._calls(final) if whole else []
        content = "" if calls else (final.text if whole else text)
        fields: dict[str, Any] = dict(
            model=self.model, created_at=rfc3339(), done=True,
            done_reason="length" if final.finish_reason is FinishReason.LENGTH else "stop",
            total_duration=_ns(t.total_ms), load_duration=_ns(t.queue_ms),
            prompt_eval_count=final.usage.prompt_tokens,
            prompt_eval_duration=_ns(t.time_to_first_token_ms - t.queue_ms),
            eval_count=final.usage.completion_tokens, eval_duration=_ns(t.total_ms - t.time_to_first_token_ms))
        answer = (ChatResponse(**fields, message=AnswerMessage(content=content, tool_calls=calls or None))
                  if self.chat else OllamaGenerateResponse(**fields, response=content))
        return answer.model_dump_json(exclude_none=True).encode() + (b"" if whole else b"\n")

    def _calls_line(self, calls: list[OllamaToolCall]) -> bytes:
        message = AnswerMessage(content="", tool_calls=calls)
        return ChatResponse(model=self.model, created_at=rfc3339(), done=False, message=message
                            ).model_dump_json(exclude_none=True).encode() + b"\n"

    async def lines(self, handle: RequestHandle, fields: dict[str, object]) -> AsyncIterator[bytes]:
        """The stream: a line per token's text; with tools, an answer that may be a call is held back until it
        is whole, then sent as one ``tool_calls`` line or as text; the final line; ``{"error"}`` on failure."""
        holder = HeldCall(bool(self.plan.tools))
        async for event in self.service.stream(handle, fields):
            if isinstance(event, TokenEvent):
                if not event.text:
                    continue
                text = holder.push(event.text)
                if not text:
                    continue
                yield self.token(text)
            elif isinstance(event, FinalEvent):
                calls = self._calls(event)
                if calls:
                    yield self._calls_line(calls)
                elif holder.held:
                    yield self.token(holder.held)
                yield self.final(event, whole=False)
            else:
                yield _error_line(event)


def _error_line(event: ErrorEvent) -> bytes:
    return json.dumps({"error": event.message}, ensure_ascii=False).encode() + b"\n"
