"""Fill-in-the-middle prompts from the model's own FIM tokens, as llama-server builds them (``format_prompt_infill``
in llama.cpp's tools/server/server-common.cpp): the one construction behind ``/infill``, ``suffix`` on
``/v1/completions`` and ``suffix`` on Ollama's ``/api/generate``.

The repo-level pattern (https://arxiv.org/abs/2409.12186), the first line only with a repo token, the file lines
only with a file-separator token (without one, each chunk of context follows a snippet marker instead)::

    [FIM_REP]myproject\\n
    [FIM_SEP]{filename}\\n{text}          (each chunk of extra context)
    [FIM_SEP]filename\\n
    [BOS][FIM_PRE]{prefix}{prompt}[FIM_SUF]{suffix}[FIM_MID]

Text is plain text: control-token text in the prefix, suffix, file names and chunks stays text (as in
llama-server); so does ``prompt``'s unless the server allows special tokens (llama-server parses it always).

Unlike llama-server, nothing is cut to fit: it keeps the prefix's last 3/4 of a batch, the suffix's first 1/4 and
the extra context's tail that fits ``n_ctx - n_batch``; here a prompt too long for a slot is refused (400), as
every prompt is. The suffix-prefix-middle order (llama-server's ``--spm-infill``) is not offered.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

from server.engine.core import EngineState
from server.engine.llama import LlamaModel
from server.errors import bad_request, unavailable
from server.prompt_limits import refuse_oversized, utf8_size
from server.serving import GenerationService

# What llama-server writes where it has no input for it (its "TODO: make project name an input").
REPO_NAME = "myproject\n"
CURRENT_FILE = "filename\n"
# llama-server's chunk separator without a file-separator token.
SNIPPET_MARKER = "\n\n--- snippet ---\n\n"


@dataclass(frozen=True)
class FimTokens:
    """A vocabulary's fill-in-the-middle tokens; ``rep`` and ``sep`` (repository and file separators) are optional,
    and ``bos`` is the BOS token where the vocabulary adds one."""

    pre: int
    suf: int
    mid: int
    rep: int | None
    sep: int | None
    bos: int | None


def _optional(token: int) -> int | None:
    return None if token < 0 else int(token)  # LLAMA_TOKEN_NULL is -1


def fim_tokens(model: LlamaModel, what: str, param: str | None) -> FimTokens:
    """The model's FIM tokens, or a 400 naming the GGUF keys it lacks; ``what`` names what asked for them."""
    missing = model.missing_fim_tokens()
    if missing:
        raise bad_request(f"{what} needs fill-in-the-middle (FIM) tokens, and this model's vocabulary lacks them "
                          f"(missing {', '.join(missing)})", param=param, code="no_fim_tokens")
    fim = model.fim
    return FimTokens(pre=int(fim["pre"]), suf=int(fim["suf"]), mid=int(fim["mid"]), rep=_optional(fim["rep"]),
                     sep=_optional(fim["sep"]), bos=int(model.bos) if model.add_bos else None)


@dataclass(frozen=True)
class FimText:
    """What goes around the gap, and the request's names for each part (for its errors)."""

    prefix: str
    suffix: str
    prompt: str = ""
    extra: Sequence[tuple[str, str]] = ()  # (filename, text) of other files' chunks
    prefix_param: str = "prompt"
    suffix_param: str = "suffix"

    def parts(self) -> list[tuple[str, str]]:
        """(param, text) of every text the prompt holds."""
        out = [(self.prefix_param, self.prefix), (self.suffix_param, self.suffix)]
        if self.prompt:
            out.append(("prompt", self.prompt))
        for i, (filename, text) in enumerate(self.extra):
            out += [(f"input_extra.{i}.filename", filename), (f"input_extra.{i}.text", text)]
        return out


def assemble(model: LlamaModel, fim: FimTokens, text: FimText, *, parse_special_prompt: bool = False) -> list[int]:
    """The prompt's tokens, in llama-server's order (module docstring). Tokenizes, so it runs off the event loop."""
    def plain(s: str) -> list[int]:
        return model.tokenize(s, add_special=False, parse_special=False)

    context: list[int] = []
    if fim.rep is not None:
        context += [fim.rep, *plain(REPO_NAME)]
    for filename, chunk in text.extra:
        context += [fim.sep, *plain(filename + "\n")] if fim.sep is not None else plain(SNIPPET_MARKER)
        context += plain(chunk)
    if fim.sep is not None:
        context += [fim.sep, *plain(CURRENT_FILE)]
    bos = [] if fim.bos is None else [fim.bos]  # after the extra context, before the prefix, as llama-server puts it
    prompt = model.tokenize(text.prompt, add_special=False, parse_special=parse_special_prompt)
    return [*context, *bos, fim.pre, *plain(text.prefix), *prompt, fim.suf, *plain(text.suffix), fim.mid]


async def fim_prompt(service: GenerationService, text: FimText, *, what: str = "suffix",
                     param: str | None = "suffix") -> list[int]:
    """The fill-in-the-middle prompt of ``text``, tokenized off the event loop: a 400 when the model has no FIM
    tokens (``what`` and ``param`` name what asked), when a text is not valid Unicode, or when the texts together
    cannot fit a slot's context whatever their tokens (the rest of the limits are ``service.build``'s)."""
    model = service.engine.model
    if model is None or service.engine.state is not EngineState.READY:
        raise unavailable(service.engine.not_ready_reason())
    fim = fim_tokens(model, what, param)
    n_bytes = 0
    for name, part in text.parts():
        n_bytes += utf8_size(part, name)
    refuse_oversized(n_bytes, await service.vocab_facts(), service.engine.slot_ctx, param=text.prefix_param)
    return await asyncio.to_thread(assemble, model, fim, text,
                                   parse_special_prompt=service.settings.allow_special_tokens)
