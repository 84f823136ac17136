"""Request and response bodies of the OpenAI-compatible API (``/v1/completions``, ``/v1/chat/completions``)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from server.engine.sampling import SamplingParams
from server.protocol import check_stop_strings, stop_tuple

# Fields of OpenAI's API that this server does not implement; a request that sets them gets a clear 400.
UNSUPPORTED_MESSAGE = "{field} is not supported by this server"


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(BaseModel):
    """Parameters shared by completions and chat completions."""

    # Fields this server does not know are ignored, as clients send many; known ones must have their JSON type.
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str = Field(description="The served model's id (see GET /v1/models).")
    max_tokens: int | None = Field(default=None, ge=1, description="Tokens to generate at most.")
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=128, description="Only 1 is supported.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0, le=2**32 - 2)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        return check_stop_strings(value, 4)  # OpenAI's limit

    def stop_strings(self) -> tuple[str, ...]:
        return stop_tuple(self.stop)

    def to_sampling(self) -> SamplingParams:
        return SamplingParams(
            temperature=self.temperature,
            top_k=0,
            top_p=self.top_p,
            min_p=0.0,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            seed=self.seed,
        )

    def unsupported(self) -> tuple[str, str] | None:
        """(param, message) for the first parameter set to something this server does not do."""
        if self.n != 1:
            return "n", "n must be 1: this server generates one choice per request"
        if self.logit_bias:
            return "logit_bias", UNSUPPORTED_MESSAGE.format(field="logit_bias")
        return None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] = Field(description="Text, or token ids, to continue (one prompt).")
    max_tokens: int | None = Field(default=16, ge=1, description="Tokens to generate at most (OpenAI: 16).")
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    def unsupported(self) -> tuple[str, str] | None:
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], str):
            if len(self.prompt) != 1:
                return "prompt", "one prompt per request: send a string or a list of one string"
        if isinstance(self.prompt, list) and not self.prompt:
            return "prompt", "prompt must not be empty"
        if self.echo:
            return "echo", UNSUPPORTED_MESSAGE.format(field="echo")
        if self.logprobs:
            return "logprobs", UNSUPPORTED_MESSAGE.format(field="logprobs")
        if self.best_of not in (None, 1):
            return "best_of", "best_of must be 1"
        if self.suffix:
            return "suffix", UNSUPPORTED_MESSAGE.format(field="suffix")
        return super().unsupported()

    def prompt_value(self) -> str | list[int]:
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], str):
            return str(self.prompt[0])
        return self.prompt  # type: ignore[return-value]


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    tools: list[dict[str, object]] | None = None
    response_format: dict[str, object] | None = None

    def unsupported(self) -> tuple[str, str] | None:
        if self.logprobs:
            return "logprobs", UNSUPPORTED_MESSAGE.format(field="logprobs")
        if self.tools:
            return "tools", UNSUPPORTED_MESSAGE.format(field="tools")
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            return "response_format", "only response_format type 'text' is supported"
        return super().unsupported()

    def limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def template_messages(self) -> list[dict[str, str]]:
        # 'developer' is OpenAI's newer name for 'system'; chat templates know 'system'.
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]


FinishReason = Literal["stop", "length"]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: FinishReason | None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: None = None
    finish_reason: FinishReason


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    logprobs: None = None
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
