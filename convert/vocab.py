"""Tokenizers into GGUF: SentencePiece (``tokenizer.model``: LLaMA 2) and byte-level BPE (``tokenizer.json``:
SmolLM2, LLaMA 3), with their special tokens, BOS/EOS settings and chat template (``gguf.SpecialVocab``)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf

from convert.errors import PipelineError

# llama.cpp names its BPE pre-tokenizers (the regular expressions that split text before merging). The name is
# decided by behaviour (see convert.pretok): the guess from the JSON's shape is only tried first.
LLAMA3_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"  # noqa: E501


def guess_bpe_pre(tokenizer_json: dict[str, Any]) -> str | None:
    """llama.cpp's name for the pre-tokenizer a tokenizer.json describes, when its shape is a known one."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"  # StarCoder's split: each digit alone, then GPT-2's expression
    if kinds[:1] == ["Split"] and (steps[0].get("pattern") or {}).get("Regex") == LLAMA3_SPLIT:
        return "llama-bpe"
    return None


@dataclass
class VocabData:
    model: str  # tokenizer.ggml.model: "gpt2" (BPE) or "llama" (SentencePiece)
    tokens: list[bytes]
    scores: list[float]
    types: list[int]
    pre: str | None = None  # None: to be decided by behaviour
    pre_guess: str | None = None
    add_space_prefix: bool | None = None  # SentencePiece's dummy prefix, when tokenizer.json says
    # The ids the checkpoint's tokenizer puts before and after a text (BOS, EOS; None: none), when known
    adds: tuple[int | None, int | None] | None = None
    merges: list[str] = field(default_factory=list)


