"""Request, response and stream-event bodies of Anthropic's Messages API (``/v1/messages``,
``/v1/messages/count_tokens``), as its SDK sends and reads them.

Fields this server does not know are ignored (Claude Code sends ``context_management``, ``betas`` and more); known
ones must have their JSON type. ``cache_control`` on any block is accepted and ignored: the prompt cache reuses
any prefix by itself. ``thinking`` is accepted and ignored (a model of this server writes no separate thinking),
and ``thinking`` or ``redacted_thinking`` blocks in the history are dropped from the prompt.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from server.protocol import MAX_STOP_STRINGS, check_stop_strings


class _Block(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    cache_control: dict[str, Any] | None = None


class TextBlock(_Block):
    type: Literal["text"]
    text: str


class ImageBlock(_Block):
    """Accepted by the schema only to be refused by name: this server has no vision."""

    type: Literal["image"]
    source: dict[str, Any] | None = None


class DocumentBlock(_Block):
    """Accepted by the schema only to be refused by name (a PDF or other document is read by vision too)."""

    type: Literal["document"]
    source: dict[str, Any] | None = None


class ToolUseBlock(_Block):
    type: Literal["tool_use"]
    id: str = Field(min_length=1, max_length=256)
    name: str = Field(min_length=1, max_length=256)
    input: dict[str, Any]


class ToolResultBlock(_Block):
    type: Literal["tool_result"]
    tool_use_id: str = Field(min_length=1, max_length=256)
    content: str | list[Annotated[TextBlock | ImageBlock | DocumentBlock, Field(discriminator="type")]] | None = None
    is_error: bool | None = None


class ThinkingBlock(_Block):
    """A past answer's thinking, sent back by clients that asked for it: not part of the prompt here."""

    type: Literal["thinking", "redacted_thinking"]


ContentBlock = Annotated[TextBlock | ImageBlock | DocumentBlock | ToolUseBlock | ToolResultBlock | ThinkingBlock,
                         Field(discriminator="type")]


