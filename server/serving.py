"""The serving layer between HTTP routes and the engine: tokenizing, validating, waiting, cancelling.

Routes stay thin and call this object; tests can drive it without HTTP.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.types import Message

from server.chat import ChatFormatter, ChatTemplateError, TemplateBudgetExceeded, load_template
from server.engine.core import Engine, EngineNotReady, EngineOverloaded, EngineState
from server.engine.sampling import SamplingParams, grammar_parses
from server.engine.types import ErrorEvent, Event, FinalEvent, GenerationRequest, RequestHandle, TokenEvent
from server.errors import APIError, bad_request, overloaded, unavailable
from server.prompt_limits import VocabFacts, measure_vocab, refuse_control_tokens, refuse_oversized, utf8_size
from server.settings import Settings

log = logging.getLogger(__name__)

# The bound on a grammar's parse stacks in the llama.cpp this server is built with
# (scripts/patches/llama-grammar-bounds.patch: 256 unless LLAMA_GRAMMAR_MAX_STACKS says), for the 400's message.
_STACKS = os.environ.get("LLAMA_GRAMMAR_MAX_STACKS", "")
GRAMMAR_MAX_STACKS = int(_STACKS) if _STACKS.isascii() and _STACKS.isdecimal() and int(_STACKS) > 0 else 256


class GenerationService:
    def __init__(self, engine: Engine, settings: Settings, model_name: str) -> None:
        self.engine = engine
        self.settings = settings
        self.model_name = model_name
        self._chat: ChatFormatter | None = None
        self._chat_error: APIError | None = None
        self._vocab: VocabFacts | None = None
        self._vocab_lock = asyncio.Lock()  # measured once, however many requests ask at the same time
        self.created = int(time.time())  # the model's "created" in the OpenAI API: when this server started

    @staticmethod
    def new_id(prefix: str) -> str:
        return f"{prefix}-{uuid.uuid4().hex[:24]}"

    async def vocab_facts(self) -> VocabFacts:
        """The vocabulary's longest token and control tokens, read once (off the event loop)."""
        if self._vocab is not None:
            return self._vocab
        async with self._vocab_lock:
            if self._vocab is None:
                model = self.engine.model
                if model is None or self.engine.state is not EngineState.READY:
                    raise unavailable(self.engine.not_ready_reason())
                self._vocab = await asyncio.to_thread(measure_vocab, model)
        return self._vocab

    async def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool | None = None,
                       param: str = "prompt") -> list[int]:
        """Tokenize off the event loop (a long prompt takes a while). Control-token text stays plain text
        unless the server allows special tokens (``parse_special`` None) or the caller says. A text too long for
        the context whatever its tokens is refused first, without tokenizing it."""
        n_bytes = utf8_size(text, param)
        refuse_oversized(n_bytes, await self.vocab_facts(), self.engine.slot_ctx, param=param)
        special = self.settings.allow_special_tokens if parse_special is None else parse_special
        try:
            return await asyncio.to_thread(self.engine.tokenize, text, add_special=add_special,
                                           parse_special=special)
        except EngineNotReady as exc:
            raise unavailable(str(exc)) from exc

    async def chat_tokens(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
                          ) -> list[int]:
        """The chat prompt rendered with the model's template and tokenized (off the event loop). What the
        messages hold is checked first; the rendering (tool definitions and calls included) is refused before it
        is tokenized when it could not fit in a slot's context."""
        for i, message in enumerate(messages):
            utf8_size(message.get("content") or "", f"messages.{i}.content", "message content")
        facts = await self.vocab_facts()
        contents = (message.get("content") for message in messages)
        refuse_oversized(sum(len(c.encode("utf-8")) for c in contents if isinstance(c, str)), facts,
                         self.engine.slot_ctx, param="messages")
        formatter = self.chat_formatter()
        # No token covers more than the longest token's bytes (and a character is at least one byte).
        max_chars = self.engine.slot_ctx * facts.longest_token_bytes
        try:
            return await asyncio.to_thread(formatter.tokenize, messages, tools, max_chars=max_chars)
        except TemplateBudgetExceeded as exc:
            raise bad_request(f"the chat prompt is too large or the chat template too costly: {exc}",
                              param="messages", code="context_length_exceeded") from exc
        except ChatTemplateError as exc:
            raise bad_request(str(exc), param="messages", code="invalid_chat") from exc

    def chat_formatter(self) -> ChatFormatter:
        """The model's chat template, compiled and tried on a canary conversation once; a template that fails
        either is refused on every request from then on, without compiling it again."""
        if self._chat_error is not None:
            raise self._chat_error
        if self._chat is None:
            model = self.engine.model
            if model is None or self.engine.state is not EngineState.READY:
                raise unavailable(self.engine.not_ready_reason())
            template = load_template(self.settings.chat_template, model)
            if not template:
                raise bad_request("this model has no chat template; set CHAT_TEMPLATE or use /v1/completions",
                                  param="messages", code="no_chat_template")
            try:
                formatter = ChatFormatter(template, model)
                formatter.check()
            except ChatTemplateError as exc:
                log.error("the chat template is refused: %s", exc)
                self._chat_error = APIError(500, f"the chat template is refused: {exc}", type="server_error",
                                            param="messages", code="invalid_chat_template")
                raise self._chat_error from exc
            self._chat = formatter
        return self._chat

    async def check_grammar(self, grammar: str, param: str) -> None:
        """A 400 for a grammar llama.cpp cannot parse (its log says where), before the request takes a slot."""
        model = self.engine.model
        if model is None or self.engine.state is not EngineState.READY:
            raise unavailable(self.engine.not_ready_reason())
        if not await asyncio.to_thread(grammar_parses, model.vocab, grammar):
            raise bad_request("the grammar does not parse, or is too ambiguous (its start expands to more than "
                              f"{GRAMMAR_MAX_STACKS} parse stacks); GBNF: see llama.cpp's grammars/README.md",
                              param=param, code="invalid_grammar")

    async def _check_token_ids(self, tokens: list[int], rendered: bool) -> list[int]:
        """A token-id prompt: every id in the vocabulary, and no control token from a client (forged turns) unless
        the server allows them. ``rendered``: the server's own chat rendering, whose markers are control tokens."""
        n_vocab = self.engine.model.n_vocab if self.engine.model is not None else 0
        bad = next((t for t in tokens if not 0 <= t < n_vocab), None)
        if bad is not None:
            raise bad_request(f"token id {bad} is outside the vocabulary (0..{n_vocab - 1})", param="prompt",
                              code="invalid_value")
        if not rendered and not self.settings.allow_special_tokens:
            forged = refuse_control_tokens(tokens, await self.vocab_facts())
            if forged is not None:
                raise forged
        return list(tokens)

    async def build(
        self,
        prompt: str | list[int],
        *,
        max_tokens: int | None,
        sampling: SamplingParams,
        stop: tuple[str, ...] = (),
        request_id: str = "",
        max_tokens_param: str = "max_length",
        cache_prompt: bool = True,
        cache_scope: str = "",
        ignore_eos: bool = False,
        grammar_param: str = "grammar",
        speculative: bool | None = None,
        rendered: bool = False,
    ) -> GenerationRequest:
        """Tokenize and check a request against the limits and the context, before it takes a slot: the one
        admission every generation route goes through. ``rendered``: ``prompt`` is the server's own chat
        rendering (its control tokens are the template's), not a client's token ids."""
        if sampling.grammar is not None:
            await self.check_grammar(sampling.grammar, grammar_param)
        if max_tokens is not None and max_tokens > self.settings.max_tokens_limit:
            raise bad_request(
                f"{max_tokens_param} is {max_tokens}; this server allows at most {self.settings.max_tokens_limit}",
                param=max_tokens_param, code="invalid_value",
            )
        tokens = (await self.tokenize(prompt) if isinstance(prompt, str)
                  else await self._check_token_ids(prompt, rendered))
        if not tokens:
            raise bad_request("the prompt is empty", param="prompt", code="invalid_value")
        n_ctx = self.engine.slot_ctx
        if len(tokens) >= n_ctx:
            raise bad_request(
                f"the prompt has {len(tokens)} tokens but a request's context holds {n_ctx} tokens "
                f"(prompt and generated together), so at most {n_ctx - 1} prompt tokens fit",
                param="prompt", code="context_length_exceeded",
            )
        if max_tokens is None:
            max_tokens = min(self.settings.default_max_tokens, n_ctx - len(tokens))
        elif len(tokens) + max_tokens > n_ctx:
            raise bad_request(
                f"the prompt has {len(tokens)} tokens and {max_tokens_param} asks for {max_tokens} more, "
                f"{len(tokens) + max_tokens} in all, but a request's context holds {n_ctx} tokens; "
                f"lower {max_tokens_param} to at most {n_ctx - len(tokens)}",
                param=max_tokens_param, code="context_length_exceeded",
            )
        return GenerationRequest(
            prompt_tokens=tokens, max_tokens=max_tokens, sampling=sampling, stop=stop, request_id=request_id,
            cache_prompt=cache_prompt, cache_scope=cache_scope, ignore_eos=ignore_eos, speculative=speculative,
        )

    def submit(self, request: GenerationRequest) -> RequestHandle:
        try:
            return self.engine.submit(request)
        except EngineOverloaded as exc:
            raise overloaded(f"server busy: {exc}; retry later") from exc
        except EngineNotReady as exc:
            raise unavailable(str(exc)) from exc

    def log_fields(self, request: GenerationRequest, prompt: object) -> dict[str, object]:
        """The request's entry in its log line (filled in as it completes)."""
        fields: dict[str, object] = {"id": request.request_id, "prompt_tokens": len(request.prompt_tokens),
                                     "max_tokens": request.max_tokens}
        if self.settings.log_prompts:
            fields["prompt"] = prompt
        return fields

    @staticmethod
    def record(fields: dict[str, object] | None, event: Event) -> None:
        if fields is None:
            return
        if isinstance(event, FinalEvent):
            fields.update(finish_reason=event.finish_reason.value, completion_tokens=event.usage.completion_tokens,
                          cached_tokens=event.usage.cached_tokens,
                          ttft_ms=round(event.timings.time_to_first_token_ms, 1),
                          decode_tps=round(event.timings.decode_tokens_per_second, 1))
        elif isinstance(event, ErrorEvent):
            fields.update(error=event.code)

    async def complete(
        self, handle: RequestHandle, receive: Callable[[], Awaitable[Message]],
        log_fields: dict[str, object] | None = None, on_token: Callable[[TokenEvent], None] | None = None,
    ) -> FinalEvent | None:
        """Wait for the whole answer (``on_token`` sees each token on the way). If the client disconnects
        meanwhile (``receive``, the request's ASGI channel, says so the moment the connection drops), cancel the
        request and return None."""
        result = asyncio.ensure_future(handle.result() if on_token is None else _result(handle, on_token))
        gone = asyncio.ensure_future(_disconnect(receive))
        try:
            await asyncio.wait({result, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            left = not result.done()  # the client left (or this coroutine was cancelled): so does the request
            if left:
                handle.cancel()
                result.cancel()
        if left:
            return None
        event = result.result()
        self.record(log_fields, event)
        if isinstance(event, ErrorEvent):
            raise APIError(event.status, event.message, code=event.code, type=event.type)
        return event

    async def stream(self, handle: RequestHandle, log_fields: dict[str, object] | None = None
                     ) -> AsyncIterator[Event]:
        """The request's events; leaving early (a disconnect) cancels the request."""
        try:
            async for event in handle.events():
                if not isinstance(event, TokenEvent):
                    self.record(log_fields, event)
                yield event
        finally:
            handle.cancel()


async def _disconnect(receive: Callable[[], Awaitable[Message]]) -> None:
    """Return once the client has gone: after the request's body, the server's next message is the disconnect."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def _result(handle: RequestHandle, on_token: Callable[[TokenEvent], None]) -> FinalEvent | ErrorEvent:
    async for event in handle.events():
        if isinstance(event, TokenEvent):
            on_token(event)
        else:
            return event
    raise AssertionError("unreachable: events() always ends with a final or error event")
