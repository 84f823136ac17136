"""Which of llama.cpp's BPE pre-tokenizers does this checkpoint's tokenizer behave like?

llama.cpp's own converter hashes the token ids of a probe text and looks the hash up in a table of known
checkpoints; an unknown checkpoint gets nothing. Here each candidate name is tried instead: a GGUF holding only
the vocabulary is written with that name, llama.cpp loads it, and the candidate is kept when llama.cpp
tokenizes the probe text exactly as the checkpoint's tokenizer does. The guess from the JSON's shape is tried
first, so a usual checkpoint costs one try (well under a second).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from convert.errors import PipelineError

log = logging.getLogger(__name__)

# llama.cpp's names (src/llama-vocab.cpp) for byte-level BPE pre-tokenizers of LLaMA-family checkpoints and
# their usual relatives, the common ones first: a probe that two of them split alike picks the first.
CANDIDATES = (
    "gpt-2", "llama-bpe", "smollm", "qwen2", "starcoder", "refact", "deepseek-llm", "deepseek-coder",
    "falcon", "mpt", "command-r", "stablelm2", "olmo", "dbrx", "jais", "bloom", "gpt-4o", "codeshell",
    "exaone", "chameleon", "tekken",
)


def choose_pre(guess: str | None, mismatch_with: Callable[[str], str | None]) -> str:
    """The first candidate for which ``mismatch_with(name)`` finds no difference; refuse when none does."""
    order = ([guess] if guess else []) + [name for name in CANDIDATES if name != guess]
    for name in order:
        if mismatch_with(name) is None:
            log.info("BPE pre-tokenizer: %s (tokenizes the probe text as the checkpoint does)", name)
            return name
    raise PipelineError(
        "no llama.cpp pre-tokenizer splits the probe text as this tokenizer.json does "
        f"(tried {len(order)}); pass --vocab-pre NAME with llama.cpp's name for it"
    )
