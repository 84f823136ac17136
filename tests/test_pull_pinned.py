"""``REPO@REVISION[:QUANT]`` pulls and serves that revision; a pulled file's SHA-256 is recorded beside its blob
and checked at each start, so a blob changed or truncated in the cache refuses to start. Against the loopback
Hub (tests/hub_fixture.py) with the real huggingface_hub client, and real files in a real cache."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from convert import hub_download
from convert.errors import PipelineError
from convert.hub_download import RECORD_SUFFIX, blob_of, check_blob
from convert.pull import ModelRef, parse_model_ref
from tests.conftest import REPO, free_port, start_server, stop_server
from tests.hub_fixture import Hub, serve_hub
from tests.test_pull import FAKE, error_line, hub_env, pull

SMOL = "SmolLM2-135M-Instruct.Q4_1.gguf"
OFFLINE = "http://127.0.0.1:9"  # nothing listens there: the Hub is unreachable


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory, model_path: Path) -> Iterator[Hub]:
    """org/pinned-GGUF: the branch main holds new files, an older commit (tag v1) the real model and old ones."""
    root = tmp_path_factory.mktemp("pinned")
    new, old = root / "new", root / "old"
    new.mkdir()
    old.mkdir()
    (new / "model.Q8_0.gguf").write_bytes(FAKE + b"new")
    (new / SMOL).write_bytes(FAKE + b"not a model")  # main's file would not load: serving it fails
    (old / "model.Q8_0.gguf").write_bytes(FAKE + b"old")
    (old / SMOL).symlink_to(model_path)
    h = Hub()
    h.add_repo("org/pinned-GGUF", new)
    h.add_commit("org/pinned-GGUF", old, "v1")
    with serve_hub(h):
        yield h


def serve_once(home: Path, *args: str, url: str = OFFLINE) -> subprocess.CompletedProcess[str]:
    """``serve`` that is expected to exit before listening."""
    return subprocess.run([sys.executable, "-m", "server", "serve", "--port", str(free_port()), *args],
                          env=hub_env(url, home), capture_output=True, text=True, timeout=60, cwd=REPO)


@pytest.mark.parametrize(
    ("text", "ref"),
    [
        ("org/m-GGUF", ModelRef("org/m-GGUF")),
        ("org/m-GGUF:Q8_0", ModelRef("org/m-GGUF", "Q8_0")),
        ("org/m-GGUF@v1.0:Q8_0", ModelRef("org/m-GGUF", "Q8_0", "v1.0")),
        ("org/m-GGUF@" + "a" * 40, ModelRef("org/m-GGUF", None, "a" * 40)),
        ("org/m-GGUF@refs/pr/1:IQ4_XS", ModelRef("org/m-GGUF", "IQ4_XS", "refs/pr/1")),
        ("models/llama/m.gguf", None),
        ("org/m-GGUF@:Q8_0", None),
    ],
)
def test_model_references_name_a_revision_after_an_at(text: str, ref: ModelRef | None) -> None:
    assert parse_model_ref(text) == ref


def test_pull_repo_at_revision_pulls_that_revision(hub: Hub, tmp_path: Path) -> None:
    commit = hub.repos["org/pinned-GGUF"].revisions["v1"]
    proc = pull(hub.url, tmp_path, "org/pinned-GGUF@v1:Q8_0")
    assert proc.returncode == 0, proc.stderr
    path = Path(proc.stdout.strip())
    assert path.read_bytes() == FAKE + b"old"
    assert path.parent.name == commit  # the commit's snapshot, in huggingface_hub's layout
    assert (path.parents[2] / "refs" / "v1").read_text() == commit
    assert any(p.endswith("/resolve/v1/model.Q8_0.gguf") for _, p, _ in hub.requests)
    # The commit itself, and --revision, name the same file; without a revision, main's.
    assert Path(pull(hub.url, tmp_path, f"org/pinned-GGUF@{commit}:Q8_0").stdout.strip()) == path
    assert Path(pull(hub.url, tmp_path, "org/pinned-GGUF:Q8_0", "--revision", "v1").stdout.strip()) == path
    main = Path(pull(hub.url, tmp_path, "org/pinned-GGUF:Q8_0").stdout.strip())
    assert main.read_bytes() == FAKE + b"new" and main.parent.name == hub.repos["org/pinned-GGUF"].revisions["main"]
    proc = pull(hub.url, tmp_path, "org/pinned-GGUF@v1:Q8_0", "--revision", "v1")
    assert "the revision is given twice" in error_line(proc)
    assert "has no revision 'v2'" in error_line(pull(hub.url, tmp_path, "org/pinned-GGUF@v2:Q8_0"))


def test_serve_repo_at_revision_serves_that_revision_and_restarts_offline(hub: Hub, tmp_path: Path,
                                                                          model_path: Path) -> None:
    """main's file of the same name is no model: a server that took main would not start."""
    home = tmp_path / "home"
    hub.requests.clear()
    server = start_server(tmp_path, f"org/pinned-GGUF@v1:{SMOL.split('.')[-2]}", env=hub_env(hub.url, home))
    try:
        reply = httpx.post(server.url + "/v1/completions", json={
            "model": "any", "prompt": "The capital of France is", "max_tokens": 4, "temperature": 0}, timeout=60)
        assert reply.status_code == 200 and "Paris" in reply.json()["choices"][0]["text"]
    finally:
        assert stop_server(server) == 0
    fetched = [p for m, p, _ in hub.requests if m == "GET" and "/resolve/" in p]
    assert fetched == [f"/org/pinned-GGUF/resolve/v1/{SMOL}"]
    # Restarted without the Hub, by MODEL_PATH: the cache's v1 file, checked against its record.
    server = start_server(tmp_path, env={**hub_env(OFFLINE, home), "MODEL_PATH": "org/pinned-GGUF@v1:Q4_1"})
    try:
        assert httpx.get(server.url + "/ready").json()["model"] == model_path.name.removesuffix(".gguf")
    finally:
        stop_server(server)


