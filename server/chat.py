"""Chat prompts: the model's own chat template (GGUF ``tokenizer.chat_template``, Jinja), rendered and tokenized.

The rendered prompt is tokenized with special-token parsing, so the template's markers (``<|im_start|>``,
``[INST]``...) become control tokens. Text that users send is never parsed that way: if a message holds the
text of a control token, the prompt is tokenized piece by piece, with the messages as plain text.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.meta
from jinja2.sandbox import ImmutableSandboxedEnvironment

from server.engine.llama import LlamaModel


class ChatTemplateError(ValueError):
    """The template could not be rendered for these messages (the template says why)."""


def _raise(message: str) -> None:
    raise ChatTemplateError(message)


def load_template(setting: str | None, model: LlamaModel) -> str | None:
    """The template to use: the setting (a file path or the template text), else the model's own."""
    if setting:
        path = Path(setting)
        if len(setting) < 4096 and path.is_file():
            return path.read_text()
        return setting
    return model.info().chat_template


class ChatFormatter:
    def __init__(self, template: str, model: LlamaModel) -> None:
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self._template = env.from_string(template)
            variables = jinja2.meta.find_undeclared_variables(env.parse(template))
        except jinja2.TemplateError as exc:
            raise ChatTemplateError(f"chat template does not compile: {exc}") from exc
        # Templates written for tool calling read a ``tools`` variable; others get server/tools.py's format.
        self.accepts_tools = "tools" in variables
        self.source = template
        self._model = model
        self.bos_text = model.token_to_piece(model.bos, special=True).decode("utf-8", "replace")
        self.eos_text = model.token_to_piece(model.eos, special=True).decode("utf-8", "replace")
        self._control_texts = model.control_token_texts()

    def render(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
               tools: list[dict[str, Any]] | None = None) -> str:
        extra = {"tools": tools} if tools else {}
        try:
            return self._template.render(
                messages=list(messages),
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_text,
                eos_token=self.eos_text,
                **extra,
            )
        except ChatTemplateError:
            raise
        except jinja2.TemplateError as exc:
            raise ChatTemplateError(f"chat template failed: {exc}") from exc

    def tokenize(self, messages: Sequence[Mapping[str, Any]], tools: list[dict[str, Any]] | None = None
                 ) -> list[int]:
        """Tokens of the rendered prompt, with the template's markers as control tokens."""
        # Tool definitions and calls are rendered by the template itself, so they cannot be kept plain text
        # piece by piece like contents: control-token text in them is refused instead.
        others = json.dumps([[{k: v for k, v in m.items() if k != "content"} for m in messages], tools or []],
                            ensure_ascii=False)
        forged = next((text for text in self._control_texts if text in others), None)
        if forged is not None:
            raise ChatTemplateError(f"a tool definition or call holds the text of the control token {forged!r}")
        contents = [m.get("content") or "" for m in messages]
        if not any(text in content for content in contents for text in self._control_texts):
            return self._drop_double_bos(self._model.tokenize(self.render(messages, tools=tools),
                                                              parse_special=True))
        return self._tokenize_pieces(messages, tools)

    def _tokenize_pieces(self, messages: Sequence[Mapping[str, Any]], tools: list[dict[str, Any]] | None
                         ) -> list[int]:
        # Render with a unique marker in place of each message, then tokenize the template's text with
        # special-token parsing and each message as plain text.
        markers = [f"\x00msg-{uuid.uuid4().hex}-{i}\x00" for i in range(len(messages))]
        rendered = self.render([{**m, "content": marker} for m, marker in zip(messages, markers, strict=True)],
                               tools=tools)
        tokens: list[int] = []
        rest = rendered
        for message, marker in zip(messages, markers, strict=True):
            before, found, rest = rest.partition(marker)
            if not found:  # the template dropped or changed this message: fall back to plain text for it
                rest = before
                continue
            if before:
                tokens += self._model.tokenize(before, add_special=not tokens, parse_special=True)
            if message.get("content"):
                tokens += self._model.tokenize(message["content"], add_special=False, parse_special=False)
        if rest:
            tokens += self._model.tokenize(rest, add_special=not tokens, parse_special=True)
        return self._drop_double_bos(tokens)

    def _drop_double_bos(self, tokens: list[int]) -> list[int]:
        # Templates that write the BOS text themselves, on a vocabulary that adds BOS too, would give two.
        if len(tokens) >= 2 and tokens[0] == tokens[1] == self._model.bos:
            return tokens[1:]
        return tokens
