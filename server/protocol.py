"""Request and response bodies of the native API (``POST /generate``, as in the seed's README, and llama-server's
``POST /infill``)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from server.engine.sampling import SamplingParams
from server.engine.types import FinalEvent
from server.errors import ErrorDetail, bad_request
from server.grammar import GrammarError, SchemaError, check_depth, schema_to_grammar

MAX_STOP_STRINGS = 16


def check_stop_strings(value: list[str] | str | None, most: int) -> list[str] | str | None:
    """Validation shared by the native and OpenAI requests: at most ``most`` strings of 1 to 256 characters."""
    stops = [value] if isinstance(value, str) else value or []
    if len(stops) > most:
        raise ValueError(f"at most {most} stop strings")
    if any(not s or len(s) > 256 for s in stops):
        raise ValueError("stop strings must have 1 to 256 characters")
    return value


def stop_tuple(value: list[str] | str | None) -> tuple[str, ...]:
    return (value,) if isinstance(value, str) else tuple(value or ())


class RouterSampling(BaseModel):
    """``sampling_params`` as vllm-router forwards ``/generate`` (SGLang's GenerateRequest): the router rewrites
    the body into that shape, keeping these and dropping the seed's own fields."""

    model_config = ConfigDict(extra="ignore", strict=True)

    max_new_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=5.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1, le=100_000)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=10.0)
    stop: list[str] | str | None = None
    ignore_eos: bool | None = None


class SamplingRequest(BaseModel):
    """The controls the native routes share (``/generate``, ``/infill``): how many tokens, how they are sampled,
    how the answer comes."""

    model_config = ConfigDict(extra="forbid", strict=True)  # strict: JSON types as documented ("stream": 0 is no bool)

    max_length: int | None = Field(
        default=None, ge=1, description="Tokens to generate (not counting the prompt). Unset: the server default."
    )
    temperature: float = Field(default=0.7, ge=0.0, le=5.0, description="0 is greedy (deterministic).")
    top_p: float = Field(default=0.95, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    top_k: int = Field(default=40, ge=0, le=100_000, description="Keep the k likeliest tokens; 0 keeps all.")
    min_p: float = Field(default=0.05, ge=0.0, le=1.0, description="Drop tokens below min_p x the likeliest's p.")
    repeat_penalty: float = Field(default=1.0, gt=0.0, le=10.0, description="1.0 is off.")
    stop: list[str] | str | None = Field(default=None, description="Stop before any of these strings.")
    seed: int | None = Field(default=None, ge=0, le=2**32 - 2, description="Sampling seed, for repeatable output.")
    stream: bool = Field(default=False, description="Answer with server-sent events, one per token.")
    ignore_eos: bool = Field(
        default=False, description="Keep generating past end-of-text tokens until max_length (for benchmarks)."
    )
    grammar: str | None = Field(
        default=None, min_length=1, max_length=100_000,
        description="A GBNF grammar (llama.cpp's grammars/README.md) the output must match; its start rule is "
        "`root`.")
    json_schema: dict[str, Any] | bool | None = Field(
        default=None, description="A JSON Schema the output must validate against (the subset a grammar can "
        "enforce; other keywords are refused by name).")
    speculative: bool | None = Field(
        default=None,
        description="Speculative decoding for this request (drafts verified in one batch; greedy output is the "
        "same): true or false; unset follows the server's SPECULATIVE setting.")
    cache_prompt: bool = Field(
        default=True,
        description="Reuse the KV cache of a slot whose tokens share a prefix with this prompt. Greedy output "
        "can differ in late tokens from an uncached run, as llama.cpp's kernels round differently for one "
        "token than for a batch of them.",
    )

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: list[str] | str | None) -> list[str] | str | None:
        return check_stop_strings(value, MAX_STOP_STRINGS)

    def stop_strings(self) -> tuple[str, ...]:
        return stop_tuple(self.stop)

    def grammar_text(self) -> str | None:
        """The grammar to constrain the output with: ``grammar`` as given, or ``json_schema`` converted."""
        if self.grammar is not None and self.json_schema is not None:
            raise bad_request("give grammar or json_schema, not both", param="json_schema", code="invalid_value")
        if self.json_schema is None:
            if self.grammar is not None:
                try:
                    check_depth(self.grammar)
                except GrammarError as exc:
                    raise bad_request(str(exc), param="grammar", code="invalid_grammar") from exc
            return self.grammar
        try:
            return schema_to_grammar(self.json_schema)
        except SchemaError as exc:
            raise bad_request(str(exc), param="json_schema", code="unsupported_schema") from exc

    @property
    def grammar_param(self) -> str:
        return "json_schema" if self.json_schema is not None else "grammar"

    def to_sampling(self) -> SamplingParams:
        return SamplingParams(
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            min_p=self.min_p,
            repeat_penalty=self.repeat_penalty,
            seed=self.seed,
            grammar=self.grammar_text(),
        )


