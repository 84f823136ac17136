"""The engine: one thread owns the model and the context, and decodes all active requests together.

Each step puts the next token of every generating sequence, plus a chunk of any prompt still being
prefilled, into one ``llama_batch`` and calls ``llama_decode`` once. While streams are generating, the chunk is
held to a budget (``PREFILL_BUDGET``; measured by default) so that a long prompt arriving never stalls them for
more than about one extra decode step; a cancelled prefill aborts its step at once. When prompts queue up faster
than that (more waiting than ``WAITING_SERVED_RATIO`` times the streams), the short ones start together in one
step, as text-generation-inference does.

Requests join at the next step and leave when done or cancelled. A slot keeps its KV cells after its request
ends, and the next request whose prompt continues them (a conversation's next turn, a stopped answer
continued) reuses them instead of computing them again (see :mod:`server.engine.scheduling`).

If the loop itself fails, the engine ends FAILED and the app exits non-zero; ``health_problem`` also reports an
engine that has work but makes no progress.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from server.engine.draft import DraftModel
from server.engine.embedding import Embedder, EmbeddingHandle, EmbeddingRequest
from server.engine.llama import Batch, LlamaContext, LlamaError, LlamaModel, ModelInfo, system_info
from server.engine.prompt_cache import Entry, PromptCache, worth_restoring
from server.engine.sampling import GrammarDeadEnd, Sampler
from server.engine.scheduling import COPY_MIN_TOKENS, QUEUE_STEP_TOKENS, PrefillBudget, best_donor, choose_slot
from server.engine.speculative import DraftLength, NgramIndex
from server.engine.text import TextStream
from server.engine.types import (
    ErrorEvent,
    FinalEvent,
    FinishReason,
    GenerationRequest,
    RequestHandle,
    Timings,
    TokenEvent,
    Usage,
)
from server.metrics import Metrics
from server.settings import Settings, kv_cache_bytes

log = logging.getLogger(__name__)


class EngineState(StrEnum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"
    STOPPED = "stopped"


AUTO_Q8_KV_ABOVE_BYTES = 2**30


def resolve_cache_type(setting: str, f16_bytes: float, flash_attn: bool) -> str:
    """The KV-cache type to use: ``auto`` is q8_0 when an f16 cache would pass 1 GiB (and flash attention,
    which a quantized cache needs, is on), else f16."""
    if setting != "auto":
        return setting
    return "q8_0" if flash_attn and f16_bytes > AUTO_Q8_KV_ABOVE_BYTES else "f16"


class EngineOverloaded(Exception):
    """Every slot is busy and the wait queue is full."""


class EngineNotReady(Exception):
    """The model is still loading, failed to load, or the engine is shutting down."""


@dataclass(eq=False)
class _Active:
    """A request that holds a slot."""

    handle: RequestHandle
    sampler: Sampler
    text: TextStream
    n_past: int  # tokens of this sequence already in the KV cache
    cached_tokens: int  # of the prompt, reused from the slot's cache
    started: float
    n_generated: int = 0
    last_token: int = -1
    first_token_at: float | None = None
    last_token_at: float | None = None
    # Speculative decoding (None: this request does not speculate): how many tokens to draft, the prompt-lookup
    # index (n-gram drafts; None with a draft model), and this step's drafts with the batch index of the first.
    draft_len: DraftLength | None = None
    ngram: NgramIndex | None = None
    drafts: list[int] = field(default_factory=list)
    draft_index: int = -1

    @property
    def prompt(self) -> list[int]:
        return self.handle.request.prompt_tokens

    @property
    def prefilling(self) -> bool:
        return self.n_past < len(self.prompt)


@dataclass(eq=False)
class _Slot:
    seq_id: int
    tokens: list[int] = field(default_factory=list)  # tokens whose KV cells this sequence holds, in order
    active: _Active | None = None
    last_used: float = 0.0
    scope: str = ""  # cache_scope of the request that filled ``tokens``
    prompt_len: int = 0  # that request's prompt tokens; the cells past them hold its output
    keep: bool = True  # that request let its prompt be reused (cache_prompt): its cells may go to host memory


class Engine:
    """Owns llama.cpp on one thread; the event loop talks to it through :meth:`submit` and request handles."""

    def __init__(self, settings: Settings, metrics: Metrics, model_path: str) -> None:
        self.settings = settings
        self.metrics = metrics
        self.model_path = model_path
        self.state = EngineState.LOADING
        self.load_error: str | None = None
        self.model: LlamaModel | None = None
        self.info: ModelInfo | None = None
        self.loaded = threading.Event()  # set once loading has ended, well or not

        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._waiting: deque[RequestHandle] = deque()
        self._in_flight = 0  # waiting + active; guarded by _lock
        self._stopping = False
        self.draining = False  # set on shutdown: no new requests, the ones in flight finish
        self._slots = [_Slot(seq_id=i) for i in range(settings.parallel)]
        self._budget = PrefillBudget(fixed=settings.prefill_budget)
        self._prompt_cache: PromptCache | None = None  # made at load, sized by the KV cache's type
        self._copy_pending: set[int] = set()  # sequences in a KV-stream copy llama.cpp makes at the next decode
        self._prefilling_now: frozenset[RequestHandle] = frozenset()  # requests with prompt tokens in this step
        self._draft_model: DraftModel | None = None
        self.embedder: Embedder | None = None  # made at load where embeddings are served
        self._embed_incoming: list[EmbeddingHandle] = []  # submitted, not yet in the embedder's queue; _lock
        self._embed_owed = False  # an embedding step was skipped for a prefill step: the next one runs
        self._step_prefilled = False  # the last generation step carried prompt tokens
        self._progress_at = time.monotonic()  # the engine loop's last turn
        self._busy_since = time.monotonic()  # when in_flight last left 0
        self.ended = threading.Event()  # the engine thread has ended
        self.crashed: str | None = None  # why the engine loop failed
        self._thread = threading.Thread(target=self._run, name="llama-engine", daemon=True)
        self._bind_metrics(settings.ctx_size)

    def _bind_metrics(self, kv_capacity: int) -> None:
        self.metrics.bind_state(
            queue_depth=lambda: len(self._waiting),
            slots_busy=lambda: sum(1 for s in self._slots if s.active is not None),
            kv_tokens=lambda: sum(len(s.tokens) for s in self._slots),
            running_kv_tokens=lambda: sum(len(s.tokens) for s in self._slots if s.active is not None),
            kv_capacity=kv_capacity,
            slots_total=self.settings.parallel,
            prompt_cache_bytes=lambda: self._prompt_cache.bytes if self._prompt_cache is not None else 0,
        )

    # ---- the caller's side (event loop) ----

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float | None = 30.0) -> None:
        """Fail what is left and end the engine thread."""
        with self._lock:
            self._stopping = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def slot_ctx(self) -> int:
        """Tokens of context one request may use: llama.cpp's cells per sequence once the context exists (in a
        unified cache, which any sequence could fill, its share)."""
        ctx = getattr(self, "_ctx", None)
        if ctx is None:
            return self.settings.slot_ctx
        return ctx.n_ctx // self.settings.parallel if ctx.kv_unified else ctx.n_ctx_seq

    def health_problem(self) -> str | None:
        """Why the engine cannot serve any more (None while it can, or is still loading): its thread ended,
        its loop crashed, or it has had work and made no progress for ``WATCHDOG_TIMEOUT_S``."""
        if self.crashed is not None:
            return f"the engine crashed: {self.crashed}"
        if self.state is EngineState.READY and not self._thread.is_alive() and not self._stopping:
            return "the engine thread has ended"
        with self._lock:
            busy = self._in_flight > 0
        if busy and self.state is EngineState.READY:
            stalled = time.monotonic() - max(self._progress_at, self._busy_since)
            if stalled > self.settings.watchdog_timeout_s:
                return (f"the engine has made no progress for {stalled:.0f} s while it has work "
                        f"({self.in_flight()} requests in flight)")
        return None

    def in_flight(self) -> int:
        """Requests accepted and not finished: running or waiting for a slot."""
        with self._lock:
            return self._in_flight

    def busy_slots(self) -> int:
        return sum(1 for s in self._slots if s.active is not None)

    def queue_depth(self) -> int:
        return len(self._waiting)

    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = False) -> list[int]:
        if self.model is None or self.state is not EngineState.READY:
            raise EngineNotReady(self.not_ready_reason())
        return self.model.tokenize(text, add_special=add_special, parse_special=parse_special)

    def submit(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop | None = None) -> RequestHandle:
        """Queue a request; raises :class:`EngineOverloaded` at once when slots and queue are full."""
        handle = RequestHandle(request=request, loop=loop or asyncio.get_running_loop(), wake_engine=self._wake)
        self._admit_in_flight(self._waiting.append, handle)
        handle.on_cancel = self._on_cancel
        self._wake.set()
        return handle

    def submit_embedding(self, request: EmbeddingRequest, loop: asyncio.AbstractEventLoop | None = None
                         ) -> EmbeddingHandle:
        """Queue inputs for the embedding context, under the same admission as :meth:`submit`."""
        if self.embedder is None and self.state is EngineState.READY:
            raise EngineNotReady("this server serves no embeddings")
        loop = loop or asyncio.get_running_loop()
        handle = EmbeddingHandle(request=request, loop=loop, future=loop.create_future())
        self._admit_in_flight(self._embed_incoming.append, handle)
        self._wake.set()
        return handle

    def _admit_in_flight(self, enqueue: Callable[[Any], None], handle: object) -> None:
        """The one admission rule of every request, generation or embedding: a ready engine, not draining, and at
        most PARALLEL + QUEUE_SIZE in flight (else :class:`EngineOverloaded` at once); ``enqueue`` under the lock."""
        with self._lock:
            if self.state is not EngineState.READY or self._stopping or self.draining:
                raise EngineNotReady(self.not_ready_reason())
            if self._in_flight >= self.settings.parallel + self.settings.queue_size:
                self.metrics.requests.labels(outcome="rejected").inc()
                raise EngineOverloaded(
                    f"all {self.settings.parallel} slots are busy and {self.settings.queue_size} requests wait"
                )
            if self._in_flight == 0:
                self._busy_since = time.monotonic()
            self._in_flight += 1
            enqueue(handle)

    def _on_cancel(self, handle: RequestHandle) -> None:
        """From the caller's thread: a request whose prompt is being prefilled right now stops that step."""
        if handle in self._prefilling_now:
            self._ctx.abort()

    def not_ready_reason(self) -> str:
        if self.crashed is not None:
            return f"the engine crashed: {self.crashed}"
        if self._stopping or self.draining or self.state is EngineState.STOPPED:
            return "the server is shutting down"
        if self.state is EngineState.FAILED:
            return f"the model failed to load: {self.load_error}"
        return "the model is still loading"

    # ---- the engine thread ----

    def _run(self) -> None:
        try:
            self._run_engine()
        finally:
            self.ended.set()

    def _run_engine(self) -> None:
        try:
            self._load()
        except Exception as exc:  # any failure to load is reported, never raised into the void
            self.load_error = str(exc)
            self.state = EngineState.FAILED
            self.loaded.set()
            log.error("model failed to load: %s", exc)
            return
        self.state = EngineState.READY
        self.metrics.ready.set(1)
        self.loaded.set()
        try:
            self._loop()
        except BaseException as exc:  # a bug: keep the reason, fail the requests; the app then exits non-zero
            log.exception("engine loop crashed")
            self.crashed = f"{type(exc).__name__}: {exc}"
            self.state = EngineState.FAILED
            self.load_error = "engine loop crashed"
        finally:
            self.metrics.ready.set(0)
            self._fail_everything(self.not_ready_reason() if self.crashed else "the server is shutting down")
            if self.state is EngineState.READY:
                self.state = EngineState.STOPPED
            self._ctx.close()
            if self.embedder is not None:
                self.embedder.close()
            if self._draft_model is not None:
                self._draft_model.close()
            if self.model is not None:
                self.model.close()

    def _load(self) -> None:
        s = self.settings
        t0 = time.perf_counter()
        log.info("llama.cpp system info: %s", system_info())
        self.model = LlamaModel(self.model_path, use_mmap=s.use_mmap)  # type: ignore[arg-type]
        self.info = self.model.info()
        if s.slot_ctx > self.model.n_ctx_train:
            raise LlamaError(
                f"each slot would get {s.slot_ctx} tokens of context (CTX_SIZE {s.ctx_size} / PARALLEL "
                f"{s.parallel}) but the model was trained for {self.model.n_ctx_train}: lower CTX_SIZE or raise "
                "PARALLEL"
            )
        info = self.info
        self.cache_type = resolve_cache_type(
            s.cache_type, kv_cache_bytes(info.n_layer, s.ctx_size, info.kv_width, "f16"), s.flash_attn)
        self._ctx = LlamaContext(
            self.model,
            n_ctx=s.ctx_size,
            n_batch=s.batch_size,
            n_seq_max=s.parallel,
            n_threads=s.n_threads,
            n_threads_batch=s.threads_batch,
            flash_attn=s.flash_attn,
            cache_type=self.cache_type,
            kv_unified=s.kv_unified,
        )
        self._batch = Batch(s.batch_size)
        if s.embeddings_on:
            self._load_embedder()
        self._bind_metrics(self._ctx.n_ctx)  # llama.cpp rounds each sequence's cells up (to 256)
        if s.draft_model_path is not None:
            self._draft_model = DraftModel(
                s.draft_model_path, target=self.model, n_slots=s.parallel, slot_ctx=self.slot_ctx,
                n_batch=s.batch_size, n_threads=s.n_threads)
            log.info("draft model loaded: %s", s.draft_model_path)
        # Cutting a sequence back to a shared prefix needs memory that keeps every cell of it: not recurrent
        # state (Mamba, RWKV, hybrids), and with sliding-window attention only while the window's cells remain.
        self._partial_reuse = not self.model.recurrent
        cache_bytes = s.prompt_cache_bytes(kv_cache_bytes(info.n_layer, s.ctx_size, info.kv_width, self.cache_type))
        if cache_bytes and (self.model.n_swa or not self._partial_reuse):
            # A restored sliding-window sequence would mostly be cut back to nothing (_cut_back's window check).
            log.log(logging.INFO if s.cache_ram_mib == "auto" else logging.WARNING,
                    "CACHE_RAM_MIB: no prompt cache for a %s model", "sliding-window" if self.model.n_swa
                    else "recurrent")
        elif cache_bytes:
            self._prompt_cache = PromptCache(cache_bytes)
        log.info(
            "model loaded in %.2fs: %s (%s, %.2f GiB, %d params); %d slots x %d tokens, KV cache %s, mmap %s, "
            "%d threads, prompt-prefix reuse %s, prompt cache %s", time.perf_counter() - t0, self.info.path,
            self.info.description, self.info.size_bytes / 2**30, self.info.n_params, s.parallel, self.slot_ctx,
            self.cache_type, "on" if s.use_mmap else "off", s.n_threads,
            "on" if self._partial_reuse else "off (recurrent model)",
            f"{self._prompt_cache.limit_bytes / 2**20:.0f} MiB" if self._prompt_cache is not None else "off",
        )

    def _load_embedder(self) -> None:
        s = self.settings
        own = s.embedding_model_path is not None
        model = LlamaModel(s.embedding_model_path.expanduser(), use_mmap=s.use_mmap) if own else self.model  # type: ignore[union-attr]
        assert model is not None
        try:
            self.embedder = Embedder(model, own_model=own, pooling=s.embedding_pooling, n_batch=s.embedding_batch_size,
                                     n_threads=s.n_threads, n_threads_batch=s.threads_batch, flash_attn=s.flash_attn)
        except LlamaError:
            if own:
                model.close()
            raise
        e = self.embedder
        log.info("embedding model: %s (%s pooling, %d dimensions, inputs up to %d tokens, %d tokens a decode)",
                 model.path if own else "the chat model", e.pooling, e.dimensions, e.max_input_tokens, e.n_batch)

    def _loop(self) -> None:
        while True:
            self._progress_at = time.monotonic()
            with self._lock:
                if self._stopping:
                    return
            self._drop_cancelled()
            self._admit()
            streams = any(s.active for s in self._slots)
            embedding = self.embedder is not None and self.embedder.pending()
            if not streams and not embedding:
                # Idle: sleep until a request arrives (or, with requests queued, until one may time out).
                self._wake.wait(timeout=1.0 if self._waiting else None)
                self._wake.clear()
                continue
            if streams:
                self._step()
            if embedding:
                self._embed_step(streams)

    def _embed_step(self, streams: bool) -> None:
        """Embed the next inputs. Beside generating streams, the prefill rule: about one decode step's worth of
        work (the streams' gap at most doubles), and not right after a step that prefilled a prompt (the two take
        turns). Alone, a whole batch."""
        assert self.embedder is not None
        if streams and self._step_prefilled and not self._embed_owed:
            self._embed_owed = True
            return
        self._embed_owed = False
        max_tokens = self.embedder.pace.tokens(self._budget.decode_s) if streams else None
        done, failed, cancelled = self.embedder.step(max_tokens)
        self.metrics.embedding_steps.inc()
        with self._lock:
            self._in_flight -= len(done) + len(failed) + len(cancelled)
        for handle in done:
            self.metrics.embedding_inputs.inc(len(handle.request.inputs))
            self.metrics.embedding_tokens.inc(handle.request.n_tokens)
        for outcome, handles in (("ok", done), ("error", failed), ("cancelled", cancelled)):
            if handles:
                self.metrics.embedding_requests.labels(outcome=outcome).inc(len(handles))

    def _drop_cancelled(self) -> None:
        for slot in self._slots:
            if slot.active is not None and slot.active.handle.cancelled:
                self._finish(slot, FinishReason.CANCELLED)
        if not self._waiting:
            return
        deadline = time.perf_counter() - self.settings.queue_timeout_s
        with self._lock:
            cancelled = [h for h in self._waiting if h.cancelled]
            expired = [h for h in self._waiting if not h.cancelled and h.arrived < deadline]
            if cancelled or expired:
                self._waiting = deque(h for h in self._waiting if not h.cancelled and h.arrived >= deadline)
                self._in_flight -= len(cancelled) + len(expired)
        for _ in cancelled:
            self.metrics.requests.labels(outcome="cancelled").inc()
        for handle in expired:
            self.metrics.requests.labels(outcome="queue_timeout").inc()
            handle.publish(ErrorEvent(
                message=f"no slot became free within {self.settings.queue_timeout_s:g} s; retry later",
                status=503, code="queue_timeout"))

    def _admit(self) -> None:
        if self._embed_incoming:
            with self._lock:
                incoming, self._embed_incoming = self._embed_incoming, []
            for handle in incoming:
                assert self.embedder is not None
                self.embedder.enqueue(handle)
        while True:
            free = [s for s in self._slots if s.active is None]
            with self._lock:
                if not free or not self._waiting:
                    return
                handle = self._waiting.popleft()
            try:
                self._start(handle, free)
            except Exception as exc:  # one request's failure must not stop the others
                log.exception("request %s could not start", handle.request.request_id)
                for slot in free:
                    if slot.active is not None and slot.active.handle is handle:
                        self._finish(slot, FinishReason.ERROR, error=f"could not start: {exc}", drop_cache=True)
                        break
                else:
                    with self._lock:
                        self._in_flight -= 1
                    self.metrics.requests.labels(outcome="error").inc()
                    handle.publish(ErrorEvent(message=f"could not start: {exc}"))

    def _start(self, handle: RequestHandle, free: list[_Slot]) -> None:
        prompt = handle.request.prompt_tokens
        scope = handle.request.cache_scope
        busy = frozenset() if self._ctx.kv_unified else frozenset(s.seq_id for s in self._slots if s.active)
        slot, shared = choose_slot(free, prompt, scope, handle.request.cache_prompt, busy,
                                   evict_freely=self._prompt_cache is not None)
        # Cells a queued KV-stream copy has yet to move (at the next decode) must not be read or overwritten now.
        cache = None if slot.seq_id in self._copy_pending else self._prompt_cache
        entry: Entry | None = None
        donor: _Slot | None = None
        if handle.request.cache_prompt and self._partial_reuse:
            # A new conversation whose system prompt another slot holds starts from a copy of those cells.
            donor, n = best_donor(self._slots, prompt, scope)
            # Sharing cells of a unified cache costs nothing; copying a KV stream pays only for long prefixes.
            copy_min = 1 if self._ctx.kv_unified else COPY_MIN_TOKENS
            if donor is slot or n < shared + copy_min:
                donor, n = None, shared
            # A conversation that lost its slot gets its cells back from host memory.
            entry, n_kept = cache.best(prompt, scope) if cache is not None else (None, 0)
            if cache is not None and entry is not None and worth_restoring(len(entry.tokens), n_kept - n):
                donor = None
                cache.take(entry)  # before the stash below, which could evict it
            else:
                entry = None
        if cache is not None:  # what the slot loses goes to host memory first
            self._stash(slot, 0 if entry is not None or donor is not None else shared)
        if entry is not None:
            shared = n_kept if self._restore(slot, entry) else 0
        elif donor is not None:
            self._ctx.seq_copy(donor.seq_id, slot.seq_id, n)
            if not self._ctx.kv_unified:
                self._copy_pending |= {donor.seq_id, slot.seq_id}
            slot.tokens = list(donor.tokens)  # cut back to the shared prefix below
            shared = n
        # At least one prompt token is always decoded, to get logits for the first sample.
        keep = self._cut_back(slot, min(shared, len(prompt) - 1))
        slot.scope, slot.prompt_len, slot.keep = scope, len(prompt), handle.request.cache_prompt
        assert self.model is not None
        sampler = Sampler(handle.request.sampling, self.model.n_vocab, self.model.vocab)
        if handle.request.sampling.has_penalties:
            for token in prompt[-handle.request.sampling.penalty_last_n:]:
                sampler.accept(token)
        slot.active = _Active(
            handle=handle,
            sampler=sampler,
            text=TextStream(handle.request.stop),
            n_past=keep,
            cached_tokens=keep,
            started=time.perf_counter(),
        )
        self._setup_speculation(slot.active)
        self.metrics.prompt_tokens.inc(len(prompt))
        self.metrics.cached_prompt_tokens.inc(keep)

    def _stash(self, slot: _Slot, keep: int) -> None:
        """Before ``slot`` is cut back to ``keep`` tokens for another prompt, keep its cells in the host-memory
        prompt cache, when what it loses could ever be worth putting back. A failure only loses the cache entry."""
        cache = self._prompt_cache
        assert cache is not None
        # Each copy costs the step that takes the slot a serialization of all its cells: none for a request that
        # asked not to be cached, none for cells an entry already holds (a conversation restored and cut back).
        if not slot.keep or not worth_restoring(len(slot.tokens), len(slot.tokens) - keep) \
                or cache.covers(slot.tokens, slot.scope):
            return
        t0 = time.perf_counter()
        try:
            size = self._ctx.seq_state_size(slot.seq_id)
            if not 0 < size <= cache.limit_bytes:
                return
            kept = cache.put(slot.tokens, slot.scope, self._ctx.seq_state(slot.seq_id))
        except (LlamaError, MemoryError) as exc:
            log.warning("prompt cache: could not keep %d tokens: %s", len(slot.tokens), exc)
            return
        if kept:
            log.debug("prompt cache: kept %d tokens (%.1f MiB) in %.1f ms; %d entries, %.1f MiB", len(slot.tokens),
                      size / 2**20, (time.perf_counter() - t0) * 1000, len(cache), cache.bytes / 2**20)

    def _restore(self, slot: _Slot, entry: Entry) -> bool:
        """Put a cached conversation's cells (already taken out of the cache) back into ``slot``."""
        if not self._ctx.set_seq_state(slot.seq_id, entry.data):  # type: ignore[arg-type]
            log.warning("prompt cache: llama.cpp refused %d cached tokens; computing them again", len(entry.tokens))
            slot.tokens = []
            return False
        slot.tokens = list(entry.tokens)
        return True

    def _setup_speculation(self, a: _Active) -> None:
        """Whether and how this request speculates: its own ``speculative`` field, else the server's setting;
        with the draft model where one is loaded (unless SPECULATIVE is ngram), else by prompt lookup."""
        s = self.settings
        wanted = a.handle.request.speculative
        if not (wanted if wanted is not None else s.speculative != "off"):
            return
        a.draft_len = DraftLength(max_k=s.draft_max)
        if self._draft_model is None or s.speculative == "ngram":
            a.ngram = NgramIndex(max_n=s.ngram_size)
            a.ngram.extend(a.prompt)

    def _cut_back(self, slot: _Slot, keep: int) -> int:
        """Drop a slot's cells past ``keep`` tokens; returns how many it keeps (0 where the model's memory
        cannot keep that prefix, so the prompt is computed whole rather than wrong)."""
        assert self.model is not None
        if keep and keep < len(slot.tokens) and not self._partial_reuse:
            keep = 0
        if keep and not self._ctx.seq_rm(slot.seq_id, keep, -1):
            keep = 0
        if keep and self.model.n_swa and not 0 <= self._ctx.seq_pos_min(slot.seq_id) <= max(0, keep - self.model.n_swa):
            keep = 0  # the sliding window has already dropped cells the next token attends to (or all of them: -1)
        if keep == 0:
            self._ctx.seq_rm(slot.seq_id, 0, -1)
        del slot.tokens[keep:]
        return keep

    def _step(self) -> None:
        batch = self._batch
        batch.clear()
        outputs: list[tuple[_Slot, int]] = []  # slots that sample this step, with their batch index
        added: list[tuple[_Slot, list[int]]] = []
        # Running streams first, one token each; prompts share what the budget leaves beside them.
        for slot in self._slots:
            a = slot.active
            if a is not None and not a.prefilling:
                outputs.append((slot, batch.add_one(a.last_token, a.n_past, slot.seq_id)))
                added.append((slot, [a.last_token]))
        n_decode = len(added)
        n_drafts = self._add_drafts(batch, [slot for slot, _ in added])
        waiting = sorted((s for s in self._slots if s.active and s.active.prefilling),
                         key=lambda s: s.active.handle.arrived)  # type: ignore[union-attr]
        ratio = self.settings.waiting_served_ratio
        # Streams with one token so far were prefilled while these prompts arrived: no pace to keep yet (two
        # requests a few ms apart would otherwise go one whole, the other a token a step beside it).
        paced = sum(1 for slot, _ in added if slot.active is not None and slot.active.n_generated > 1)
        # A queue of prompts outgrowing the streams: the short ones start together (one short pause of the
        # streams) rather than a token a step each, one after another.
        whole = bool(n_decode and ratio and len(waiting) > ratio * paced
                     and self._add_prompts(batch, waiting, min(batch.free, QUEUE_STEP_TOKENS), added, outputs,
                                           whole=True))
        if whole:  # the prompts that did not fit whole still advance by the budget
            taken = {id(slot) for slot, _ in added[n_decode:]}
            waiting = [slot for slot in waiting if id(slot) not in taken]
        if waiting:
            room = batch.free
            if n_decode:
                # Drafts lengthen the step like prompt tokens do: they come out of the prompts' budget (which still
                # advances a prompt by at least one token, except in the budget's plain step now and then).
                budget = self._budget.tokens(batch.free)
                room = max(1, budget - n_drafts) if budget else 0
            self._add_prompts(batch, waiting, room, added, outputs, whole=False)
        prefilling = [slot.active.handle for slot, _ in added[n_decode:] if slot.active is not None]
        self._step_prefilled = bool(prefilling)
        self._ctx.clear_abort()
        self._prefilling_now = frozenset(prefilling)
        if any(h.cancelled for h in prefilling):
            self._ctx.abort()  # cancelled between the loop's check and now: the step stops at once
        started = time.perf_counter()
        self._copy_pending.clear()  # llama.cpp makes the queued copies at the start of this decode
        try:
            done = self._ctx.decode(batch)
        except LlamaError as exc:
            log.error("%s; failing the %d requests in this batch", exc, len(added))
            for slot, _ in added:
                self._finish(slot, FinishReason.ERROR, error=str(exc), drop_cache=True)
            return
        finally:
            self._prefilling_now = frozenset()
        if not done:
            self._aborted(added)
            return
        seconds = time.perf_counter() - started
        if not whole:  # a step of whole prompts is not what the budget measures (a few tokens beside the streams)
            # Drafts cost what prompt tokens cost: extra tokens in the step.
            self._budget.observe(seconds, n_decode, batch.n_tokens - n_decode)
        if log.isEnabledFor(logging.DEBUG):  # the trace that explains a long gap or a slow level
            log.debug("step: %d streams, %d drafted, %d prompt tokens: %.1f ms", n_decode, n_drafts,
                      batch.n_tokens - n_decode - n_drafts, seconds * 1000)
        self.metrics.decode_steps.inc()
        for slot, tokens in added:
            assert slot.active is not None
            slot.active.n_past += len(tokens)
            slot.tokens.extend(tokens)
        for slot, index in outputs:
            try:
                self._sampled(slot, index)
            except GrammarDeadEnd as exc:  # the request's own grammar (and bias) allow nothing: its error
                if slot.active is not None:
                    self._finish(slot, FinishReason.ERROR, error=f"sampling failed: {exc}", status=400,
                                 code="invalid_grammar")
            except Exception as exc:  # one request's failure must not stop the others
                log.exception("sampling failed for %s", slot.active.handle.request.request_id if slot.active else "?")
                if slot.active is not None:
                    self._finish(slot, FinishReason.ERROR, error=f"sampling failed: {exc}", drop_cache=True)

    @staticmethod
    def _add_prompts(batch: Batch, waiting: list[_Slot], room: int, added: list[tuple[_Slot, list[int]]],
                     outputs: list[tuple[_Slot, int]], *, whole: bool) -> int:
        """Put up to ``room`` prompt tokens of the ``waiting`` slots (in order) into the batch; with ``whole``,
        only prompts whose rest fits entirely. Returns how many prompts went in."""
        n = 0
        for slot in waiting:
            if room == 0:
                break
            a = slot.active
            assert a is not None
            chunk = a.prompt[a.n_past:a.n_past + room]
            last = a.n_past + len(chunk) == len(a.prompt)
            if whole and not last:
                continue
            room -= len(chunk)
            index = batch.add(chunk, a.n_past, slot.seq_id, last)
            added.append((slot, chunk))
            n += 1
            if last:
                outputs.append((slot, index))
        return n

    def _draft_cost(self) -> float:
        """What one more token adds to a decode step, in decode steps (the prefill budget's measurements)."""
        b = self._budget
        if b.decode_s and b.per_token_s:
            return b.per_token_s / b.decode_s
        return 0.5  # until measured: the embedded model on 2 cores

    def _add_drafts(self, batch: Batch, decoding: list[_Slot]) -> int:
        """Put the drafts of the speculating streams into the batch, after their last tokens, with logits for
        each (so the step verifies them); returns how many. Each stream drafts at most DRAFT_MAX, and all of them
        together at most half the batch while a prompt waits to be prefilled, so drafts never starve it."""
        wants: dict[_Slot, int] = {}
        for slot in decoding:
            a = slot.active
            assert a is not None
            a.drafts = []
            if a.draft_len is None:
                continue
            # Room left in the request (the token sampled from the last draft is generated too) and in the slot.
            k = min(a.draft_len.k(self._draft_cost()), a.handle.request.max_tokens - a.n_generated - 1,
                    self.slot_ctx - a.n_past - 2)
            if k > 0:
                wants[slot] = k
        if not wants:
            return 0
        prompts_waiting = any(s.active is not None and s.active.prefilling for s in self._slots)
        share = (batch.free // 2 if prompts_waiting else batch.free) // len(wants)
        by_model = {slot.seq_id: (slot.tokens + [slot.active.last_token], min(k, share))  # type: ignore[union-attr]
                    for slot, k in wants.items() if slot.active.ngram is None}  # type: ignore[union-attr]
        proposed = self._draft_model.draft(by_model) if by_model and self._draft_model is not None else {}
        n = 0
        for slot, k in wants.items():
            a = slot.active
            assert a is not None
            drafts = a.ngram.draft(min(k, share)) if a.ngram is not None else proposed.get(slot.seq_id, [])
            if drafts:
                a.drafts = drafts
                a.draft_index = batch.add(drafts, a.n_past + 1, slot.seq_id, True, all_logits=True) - len(drafts) + 1
                n += len(drafts)
        return n

    def _aborted(self, added: list[tuple[_Slot, list[int]]]) -> None:
        """A cancel stopped the step: llama.cpp keeps the micro-batches it finished, so every sequence of the
        step is cut back to where it stood, and the others run this step again next time."""
        for slot, _ in added:
            a = slot.active
            assert a is not None
            if not self._ctx.seq_rm(slot.seq_id, a.n_past, -1):  # recurrent state cannot step back
                self._finish(slot, FinishReason.ERROR, error="the step was aborted and the model's state lost",
                             drop_cache=True)

    def _sampled(self, slot: _Slot, index: int) -> None:
        """Sample the slot's next token from the logits at ``index``. With drafts in the step, go on sampling at
        each draft's position while the sample equals the draft (that token's cell is then already computed);
        the cells of the drafts not taken are removed before the request may finish."""
        a = slot.active
        assert a is not None
        drafts, a.drafts = a.drafts, []
        base = a.n_past  # the first draft's position
        accepted = 0
        while True:
            reason = self._sample_one(a, index)
            if reason is None and accepted < len(drafts) and a.last_token == drafts[accepted]:
                slot.tokens.append(a.last_token)
                a.n_past += 1
                index = a.draft_index + accepted
                accepted += 1
                continue
            break
        if drafts:
            if accepted < len(drafts):
                self._ctx.seq_rm(slot.seq_id, base + accepted, -1)
            assert a.draft_len is not None
            a.draft_len.observe(len(drafts), accepted)
            self.metrics.draft_tokens.inc(len(drafts))
            self.metrics.draft_accepted.inc(accepted)
        if reason is not None:
            self._finish(slot, reason)

    def _sample_one(self, a: _Active, index: int) -> FinishReason | None:
        """Sample and publish one token; the reason the request ends with it, or None."""
        assert self.model is not None
        token = a.sampler.sample(self._ctx.ptr, index)
        now = time.perf_counter()
        if a.first_token_at is None:
            a.first_token_at = now
            self.metrics.time_to_first_token.observe(now - a.handle.arrived)
        elif a.last_token_at is not None:
            self.metrics.inter_token.observe(now - a.last_token_at)
        a.last_token_at = now
        if self.model.is_eog(token) and not a.handle.request.ignore_eos:
            return FinishReason.STOP
        a.n_generated += 1
        a.last_token = token
        if a.ngram is not None:
            a.ngram.extend([token])
        delta = a.text.push(self.model.token_to_piece(token))
        a.handle.publish(TokenEvent(token=token, text=delta, logprob=a.sampler.last_logprob))
        if a.text.stopped:
            return FinishReason.STOP
        if a.n_generated >= a.handle.request.max_tokens or a.n_past + 1 >= self.slot_ctx:
            return FinishReason.LENGTH
        return None

    def _finish(
        self, slot: _Slot, reason: FinishReason, *, error: str | None = None, drop_cache: bool = False,
        status: int = 500, code: str | None = None,
    ) -> None:
        a = slot.active
        assert a is not None
        slot.active = None
        slot.last_used = time.perf_counter()
        a.sampler.close()
        if reason is FinishReason.ERROR or drop_cache:
            # After a failure the cells may not match ``tokens``. A finished or cancelled request keeps them:
            # with one KV stream per slot nobody else could use them, and a stopped answer may be continued.
            self._ctx.seq_rm(slot.seq_id, 0, -1)
            slot.tokens.clear()
        with self._lock:
            self._in_flight -= 1
        self.metrics.requests.labels(outcome=reason.value).inc()
        self.metrics.generated_tokens.inc(a.n_generated)
        if error is not None:
            a.handle.publish(ErrorEvent(message=error, status=status,
                                        code=code or ("shutting_down" if status == 503 else "server_error")))
            return
        tail = a.text.flush()
        if tail:
            a.handle.publish(TokenEvent(token=-1, text=tail))
        end = time.perf_counter()
        self.metrics.request_duration.observe(end - a.handle.arrived)
        first = a.first_token_at or end
        decode_s = (a.last_token_at or end) - first
        a.handle.publish(FinalEvent(
            text=a.text.text,
            finish_reason=reason,
            usage=Usage(
                prompt_tokens=len(a.prompt), completion_tokens=a.n_generated, cached_tokens=a.cached_tokens
            ),
            timings=Timings(
                queue_ms=(a.started - a.handle.arrived) * 1000,
                time_to_first_token_ms=(first - a.handle.arrived) * 1000,
                total_ms=(end - a.handle.arrived) * 1000,
                decode_tokens_per_second=(a.n_generated - 1) / decode_s if decode_s > 0 else 0.0,
                draft_tokens=a.draft_len.drafted if a.draft_len else 0,
                draft_accepted=a.draft_len.accepted if a.draft_len else 0,
            ),
        ))

    def _fail_everything(self, message: str) -> None:
        for slot in self._slots:
            if slot.active is not None:
                self._finish(slot, FinishReason.ERROR, error=message, status=503)
        with self._lock:
            waiting, self._waiting = list(self._waiting), deque()
            self._in_flight -= len(waiting)
        for handle in waiting:
            handle.publish(ErrorEvent(message=message, status=503, code="shutting_down"))
        with self._lock:
            incoming, self._embed_incoming = self._embed_incoming, []
            self._in_flight -= len(incoming)
        for embed in incoming:
            embed.fail(message, status=503)
        if self.embedder is not None:
            dropped = self.embedder.fail_all(message, status=503)
            with self._lock:
                self._in_flight -= len(dropped)