class MessageParam(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    role: Literal["user", "assistant"]
    content: str | list[ContentBlock]


class ToolParam(BaseModel):
    """A custom tool (``type`` absent or ``custom``) with its ``input_schema``. Anthropic's own tool types
    (``web_search_20250305``, ``bash_20250124``, ``text_editor_...``, ``computer_...``) run on Anthropic's side:
    they are skipped, not refused."""

    model_config = ConfigDict(extra="ignore", strict=True)

    type: str | None = None
    name: str = Field(min_length=1, max_length=256)
    description: str | None = None
    input_schema: dict[str, Any] | None = None
    cache_control: dict[str, Any] | None = None

    @property
    def custom(self) -> bool:
        return self.type in (None, "custom")


class ToolChoiceAuto(BaseModel):
    type: Literal["auto"]
    disable_parallel_tool_use: bool | None = None


class ToolChoiceAny(BaseModel):
    type: Literal["any"]
    disable_parallel_tool_use: bool | None = None


class ToolChoiceTool(BaseModel):
    type: Literal["tool"]
    name: str
    disable_parallel_tool_use: bool | None = None


class ToolChoiceNone(BaseModel):
    type: Literal["none"]


ToolChoice = Annotated[ToolChoiceAuto | ToolChoiceAny | ToolChoiceTool | ToolChoiceNone, Field(discriminator="type")]


class Metadata(BaseModel):
    """Accepted; ``user_id`` is logged nowhere."""

    model_config = ConfigDict(extra="ignore", strict=True)

    user_id: str | None = None


class PromptFields(BaseModel):
    """What makes the prompt: shared by a message request and a token count."""

    model_config = ConfigDict(extra="ignore", strict=True)

    model: str | None = Field(
        default=None, description="Any name is accepted (one model is served, and answers name it) unless "
        "STRICT_MODEL_NAME is on.")
    messages: list[MessageParam] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    tools: list[ToolParam] | None = None
    tool_choice: ToolChoice | None = None
    thinking: dict[str, Any] | None = Field(default=None, description="Accepted and ignored.")

    def custom_tools(self) -> list[ToolParam]:
        """The tools the model is told about: the custom ones, none when ``tool_choice`` is ``none``."""
        if isinstance(self.tool_choice, ToolChoiceNone):
            return []
        return [t for t in self.tools or [] if t.custom]


class MessageRequest(PromptFields):
    max_tokens: int = Field(ge=1, description="Tokens to generate at most (required, as in Anthropic's API).")
    stop_sequences: list[str] | None = None
    temperature: float = Field(default=1.0, ge=0.0, le=1.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0, le=100_000)
    metadata: Metadata | None = None
    stream: bool = False

    @field_validator("stop_sequences")
    @classmethod
    def _check_stop(cls, value: list[str] | None) -> list[str] | None:
        check_stop_strings(value, MAX_STOP_STRINGS)
        return value


class CountTokensRequest(PromptFields):
    pass


class CountTokensResponse(BaseModel):
    input_tokens: int


# ---- answers ----

StopReason = Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"]


class TextContent(BaseModel):
    type: Literal["text"] = "text"
    text: str


class ToolUseContent(BaseModel):
    type: Literal["tool_use"] = "tool_use"
    id: str
    name: str
    input: dict[str, Any]


class AnthropicUsage(BaseModel):
    input_tokens: int = Field(description="Prompt tokens computed for this request (not read from the cache).")
    output_tokens: int
    cache_read_input_tokens: int = Field(
        default=0, description="Prompt tokens whose KV cache was reused from an earlier request (input_tokens + "
        "cache_read_input_tokens is the whole prompt, as count_tokens counts it).")
    cache_creation_input_tokens: int = 0


class Message(BaseModel):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    model: str
    content: list[Annotated[TextContent | ToolUseContent, Field(discriminator="type")]]
    stop_reason: StopReason | None
    stop_sequence: str | None = None
    usage: AnthropicUsage


# ---- stream events ----

class MessageStart(BaseModel):
    type: Literal["message_start"] = "message_start"
    message: Message


class ContentBlockStart(BaseModel):
    type: Literal["content_block_start"] = "content_block_start"
    index: int
    content_block: Annotated[TextContent | ToolUseContent, Field(discriminator="type")]


class TextDelta(BaseModel):
    type: Literal["text_delta"] = "text_delta"
    text: str


class InputJsonDelta(BaseModel):
    type: Literal["input_json_delta"] = "input_json_delta"
    partial_json: str


class ContentBlockDelta(BaseModel):
    type: Literal["content_block_delta"] = "content_block_delta"
    index: int
    delta: Annotated[TextDelta | InputJsonDelta, Field(discriminator="type")]


class ContentBlockStop(BaseModel):
    type: Literal["content_block_stop"] = "content_block_stop"
    index: int


class MessageDeltaBody(BaseModel):
    stop_reason: StopReason | None
    stop_sequence: str | None = None


class DeltaUsage(BaseModel):
    """Totals at the end of the stream (the SDK overwrites message_start's with them)."""

    output_tokens: int
    input_tokens: int | None = None
    cache_read_input_tokens: int | None = None
    cache_creation_input_tokens: int | None = None


class MessageDelta(BaseModel):
    type: Literal["message_delta"] = "message_delta"
    delta: MessageDeltaBody
    usage: DeltaUsage


class MessageStop(BaseModel):
    type: Literal["message_stop"] = "message_stop"


class Ping(BaseModel):
    type: Literal["ping"] = "ping"


class ErrorBody(BaseModel):
    type: str = Field(description="invalid_request_error, authentication_error, permission_error, "
                      "not_found_error, request_too_large, rate_limit_error, api_error or overloaded_error")
    message: str


class AnthropicErrorResponse(BaseModel):
    """Anthropic's error envelope: the body of every error on these routes, and a stream's ``error`` event."""

    type: Literal["error"] = "error"
    error: ErrorBody


STREAM_EVENTS: list[type[BaseModel]] = [MessageStart, ContentBlockStart, ContentBlockDelta, ContentBlockStop,
                                        MessageDelta, MessageStop, Ping, AnthropicErrorResponse]
STREAM_EVENT_NAMES = ["message_start", "content_block_start", "content_block_delta", "content_block_stop",
                      "message_delta", "message_stop", "ping", "error"]