class GenerateRequest(SamplingRequest):
    """The seed's ``{"prompt", "max_length", "temperature"}``, plus the usual sampling controls, and the shape
    vllm-router forwards (``sampling_params``; its ``return_logprob``/``return_hidden_states`` flags off)."""

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"prompt": "Once upon a time", "max_length": 50, "temperature": 0.7}]},
    )

    prompt: str | list[int] = Field(
        min_length=1, description="Text to continue, or the token ids of a prompt already tokenized."
    )
    sampling_params: RouterSampling | None = Field(
        default=None, description="SGLang's sampling fields, as vllm-router forwards /generate; where given they "
        "take the place of the seed's (max_new_tokens for max_length).")
    return_logprob: Literal[False] = Field(default=False, description="vllm-router's flag; only false is served.")
    return_hidden_states: Literal[False] = Field(default=False, description="vllm-router's flag; only false.")

    @model_validator(mode="after")
    def _router_fields(self) -> GenerateRequest:
        """Fold vllm-router's ``sampling_params`` into the seed's fields, so one request reaches the engine."""
        p = self.sampling_params
        if p is None:
            return self
        updates = {"max_length": p.max_new_tokens, "temperature": p.temperature, "top_p": p.top_p,
                   "top_k": None if p.top_k is None else max(p.top_k, 0), "min_p": p.min_p,
                   "repeat_penalty": p.repetition_penalty, "stop": check_stop_strings(p.stop, MAX_STOP_STRINGS),
                   "ignore_eos": p.ignore_eos}
        for name, value in updates.items():
            if value is not None:
                object.__setattr__(self, name, value)
        return self


# Each chunk of input_extra is tokenized apart, and named in the prompt.
MAX_EXTRA_CHUNKS = 1024


class ExtraChunk(BaseModel):
    """A piece of another file, given to the model as context ahead of the file being edited."""

    model_config = ConfigDict(extra="ignore", strict=True)  # llama.vim sends each chunk's `time` too

    filename: str = Field(default="tmp", description="The file it comes from (llama-server's default: tmp).")
    text: str


class InfillRequest(SamplingRequest):
    """llama-server's ``POST /infill``: fill in the middle between ``input_prefix`` and ``input_suffix`` with the
    model's own fill-in-the-middle tokens, ``input_extra`` (other files' chunks) ahead as context; the answer and
    the stream are /generate's."""

    # Editors send llama-server's other fields (llama.vim: samplers, t_max_prompt_ms, t_max_predict_ms, n_indent,
    # response_fields, id_slot): accepted and ignored here, as on the OpenAI routes.
    model_config = ConfigDict(extra="ignore", json_schema_extra={"examples": [{
        "input_prefix": "def add(a, b):\n    ", "input_suffix": "\n\nprint(add(1, 2))\n", "max_length": 16,
        "temperature": 0}]})

    input_prefix: str = Field(description="The text before the gap (the file up to the cursor).")
    input_suffix: str = Field(description="The text after the gap (the file from the cursor on).")
    input_extra: list[ExtraChunk] = Field(
        default_factory=list, max_length=MAX_EXTRA_CHUNKS,
        description="Chunks of other files, as context: with the model's file-separator token each is named by "
        "its filename, without it they are set apart by a snippet marker (as llama-server does).")
    prompt: str = Field(
        default="", description="Text already typed in the gap: it follows the prefix, and the answer continues "
        "it (llama.vim sends the cursor line's start here).")
    n_predict: int | None = Field(
        default=None, ge=-1, description="llama-server's name for max_length (-1: the server's default; 0, which "
        "llama.vim sends to warm the cache with input_extra: the prompt and one token).")

    @model_validator(mode="after")
    def _n_predict(self) -> InfillRequest:
        if self.max_length is None and self.n_predict is not None and self.n_predict >= 0:
            object.__setattr__(self, "max_length", max(1, self.n_predict))
        return self


