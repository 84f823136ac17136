"""``llama-inference pull``: a ready GGUF file from a Hugging Face repository, by quantization.

The file lands in huggingface_hub's own cache (``HF_HOME``, shared with every other Hub tool), so a second pull
or a restart reuses it (without the Hub too); a dropped connection, or a pull killed midway, resumes where it
broke (convert/hub_download.py, which also refuses an answer of the Hub that would lead out of the cache), and
a gated repository is read with ``HF_TOKEN``.
``REPO@REVISION`` (or ``--revision``) pins a commit, tag or branch. Every file returned has been checked against
the SHA-256 it was pulled with (convert/hub_download.py), so a blob changed or truncated in the cache is refused.
Which file: ``--file NAME`` names it; ``--quant Q`` picks the repository's GGUF of that quantization; with
neither, the only GGUF of the repository, else its Q4_K_M (llama.cpp's ``-hf`` default). Anything else that
matches more than one file, or none, is refused with the choices listed.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from convert.errors import PipelineError
from convert.hub_download import blob_of, check_blob, check_revision, download

DEFAULT_QUANT = "Q4_K_M"
# A model reference on the command line: ``owner/name`` or ``owner/name:QUANT`` (Ollama's and llama.cpp's form),
# with ``@REVISION`` (a commit, tag or branch) after the name.
_REF = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+?)(?:@(?P<revision>[\w./-]+?))?(?::(?P<quant>[\w.-]+))?")
# llama.cpp's quantization names inside a file name: Q4_K_M, Q8_0, IQ4_XS, F16, BF16...
_QUANT_IN_NAME = re.compile(r"(?<![A-Za-z0-9])(I?Q\d(?:_[A-Za-z0-9]+)*|BF16|F16|F32)(?=[.-]|$)", re.IGNORECASE)
# Split GGUFs: model-Q4_K_M-00001-of-00003.gguf; llama.cpp opens the first part and finds the others.
_SPLIT = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$")


@dataclass(frozen=True)
class ModelRef:
    repo_id: str
    quant: str | None = None
    revision: str | None = None


def parse_model_ref(text: str) -> ModelRef | None:
    """``owner/name[@REVISION][:QUANT]`` as a :class:`ModelRef`, or None when ``text`` is not of that form; a
    revision that cannot name a branch, tag or commit (``@../x``) is refused with :class:`PipelineError`."""
    match = _REF.fullmatch(text)
    if match is None:
        return None
    if match["revision"] is not None:
        check_revision(match["revision"])
    return ModelRef(match["repo"], match["quant"], match["revision"])


def quant_of(filename: str) -> str | None:
    """The quantization named in a GGUF file name (upper case), or None."""
    found = _QUANT_IN_NAME.findall(_SPLIT.sub(".gguf", Path(filename).name))
    return found[-1].upper() if found else None


def _first_parts(files: list[str]) -> list[str]:
    """The GGUF model files of a listing: split files only by their first part; projector files left out."""
    chosen = []
    for name in files:
        if not name.endswith(".gguf") or "mmproj" in Path(name).name.lower():
            continue
        split = _SPLIT.search(name)
        if split is None or int(split[1]) == 1:
            chosen.append(name)
    return sorted(chosen)


def _describe(files: list[str]) -> str:
    return ", ".join(f"{f} ({quant_of(f) or '?'})" for f in files)


def choose_file(repo_id: str, files: list[str], *, quant: str | None = None, filename: str | None = None) -> str:
    """The GGUF to download from a repository's file listing; :class:`PipelineError` if none or ambiguous."""
    ggufs = _first_parts(files)
    if filename is not None:
        if filename not in files:
            raise PipelineError(f"{repo_id} has no file {filename!r}; its GGUF files: {_describe(ggufs) or 'none'}")
        return filename
    if not ggufs:
        raise PipelineError(f"{repo_id} holds no GGUF file (is it a safetensors repository? see `fetch`)")
    if quant is None:
        if len(ggufs) == 1:
            return ggufs[0]
        default = [f for f in ggufs if quant_of(f) == DEFAULT_QUANT]
        if len(default) == 1:
            return default[0]
        raise PipelineError(f"{repo_id} has several GGUF files; choose one with --quant or --file: {_describe(ggufs)}")
    matches = [f for f in ggufs if quant_of(f) == quant.upper()]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        known = sorted({q for f in ggufs if (q := quant_of(f))})
        raise PipelineError(f"{repo_id} has no {quant.upper()} GGUF; quantizations there: {', '.join(known) or 'none'}"
                            f" ({_describe(ggufs)})")
    raise PipelineError(f"{repo_id} has several {quant.upper()} GGUF files; choose one with --file: "
                        f"{', '.join(matches)}")


def _split_parts(chosen: str, files: list[str]) -> list[str]:
    split = _SPLIT.search(chosen)
    if split is None:
        return [chosen]
    stem = chosen[: split.start()]
    return sorted(f for f in files if f.startswith(stem) and (m := _SPLIT.search(f)) and m[2] == split[2])


