"""Cheap checks on a prompt before it is tokenized: its size against the context, and token ids.

Tokenizing a 4 MiB prompt takes seconds of CPU and hundreds of MB, only to find that it cannot fit. No token
covers more bytes of text than the vocabulary's longest token, so a text of B bytes has at least
B / longest tokens (llama.cpp's tokenizers do not normalize text into fewer bytes); when that bound already
fills the context, the prompt is refused without tokenizing it.
"""

from __future__ import annotations

from dataclasses import dataclass

from server.engine.llama import LlamaModel
from server.errors import APIError, bad_request


def utf8_size(text: str, param: str, label: str | None = None) -> int:
    """The UTF-8 bytes of a client's text, or a 400 when it cannot be encoded: a lone surrogate (JSON's
    ``"\\ud800"``), whose bytes the tokenizer would otherwise pass on. ``label`` names it in the message (default:
    "the ``param``")."""
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise bad_request(f"{label or 'the ' + param} is not valid Unicode (it holds a lone surrogate)", param=param,
                          code="invalid_value") from exc


@dataclass(frozen=True)
class VocabFacts:
    longest_token_bytes: int  # with control tokens rendered as their text
    control_ids: frozenset[int]  # tokens such as <|im_end|> that only the server's own formatting may use
    bos_ids: tuple[int, ...]  # what the model puts first (the one control token a token-id prompt may start with)


def measure_vocab(model: LlamaModel) -> VocabFacts:
    """Read once per model (a pass over the vocabulary: tens of milliseconds), off the event loop."""
    longest = max((len(model.token_to_piece(t, special=True)) for t in range(model.n_vocab)), default=1)
    control: set[int] = set()
    for text in model.control_token_texts():
        ids = model.tokenize(text, add_special=False, parse_special=True)
        if len(ids) == 1:
            control.add(ids[0])
    bos = tuple(model.tokenize("", add_special=True, parse_special=False))
    return VocabFacts(longest_token_bytes=max(1, longest), control_ids=frozenset(control), bos_ids=bos)


def refuse_oversized(n_bytes: int, facts: VocabFacts, n_ctx: int, param: str = "prompt") -> None:
    """400 ``context_length_exceeded`` when ``n_bytes`` of text cannot fit in ``n_ctx`` tokens whatever the
    tokenization."""
    at_least = -(-n_bytes // facts.longest_token_bytes)
    if at_least >= n_ctx:
        raise bad_request(
            f"the prompt has {n_bytes} bytes, so at least {at_least} tokens, but a request's context holds "
            f"{n_ctx} tokens (prompt and generated together)", param=param, code="context_length_exceeded",
        )


def refuse_control_tokens(tokens: list[int], facts: VocabFacts) -> APIError | None:
    """A token-id prompt may not hold control tokens (forged turns), but for the model's BOS at its start."""
    start = len(facts.bos_ids) if tuple(tokens[: len(facts.bos_ids)]) == facts.bos_ids else 0
    bad = next((t for t in tokens[start:] if t in facts.control_ids), None)
    if bad is None:
        return None
    return bad_request(f"token id {bad} is a control token; this server does not accept control tokens in "
                       "prompts (ALLOW_SPECIAL_TOKENS)", param="prompt", code="invalid_value")
