"""A Hub file into huggingface_hub's cache, resumable across processes, checked on the way in and on each use.

huggingface_hub (2.x) downloads each file into a temporary file named for its process and deletes it when the
download fails, so a pull that is killed, or a pod restarted, starts a 4 GB file over. Here the blob is
downloaded into a partial file with a stable name beside the cache's blobs, continued with a Range request by the
next try (in this process after a dropped connection, or in the next one after a kill), checked against its
size and, for LFS files, its SHA-256 (hashed as the bytes arrive), moved into place whole and linked into the
snapshot as huggingface_hub links it, so the cache's layout stays huggingface_hub's own (``snapshot_download``
and ``hf cache`` read it).

What the Hub answers becomes paths in the cache, so it is checked first: the ETag names the blob and must be a
git SHA-1 or an LFS SHA-256 (huggingface_hub itself joins it to the path unchecked: ``../../x`` would write
outside the cache), the commit names the snapshot, the file name stays inside it. Beside each blob a record
keeps its SHA-256 and the size and times it had when last hashed; :func:`check_blob` re-hashes the blob only when
those changed, and refuses a blob that no longer matches.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

import httpx

from convert.errors import PipelineError

log = logging.getLogger("llama_inference.pull")

ATTEMPTS = 5  # connections that may break in one download before it gives up (each resumes the last)
RETRY_STATUSES = {403, 408, 429, 500, 502, 503, 504}  # 403: a signed address that expired
CHUNK = 2**20
_SHA256 = re.compile(r"[0-9a-f]{64}")  # an LFS file's ETag: its SHA-256
_SHA1 = re.compile(r"[0-9a-f]{40}")  # a git file's ETag (its blob id), and every commit id
# A branch, tag or commit as a path under refs/: names of git's characters, no '.' or '..' component.
_REVISION = re.compile(r"(?!.*(?:^|/)\.\.?(?:/|$))[A-Za-z0-9_.-]+(?:/[A-Za-z0-9_.-]+)*")


PARTIAL_SUFFIX = ".llama-inference-partial"  # a blob's bytes so far, beside the cache's blobs
RECORD_SUFFIX = ".llama-inference.json"  # a blob's SHA-256 and the state it was hashed in, beside it


def partial_path(blob: Path) -> Path:
    return blob.with_name(blob.name + PARTIAL_SUFFIX)


def record_path(blob: Path) -> Path:
    return blob.with_name(blob.name + RECORD_SUFFIX)


def _shown(value: str, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def blob_name(etag: str | None) -> str:
    """The Hub's ETag for a file as the name of its blob, once it is known to be a plain name: a git SHA-1
    (40 hex digits) or an LFS file's SHA-256 (64); huggingface_hub has taken off the quotes and a weak ``W/``.
    Anything else (a path, a NUL, 5000 characters) is refused before a file is made."""
    if etag is None:
        raise PipelineError("the Hub's answer has no ETag, so the file cannot be cached")
    if _SHA256.fullmatch(etag) is None and _SHA1.fullmatch(etag) is None:
        raise PipelineError(f"the Hub's ETag {_shown(etag)} is neither a SHA-1 nor a SHA-256; "
                            "refusing it as a file name in the cache")
    return etag


def check_revision(revision: str) -> str:
    """``revision`` if it can name a file under the cache's ``refs/`` (a branch, tag or commit), else refused."""
    if _REVISION.fullmatch(revision) is None:
        raise PipelineError(f"not a branch, tag or commit name: {_shown(revision)}")
    return revision


def download(repo_id: str, filename: str, *, revision: str | None, token: str | None) -> Path:
    """The local path of ``filename`` at ``revision`` (huggingface_hub's snapshot link), downloading the blob
    (resuming a partial download) unless the cache holds it intact. Where the Hub cannot describe the file (no
    network, an error), a copy the cache holds for ``revision`` is used; else the Hub's error is raised."""
    from filelock import FileLock
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url
    from huggingface_hub.file_download import repo_folder_name

    revision = check_revision(revision or constants.DEFAULT_REVISION)
    url = hf_hub_url(repo_id, filename, revision=revision)
    try:
        meta = get_hf_file_metadata(url, token=token or False)
    except Exception:
        cached = _cached(repo_id, filename, revision, token)
        if cached is None:
            raise
        if (problem := check_blob(blob_of(cached))) is not None:
            raise PipelineError(f"the Hub cannot describe it now and the cached copy {problem}") from None
        return cached
    name = blob_name(meta.etag)
    commit = meta.commit_hash
    if commit is None or _SHA1.fullmatch(commit) is None:
        raise PipelineError(f"the Hub's answer names no commit (X-Repo-Commit {_shown(str(commit))})")
    if meta.size is None or meta.location is None:
        raise PipelineError("the Hub's answer does not say how large the file is, or where")
    storage = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model")
    blob = storage / "blobs" / name
    pointer = _inside(storage / "snapshots" / commit, filename, "the file name")
    blob.parent.mkdir(parents=True, exist_ok=True)
    # huggingface_hub's own lock for this blob: two pulls (or a pull and another Hub tool) take turns.
    lock = Path(constants.HF_HUB_CACHE) / ".locks" / storage.name / f"{name}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(lock)):
        if blob.exists() and (problem := check_blob(blob, size=meta.size)) is not None:
            log.warning("%s: the cached blob %s %s; downloading it again", filename, blob, problem)
            blob.unlink()
        if not blob.exists():
            # The first try goes where the metadata just said; later ones ask again.
            digest = _fetch(filename, lambda attempt: _location(url, token, meta.location if attempt == 0 else None),
                            meta.size, name, blob)
            _write_record(blob, digest)
        _link(storage, revision, commit, pointer, blob)
    return pointer