def test_the_sha256_is_recorded_beside_the_blob(hub: Hub, tmp_path: Path) -> None:
    path = Path(pull(hub.url, tmp_path, "org/pinned-GGUF:Q8_0").stdout.strip())
    blob = blob_of(path)
    record = json.loads(blob.with_name(blob.name + RECORD_SUFFIX).read_text())
    assert record["sha256"] == hashlib.sha256(FAKE + b"new").hexdigest() == blob.name
    assert record["size"] == len(FAKE + b"new")


def _flip(blob: Path) -> None:
    with blob.open("r+b") as f:
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 1]))


def _flip_keeping_mtime(blob: Path) -> None:
    before = blob.stat()
    _flip(blob)
    os.utime(blob, ns=(before.st_atime_ns, before.st_mtime_ns))


def _truncate(blob: Path) -> None:
    with blob.open("r+b") as f:
        f.truncate(4096)


@pytest.mark.parametrize(
    ("tamper", "message"),
    [
        (_flip, "does not match the SHA-256 it was pulled with"),
        (_flip_keeping_mtime, "does not match the SHA-256 it was pulled with"),
        (_truncate, "is 4096 bytes where 102407 were pulled"),
    ],
    ids=["byte-changed", "byte-changed-mtime-restored", "truncated"],
)
def test_a_tampered_cached_blob_refuses_to_start_and_pull_repairs_it(hub: Hub, tmp_path: Path, tamper,
                                                                     message: str) -> None:  # type: ignore[no-untyped-def]
    path = Path(pull(hub.url, tmp_path, "org/pinned-GGUF:Q8_0").stdout.strip())
    tamper(blob_of(path))
    proc = serve_once(tmp_path, "org/pinned-GGUF:Q8_0")
    line = error_line(proc)
    assert message in line and "llama-inference pull org/pinned-GGUF --quant Q8_0" in line, line
    assert "Uvicorn running" not in proc.stderr
    # pull asks the Hub, finds the blob changed, and downloads it again; the check then passes.
    hub.requests.clear()
    again = pull(hub.url, tmp_path, "org/pinned-GGUF:Q8_0")
    assert again.returncode == 0, again.stderr
    assert Path(again.stdout.strip()).read_bytes() == FAKE + b"new"
    assert [p for m, p, _ in hub.requests if m == "GET" and "/resolve/" in p] == \
        ["/org/pinned-GGUF/resolve/main/model.Q8_0.gguf"]
    assert check_blob(blob_of(path)) is None