class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cached_tokens: int = Field(description="Prompt tokens whose KV cache was reused from an earlier request.")

    @classmethod
    def of(cls, final: FinalEvent) -> UsageInfo:
        u = final.usage
        return cls(
            prompt_tokens=u.prompt_tokens,
            completion_tokens=u.completion_tokens,
            total_tokens=u.prompt_tokens + u.completion_tokens,
            cached_tokens=u.cached_tokens,
        )


class TimingsInfo(BaseModel):
    queue_ms: float
    time_to_first_token_ms: float
    total_ms: float
    decode_tokens_per_second: float
    draft_tokens: int = Field(default=0, description="Speculative decoding: tokens drafted for this request.")
    draft_accepted: int = Field(default=0, description="Of the drafted tokens, those the model accepted.")

    @classmethod
    def of(cls, final: FinalEvent) -> TimingsInfo:
        t = final.timings
        return cls(
            queue_ms=round(t.queue_ms, 3),
            time_to_first_token_ms=round(t.time_to_first_token_ms, 3),
            total_ms=round(t.total_ms, 3),
            decode_tokens_per_second=round(t.decode_tokens_per_second, 3),
            draft_tokens=t.draft_tokens,
            draft_accepted=t.draft_accepted,
        )


FinishReasonName = Literal["stop", "length"]


class GenerateResponse(BaseModel):
    id: str
    model: str
    text: str = Field(description="The generated continuation (without the prompt).")
    finish_reason: FinishReasonName
    usage: UsageInfo
    timings: TimingsInfo


class InfillResponse(GenerateResponse):
    """/generate's answer, with llama-server's fields that editors read (llama.vim, llama.vscode: ``content``)."""

    content: str = Field(description="The same as text: llama-server's name for it.")
    stop: Literal[True] = True
    tokens_predicted: int
    tokens_evaluated: int
    tokens_cached: int


class TokenChunk(BaseModel):
    """A streamed event: the text one token added."""

    type: Literal["token"] = "token"
    text: str


class DoneChunk(BaseModel):
    """The stream's last event."""

    type: Literal["done"] = "done"
    id: str
    model: str
    finish_reason: FinishReasonName
    usage: UsageInfo
    timings: TimingsInfo


class ErrorChunk(BaseModel):
    """An error after the stream began."""

    type: Literal["error"] = "error"
    error: ErrorDetail


class VllmTokenizeRequest(BaseModel):
    """vLLM's ``POST /tokenize`` (``prompt``, or chat ``messages`` rendered with the model's template), as
    vllm-router's cache_aware policy asks each replica for a prompt's tokens."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    add_special_tokens: bool = True

    @model_validator(mode="after")
    def _one_input(self) -> VllmTokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give prompt or messages")
        return self


class VllmTokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class TokenizeRequest(BaseModel):
    """llama-server's ``POST /tokenize``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    content: str = Field(description="Text to tokenize.")
    add_special: bool = Field(default=False, description="Add the model's BOS token (as llama-server does).")
    parse_special: bool = Field(
        default=True, description="Read control-token text such as `<|im_end|>` as that token (llama-server's "
        "default).")
    with_pieces: bool = Field(default=False, description="Answer each token with its text piece.")


class TokenPiece(BaseModel):
    id: int
    piece: str | list[int] = Field(description="The token's text, or its bytes when they are not valid UTF-8 "
                                   "alone (part of a character).")


class TokenizeResponse(BaseModel):
    tokens: list[int] | list[TokenPiece]


class DetokenizeRequest(BaseModel):
    """llama-server's ``POST /detokenize``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    tokens: list[int] = Field(description="Token ids to turn back into text.")


class DetokenizeResponse(BaseModel):
    content: str
