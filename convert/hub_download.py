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
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlparse

import httpx

ATTEMPTS = 5  # connections that may break in one download before it gives up (each resumes the last)
RETRY_STATUSES = {403, 408, 429, 500, 502, 503, 504}  # 403: a signed address that expired
CHUNK = 2**20
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


PARTIAL_SUFFIX = ".llama-inference-partial"  # a blob's bytes so far, beside the cache's blobs


def partial_path(blob: Path) -> Path:
    return blob.with_name(blob.name + PARTIAL_SUFFIX)


def fetch_blob(repo_id: str, filename: str, *, revision: str | None, token: str | None) -> None:
    """Make sure the cache holds the blob of ``filename`` at ``revision``, resuming a partial download. Where the
    Hub cannot describe the file (no network, an error), nothing is done: ``hf_hub_download`` then answers from
    its cache or with the Hub's error."""
    from filelock import FileLock
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url
    from huggingface_hub.file_download import repo_folder_name

    url = hf_hub_url(repo_id, filename, revision=revision)
    try:
        meta = get_hf_file_metadata(url, token=token or False)
    except Exception:  # noqa: BLE001 - hf_hub_download below reports it, or finds the file cached
        return
    if meta.etag is None or meta.size is None or meta.location is None:
        return
    folder = repo_folder_name(repo_id=repo_id, repo_type="model")
    blob = Path(constants.HF_HUB_CACHE) / folder / "blobs" / meta.etag
    if blob.exists():
        return
    blob.parent.mkdir(parents=True, exist_ok=True)
    # huggingface_hub's own lock for this blob: two pulls (or a pull and another Hub tool) take turns.
    lock = Path(constants.HF_HUB_CACHE) / ".locks" / folder / f"{meta.etag}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(lock)):
        if not blob.exists():
            # The first try goes where the metadata just said; later ones ask again.
            _fetch(filename, lambda attempt: _location(url, token, meta.location if attempt == 0 else None),
                   meta.size, meta.etag, blob)


def _location(url: str, token: str | None, known: str | None) -> tuple[str, dict[str, str]]:
    """Where the file's bytes are now (``known``, else asked of the Hub; LFS files: a signed address on another
    host, which expires) and the headers to send there: the token only to the Hub's own host, as
    huggingface_hub does."""
    from huggingface_hub import get_hf_file_metadata
    from huggingface_hub.utils import build_hf_headers

    location = known or get_hf_file_metadata(url, token=token or False).location
    same_host = urlparse(location).netloc == urlparse(url).netloc
    return location, build_hf_headers(token=(token or False) if same_host else False)


def _fetch(filename: str, locate: Callable[[int], tuple[str, dict[str, str]]], total: int, etag: str,
           blob: Path) -> None:
    from huggingface_hub.utils import tqdm as hub_tqdm

    part = partial_path(blob)
    with hub_tqdm(total=total, unit="B", unit_scale=True, desc=filename,
                  initial=part.stat().st_size if part.exists() else 0) as progress:
        for attempt in range(ATTEMPTS):
            have = part.stat().st_size if part.exists() else 0
            if have >= total:
                break
            try:
                # Asked anew after a failure: a signed address may have expired while a connection hung.
                _download_from(*locate(attempt), part, have, progress)
            except (httpx.TransportError, httpx.HTTPStatusError, _WrongRange) as exc:
                status = exc.response.status_code if isinstance(exc, httpx.HTTPStatusError) else 0
                if attempt == ATTEMPTS - 1 or (status and status not in RETRY_STATUSES):
                    raise
                time.sleep(min(2**attempt, 8))  # resume from what arrived, after a pause
    size = part.stat().st_size
    if size != total:
        part.unlink()
        raise OSError(f"{filename}: {size} bytes arrived where the Hub announced {total}")
    if _SHA256.match(etag) and _sha256(part) != etag:
        part.unlink()
        raise OSError(f"{filename}: the bytes received do not match the Hub's SHA-256; downloading again helps")
    os.chmod(part, 0o644)
    os.replace(part, blob)


class _WrongRange(OSError):
    """A 206 whose Content-Range does not start where the partial file ends."""


def _download_from(url: str, headers: dict[str, str], part: Path, have: int, progress) -> None:  # type: ignore[no-untyped-def]
    range_headers = {**headers, "Range": f"bytes={have}-"} if have else headers
    with httpx.stream("GET", url, headers=range_headers, follow_redirects=True, timeout=60) as response:
        if response.status_code not in (200, 206):
            response.raise_for_status()
        if have and response.status_code == 206 and \
                not response.headers.get("Content-Range", "").lower().startswith(f"bytes {have}-"):
            # Bytes from another offset than asked: appending them would corrupt the file; start it over.
            part.unlink(missing_ok=True)
            progress.reset()
            raise _WrongRange(f"asked for bytes {have}-, got {response.headers.get('Content-Range')!r}")
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
