"""The embedding core every dialect's route calls (OpenAI's ``/v1/embeddings``, Ollama's ``/api/embed``): inputs
checked and tokenized off the event loop, embedded by the engine thread's embedding context, vectors cut to the
width asked for.

Nothing is cut silently: an input longer than the embedding model's context is refused with its index and length
(llama-cpp-python's ``embed()`` truncates; OpenAI answers 400), as is a token id outside the vocabulary.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from server.engine.core import Engine, EngineNotReady, EngineOverloaded, EngineState
from server.engine.embedding import Embedder, EmbeddingFailed, EmbeddingHandle, EmbeddingRequest
from server.errors import APIError, bad_request, overloaded, unavailable
from server.prompt_limits import utf8_size
from server.settings import Settings

# Work small enough to do on the event loop rather than pay a worker thread's hop for (a request's whole
# latency is a few ms at one short input): input characters (or token ids) to tokenize, vector components to write.
INLINE_CHARS = 4096
INLINE_FLOATS = 16_384


def off_loop_size(vectors: list[np.ndarray]) -> bool:
    """Whether writing these vectors' JSON belongs in a worker thread."""
    return sum(v.size for v in vectors) > INLINE_FLOATS


@dataclass(frozen=True)
class Embeddings:
    vectors: list[np.ndarray]  # L2-normalised, one per input, in input order
    prompt_tokens: int


def not_served() -> APIError:
    return APIError(501, "this server serves no embedding model: start it with EMBEDDING_MODEL_PATH (a GGUF "
                    "embedding model), or with EMBEDDING_POOLING to embed with the chat model",
                    type="not_supported_error", code="embeddings_not_enabled")


class EmbeddingService:
    def __init__(self, engine: Engine, settings: Settings, chat_model_name: str) -> None:
        self.engine = engine
        self.settings = settings
        path = settings.embedding_model_path
        # The name /v1/models lists and answers carry: the embedding GGUF's, or the chat model's when it embeds.
        self.model_name = Path(path).name.removesuffix(".gguf") if path is not None else chat_model_name

    @property
    def served(self) -> bool:
        return self.settings.embeddings_on

    def embedder(self) -> Embedder:
        if not self.served:
            raise not_served()
        embedder = self.engine.embedder
        if embedder is None or self.engine.state is not EngineState.READY:
            raise unavailable(self.engine.not_ready_reason())
        return embedder

    def check_dimensions(self, dimensions: int | None) -> int | None:
        """The width to cut vectors to (None: their own), or a 400: only widths the model was trained to be cut
        to (EMBEDDING_DIMENSIONS), as vLLM serves Matryoshka models."""
        full = self.embedder().dimensions
        if dimensions is None or dimensions == full:
            return None
        allowed = sorted(d for d in self.settings.embedding_dimensions if d < full)
        if dimensions in allowed:
            return dimensions
        hint = (f"one of {', '.join(map(str, allowed))} or {full}" if allowed else
                f"{full}: this model was not trained to be cut to fewer (set EMBEDDING_DIMENSIONS for one that was)")
        raise bad_request(f"dimensions {dimensions} is not served; it must be {hint}", param="dimensions",
                          code="invalid_value")

    async def embed(self, inputs: list[str] | list[list[int]], *, dimensions: int | None = None,
                    param: str = "input", request_id: str = "") -> Embeddings:
        embedder = self.embedder()
        width = self.check_dimensions(dimensions)
        s = self.settings
        if not inputs:
            raise bad_request(f"'{param}' holds no input", param=param, code="invalid_value")
        if len(inputs) > s.embedding_max_inputs:
            raise bad_request(f"'{param}' holds {len(inputs)} inputs; at most {s.embedding_max_inputs} are taken in "
                              "one request (EMBEDDING_MAX_INPUTS)", param=param, code="too_many_inputs")
        # A few short texts are tokenized at once (tens of microseconds); anything longer in a worker thread.
        small = sum(len(item) for item in inputs) <= INLINE_CHARS
        tokens = (_tokenize(embedder, inputs, s.embedding_max_tokens, param) if small else
                  await asyncio.to_thread(_tokenize, embedder, inputs, s.embedding_max_tokens, param))
        handle = self._submit(EmbeddingRequest(inputs=tokens, request_id=request_id))
        try:
            vectors = await asyncio.shield(handle.future)
        except asyncio.CancelledError:  # the client went away: its inputs leave the queue at the next step
            handle.cancel()
            raise
        except EmbeddingFailed as exc:
            raise (unavailable(str(exc)) if exc.status == 503 else
                   APIError(exc.status, str(exc), type="server_error", code="embedding_failed")) from exc
        if width is not None:
            vectors = [_renormalised(v[:width]) for v in vectors]
        return Embeddings(vectors=vectors, prompt_tokens=sum(len(t) for t in tokens))

    def _submit(self, request: EmbeddingRequest) -> EmbeddingHandle:
        try:
            return self.engine.submit_embedding(request)
        except EngineOverloaded as exc:
            raise overloaded(str(exc)) from exc
        except EngineNotReady as exc:
            raise unavailable(str(exc)) from exc