def _hub_error(exc: Exception, repo_id: str, revision: str | None, token: str | None,
               filename: str | None = None) -> PipelineError:
    """One line a user can act on, for each way the Hub can refuse (``filename``: while downloading it)."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(exc, GatedRepoError):
        hint = ("set HF_TOKEN to a token of an account that accepted its license" if not token else
                "the token's account has not been granted access: accept the license on the repository's page")
        return PipelineError(f"{repo_id} is a gated repository: {hint}")
    if isinstance(exc, RevisionNotFoundError):
        return PipelineError(f"{repo_id} has no revision {revision!r}")
    if isinstance(exc, RepositoryNotFoundError):
        hint = "" if token else " (if it is private or gated, set HF_TOKEN)"
        return PipelineError(f"repository {repo_id} not found, or not visible without a token{hint}")
    if isinstance(exc, HfHubHTTPError):
        status = exc.response.status_code if exc.response is not None else "?"
        if status == 401:
            return PipelineError(f"{repo_id}: the Hub refused the token (401): check HF_TOKEN")
        return PipelineError(f"{repo_id}: the Hub answered {status}: {str(exc).splitlines()[0]}")
    reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if filename is not None:
        return PipelineError(f"downloading {filename} from {repo_id} failed: {reason}")
    return PipelineError(f"cannot reach the Hugging Face Hub for {repo_id} and it is not in the local cache: {reason}")


def _cached_files(repo_id: str, revision: str | None, token: str | None) -> tuple[Path, list[str]] | None:
    """The snapshot folder of the repository in the local cache and the GGUF files there, or None."""
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=["*.gguf"],
                                        local_files_only=True, token=token or False))
    except Exception:  # noqa: BLE001 - anything here means "not cached"
        return None
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*.gguf"))
    return (folder, files) if files else None


def _pull_again(repo_id: str, revision: str | None, quant: str | None, filename: str | None) -> str:
    """The command that downloads the file again."""
    ref = repo_id + (f"@{revision}" if revision else "")
    return f"llama-inference pull {ref}" + (f" --quant {quant}" if quant else "") + (f" --file {filename}" if filename
                                                                                       else "")


def _from_cache(repo_id: str, quant: str | None, filename: str | None, revision: str | None,
                token: str | None) -> Path | None:
    """The chosen file if the cache holds it (and every part of a split model), else None. A file there that
    no longer holds the bytes it was pulled with is refused (:class:`PipelineError`)."""
    cached = _cached_files(repo_id, revision, token)
    if cached is None:
        return None
    folder, files = cached
    try:
        chosen = choose_file(repo_id, files, quant=quant, filename=filename)
    except PipelineError:
        return None
    parts = _split_parts(chosen, files)
    if (split := _SPLIT.search(chosen)) is not None and len(parts) != int(split[2]):
        return None
    for part in parts:
        if (problem := check_blob(blob_of(folder / part))) is not None:
            raise PipelineError(f"{repo_id}: the cached {part} {problem}; "
                                f"`{_pull_again(repo_id, revision, quant, filename)}` downloads it again")
    return folder / chosen


def pull(repo_id: str, *, quant: str | None = None, filename: str | None = None, revision: str | None = None,
         token: str | None = None, prefer_cache: bool = False) -> Path:
    """Download (or find in the cache) the chosen GGUF of ``repo_id`` and return its local path.

    The token comes from ``token`` or ``HF_TOKEN``. A split model is downloaded whole; the first part's path
    is returned (llama.cpp opens the rest from it). With ``prefer_cache`` (``serve``), a file already pulled is
    used without asking the Hub, so a server restarts the same model, and without a network; it is checked
    against the SHA-256 it was pulled with first (hashed again only when its size or times changed)."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    token = token or os.environ.get("HF_TOKEN") or None
    if quant is not None and filename is not None:
        raise PipelineError("give --quant or --file, not both")
    if revision is not None:
        check_revision(revision)
    if prefer_cache and (hit := _from_cache(repo_id, quant, filename, revision, token)) is not None:
        return hit
    try:
        files = HfApi().list_repo_files(repo_id, revision=revision, token=token or False)
    except HfHubHTTPError as exc:
        raise _hub_error(exc, repo_id, revision, token) from exc
    except Exception as exc:  # noqa: BLE001 - no Hub (connection refused, DNS, offline mode): try the cache
        hit = _from_cache(repo_id, quant, filename, revision, token)
        if hit is None:
            raise _hub_error(exc, repo_id, revision, token) from exc
        return hit
    chosen = choose_file(repo_id, files, quant=quant, filename=filename)
    paths = []
    for part in _split_parts(chosen, files):
        try:
            # Resumable across processes, checked, and linked into the cache's snapshot as huggingface_hub does.
            paths.append(download(repo_id, part, revision=revision, token=token))
        except Exception as exc:  # noqa: BLE001 - every failure of the download becomes one line
            raise _hub_error(exc, repo_id, revision, token, filename=part) from exc
    return paths[0]
