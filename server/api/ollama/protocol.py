"""Request and response bodies of Ollama's native API (``/api/*``), as its clients send and read them.

Fields this server does not know are ignored (clients send runner options such as ``num_gpu`` or ``mirostat``);
known ones must have their JSON type. Durations are in nanoseconds and times in RFC 3339, as Ollama writes them.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from server.openai_protocol import Tool
from server.protocol import MAX_STOP_STRINGS, check_stop_strings

# Ollama's own defaults (api/types.go DefaultOptions), so a client that sends no options samples as with Ollama.
DEFAULT_TEMPERATURE, DEFAULT_TOP_K, DEFAULT_TOP_P, DEFAULT_REPEAT_PENALTY, DEFAULT_REPEAT_LAST_N = 0.8, 40, 0.9, 1.1, 64


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class Options(_Body):
    """The sampling options; runner options (``num_gpu``, ``num_thread``, ``use_mmap``...) and the samplers this
    server lacks (``mirostat``, ``tfs_z``, ``typical_p``) are accepted and ignored."""

    num_predict: int | None = Field(
        default=None, ge=-2, description="Tokens to generate at most; -1 or -2 (Ollama: unbounded, fill the "
        "context) and unset: the server's DEFAULT_MAX_TOKENS.")
    num_ctx: int | None = Field(
        default=None, ge=1, description="Checked against a slot's context: larger is refused (a prompt is never "
        "cut to fit), smaller or equal is served with the slot's context.")
    temperature: float | None = Field(default=None, ge=0.0, le=5.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0, le=100_000)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    repeat_penalty: float | None = Field(default=None, gt=0.0, le=10.0)
    repeat_last_n: int | None = Field(default=None, ge=-1, le=100_000)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    seed: int | None = Field(default=None, ge=-1, le=2**32 - 2, description="-1: random, as in Ollama.")
    stop: list[str] | None = None

    @field_validator("num_predict")
    @classmethod
    def _check_predict(cls, value: int | None) -> int | None:
        if value == 0:
            raise ValueError("num_predict must be positive, or -1 or -2")
        return value

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: list[str] | None) -> list[str] | None:
        check_stop_strings(value, MAX_STOP_STRINGS)
        return value


class _Generation(_Body):
    model: str = Field(min_length=1, description="`name`, `name:latest` or a served name; any name unless "
                       "STRICT_MODEL_NAME is on.")
    stream: bool = Field(default=True, description="Newline-delimited JSON, one object per token (Ollama's default).")
    format: Literal["", "json"] | dict[str, Any] | None = Field(
        default=None, description='"json" (any JSON object) or a JSON schema the answer must match.')
    options: Options | None = None
    keep_alive: str | int | float | None = Field(default=None, description="Accepted: the model stays loaded.")
    think: bool | str | None = Field(default=None, description="Accepted and ignored.")


class ToolCallFunction(_Body):
    index: int | None = None
    name: str
    arguments: dict[str, Any] = Field(description="An object, not JSON text (Ollama's shape).")


class OllamaToolCall(_Body):
    id: str | None = None
    function: ToolCallFunction


class Message(_Body):
    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    images: list[str] | None = Field(default=None, description="Refused: this server has no vision.")
    tool_calls: list[OllamaToolCall] | None = None
    tool_name: str | None = None
    thinking: str | None = Field(default=None, description="A past answer's thinking: not part of the prompt.")


class ChatRequest(_Generation):
    messages: list[Message] = Field(default_factory=list, description="None: the model is 'loaded' (done_reason "
                                    "`load`), as Ollama answers a client preparing a model.")
    tools: list[Tool] | None = None


class OllamaGenerateRequest(_Generation):
    prompt: str = ""
    suffix: str | None = Field(
        default=None, description="Text after the gap: fill in the middle between `prompt` and this with the model's "
        "fill-in-the-middle tokens (no chat template, no `system`); refused on a model without them.")
    system: str | None = None
    raw: bool = Field(default=False, description="The prompt as it is, without the chat template.")
    images: list[str] | None = Field(default=None, description="Refused: this server has no vision.")
    template: str | None = Field(default=None, description="Refused: Ollama's Go templates are not rendered here.")
    context: list[int] | None = Field(default=None, description="Refused: send the conversation to /api/chat.")


class ShowRequest(_Body):
    model: str | None = None
    name: str | None = Field(default=None, description="Older clients' spelling of `model`.")
    verbose: bool = False

    def model_name(self) -> str:
        return self.model or self.name or ""


# ---- answers ----

class ModelDetails(BaseModel):
    parent_model: str = ""
    format: Literal["gguf"] = "gguf"
    family: str
    families: list[str]
    parameter_size: str = Field(description='As Ollama writes it: "134.52M", "6.7B".')
    quantization_level: str = Field(description='"Q4_1", "Q4_K_M"...')


class ModelEntry(BaseModel):
    name: str
    model: str
    modified_at: str
    size: int = Field(description="The GGUF file's size in bytes.")
    digest: str = Field(description="sha256 of the file's name, size and modification time (not of its bytes: "
                        "hashing gigabytes for a listing would cost seconds).")
    details: ModelDetails


class OllamaModelList(BaseModel):
    models: list[ModelEntry]


class RunningModel(ModelEntry):
    expires_at: str = Field(description="Far ahead: the model stays loaded while the server runs.")
    size_vram: int = 0
    context_length: int = Field(description="A slot's context.")


class RunningList(BaseModel):
    models: list[RunningModel]


class ShowResponse(BaseModel):
    modelfile: str
    parameters: str
    template: str
    details: ModelDetails
    model_info: dict[str, Any]
    capabilities: list[str]
    modified_at: str


class VersionResponse(BaseModel):
    version: str


class AnswerMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    tool_calls: list[OllamaToolCall] | None = None


class _Done(BaseModel):
    model: str
    created_at: str
    done: bool
    done_reason: Literal["stop", "length", "load", "unload"] | None = None
    total_duration: int | None = Field(default=None, description="Nanoseconds, arrival to the last token.")
    load_duration: int | None = Field(default=None, description="Nanoseconds waiting for a slot (the model is "
                                      "always loaded).")
    prompt_eval_count: int | None = None
    prompt_eval_duration: int | None = Field(default=None, description="Nanoseconds.")
    eval_count: int | None = None
    eval_duration: int | None = Field(default=None, description="Nanoseconds.")


class ChatResponse(_Done):
    message: AnswerMessage


class OllamaGenerateResponse(_Done):
    response: str


class EmbedRequest(_Body):
    model: str = Field(min_length=1, description="The embedding model's name (any, unless STRICT_MODEL_NAME).")
    input: str | list[str] = Field(description="A text or a list of texts.")
    truncate: bool | None = Field(
        default=None, description="Accepted; an input longer than the model's context is refused (400) either way: "
        "nothing is cut.")
    dimensions: int | None = Field(default=None, ge=1, description="Cut each vector to this width "
                                   "(EMBEDDING_DIMENSIONS) and normalise it again.")
    options: dict[str, Any] | None = Field(default=None, description="Accepted and ignored.")
    keep_alive: str | int | float | None = Field(default=None, description="Accepted: the model stays loaded.")


class EmbedResponse(BaseModel):
    model: str
    embeddings: list[list[float]] = Field(description="One L2-normalised vector per input.")
    total_duration: int
    load_duration: int = 0
    prompt_eval_count: int


class LegacyEmbeddingRequest(_Body):
    model: str = Field(min_length=1)
    prompt: str = Field(description="One text.")
    options: dict[str, Any] | None = Field(default=None, description="Accepted and ignored.")
    keep_alive: str | int | float | None = None


class LegacyEmbeddingResponse(BaseModel):
    embedding: list[float] = Field(description="The L2-normalised vector (Ollama's legacy route does not normalise).")


class OllamaErrorResponse(BaseModel):
    """Ollama's error body, on every /api/* error and as a stream's last line after a failure."""

    error: str
