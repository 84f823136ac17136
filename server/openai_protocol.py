"""Request and response bodies of the OpenAI-compatible API (``/v1/completions``, ``/v1/chat/completions``)."""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator

from server.engine.sampling import SamplingParams
from server.errors import bad_request
from server.grammar import JSON_OBJECT_GRAMMAR, SchemaError, schema_to_grammar
from server.protocol import check_stop_strings, stop_tuple

# Fields of OpenAI's API that this server does not implement; a request that sets them gets a clear 400.
UNSUPPORTED_MESSAGE = "{field} is not supported by this server"


class StreamOptions(BaseModel):
    include_usage: bool = False


class JsonSchemaFormat(BaseModel):
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """``text``, ``json_object`` (any JSON object; llama-server's ``schema`` extension accepted too) or
    ``json_schema``."""

    model_config = ConfigDict(strict=True)

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")

    def grammar(self) -> str | None:
        """The GBNF the output must match; a 400 naming the keyword when the schema cannot be enforced."""
        if self.type == "text":
            return None
        schema = self.json_schema.schema_ if self.type == "json_schema" and self.json_schema else self.schema_
        if self.type == "json_schema" and schema is None:
            raise bad_request("response_format json_schema needs json_schema.schema", param="response_format",
                              code="invalid_value")
        if schema is None:
            return JSON_OBJECT_GRAMMAR
        return grammar_of_schema(schema, "response_format")


def grammar_of_schema(schema: object, param: str) -> str:
    try:
        return schema_to_grammar(schema)
    except SchemaError as exc:
        raise bad_request(str(exc), param=param, code="unsupported_schema") from exc


# Each entry of a logit_bias is work for the sampler on the engine thread, every step.
MAX_LOGIT_BIAS = 1024


