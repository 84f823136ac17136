"""Request, response and stream-event bodies of OpenAI's Responses API (``/v1/responses``), as the ``openai`` SDK
and Codex CLI send and read them.

Stateless: nothing is stored. ``store`` (the SDK sends ``true`` by default) is accepted and nothing is kept;
``previous_response_id``, ``conversation``, ``prompt`` (a stored prompt template) and ``background: true`` would
need a stored response and are refused with a 400. Fields this server does not know are ignored (Codex sends
``include``, ``prompt_cache_key``, ``text.verbosity``, ``service_tier``...); known ones must have their JSON type.
``reasoning``, ``metadata``, ``user`` and ``parallel_tool_calls`` are accepted (and echoed), not acted on.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag

# ---- the request ----


class _Item(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class InputText(_Item):
    type: Literal["input_text", "output_text"]
    text: str


class Refusal(_Item):
    """A past answer's refusal (the SDK sends it back in an assistant message): part of the text."""

    type: Literal["refusal"]
    refusal: str


class MediaPart(_Item):
    """``input_image``, ``input_file``, ``input_audio``: accepted by the schema only to be refused by name."""

    type: Literal["input_image", "input_file", "input_audio"]


ContentPart = Annotated[InputText | Refusal | MediaPart, Field(discriminator="type")]


class MessageItem(_Item):
    """A message; ``type`` may be left out (the SDK's easy input message)."""

    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: str | list[ContentPart]
    id: str | None = None
    status: str | None = None


class FunctionCallItem(_Item):
    type: Literal["function_call"]
    call_id: str = Field(min_length=1, max_length=256)
    name: str = Field(min_length=1, max_length=256)
    arguments: str
    id: str | None = None
    status: str | None = None


class FunctionCallOutputItem(_Item):
    type: Literal["function_call_output"]
    call_id: str = Field(min_length=1, max_length=256)
    output: str | list[ContentPart]
    id: str | None = None
    status: str | None = None


class OtherItem(_Item):
    """Any other item (``reasoning``, ``local_shell_call``, ``web_search_call``, ``item_reference``...): skipped,
    as llama-server does; a model of this server neither made nor can use them."""

    type: str


def _item_type(value: Any) -> str:
    """The item's model, by its ``type`` (absent: a message). Tags are capitalized so that error locations name
    the field (``input.0.content``), not the branch (server/errors.py drops such names)."""
    kind = value.get("type", "message") if isinstance(value, dict) else getattr(value, "type", None)
    return {"message": "Message", "function_call": "FunctionCall",
            "function_call_output": "FunctionCallOutput"}.get(kind, "Other")  # type: ignore[arg-type]


InputItem = Annotated[
    Annotated[MessageItem, Tag("Message")] | Annotated[FunctionCallItem, Tag("FunctionCall")]
    | Annotated[FunctionCallOutputItem, Tag("FunctionCallOutput")] | Annotated[OtherItem, Tag("Other")],
    Discriminator(_item_type),
]


