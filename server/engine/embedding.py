"""Embeddings on the engine thread: a second llama.cpp context (pooling, its own cells), fed many inputs a decode.

The embedding model is a GGUF of its own (``EMBEDDING_MODEL_PATH``: all-MiniLM, nomic-embed, EmbeddingGemma...) or
the chat model itself (``EMBEDDING_POOLING`` set), always in a context apart from the chat slots, so a document
embedded never touches their cells or the prompt cache. The engine loop runs an embedding step between its
generation steps, sized by :class:`EmbeddingPace`, so that it costs the running streams what a prefill step may.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from dataclasses import dataclass, field

import llama_cpp
import numpy as np

from server.engine.llama import Batch, LlamaContext, LlamaError, LlamaModel

log = logging.getLogger(__name__)

POOLING = {"mean": llama_cpp.LLAMA_POOLING_TYPE_MEAN, "cls": llama_cpp.LLAMA_POOLING_TYPE_CLS,
           "last": llama_cpp.LLAMA_POOLING_TYPE_LAST}
POOLING_NAMES = {value: name for name, value in POOLING.items()} | {llama_cpp.LLAMA_POOLING_TYPE_RANK: "rank",
                                                                    llama_cpp.LLAMA_POOLING_TYPE_NONE: "none"}
# Sequences one embedding decode may carry (llama.cpp allows 256).
MAX_SEQS = 64


@dataclass(frozen=True)
class EmbeddingRequest:
    """Inputs already tokenized and each checked against :attr:`Embedder.max_input_tokens`."""

    inputs: tuple[tuple[int, ...], ...]
    request_id: str = ""

    @property
    def n_tokens(self) -> int:
        return sum(len(tokens) for tokens in self.inputs)


@dataclass(eq=False)
class EmbeddingHandle:
    """The caller's end: a future resolved with one L2-normalised vector per input, or an error message."""

    request: EmbeddingRequest
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[list[np.ndarray]]
    arrived: float = field(default_factory=time.perf_counter)
    cancelled: bool = False
    next_input: int = 0  # the first input not yet given to a decode
    vectors: list[np.ndarray | None] = field(default_factory=list)

    def cancel(self) -> None:
        self.cancelled = True

    def _settle(self, value: list[np.ndarray] | BaseException) -> None:
        def settle() -> None:
            if self.future.done():
                return
            if isinstance(value, BaseException):
                self.future.set_exception(value)
            else:
                self.future.set_result(value)
        try:
            self.loop.call_soon_threadsafe(settle)
        except RuntimeError:  # the caller's loop is closed: nobody is waiting
            pass

    def succeed(self) -> None:
        self._settle([v for v in self.vectors if v is not None])

    def fail(self, message: str, *, status: int = 500) -> None:
        self._settle(EmbeddingFailed(message, status))


class EmbeddingFailed(RuntimeError):
    """A request's inputs were not embedded: llama.cpp failed (500), or the server is going away (503)."""

    def __init__(self, message: str, status: int = 500) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class EmbeddingPace:
    """How many tokens an embedding step may take while streams generate: what one decode step of the streams
    takes (so their inter-token gap at most doubles, the prefill rule), from a moving average of this context's
    own cost per token. An input is never split: a step takes at least one, whatever it costs."""

    initial: int = 32  # until measured
    alpha: float = 0.2
    per_token_s: float | None = None

    def tokens(self, decode_s: float | None) -> int:
        if decode_s is None or self.per_token_s is None:
            return self.initial
        return max(1, math.floor(decode_s / self.per_token_s))

    def observe(self, seconds: float, n_tokens: int) -> None:
        sample = seconds / max(1, n_tokens)
        self.per_token_s = sample if self.per_token_s is None else self.per_token_s + self.alpha * (
            sample - self.per_token_s)


