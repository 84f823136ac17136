"""``REPO@REVISION[:QUANT]`` pulls and serves that revision. Against the loopback Hub (tests/hub_fixture.py) with
the real huggingface_hub client, and real files in a real cache."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from convert.errors import PipelineError
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
    # Restarted without the Hub, by MODEL_PATH: the cache's v1 file.
    server = start_server(tmp_path, env={**hub_env(OFFLINE, home), "MODEL_PATH": "org/pinned-GGUF@v1:Q4_1"})
    try:
        assert httpx.get(server.url + "/ready").json()["model"] == model_path.name.removesuffix(".gguf")
    finally:
        stop_server(server)


def test_a_revision_that_cannot_be_a_ref_is_refused_by_serve(tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match="not a branch, tag or commit name"):
        parse_model_ref("org/m-GGUF@../../x:Q8_0")
    assert "not a branch, tag or commit name" in error_line(serve_once(tmp_path, "org/m-GGUF@../../x:Q8_0"))
