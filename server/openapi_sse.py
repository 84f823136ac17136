"""OpenAPI descriptions of the event streams, so that a client (or schemathesis) can check every event.

OpenAPI 3.1 lets the ``schema`` of a ``text/event-stream`` response describe one event: an object with
``event`` and ``data``, whose JSON payload ``contentSchema`` describes.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


def inline_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The model's JSON schema with its ``$defs`` inlined (the stream schemas stand alone in the document)."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return resolve(defs[ref.removeprefix("#/$defs/")])
            return {k: resolve(v) for k, v in node.items()}
        if isinstance(node, list):
            return [resolve(v) for v in node]
        return node

    return resolve(schema)  # type: ignore[no-any-return]


def event_stream(description: str, payloads: list[type[BaseModel]] | None, event_names: list[str] | None = None
                 ) -> dict[str, Any]:
    """A 200 response entry for a ``text/event-stream`` whose events carry one of ``payloads`` as JSON (or,
    with ``payloads`` None, any text, as OpenAI's stream whose last event is ``[DONE]``)."""
    data: dict[str, Any] = {"type": "string"}
    if payloads:
        data |= {"contentMediaType": "application/json",
                 "contentSchema": {"oneOf": [inline_schema(p) for p in payloads]}}
    event: dict[str, Any] = {"type": "string"}
    if event_names:
        event["enum"] = event_names
    return {
        "description": description,
        "content": {"text/event-stream": {"schema": {
            "type": "object", "required": ["data"],
            "properties": {"event": event, "data": data, "id": {"type": "string"}, "retry": {"type": "integer"}},
        }}},
    }
