"""Downloading a pinned revision of a Hugging Face repository: only what conversion needs, resumable."""

from __future__ import annotations

import os
from pathlib import Path

from huggingface_hub import snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from convert.errors import PipelineError

# Config, weights and tokenizer files; never the pytorch .bin duplicates or the original/ consolidated copies.
ALLOW_PATTERNS = [
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",  # transformers 5 keeps the chat template here, not in tokenizer_config.json
    "chat_template.json",
]


def fetch(repo_id: str, out: Path, *, revision: str = "main", token: str | None = None) -> Path:
    """Download ``repo_id`` at ``revision`` into ``out``. Files already there and complete are kept, so an
    interrupted download resumes. The token comes from ``token`` or ``HF_TOKEN``."""
    token = token or os.environ.get("HF_TOKEN") or None
    if not out.parent.is_dir():
        raise PipelineError(f"output directory's parent does not exist: {out.parent}")
    try:
        path = snapshot_download(
            repo_id, revision=revision, local_dir=out, allow_patterns=ALLOW_PATTERNS, token=token or False,
        )
    except GatedRepoError as exc:
        hint = "set HF_TOKEN to a token of an account that accepted its license" if not token else \
            "the token's account has not been granted access: accept the license on the repository's page"
        raise PipelineError(f"{repo_id} is a gated repository: {hint}") from exc
    except RevisionNotFoundError as exc:
        raise PipelineError(f"{repo_id} has no revision {revision!r}") from exc
    except RepositoryNotFoundError as exc:
        hint = "" if token else " (if it is private or gated, set HF_TOKEN)"
        raise PipelineError(f"repository {repo_id} not found, or not visible without a token{hint}") from exc
    except LocalEntryNotFoundError as exc:
        raise PipelineError(f"cannot reach the Hugging Face Hub for {repo_id}: {exc}") from exc
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "?"
        if status == 401:
            raise PipelineError(f"{repo_id}: the Hub refused the token (401): check HF_TOKEN") from exc
        raise PipelineError(f"{repo_id}: the Hub answered {status}: {exc}") from exc
    except OSError as exc:  # a file that could not be written: a full disk, or a Hub answer that names no file
        raise PipelineError(f"{repo_id}: the download failed: {_first_line(exc)}") from exc
    return Path(path)


def _first_line(exc: Exception, limit: int = 300) -> str:
    text = (str(exc).splitlines() or [type(exc).__name__])[0]
    return text if len(text) <= limit else text[:limit] + "..."
