"""Does llama.cpp tokenize like the checkpoint? Both tokenizers run on one probe text and the ids are compared.

The checkpoint's own tokenizer is the reference: ``tokenizer.json`` through the Hugging Face ``tokenizers``
library (what transformers runs), or ``tokenizer.model`` through ``sentencepiece`` when there is no
``tokenizer.json``. llama.cpp loads only the vocabulary of a GGUF file (``vocab_only``), which takes a fraction
of a second and no memory to speak of, whatever the size of the weights.
"""

from __future__ import annotations

import ctypes
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import llama_cpp

from convert.errors import PipelineError
from server.engine.llama import route_native_logs

# What pre-tokenizers disagree on: digit runs, CJK, emoji (4-byte UTF-8, skin tones, ZWJ), accents (also
# decomposed, which a Unicode normalizer would change), runs of spaces, tabs and newlines, English contractions
# in both cases, punctuation runs, code.
PROBE = (
    "Hello world! It's 2024-05-17, the price is $1234567.89 (≈ 3.14159); we'll see, they've said, I'M SURE.\n"
    "  Two spaces,   three spaces,\tone tab,\t\ttwo tabs.\n\n\nThree newlines above; \r\n a CRLF.\n"
    "naïve café Ünïcödé façade (decomposed: cafe\u0301 nai\u0308ve) — “quoted” «guillemets» ‘single’ ... !!! ?? -\n"
    "日本語のテキストも。中文句子，标点符号！한국어 문장입니다. Русский текст, Ελληνικά, العربية, हिन्दी.\n"
    "🎉🚀 emoji 👍🏽 family 👨‍👩‍👧 flags 🇫🇷 ✓ ✗ ∑ √ ∞ ½ №\n"
    "def fibonacci(n: int) -> int:\n    if n < 2:\n        return n  # base case\n"
    "    return fibonacci(n - 1) + fibonacci(n - 2)\n\n"
    "for (int i = 0; i < 10; ++i) { x[i] = 0x1F; }   \n"
    "   leading and trailing spaces   \n 1 12 123 1234 12345 123456 a1b2c3 ab12cd34\n"
)


@dataclass
class Reference:
    """The checkpoint's tokenizer."""

    source: str  # the file it was read from
    parse_special: bool  # whether special-token text in input becomes the special token
    special_texts: list[str]
    _encode: Any
    _decode: Any
    _offsets: Any = None  # (text, add_special) -> each token's (start, end) in text, when the library says

    def char_at(self, text: str, add_special: bool, i: int) -> int:
        """Where in ``text`` the ``i``-th token of its encoding starts."""
        ids = self.encode(text, add_special)
        if self._offsets is not None and i < len(ids):
            return int(self._offsets(text, add_special)[i][0])
        return min(len(self.decode(ids[:i])), len(text))

    def encode(self, text: str, add_special: bool) -> list[int]:
        return list(self._encode(text, add_special))

    def decode(self, ids: list[int]) -> str:
        return str(self._decode(ids))

    def adds(self) -> tuple[int | None, int | None]:
        """The ids this tokenizer puts before and after a text when asked for special tokens (BOS, EOS)."""
        plain, full = self.encode("a b", False), self.encode("a b", True)
        if not plain or len(full) <= len(plain):
            return None, None
        start = full.index(plain[0]) if plain[0] in full else 0
        bos = full[0] if start == 1 else None
        eos = full[-1] if len(full) - start - len(plain) == 1 else None
        return bos, eos


def _tokenizer_config(directory: Path) -> dict[str, Any]:
    path = directory / "tokenizer_config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    except json.JSONDecodeError as exc:
        raise PipelineError(f"tokenizer_config.json is not valid JSON: {exc}") from exc
    return config if isinstance(config, dict) else {}