class FunctionToolParam(BaseModel):
    """A tool: a ``function`` one is told to the model; any other type (``web_search``, ``local_shell``,
    ``custom``, ``file_search``, ``mcp``...) runs on OpenAI's side or needs a format this server lacks: it is
    skipped, not refused (as llama-server does)."""

    model_config = ConfigDict(extra="ignore", strict=True)

    type: str
    name: str | None = None
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class FunctionChoice(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    type: Literal["function"]
    name: str


class TextFormat(BaseModel):
    """``text.format``: ``text`` (the default), ``json_object`` or ``json_schema`` (``name``, ``schema``,
    ``strict``)."""

    model_config = ConfigDict(extra="ignore", strict=True)

    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class TextConfig(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    format: TextFormat | None = None
    verbosity: str | None = None


class ResponseRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    model: str | None = Field(
        default=None, description="Any name is accepted (one model is served, and answers name it) unless "
        "STRICT_MODEL_NAME is on.")
    input: str | list[InputItem] = Field(
        description="Text (one user message) or items: `message` (role user, system, developer or assistant; "
        "content as text or `input_text`/`output_text` parts), `function_call`, `function_call_output`; other "
        "item types are skipped.")
    instructions: str | None = Field(default=None, description="The system prompt.")
    tools: list[FunctionToolParam] | None = None
    tool_choice: Literal["auto", "none", "required"] | FunctionChoice | None = None
    max_output_tokens: int | None = Field(default=None, ge=1, description="Tokens to generate at most.")
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    text: TextConfig | None = None
    parallel_tool_calls: bool = Field(default=True, description="Accepted; one call per answer when forced.")
    metadata: dict[str, str] | None = None
    user: str | None = None
    reasoning: dict[str, Any] | None = Field(default=None, description="Accepted and ignored.")
    store: bool | None = Field(default=None, description="Accepted; nothing is stored (this server is stateless).")
    previous_response_id: str | None = Field(
        default=None, description="Refused: this server is stateless (send the whole conversation as `input`).")
    conversation: str | dict[str, Any] | None = Field(default=None, description="Refused: stateless.")
    prompt: dict[str, Any] | None = Field(default=None, description="Refused: no stored prompt templates.")
    background: bool | None = Field(default=None, description="`true` is refused: stateless.")
    stream: bool = False


# ---- the answer ----


class OutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = Field(default_factory=list)
    logprobs: list[Any] = Field(default_factory=list)


ItemStatus = Literal["in_progress", "completed", "incomplete"]


class OutputMessage(BaseModel):
    type: Literal["message"] = "message"
    id: str
    status: ItemStatus
    role: Literal["assistant"] = "assistant"
    content: list[OutputText]


class FunctionCallOutput(BaseModel):
    type: Literal["function_call"] = "function_call"
    id: str
    call_id: str
    name: str
    arguments: str = Field(description="The arguments, as JSON text.")
    status: ItemStatus


OutputItem = Annotated[OutputMessage | FunctionCallOutput, Field(discriminator="type")]


class InputTokensDetails(BaseModel):
    cached_tokens: int = Field(description="Prompt tokens whose KV cache was reused from an earlier request.")
    cache_write_tokens: int = 0


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class ResponseUsage(BaseModel):
    input_tokens: int = Field(description="The prompt's tokens, cached ones included.")
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails = Field(default_factory=OutputTokensDetails)
    total_tokens: int


class IncompleteDetails(BaseModel):
    reason: Literal["max_output_tokens"]


class ResponseError(BaseModel):
    code: str
    message: str


class FunctionToolEcho(BaseModel):
    type: Literal["function"] = "function"
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Response(BaseModel):
    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: Literal["completed", "incomplete", "in_progress", "failed"]
    error: ResponseError | None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    model: str
    output: list[OutputItem]
    parallel_tool_calls: bool
    previous_response_id: None = None
    reasoning: dict[str, Any] | None = None
    store: bool = False
    temperature: float
    text: dict[str, Any]
    tool_choice: str | dict[str, str]
    tools: list[FunctionToolEcho]
    top_p: float
    truncation: Literal["disabled"] = "disabled"
    usage: ResponseUsage | None = None
    user: str | None = None
    metadata: dict[str, str] = Field(default_factory=dict)


# ---- stream events (each with its ``sequence_number``, from 0) ----


class _Event(BaseModel):
    sequence_number: int = 0


class ResponseLifecycle(_Event):
    """``response.created``, ``response.in_progress``, ``response.completed``, ``response.incomplete``,
    ``response.failed``."""

    type: Literal["response.created", "response.in_progress", "response.completed", "response.incomplete",
                  "response.failed"]
    response: Response


class OutputItemEvent(_Event):
    type: Literal["response.output_item.added", "response.output_item.done"]
    output_index: int
    item: OutputItem


class ContentPartEvent(_Event):
    type: Literal["response.content_part.added", "response.content_part.done"]
    item_id: str
    output_index: int
    content_index: int
    part: OutputText


class TextDelta(_Event):
    type: Literal["response.output_text.delta"] = "response.output_text.delta"
    item_id: str
    output_index: int
    content_index: int
    delta: str
    logprobs: list[Any] = Field(default_factory=list)


class TextDone(_Event):
    type: Literal["response.output_text.done"] = "response.output_text.done"
    item_id: str
    output_index: int
    content_index: int
    text: str
    logprobs: list[Any] = Field(default_factory=list)


class ArgumentsDelta(_Event):
    type: Literal["response.function_call_arguments.delta"] = "response.function_call_arguments.delta"
    item_id: str
    output_index: int
    delta: str


class ArgumentsDone(_Event):
    type: Literal["response.function_call_arguments.done"] = "response.function_call_arguments.done"
    item_id: str
    output_index: int
    name: str
    arguments: str


class ErrorEventBody(_Event):
    """A failure after the stream began (then ``response.failed``)."""

    type: Literal["error"] = "error"
    code: str | None = None
    message: str
    param: str | None = None


STREAM_EVENTS: list[type[BaseModel]] = [ResponseLifecycle, OutputItemEvent, ContentPartEvent, TextDelta, TextDone,
                                        ArgumentsDelta, ArgumentsDone, ErrorEventBody]
STREAM_EVENT_NAMES = ["response.created", "response.in_progress", "response.output_item.added",
                      "response.content_part.added", "response.output_text.delta", "response.output_text.done",
                      "response.content_part.done", "response.function_call_arguments.delta",
                      "response.function_call_arguments.done", "response.output_item.done", "response.completed",
                      "response.incomplete", "response.failed", "error"]
