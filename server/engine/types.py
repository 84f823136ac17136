"""What goes into the engine and what comes out of it."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from enum import StrEnum

from server.engine.sampling import SamplingParams, TokenLogprob


class FinishReason(StrEnum):
    STOP = "stop"  # end-of-generation token or a stop string
    LENGTH = "length"  # max tokens reached, or the slot's context is full
    CANCELLED = "cancelled"  # the client went away
    ERROR = "error"


@dataclass(frozen=True)
class GenerationRequest:
    """A tokenized request, validated against the context before it reaches the engine."""

    prompt_tokens: list[int]
    max_tokens: int
    sampling: SamplingParams
    stop: tuple[str, ...] = ()
    request_id: str = ""
    cache_prompt: bool = True  # reuse a slot's KV for a shared prompt prefix
    ignore_eos: bool = False  # generate max_tokens even past end-of-generation tokens (benchmarks)
    # Who may share this request's cached prompt prefix: a slot's KV cells are reused only by a request with
    # the same scope as the slot's last request (e.g. a hash of the API key), so one client cannot time
    # another's prompts through cached_tokens or TTFT. Empty: the unscoped pool.
    cache_scope: str = ""
    # Speculative decoding for this request: None follows the server's SPECULATIVE setting; True speculates
    # (with the draft model where one is loaded, else by prompt lookup), False never.
    speculative: bool | None = None


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int  # prompt tokens whose KV came from a slot's cache instead of being computed


@dataclass(frozen=True)
class Timings:
    queue_ms: float  # waiting for a free slot
    time_to_first_token_ms: float  # from arrival to the first generated token
    total_ms: float
    decode_tokens_per_second: float  # generated tokens after the first, per second
    draft_tokens: int = 0  # speculative decoding: tokens proposed for this request
    draft_accepted: int = 0  # of those, accepted (each one a token generated without a step of its own)


@dataclass(frozen=True)
class TokenEvent:
    token: int
    text: str  # the text this token completes (may be empty: part of a character, or held for a stop string)
    logprob: TokenLogprob | None = None  # only for requests that asked for logprobs


@dataclass(frozen=True)
class FinalEvent:
    text: str
    finish_reason: FinishReason
    usage: Usage
    timings: Timings


@dataclass(frozen=True)
class ErrorEvent:
    message: str
    status: int = 500  # the HTTP status a non-streamed request answers with
    code: str = "server_error"

    @property
    def type(self) -> str:
        """The error envelope's ``type``."""
        if self.status == 503:
            return "service_unavailable"
        return "invalid_request_error" if 400 <= self.status < 500 else "server_error"


Event = TokenEvent | FinalEvent | ErrorEvent


@dataclass(eq=False)
class RequestHandle:
    """The caller's end of a request: an async stream of events, and a way to cancel.

    The engine thread publishes events through the caller's event loop, so the caller never blocks.
    """

    request: GenerationRequest
    loop: asyncio.AbstractEventLoop
    wake_engine: threading.Event
    arrived: float = field(default_factory=time.perf_counter)
    _queue: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)
    cancelled: bool = False
    done: bool = False
    on_cancel: Callable[[RequestHandle], None] | None = None  # the engine's: stops a prefill step at once

    def publish(self, event: Event) -> None:
        """Called by the engine thread."""
        if isinstance(event, (FinalEvent, ErrorEvent)):
            self.done = True
        try:
            self.loop.call_soon_threadsafe(self._queue.put_nowait, event)
        except RuntimeError:  # the caller's loop is closed: nobody is listening any more
            pass

    def cancel(self) -> None:
        """Stop generating; the engine frees the slot at its next step."""
        if not self.done:
            self.cancelled = True
            if self.on_cancel is not None:
                self.on_cancel(self)
            self.wake_engine.set()

    async def events(self) -> AsyncIterator[Event]:
        """Token events, then one final or error event."""
        while True:
            event = await self._queue.get()
            yield event
            if not isinstance(event, TokenEvent):
                return

    async def result(self) -> FinalEvent | ErrorEvent:
        async for event in self.events():
            if not isinstance(event, TokenEvent):
                return event
        raise AssertionError("unreachable: events() always ends with a final or error event")
