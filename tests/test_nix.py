"""nix/*.nix: they parse, evaluate against a stand-in for nixpkgs, and the model derivation really builds:
stage 1 fetches from a loopback Hub and is checked against its hash, stage 2 converts and quantizes."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from llama_cpp import Llama

from tests.conftest import REPO
from tests.hub_fixture import Hub, serve_hub

NIX_FILES = sorted((REPO / "nix").glob("*.nix")) + sorted((REPO / "flox").glob("*/.flox/pkgs/*.nix"))
pytestmark = pytest.mark.skipif(shutil.which("nix-instantiate") is None,
                                reason="Nix is not installed (make install-system-deps installs Debian's nix-bin)")
NIX_OPTS = ["--option", "sandbox", "false", "--option", "build-users-group", "", "--option", "substituters", ""]


def nix_args(**values: str) -> list[str]:
    out = ["--arg", "venv", json.dumps(str(REPO / ".venv"))]
    for key, value in values.items():
        out += ["--argstr", key, value]
    return out


@pytest.mark.parametrize("path", NIX_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_nix_files_parse(path: Path) -> None:
    proc = subprocess.run(["nix-instantiate", "--parse", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_model_derivation_is_a_fixed_output_fetch_then_a_build_that_calls_our_cli() -> None:
    proc = subprocess.run(
        ["nix-instantiate", "--eval", "--strict", "--json", str(REPO / "tests/nix/summary.nix"),
         *nix_args(repoId="org/tiny", revision="abc123", hfEndpoint="http://127.0.0.1:9",
                   outputHash="sha256-AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=")],
        capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    s = json.loads(proc.stdout)
    assert s["weightsFixedOutput"] and "HF_TOKEN" in s["weightsImpureEnvVars"]
    assert "llama-inference fetch 'org/tiny' --revision 'abc123'" in s["weightsFetches"]
    assert "llama-inference convert" not in s["weightsFetches"]  # never convert in the fixed-output stage
    assert not s["buildIsFixedOutput"]
    assert f"llama-inference convert {s['weightsPath']}" in s["buildPhase"]
    assert "llama-inference quantize" in s["buildPhase"] and s["modelPath"] == "share/models/tiny.Q8_0.gguf"


def test_model_derivation_builds_from_a_loopback_hub(tmp_path: Path, tiny_spm: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.model", "tokenizer_config.json"):
        shutil.copy(tiny_spm / name, repo / name)
    hub = Hub()
    revision = hub.add_repo("org/tiny", repo)
    # The expected hash of stage 1, computed from the repository's files alone (not through our fetch).
    nar_hex = subprocess.run(["nix-hash", "--type", "sha256", str(repo)], capture_output=True, text=True,
                             check=True).stdout.strip()
    expected = "sha256-" + base64.b64encode(bytes.fromhex(nar_hex)).decode()
    env = {**os.environ, "HF_TOKEN": "unused-for-a-public-repo"}
    with serve_hub(hub):
        proc = subprocess.run(
            ["nix-build", str(REPO / "tests/nix/model.nix"), "--no-out-link", *NIX_OPTS,
             *nix_args(repoId="org/tiny", revision=revision, hfEndpoint=hub.url, outputHash=expected)],
            capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = Path(proc.stdout.strip().splitlines()[-1])
    gguf_path = out / "share/models/tiny.Q8_0.gguf"
    meta = json.loads((out / "share/models/tiny.Q8_0.json").read_text())
    assert meta["revision"] == revision and meta["quantization"] == "Q8_0"
    assert meta["size_bytes"] == gguf_path.stat().st_size and len(meta["sha256"]) == 64
    llm = Llama(str(gguf_path), n_ctx=64, verbose=False)
    try:
        assert llm.metadata["general.architecture"] == "llama"
        assert len(llm.tokenize(b"The keeper of the light")) > 3
        assert llm.create_completion("The sea", max_tokens=4, temperature=0)["choices"][0]["text"] is not None  # type: ignore[index]
    finally:
        llm.close()


def test_a_wrong_hash_fails_stage_one(tmp_path: Path, tiny_spm: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(tiny_spm / "config.json", repo / "config.json")
    hub = Hub()
    revision = hub.add_repo("org/hashcheck", repo)
    with serve_hub(hub):
        proc = subprocess.run(
            ["nix-build", str(REPO / "tests/nix/model.nix"), "-A", "weights", "--no-out-link", *NIX_OPTS,
             *nix_args(repoId="org/hashcheck", revision=revision, hfEndpoint=hub.url,
                       outputHash="sha256-AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=")],
            capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "hash mismatch" in proc.stderr and "got:" in proc.stderr