def load_reference(directory: Path) -> Reference:
    """The tokenizer transformers would use for this checkpoint."""
    if (directory / "tokenizer.json").exists():
        from tokenizers import Tokenizer

        try:
            tok = Tokenizer.from_file(str(directory / "tokenizer.json"))
        except Exception as exc:  # the library raises a bare Exception for a malformed file
            raise PipelineError(f"tokenizer.json cannot be loaded by the tokenizers library: {exc}") from exc
        specials = [t.content for t in tok.get_added_tokens_decoder().values() if t.special]
        return Reference(
            "tokenizer.json", True, specials,
            lambda text, add: tok.encode(text, add_special_tokens=add).ids,
            lambda ids: tok.decode(ids, skip_special_tokens=False),
            lambda text, add: tok.encode(text, add_special_tokens=add).offsets,
        )
    if (directory / "tokenizer.model").exists():
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(directory / "tokenizer.model"))
        config = _tokenizer_config(directory)
        add_bos, add_eos = config.get("add_bos_token", True), config.get("add_eos_token", False)

        def encode(text: str, add: bool) -> list[int]:
            ids = list(sp.encode(text))
            if add and add_bos and sp.bos_id() >= 0:
                ids.insert(0, sp.bos_id())
            if add and add_eos and sp.eos_id() >= 0:
                ids.append(sp.eos_id())
            return ids

        return Reference("tokenizer.model", False, [], encode, lambda ids: sp.decode(ids))
    raise PipelineError(f"no tokenizer in {directory}: expected tokenizer.model or tokenizer.json")


class _ErrorCapture:
    """llama.cpp's error lines while it loads a file, to put its reason in our one-line message."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.callback = llama_cpp.llama_log_callback(self._on_log)  # kept referenced while installed

    def _on_log(self, level: int, text: bytes, _user_data: ctypes.c_void_p) -> None:
        if level == 4:  # GGML_LOG_LEVEL_ERROR
            self.errors.append(text.decode("utf-8", "replace").strip())


class LlamaVocab:
    """A GGUF file's vocabulary as llama.cpp loads it (no weights)."""

    def __init__(self, path: Path) -> None:
        llama_cpp.llama_backend_init()
        params = llama_cpp.llama_model_default_params()
        params.vocab_only = True
        capture = _ErrorCapture()
        llama_cpp.llama_log_set(capture.callback, ctypes.c_void_p(0))
        try:
            model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        finally:
            route_native_logs()
        if not model:
            reason = capture.errors[0].rsplit("error loading model: ", 1)[-1] if capture.errors else "no reason given"
            raise PipelineError(f"llama.cpp cannot load the vocabulary: {reason}")
        self._model: llama_cpp.llama_model_p | None = model
        self._vocab = llama_cpp.llama_model_get_vocab(model)

    def tokenize(self, text: str, add_special: bool, parse_special: bool) -> list[int]:
        data = text.encode("utf-8")
        n_max = len(data) + 8
        buf = (llama_cpp.llama_token * n_max)()
        n = llama_cpp.llama_tokenize(self._vocab, data, len(data), buf, n_max, add_special, parse_special)
        return list(buf[:n])

    def close(self) -> None:
        if self._model is not None:
            llama_cpp.llama_model_free(self._model)
            self._model = None


@contextmanager
def llama_vocab(path: Path) -> Iterator[LlamaVocab]:
    vocab = LlamaVocab(path)
    try:
        yield vocab
    finally:
        vocab.close()


def probe_texts(reference: Reference, markers_in_text: bool = True) -> list[str]:
    """The probe, and - when the tokenizer parses them - every special token, inside some text or alone.

    ``markers_in_text`` False is for SentencePiece vocabularies: llama.cpp puts the dummy-prefix space before
    any text that follows a special token, which transformers 5 (``legacy=False``) does not, and no GGUF key
    changes that; the markers themselves must still come out as their ids."""
    texts = [PROBE]
    if reference.parse_special and reference.special_texts:
        if markers_in_text:
            texts.append("".join(f"{s}user\nHi there{s}\n" for s in reference.special_texts))
        else:
            texts.append("".join(reference.special_texts))
    return texts


def first_difference(gguf_path: Path, reference: Reference, markers_in_text: bool = True) -> str | None:
    """None when llama.cpp tokenizes the probe exactly as the checkpoint does; else where they first differ."""
    with llama_vocab(gguf_path) as vocab:
        for text in probe_texts(reference, markers_in_text):
            for add_special in (False, True):
                want = reference.encode(text, add_special)
                got = vocab.tokenize(text, add_special, reference.parse_special)
                if got == want:
                    continue
                i = next((k for k, (a, b) in enumerate(zip(got, want, strict=False)) if a != b),
                         min(len(got), len(want)))
                done = reference.char_at(text, add_special, i)
                what = "with BOS/EOS added" if add_special else "of plain text"
                return (f"token ids {what} first differ at token {i}, after {text[max(0, done - 12):done]!r} "
                        f"at {text[done:done + 12]!r}: llama.cpp gives {got[i:i + 4]}, {reference.source} gives "
                        f"{want[i:i + 4]}")
    return None
