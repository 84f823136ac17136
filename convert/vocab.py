"""Tokenizers into GGUF: SentencePiece (``tokenizer.model``: LLaMA 2) and byte-level BPE (``tokenizer.json``:
SmolLM2, LLaMA 3), with their special tokens, BOS/EOS settings and chat template (``gguf.SpecialVocab``)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf

from convert.errors import PipelineError

# llama.cpp names its BPE pre-tokenizers (the regular expressions that split text before merging); a
# tokenizer.json says which it needs through the shape of its `pre_tokenizer`. The shapes known here:
LLAMA3_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"  # noqa: E501


def detect_bpe_pre(tokenizer_json: dict[str, Any]) -> str:
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"  # StarCoder's split: each digit alone, then GPT-2's expression
    if kinds[:1] == ["Split"] and (steps[0].get("pattern") or {}).get("Regex") == LLAMA3_SPLIT:
        return "llama-bpe"
    raise PipelineError(
        f"tokenizer.json: unknown BPE pre-tokenizer {kinds}; pass --vocab-pre NAME with llama.cpp's name for it"
    )


@dataclass
class VocabData:
    model: str  # tokenizer.ggml.model: "gpt2" (BPE) or "llama" (SentencePiece)
    tokens: list[bytes]
    scores: list[float]
    types: list[int]
    pre: str | None = None
    merges: list[str] = field(default_factory=list)


def _bpe(directory: Path, pre_override: str | None) -> VocabData:
    data = json.loads((directory / "tokenizer.json").read_text(encoding="utf-8"))
    model = data.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise PipelineError("tokenizer.json: not a byte-level BPE tokenizer (and no tokenizer.model beside it)")
    vocab: dict[str, int] = dict(model["vocab"])
    added = {t["content"]: t for t in data.get("added_tokens", [])}
    for text, tok in added.items():
        vocab.setdefault(text, tok["id"])
    size = max(vocab.values()) + 1
    by_id: dict[int, str] = {i: t for t, i in vocab.items()}
    tokens, types = [], []
    for i in range(size):
        text = by_id.get(i)
        if text is None:  # a hole in the ids: llama.cpp wants a dense list
            tokens.append(f"[PAD{i}]".encode())
            types.append(gguf.TokenType.UNUSED)
        elif text in added:
            tokens.append(text.encode("utf-8"))
            types.append(gguf.TokenType.CONTROL if added[text].get("special") else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(text.encode("utf-8"))
            types.append(gguf.TokenType.NORMAL)
    return VocabData(model="gpt2", tokens=tokens, scores=[0.0] * size, types=[int(t) for t in types],
                     pre=pre_override or detect_bpe_pre(data))


def _spm(directory: Path) -> VocabData:
    try:
        vocab = gguf.vocab.SentencePieceVocab(directory)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        raise PipelineError(f"tokenizer.model: {exc}") from exc
    tokens, scores, types = [], [], []
    for text, score, kind in vocab.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(int(kind))
    return VocabData(model="llama", tokens=tokens, scores=scores, types=types, pre="default")


def load_vocab(directory: Path, pre_override: str | None = None) -> VocabData:
    if (directory / "tokenizer.model").exists():
        return _spm(directory)
    if (directory / "tokenizer.json").exists():
        return _bpe(directory, pre_override)
    raise PipelineError(f"no tokenizer in {directory}: expected tokenizer.model or tokenizer.json")


def add_vocab(writer: gguf.GGUFWriter, directory: Path, vocab: VocabData, n_vocab: int) -> None:
    if len(vocab.tokens) > n_vocab:
        raise PipelineError(f"the tokenizer has {len(vocab.tokens)} tokens but the model's vocab_size is {n_vocab}")
    # Embedding rows past the tokenizer's last id (padding to a multiple of 64...) get placeholder tokens.
    for i in range(len(vocab.tokens), n_vocab):
        vocab.tokens.append(f"[PAD{i}]".encode())
        vocab.scores.append(-1000.0)
        vocab.types.append(int(gguf.TokenType.UNUSED))
    writer.add_tokenizer_model(vocab.model)
    if vocab.pre:
        writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_scores(vocab.scores)
    writer.add_token_types(vocab.types)
    special = gguf.SpecialVocab(directory, load_merges=vocab.model == "gpt2", n_vocab=n_vocab)
    if vocab.model == "gpt2" and not special.merges:
        raise PipelineError("tokenizer.json has no merges")
    special.add_to_gguf(writer, quiet=True)