@pytest.fixture
def hashes(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The files check_blob hashes, in order."""
    seen: list[Path] = []
    real = hub_download._sha256

    def counting(path: Path) -> str:
        seen.append(path)
        return real(path)

    monkeypatch.setattr(hub_download, "_sha256", counting)
    return seen


def test_a_blob_is_hashed_again_only_when_its_size_or_times_changed(tmp_path: Path, hashes: list[Path]) -> None:
    data = os.urandom(1 << 20)
    blob = tmp_path / hashlib.sha256(data).hexdigest()  # an LFS blob, named by its SHA-256
    blob.write_bytes(data)
    assert check_blob(blob) is None and hashes == [blob]  # first check: hashed, then recorded
    assert check_blob(blob) is None and check_blob(blob) is None and hashes == [blob]  # unchanged: not hashed
    os.utime(blob, ns=(1, 1))  # touched: hashed again (same bytes), recorded again
    assert check_blob(blob) is None and len(hashes) == 2
    assert check_blob(blob) is None and len(hashes) == 2
    _flip_keeping_mtime(blob)  # the change time moved, though the modification time did not
    assert "does not match the SHA-256" in (check_blob(blob) or "") and len(hashes) == 3
    _truncate(blob)  # a size other than recorded: refused without hashing
    assert check_blob(blob) == "is 4096 bytes where 1048576 were pulled (truncated or changed)"
    assert len(hashes) == 3


def test_a_git_file_blob_is_checked_against_the_sha256_recorded_at_download(tmp_path: Path,
                                                                           hashes: list[Path]) -> None:
    """A file kept in git (not LFS) has a SHA-1 name; its SHA-256 is the one recorded (here: at first check)."""
    blob = tmp_path / ("ab" * 20)
    blob.write_bytes(FAKE)
    assert check_blob(blob) is None
    _flip(blob)
    assert "does not match the SHA-256" in (check_blob(blob) or "")
    # A record that is not the blob's own (another SHA-256 than its name) is not trusted.
    lfs = tmp_path / hashlib.sha256(FAKE).hexdigest()
    lfs.write_bytes(FAKE + b"x")
    (tmp_path / (lfs.name + RECORD_SUFFIX)).write_text(json.dumps(
        {"sha256": "0" * 64, "size": len(FAKE) + 1, "state": hub_download._state(lfs.stat())}))
    assert "does not match the SHA-256" in (check_blob(lfs) or "")


def test_a_cache_lookup_refuses_a_split_model_with_a_changed_part(hub: Hub, tmp_path: Path) -> None:
    root = tmp_path / "split"
    root.mkdir()
    for i in (1, 2):
        (root / f"m-Q8_0-0000{i}-of-00002.gguf").write_bytes(FAKE + bytes([i]))
    hub.add_repo("org/split-GGUF", root)
    first = Path(pull(hub.url, tmp_path, "org/split-GGUF").stdout.strip())
    assert first.name == "m-Q8_0-00001-of-00002.gguf"
    _flip(blob_of(first.with_name("m-Q8_0-00002-of-00002.gguf")))
    assert "the cached m-Q8_0-00002-of-00002.gguf does not match" in error_line(serve_once(tmp_path, "org/split-GGUF"))


def test_a_revision_that_cannot_be_a_ref_is_refused_by_serve(tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match="not a branch, tag or commit name"):
        parse_model_ref("org/m-GGUF@../../x:Q8_0")
    assert "not a branch, tag or commit name" in error_line(serve_once(tmp_path, "org/m-GGUF@../../x:Q8_0"))
