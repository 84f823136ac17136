"""A Hub file into huggingface_hub's cache, resumable across processes.

huggingface_hub (2.x) downloads each file into a temporary file named for its process and deletes it when the
download fails, so a pull that is killed, or a pod restarted, starts a 4 GB file over. Here the blob is
downloaded into a partial file with a stable name beside the cache's blobs, continued with a Range request by the
next try (in this process after a dropped connection, or in the next one after a kill), checked against its
size and, for LFS files, its SHA-256, and moved into place whole. ``hf_hub_download`` then finds the blob in its
cache and only links it into the snapshot, so the cache's layout stays huggingface_hub's own.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import httpx

ATTEMPTS = 5  # connections that may break in one download before it gives up (each resumes the last)
CHUNK = 2**20
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


PARTIAL_SUFFIX = ".llama-inference-partial"  # a blob's bytes so far, beside the cache's blobs


def partial_path(blob: Path) -> Path:
    return blob.with_name(blob.name + PARTIAL_SUFFIX)


def fetch_blob(repo_id: str, filename: str, *, revision: str | None, token: str | None) -> None:
    """Make sure the cache holds the blob of ``filename`` at ``revision``, resuming a partial download."""
    from filelock import FileLock
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url
    from huggingface_hub.file_download import repo_folder_name
    from huggingface_hub.utils import build_hf_headers

    meta = get_hf_file_metadata(hf_hub_url(repo_id, filename, revision=revision), token=token or False)
    if meta.etag is None or meta.size is None or meta.location is None:
        return  # the Hub did not describe the file: leave the download to huggingface_hub
    folder = repo_folder_name(repo_id=repo_id, repo_type="model")
    blob = Path(constants.HF_HUB_CACHE) / folder / "blobs" / meta.etag
    if blob.exists():
        return
    blob.parent.mkdir(parents=True, exist_ok=True)
    part = partial_path(blob)
    headers = build_hf_headers(token=token or False)
    # huggingface_hub's own lock for this blob: two pulls (or a pull and another Hub tool) take turns.
    lock = Path(constants.HF_HUB_CACHE) / ".locks" / folder / f"{meta.etag}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(lock)):
        if not blob.exists():
            _fetch(filename, meta.location, meta.size, meta.etag, part, blob, headers)


def _fetch(filename: str, url: str, total: int, etag: str, part: Path, blob: Path,  # noqa: PLR0913
           headers: dict[str, str]) -> None:
    from huggingface_hub.utils import tqdm as hub_tqdm

    with hub_tqdm(total=total, unit="B", unit_scale=True, desc=filename,
                  initial=part.stat().st_size if part.exists() else 0) as progress:
        for attempt in range(ATTEMPTS):
            have = part.stat().st_size if part.exists() else 0
            if have >= total:
                break
            try:
                _download_from(url, part, have, headers, progress)
            except httpx.TransportError:  # a dropped connection, a timeout: resume from what arrived
                if attempt == ATTEMPTS - 1:
                    raise
    size = part.stat().st_size
    if size != total:
        part.unlink()
        raise OSError(f"{filename}: {size} bytes arrived where the Hub announced {total}")
    if _SHA256.match(etag) and _sha256(part) != etag:
        part.unlink()
        raise OSError(f"{filename}: the bytes received do not match the Hub's SHA-256; downloading again helps")
    os.chmod(part, 0o644)
    os.replace(part, blob)


def _download_from(url: str, part: Path, have: int, headers: dict[str, str], progress) -> None:  # type: ignore[no-untyped-def]
    range_headers = {**headers, "Range": f"bytes={have}-"} if have else headers
    with httpx.stream("GET", url, headers=range_headers, follow_redirects=True, timeout=60) as response:
        if response.status_code not in (200, 206):
            response.raise_for_status()
        # 200 to a Range request: the server sends the whole file, so start it over.
        mode = "ab" if have and response.status_code == 206 else "wb"
        if mode == "wb" and have:
            progress.reset()
        with part.open(mode) as out:
            for chunk in response.iter_bytes(CHUNK):
                out.write(chunk)
                out.flush()  # what arrived is on disk if the process is killed now
                progress.update(len(chunk))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(8 * CHUNK):
            digest.update(block)
    return digest.hexdigest()