class SamplingFields(BaseModel):
    """Parameters shared by completions and chat completions."""

    # Fields this server does not know are ignored, as clients send many; known ones must have their JSON type.
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str | None = Field(
        default=None, description="The served model's id (see GET /v1/models); unset: the served model (as vLLM and "
        "llama-server allow).")
    max_tokens: int | None = Field(default=None, ge=1, description="Tokens to generate at most.")
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=16, description="Choices to generate for the prompt.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0, le=2**32 - 2)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = Field(
        default=None, description="Token id (as a string) to a bias from -100 to 100 added to its logit; -100 "
        "keeps the token out.")
    user: str | None = None
    # The sampling extras vLLM and llama-server accept.
    top_k: int = Field(default=0, ge=-1, le=100_000, description="Keep the k likeliest tokens; 0 or -1: all.")
    min_p: float = Field(default=0.0, ge=0.0, le=1.0, description="Drop tokens below min_p x the likeliest's p.")
    repetition_penalty: float = Field(
        default=1.0, gt=0.0, le=10.0, validation_alias=AliasChoices("repetition_penalty", "repeat_penalty"),
        description="Multiplicative penalty on tokens already in the context (1.0 is off); also `repeat_penalty`.")
    response_format: ResponseFormat | None = None
    ignore_eos: bool = Field(
        default=False, description="Generate max_tokens even past end-of-generation tokens (benchmarks); as in "
        "vLLM and llama-server.")
    speculative: bool | None = Field(
        default=None, description="This server's extra: speculative decoding for this request (greedy output is "
        "the same); unset follows the server's SPECULATIVE setting.")

    @field_validator("logit_bias")
    @classmethod
    def _check_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value is not None and len(value) > MAX_LOGIT_BIAS:
            raise ValueError(f"logit_bias has {len(value)} entries; at most {MAX_LOGIT_BIAS} are allowed")
        for token, bias in (value or {}).items():
            digits = token.removeprefix("-")
            if not (digits.isascii() and digits.isdigit() and len(digits) <= 9):  # '²' is a digit to str.isdigit
                raise ValueError(f"logit_bias keys are token ids, not {token!r}")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"logit_bias values are from -100 to 100, not {bias}")
        return value

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        return check_stop_strings(value, 4)  # OpenAI's limit

    def stop_strings(self) -> tuple[str, ...]:
        return stop_tuple(self.stop)

    def to_sampling(self, n_vocab: int, grammar: str | None = None) -> SamplingParams:
        return SamplingParams(
            temperature=self.temperature,
            top_k=max(self.top_k, 0),
            top_p=self.top_p,
            min_p=self.min_p,
            repeat_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            seed=self.seed,
            grammar=grammar,
            logit_bias=self.bias_pairs(n_vocab),
            logprobs=self.logprobs_wanted(),
        )

    def bias_pairs(self, n_vocab: int) -> tuple[tuple[int, float], ...]:
        """(token, bias) for llama.cpp's logit-bias sampler; -100 becomes -inf, as OpenAI documents it as a ban."""
        pairs = []
        for key, bias in (self.logit_bias or {}).items():
            token = int(key)
            if not 0 <= token < n_vocab:
                raise bad_request(f"logit_bias names token {token}, outside the vocabulary (0..{n_vocab - 1})",
                                  param="logit_bias", code="invalid_value")
            pairs.append((token, -math.inf if bias <= -100.0 else bias))
        return tuple(pairs)

    def logprobs_wanted(self) -> int | None:
        """Alternatives to report per token (0: the sampled token only); None: no logprobs asked."""
        return None

    def grammar(self) -> str | None:
        return self.response_format.grammar() if self.response_format else None

    def unsupported(self) -> tuple[str, str] | None:
        """(param, message) for the first parameter set to something this server does not do."""
        return None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] = Field(description="Text, or token ids, to continue (one prompt).")
    max_tokens: int | None = Field(default=16, ge=1, description="Tokens to generate at most (OpenAI: 16).")
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=20, description="Alternatives to report per token.")
    best_of: int | None = None
    suffix: str | None = Field(
        default=None, description="Text after the gap: the completion fills in the middle between the prompt and "
        "this, with the model's fill-in-the-middle tokens (a 400 on a model without them); empty: no suffix.")

    def unsupported(self) -> tuple[str, str] | None:
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], str):
            if len(self.prompt) != 1:
                return "prompt", "one prompt per request: send a string or a list of one string"
        if isinstance(self.prompt, list) and not self.prompt:
            return "prompt", "prompt must not be empty"
        if self.echo:
            return "echo", UNSUPPORTED_MESSAGE.format(field="echo")
        if self.best_of not in (None, 1):
            return "best_of", "best_of must be 1"
        if self.suffix and not isinstance(self.prompt_value(), str):
            return "suffix", "suffix needs a text prompt (the text before the gap), not token ids"
        return super().unsupported()

    def logprobs_wanted(self) -> int | None:
        return self.logprobs

    def prompt_value(self) -> str | list[int]:
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], str):
            return str(self.prompt[0])
        return self.prompt  # type: ignore[return-value]


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class FunctionCall(BaseModel):
    name: str
    arguments: str = Field(description="The arguments, as JSON text.")


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class FunctionDefinition(BaseModel):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(BaseModel):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: NamedFunction


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None

    def unsupported(self) -> tuple[str, str] | None:
        if self.top_logprobs and not self.logprobs:
            return "top_logprobs", "top_logprobs needs logprobs: true"
        if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.function.name not in {
                t.function.name for t in self.tools or []}:
            return "tool_choice", f"tool_choice names '{self.tool_choice.function.name}', which is not in tools"
        if self.tool_choice not in (None, "none", "auto") and not self.tools:
            return "tool_choice", "tool_choice needs tools"
        if self.forced_tools() and self.response_format and self.response_format.type != "text":
            return "response_format", "response_format cannot be combined with a required tool call"
        return super().unsupported()

    def logprobs_wanted(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def active_tools(self) -> list[Tool]:
        """The tools the model is told about: none when tool_choice is 'none'."""
        return [] if self.tool_choice == "none" else list(self.tools or [])

    def forced_tools(self) -> list[Tool]:
        """The tools one of which must be called (a grammar enforces it): empty unless 'required' or named."""
        if self.tool_choice == "required":
            return list(self.tools or [])
        if isinstance(self.tool_choice, NamedToolChoice):
            return [t for t in self.tools or [] if t.function.name == self.tool_choice.function.name]
        return []


FinishReason = Literal["stop", "length", "tool_calls"]


class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(description="Prompt tokens whose KV cache was reused from an earlier request.")


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails  # as OpenAI (and llama-server) report prompt caching


class CompletionLogprobs(BaseModel):
    """The legacy completions shape: parallel lists, one entry per generated token."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float] = Field(default_factory=list)
    top_logprobs: list[dict[str, float]] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprobInfo(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprobInfo] | None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class FunctionCallDelta(BaseModel):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(BaseModel):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "llama-inference"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
