"""``llama-inference fetch`` against a loopback Hub: the real huggingface_hub client, real HTTP."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.hub_fixture import Hub, serve_hub


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[Hub]:
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    (repo / "tokenizer.json").write_text('{"model": {}}')
    (repo / "chat_template.jinja").write_text("{{ messages }}")  # where transformers 5 saves the template
    (repo / "model.safetensors").write_bytes(os.urandom(300_000))
    (repo / "pytorch_model.bin").write_bytes(b"not wanted")
    (repo / "README.md").write_text("not wanted either")
    h = Hub()
    h.add_repo("org/open", repo)
    h.add_repo("org/gated", repo, token="hf_granted")
    with serve_hub(h):
        yield h


def fetch(hub: Hub, tmp_path: Path, *args: str, token: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf-home"),
           "HF_HUB_DISABLE_TELEMETRY": "1"}
    env.pop("HF_TOKEN", None)
    if token:
        env["HF_TOKEN"] = token
    return subprocess.run([sys.executable, "-m", "server", "fetch", *args], env=env, capture_output=True, text=True,
                          timeout=120, cwd=REPO)


def test_fetch_downloads_only_what_conversion_needs_at_the_pinned_revision(hub: Hub, tmp_path: Path) -> None:
    sha = hub.repos["org/open"].revisions["main"]
    out = tmp_path / "model"
    proc = fetch(hub, tmp_path, "org/open", "--revision", sha, "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == ["chat_template.jinja", "config.json",
                                                                    "model.safetensors", "tokenizer.json"]
    assert (out / "model.safetensors").read_bytes() == hub.repos["org/open"].files["model.safetensors"]
    assert any(path.endswith(f"/resolve/{sha}/model.safetensors") for _, path, _ in hub.requests)


def test_fetch_again_reuses_complete_files(hub: Hub, tmp_path: Path) -> None:
    out = tmp_path / "model"
    assert fetch(hub, tmp_path, "org/open", "--out", str(out)).returncode == 0
    hub.requests.clear()
    assert fetch(hub, tmp_path, "org/open", "--out", str(out)).returncode == 0
    assert not [p for m, p, _ in hub.requests if m == "GET" and p.endswith("model.safetensors")]


@pytest.mark.parametrize(
    ("args", "token", "message"),
    [
        (["org/gated"], None, "gated repository: set HF_TOKEN"),
        (["org/gated"], "hf_wrong", "has not been granted access"),
        (["org/open", "--revision", "v0.0.1"], None, "has no revision 'v0.0.1'"),
        (["org/nope"], None, "repository org/nope not found"),
    ],
)
def test_fetch_errors_are_one_clear_line(hub: Hub, tmp_path: Path, args: list[str], token: str | None,
                                         message: str) -> None:
    out = tmp_path / "model"
    proc = fetch(hub, tmp_path, *args, "--out", str(out), token=token)
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("llama-inference: error:")]
    assert len(errors) == 1 and message in errors[0], proc.stderr
    assert not (out / "model.safetensors").exists()


def test_fetch_sends_the_token_to_a_gated_repository(hub: Hub, tmp_path: Path) -> None:
    out = tmp_path / "model"
    proc = fetch(hub, tmp_path, "org/gated", "--out", str(out), token="hf_granted")
    assert proc.returncode == 0, proc.stderr
    assert (out / "config.json").exists()
    assert {auth for _, _, auth in hub.requests} == {"Bearer hf_granted"}


def test_a_hostile_etag_fails_in_one_line_and_writes_nothing_outside(hub: Hub, tmp_path: Path) -> None:
    """huggingface_hub names its partial file ``<hash>.<etag>.incomplete`` in the output's .cache: an ETag with
    ``../`` in it cannot lead out (the ``<hash>.x`` folder before it does not exist) but must not end in a
    traceback."""
    hub.repos["org/open"].etags["config.json"] = '"x/../../../../../../escaped"'
    out = tmp_path / "model"
    proc = fetch(hub, tmp_path, "org/open", "--out", str(out))
    lines = [line for line in proc.stderr.splitlines() if line.strip() and "%|" not in line]
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("llama-inference: error: org/open: the download failed: ")
    assert not list(tmp_path.rglob("escaped*")) and not (out / "config.json").exists()