class Embedder:
    """An embedding context and its queue; every method but :meth:`submit` runs on the engine thread."""

    def __init__(self, model: LlamaModel, *, own_model: bool, pooling: str | None, n_batch: int, n_threads: int,
                 n_threads_batch: int, flash_attn: bool) -> None:
        self.model = model
        self.own_model = own_model  # closed with this embedder (else it is the chat model)
        # Causal models keep cells while a sequence is decoded: one cache all sequences share, the batch's size.
        self._ctx = LlamaContext(
            model, n_ctx=n_batch, n_batch=n_batch, n_seq_max=MAX_SEQS, n_threads=n_threads,
            n_threads_batch=n_threads_batch, flash_attn=flash_attn, kv_unified=True, embeddings=True,
            pooling=POOLING[pooling] if pooling else llama_cpp.LLAMA_POOLING_TYPE_UNSPECIFIED)
        if self._ctx.pooling not in POOLING_NAMES or self._ctx.pooling in (
                llama_cpp.LLAMA_POOLING_TYPE_NONE, llama_cpp.LLAMA_POOLING_TYPE_RANK):
            kind = POOLING_NAMES.get(self._ctx.pooling, str(self._ctx.pooling))
            self._ctx.close()
            raise LlamaError(f"{model.path} pools its outputs as '{kind}', which gives no sentence embedding: set "
                             "EMBEDDING_POOLING (mean, cls or last)")
        self.pooling = POOLING_NAMES[self._ctx.pooling]
        self.dimensions = self._ctx.n_embd
        self.n_batch = n_batch
        # An input is decoded whole in one step (a non-causal model attends over all of it at once).
        self.max_input_tokens = min(model.n_ctx_train, n_batch)
        self.limit_reason = ("its context" if model.n_ctx_train <= n_batch else
                             f"EMBEDDING_BATCH_SIZE; the model's own context is {model.n_ctx_train}")
        self._batch = Batch(n_batch)
        self._waiting: deque[EmbeddingHandle] = deque()
        self.pace = EmbeddingPace()

    def close(self) -> None:
        self._ctx.close()
        if self.own_model:
            self.model.close()

    def pending(self) -> bool:
        return bool(self._waiting)

    def queued(self) -> list[EmbeddingHandle]:
        return list(self._waiting)

    def enqueue(self, handle: EmbeddingHandle) -> None:
        handle.vectors = [None] * len(handle.request.inputs)
        self._waiting.append(handle)

    def drop(self, handles: list[EmbeddingHandle]) -> None:
        gone = {id(h) for h in handles}
        self._waiting = deque(h for h in self._waiting if id(h) not in gone)

    def step(self, max_tokens: int | None
             ) -> tuple[list[EmbeddingHandle], list[EmbeddingHandle], list[EmbeddingHandle]]:
        """Decode the next inputs in arrival order, up to ``max_tokens`` (None: a whole batch) and at least one;
        returns the requests this step finished, those it failed and those cancelled (all out of the queue)."""
        room = self.n_batch if max_tokens is None else max(1, min(max_tokens, self.n_batch))
        batch = self._batch
        batch.clear()
        placed: list[tuple[EmbeddingHandle, int]] = []  # (request, input index), one sequence each
        for handle in self._waiting:
            if handle.cancelled:
                continue
            inputs = handle.request.inputs
            while handle.next_input < len(inputs) and len(placed) < MAX_SEQS:
                tokens = inputs[handle.next_input]
                if placed and len(tokens) > min(room, batch.free):
                    break
                batch.add(list(tokens), 0, len(placed), False, all_logits=True)  # pooling reads every output
                room -= len(tokens)
                placed.append((handle, handle.next_input))
                handle.next_input += 1
            if handle.next_input < len(inputs):
                break  # the next input does not fit: later requests wait their turn
        failed: list[EmbeddingHandle] = []
        if placed:
            started = time.perf_counter()
            try:
                self._ctx.decode(batch)
                for seq, (handle, index) in enumerate(placed):
                    vector = self._ctx.seq_embedding(seq)
                    norm = float(np.linalg.norm(vector))
                    handle.vectors[index] = vector / norm if norm > 0 else vector
            except LlamaError as exc:
                log.error("embedding decode failed: %s", exc)
                failed = list({id(h): h for h, _ in placed}.values())
                for handle in failed:
                    handle.fail(f"embedding failed: {exc}")
            finally:
                self._ctx.clear()
            seconds = time.perf_counter() - started
            self.pace.observe(seconds, batch.n_tokens)
            if log.isEnabledFor(logging.DEBUG):
                log.debug("embedding step: %d inputs, %d tokens: %.1f ms", len(placed), batch.n_tokens, seconds * 1000)
        cancelled = [h for h in self._waiting if h.cancelled and h not in failed]  # after the decode: counted once
        done = [h for h in self._waiting
                if not h.cancelled and h not in failed and h.next_input == len(h.request.inputs)]
        for handle in done:
            handle.succeed()
        self.drop(cancelled + failed + done)
        return done, failed, cancelled

    def fail_all(self, message: str, *, status: int = 500) -> list[EmbeddingHandle]:
        handles = list(self._waiting)
        self._waiting.clear()
        for handle in handles:
            handle.fail(message, status=status)
        return handles