def _cached(repo_id: str, filename: str, revision: str, token: str | None) -> Path | None:
    """The cache's copy of ``filename`` at ``revision``, found without the network, if it is there."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision, token=token or False,
                                    local_files_only=True))
    except Exception:  # noqa: BLE001 - anything here means "not cached"
        return None


def _inside(root: Path, name: str, what: str) -> Path:
    """``root / name``, refused unless it stays inside ``root`` (``name`` comes from the Hub)."""
    path = Path(os.path.normpath(root / name))
    if "\0" in name or not path.is_relative_to(root) or path == root:
        raise PipelineError(f"{what}: {_shown(name)} would lie outside {root}")
    return path


def _link(storage: Path, revision: str, commit: str, pointer: Path, blob: Path) -> None:
    """Link ``pointer`` (``snapshots/<commit>/<file>``) to ``blob`` and remember which commit ``revision``
    (a branch or tag) is, as huggingface_hub does, so that its cache lookups find the file."""
    if revision != commit:
        ref = _inside(storage / "refs", revision, "revision")
        ref.parent.mkdir(parents=True, exist_ok=True)
        if not ref.exists() or ref.read_text() != commit:
            tmp = ref.with_name(f"{ref.name}.{os.getpid()}.tmp")
            tmp.write_text(commit)
            os.replace(tmp, ref)
    target = os.path.relpath(blob, pointer.parent)
    if pointer.is_symlink() and os.readlink(pointer) == target:
        return
    pointer.parent.mkdir(parents=True, exist_ok=True)
    pointer.unlink(missing_ok=True)  # a link to another blob: the file of a commit is this one
    os.symlink(target, pointer)


def blob_of(path: Path) -> Path:
    """The blob a snapshot file links to (the cache's layout), or ``path`` itself when it is not a link."""
    return Path(os.path.normpath(path.parent / os.readlink(path))) if path.is_symlink() else path


def check_blob(blob: Path, *, size: int | None = None) -> str | None:
    """None if ``blob`` holds the bytes it was pulled with, else what is wrong with it (a phrase).

    The SHA-256 to match is the blob's name for an LFS file (the Hub's own), else the one recorded beside it at
    download (or at its first check: a git file's name is a SHA-1 of another form). Hashing 4 GB takes seconds,
    so the record also keeps the blob's size, modification and change times when it was hashed, and while they
    are unchanged it is not hashed again; any write to the file changes its change time (which ``touch`` cannot
    set back), so the next check hashes it."""
    try:
        stat = blob.stat()
    except OSError as exc:
        return f"cannot be read ({exc.strerror})"
    record = _read_record(blob)
    named = blob.name if _SHA256.fullmatch(blob.name) else None
    if record is not None and named is not None and record["sha256"] != named:
        record = None  # not this blob's record
    expected = named or (record["sha256"] if record else None)
    wanted_size = size if size is not None else (record["size"] if record else None)
    if wanted_size is not None and stat.st_size != wanted_size:
        return f"is {stat.st_size} bytes where {wanted_size} were pulled (truncated or changed)"
    if record is not None and record["state"] == _state(stat):
        return None
    if expected is not None:
        log.info("checking the SHA-256 of %s (%.1f GB, changed since its last check)", blob, stat.st_size / 1e9)
    digest = _sha256(blob)
    if expected is not None and digest != expected:
        return f"does not match the SHA-256 it was pulled with ({digest[:12]}... where {expected[:12]}... was)"
    _write_record(blob, digest)
    return None


def _state(stat: os.stat_result) -> list[int]:
    return [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns]


def _read_record(blob: Path) -> dict | None:  # type: ignore[type-arg]
    try:
        record = json.loads(record_path(blob).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or not isinstance(record.get("sha256"), str) or \
            _SHA256.fullmatch(record["sha256"]) is None or not isinstance(record.get("size"), int) or \
            not isinstance(record.get("state"), list):
        return None
    return record


def _write_record(blob: Path, digest: str) -> None:
    stat = blob.stat()
    record = record_path(blob)
    tmp = record.with_name(f"{record.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps({"sha256": digest, "size": stat.st_size, "state": _state(stat)}))
        os.replace(tmp, record)
    except OSError as exc:  # a read-only cache: the blob is hashed at every start instead
        log.warning("cannot record the SHA-256 of %s (%s); it is hashed again at each start", blob, exc.strerror)
        tmp.unlink(missing_ok=True)


def _location(url: str, token: str | None, known: str | None) -> tuple[str, dict[str, str]]:
    """Where the file's bytes are now (``known``, else asked of the Hub; LFS files: a signed address on another
    host, which expires) and the headers to send there: the token only to the Hub's own host, as
    huggingface_hub does."""
    from huggingface_hub import get_hf_file_metadata
    from huggingface_hub.utils import build_hf_headers

    location = known or get_hf_file_metadata(url, token=token or False).location
    same_host = urlparse(location).netloc == urlparse(url).netloc
    return location, build_hf_headers(token=(token or False) if same_host else False)


class _Partial:
    """The partial file and the SHA-256 of what it holds, kept as bytes arrive so the file is not read again."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._rehash()  # bytes left by an earlier process: hashed once, then continued

    def _rehash(self) -> None:
        self.digest = hashlib.sha256()
        self.size = 0
        if self.path.exists():
            with self.path.open("rb") as f:
                while block := f.read(8 * CHUNK):
                    self.digest.update(block)
                    self.size += len(block)

    def restart(self) -> None:
        self.path.unlink(missing_ok=True)
        self._rehash()

    def on_disk(self) -> int:
        """The partial file's size; if it is not what was hashed (a write cut short), hashed again."""
        if (self.path.stat().st_size if self.path.exists() else 0) != self.size:
            self._rehash()
        return self.size


def _fetch(filename: str, locate: Callable[[int], tuple[str, dict[str, str]]], total: int, etag: str,
           blob: Path) -> str:
    """Download into the partial file and move it to ``blob``; the SHA-256 of its bytes."""
    from huggingface_hub.utils import tqdm as hub_tqdm

    part = _Partial(partial_path(blob))
    with hub_tqdm(total=total, unit="B", unit_scale=True, desc=filename, initial=part.size) as progress:
        for attempt in range(ATTEMPTS):
            if part.on_disk() >= total:
                break
            try:
                # Asked anew after a failure: a signed address may have expired while a connection hung.
                _download_from(*locate(attempt), part, progress)
            except (httpx.TransportError, httpx.HTTPStatusError, _WrongRange) as exc:
                status = exc.response.status_code if isinstance(exc, httpx.HTTPStatusError) else 0
                if attempt == ATTEMPTS - 1 or (status and status not in RETRY_STATUSES):
                    raise
                time.sleep(min(2**attempt, 8))  # resume from what arrived, after a pause
    size, digest = part.on_disk(), part.digest.hexdigest()
    if size != total:
        part.restart()
        raise OSError(f"{filename}: {size} bytes arrived where the Hub announced {total}")
    if _SHA256.fullmatch(etag) and digest != etag:
        part.restart()
        raise OSError(f"{filename}: the bytes received do not match the Hub's SHA-256; downloading again helps")
    os.chmod(part.path, 0o644)
    os.replace(part.path, blob)
    return digest


class _WrongRange(OSError):
    """A 206 whose Content-Range does not start where the partial file ends."""


def _download_from(url: str, headers: dict[str, str], part: _Partial, progress) -> None:  # type: ignore[no-untyped-def]
    have = part.size
    range_headers = {**headers, "Range": f"bytes={have}-"} if have else headers
    with httpx.stream("GET", url, headers=range_headers, follow_redirects=True, timeout=60) as response:
        if response.status_code not in (200, 206):
            response.raise_for_status()
        if have and response.status_code == 206 and \
                not response.headers.get("Content-Range", "").lower().startswith(f"bytes {have}-"):
            # Bytes from another offset than asked: appending them would corrupt the file; start it over.
            part.restart()
            progress.reset()
            raise _WrongRange(f"asked for bytes {have}-, got {response.headers.get('Content-Range')!r}")
        # 200 to a Range request: the server sends the whole file, so start it over.
        if have and response.status_code != 206:
            part.restart()
            progress.reset()
        with part.path.open("ab") as out:
            for chunk in response.iter_bytes(CHUNK):
                out.write(chunk)
                out.flush()  # what arrived is on disk if the process is killed now
                part.digest.update(chunk)
                part.size += len(chunk)
                progress.update(len(chunk))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(8 * CHUNK):
            digest.update(block)
    return digest.hexdigest()