def json_floats(vector: np.ndarray) -> list[float]:
    """A vector's components for JSON, to 8 decimals: a float32's own precision for the components of a unit
    vector (one unit in the last place at 0.05 is 4e-9), in half the text of float64's 17 digits (and half the
    time to write and to read)."""
    return np.round(vector.astype(np.float64), 8).tolist()  # type: ignore[no-any-return]


def _renormalised(vector: np.ndarray) -> np.ndarray:
    norm = float(np.linalg.norm(vector))
    return vector / norm if norm > 0 else vector


def _tokenize(embedder: Embedder, inputs: list[str] | list[list[int]], max_total: int, param: str
              ) -> tuple[tuple[int, ...], ...]:
    """Each input's tokens (text with the model's own special tokens: [CLS] ... [SEP], BOS...; token ids as
    given), each checked against the model's limit, all of them against ``max_total``. Linear in the text, whose
    size the body limit bounds; run in a worker thread."""
    limit = embedder.max_input_tokens
    n_vocab = embedder.model.n_vocab
    out: list[tuple[int, ...]] = []
    total = 0
    for i, item in enumerate(inputs):
        name = f"{param}[{i}]" if len(inputs) > 1 else param
        if isinstance(item, str):
            if not item:
                raise bad_request(f"{name} is empty", param=name, code="invalid_value")
            utf8_size(item, name, name)
            tokens = tuple(embedder.model.tokenize(item, add_special=True, parse_special=False))
            if not tokens:  # a tokenizer that adds nothing and drops all of it (blanks): nothing to embed
                raise bad_request(f"{name} holds no token once tokenized", param=name, code="invalid_value")
        else:
            if not item:
                raise bad_request(f"{name} holds no token", param=name, code="invalid_value")
            bad = next((t for t in item if not 0 <= t < n_vocab), None)
            if bad is not None:
                raise bad_request(
                    f"{name} holds token id {bad}, outside the embedding model's vocabulary of {n_vocab} tokens "
                    "(token ids from another tokenizer, such as tiktoken's? LangChain's OpenAIEmbeddings sends "
                    "those unless check_embedding_ctx_length=False)", param=name, code="invalid_token")
            tokens = tuple(item)
        if len(tokens) > limit:
            raise _too_long(name, len(tokens), limit, embedder.limit_reason)
        total += len(tokens)
        if total > max_total:
            raise bad_request(f"the inputs hold more than {max_total} tokens together (EMBEDDING_MAX_TOKENS); "
                              "send them in several requests", param=param, code="too_many_tokens")
        out.append(tokens)
    return tuple(out)


def _too_long(name: str, n: int, limit: int, reason: str) -> APIError:
    return bad_request(f"{name} is {n} tokens long; the embedding model takes at most {limit} tokens an input "
                       f"({reason}); nothing is cut: split the input", param=name, code="context_length_exceeded")