def _read_tokenizer_json(directory: Path) -> dict[str, Any]:
    try:
        data = json.loads((directory / "tokenizer.json").read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise PipelineError(f"tokenizer.json is not valid JSON: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise PipelineError("tokenizer.json has no model")
    return data


def _dense(data: dict[str, Any]) -> tuple[list[str | None], dict[str, dict[str, Any]]]:
    """Token text by id (None for a hole in the ids), and the added tokens by text."""
    vocab: dict[str, int] = dict(data["model"].get("vocab") or {})
    added = {t["content"]: t for t in data.get("added_tokens", [])}
    for text, tok in added.items():
        vocab.setdefault(text, tok["id"])
    if not vocab:
        raise PipelineError("tokenizer.json has an empty vocabulary")
    by_id: list[str | None] = [None] * (max(vocab.values()) + 1)
    for text, i in vocab.items():
        by_id[i] = text
    return by_id, added


def _bpe(data: dict[str, Any], pre_override: str | None) -> VocabData:
    by_id, added = _dense(data)
    tokens, types = [], []
    for i, text in enumerate(by_id):
        if text is None:  # a hole in the ids: llama.cpp wants a dense list
            tokens.append(f"[PAD{i}]".encode())
            types.append(gguf.TokenType.UNUSED)
        elif text in added:
            tokens.append(text.encode("utf-8"))
            types.append(gguf.TokenType.CONTROL if added[text].get("special") else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(text.encode("utf-8"))
            types.append(gguf.TokenType.NORMAL)
    return VocabData(model="gpt2", tokens=tokens, scores=[0.0] * len(tokens), types=[int(t) for t in types],
                     pre=pre_override, pre_guess=guess_bpe_pre(data))


def _merge_pair(merge: str | list[str]) -> str:
    return "".join(merge.split(" ", 1) if isinstance(merge, str) else merge)


def _spm_from_json(data: dict[str, Any]) -> VocabData:
    """LLaMA 2's kind of tokenizer as transformers 5 saves it: tokenizer.json only (BPE with byte fallback and
    a Metaspace pre-tokenizer), no tokenizer.model. llama.cpp's SentencePiece tokenizer merges the pair whose
    result scores highest, so a token's score is minus the rank of the first merge that makes it."""
    by_id, added = _dense(data)
    rank: dict[str, int] = {}
    for r, merge in enumerate(data["model"].get("merges") or []):
        rank.setdefault(_merge_pair(merge), r)
    unk = data["model"].get("unk_token")
    tokens, scores, types = [], [], []
    for i, text in enumerate(by_id):
        if text is None:
            tokens.append(f"[PAD{i}]".encode())
            scores.append(-1e9)
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(text.encode("utf-8"))
        scores.append(-float(rank[text]) if text in rank else (0.0 if len(text) == 1 else -1e9))
        if text == unk:
            types.append(gguf.TokenType.UNKNOWN)
        elif text in added:
            types.append(gguf.TokenType.CONTROL if added[text].get("special") else gguf.TokenType.USER_DEFINED)
        elif re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", text):
            types.append(gguf.TokenType.BYTE)
        else:
            types.append(gguf.TokenType.NORMAL)
    return VocabData(model="llama", tokens=tokens, scores=scores, types=[int(t) for t in types], pre="default",
                     add_space_prefix=_dummy_prefix(data))


def _dummy_prefix(data: dict[str, Any]) -> bool:
    """Whether text gets a leading "▁": a Metaspace pre-tokenizer that prepends, or (older files) a normalizer
    that prepends it."""
    pre = data.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    for step in steps:
        if step.get("type") == "Metaspace":
            return step.get("prepend_scheme", "always") != "never" and step.get("add_prefix_space", True)
    norm = data.get("normalizer") or {}
    norms = norm.get("normalizers", [norm]) if norm.get("type") == "Sequence" else [norm]
    return any(n.get("type") == "Prepend" for n in norms)


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
    """The vocabulary; for byte-level BPE, ``pre`` is ``pre_override`` (None: decide it by behaviour)."""
    if (directory / "tokenizer.model").exists():
        return _spm(directory)
    if (directory / "tokenizer.json").exists():
        data = _read_tokenizer_json(directory)
        if data["model"].get("type") != "BPE":
            raise PipelineError(f"tokenizer.json: a {data['model'].get('type')} model; BPE tokenizers only")
        if data["model"].get("byte_fallback"):
            return _spm_from_json(data)
        return _bpe(data, pre_override)
    raise PipelineError(f"no tokenizer in {directory}: expected tokenizer.model or tokenizer.json")


def _generation_config(directory: Path) -> dict[str, Any]:
    path = directory / "generation_config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    except json.JSONDecodeError as exc:
        raise PipelineError(f"generation_config.json is not valid JSON: {exc}") from exc
    return data if isinstance(data, dict) else {}


def add_vocab(writer: gguf.GGUFWriter, directory: Path, vocab: VocabData, n_vocab: int, write_pre: bool = True) -> None:
    """Tokens, merges, special tokens (tokenizer_config.json, then config.json, then generation_config.json);
    the pre-tokenizer's name unless ``write_pre`` is False (the caller writes it)."""
    if write_pre and vocab.model == "gpt2" and not vocab.pre:
        raise PipelineError("internal: the BPE pre-tokenizer was not decided")
    if len(vocab.tokens) > n_vocab:
        raise PipelineError(f"the tokenizer has {len(vocab.tokens)} tokens but the model's vocab_size is {n_vocab}")
    # Embedding rows past the tokenizer's last id (padding to a multiple of 64...) get placeholder tokens.
    for i in range(len(vocab.tokens), n_vocab):
        vocab.tokens.append(f"[PAD{i}]".encode())
        vocab.scores.append(-1000.0)
        vocab.types.append(int(gguf.TokenType.UNUSED))
    writer.add_tokenizer_model(vocab.model)
    if write_pre and vocab.pre:
        writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_scores(vocab.scores)
    writer.add_token_types(vocab.types)
    special = gguf.SpecialVocab(directory, load_merges=vocab.model == "gpt2", n_vocab=n_vocab)
    if vocab.model == "gpt2" and not special.merges:
        raise PipelineError("tokenizer.json has no merges")
    for kind, value in _generation_config(directory).items():
        typ = kind.removesuffix("_token_id")
        if kind.endswith("_token_id") and typ in ("bos", "eos", "pad") and typ not in special.special_token_ids:
            first = value[0] if isinstance(value, list) and value else value  # LLaMA 3 lists several EOS ids
            if isinstance(first, int) and 0 <= first < n_vocab:
                special.special_token_ids[typ] = first
    if vocab.adds is not None:  # what the tokenizer does wins over what its config files say
        for typ, token in zip(("bos", "eos"), vocab.adds, strict=True):
            special.add_special_token[typ] = token is not None
            if token is not None:
                special.special_token_ids[typ] = token
    if vocab.add_space_prefix is not None:
        writer.add_add_space_prefix(vocab.add_space_prefix)
    special.add_to_gguf(writer, quiet=True)
