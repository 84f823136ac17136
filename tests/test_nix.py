"""nix/*.nix: they parse, evaluate against a stand-in for nixpkgs (tests/nix/stand-in.nix says what it does and
does not prove), and really build: the server package runs its install check (serve a GGUF, generate), the model
package fetches from a loopback Hub, is checked against its hash, converts and quantizes, and its output refers
to no other store path (`nix-store -q --references`)."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from llama_cpp import Llama

from tests.conftest import REPO
from tests.hub_fixture import Hub, serve_hub

NIX_FILES = sorted((REPO / "nix").glob("*.nix")) + sorted((REPO / "flox").glob("*/.flox/pkgs/*.nix")) + sorted(
    (REPO / "tests/nix").glob("*.nix"))
pytestmark = pytest.mark.skipif(shutil.which("nix-instantiate") is None,
                                reason="Nix is not installed (`make install` installs Debian's nix-bin as root)")
NIX_OPTS = ["--option", "sandbox", "false", "--option", "build-users-group", "", "--option", "substituters", ""]
VENV = json.dumps(str(REPO / ".venv"))


def nix_args(**values: str) -> list[str]:
    out = ["--arg", "venv", VENV]
    for key, value in values.items():
        out += ["--argstr", key, value]
    return out


def evaluate(path: Path, *args: str) -> dict[str, object]:
    proc = subprocess.run(["nix-instantiate", "--eval", "--strict", "--json", str(path), *args],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return dict(json.loads(proc.stdout))


@pytest.mark.parametrize("path", NIX_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_nix_files_parse(path: Path) -> None:
    proc = subprocess.run(["nix-instantiate", "--parse", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


# ---- the server package ----

def test_default_nix_pins_nixpkgs_and_exposes_both_packages() -> None:
    text = (REPO / "nix/default.nix").read_text()
    pin = re.search(r'url = "https://github\.com/NixOS/nixpkgs/archive/([0-9a-f]{40})\.tar\.gz";\s*'
                    r'sha256 = "([0-9a-z]{52})";', text)
    assert pin, "nixpkgs is not pinned by a full revision and a base-32 sha256"
    s = evaluate(REPO / "tests/nix/server-summary.nix", "--arg", "venv", VENV)
    assert s["attributes"] == ["llama-model", "llama-server"] and s["mainProgram"] == "llama-inference"


def test_llama_cpp_python_is_our_pin_built_portably() -> None:
    s = evaluate(REPO / "tests/nix/server-summary.nix", "--arg", "venv", VENV)
    pins = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    pinned = next(d.split("==")[1] for d in pins if d.startswith("llama-cpp-python=="))
    llama = s["llama"]
    assert isinstance(llama, dict) and llama["version"] == pinned and s["dependsOnOurLlama"]
    assert llama["src"] == {"pname": "llama_cpp_python", "version": pinned,
                            "hash": "sha256-gy2waZAH8b6Vp+Qe8S6IkmsCuoNkYeNqNjctsnYMGi4="}
    # The same patches the wheel build applies (scripts/build-llama-cpp-wheel.sh), every one of them.
    assert sorted(llama["patches"]) == sorted(p.name for p in (REPO / "scripts/patches").glob("*.patch"))
    assert llama["patches"]
    flags = llama["cmakeArgs"].split()
    assert "-DGGML_NATIVE=OFF" in flags and "-DGGML_BACKEND_DL=OFF" in flags
    assert not any("CPU_ALL_VARIANTS" in f or "march=native" in f for f in flags)
    relaxed = s["relaxed"]
    assert isinstance(relaxed, list) and not any(r.replace("_", "-") == "llama-cpp-python" for r in relaxed)
    assert s["doCheck"] is True


def test_every_runtime_dependency_of_pyproject_is_in_the_package() -> None:
    """nixpkgs' runtime-dependency check fails the build for a pyproject dependency the package does not list
    (as `tokenizers` once was); each is listed, or removed on purpose with a reason in the expression."""
    s = evaluate(REPO / "tests/nix/server-summary.nix", "--arg", "venv", VENV)
    pins = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    wanted = {re.split(r"[=<>! ]", d, maxsplit=1)[0].lower().replace("_", "-") for d in pins}
    listed = {str(n).lower().replace("_", "-") for n in s["dependencyNames"]}  # type: ignore[union-attr]
    removed = {str(n).lower().replace("_", "-") for n in s["removed"]}  # type: ignore[union-attr]
    assert wanted - listed - removed == set()


def test_server_package_builds_and_its_install_check_serves() -> None:
    proc = subprocess.run(["nix-build", str(REPO / "tests/nix/server.nix"), "--no-out-link", *NIX_OPTS,
                           "--arg", "venv", VENV],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = Path(proc.stdout.strip().splitlines()[-1])
    assert os.access(out / "bin/llama-inference", os.X_OK)


def test_install_check_fails_when_the_package_cannot_serve(tmp_path: Path) -> None:
    """The install check is what stops a broken package: a command whose llama.cpp loads nothing fails it."""
    broken = tmp_path / "llama-inference"
    broken.write_text("#!/bin/bash\necho 'llama_cpp: no backends are loaded' >&2\nexit 1\n")
    broken.chmod(0o755)
    proc = subprocess.run([str(REPO / ".venv/bin/python"), str(REPO / "nix/install-check.py"), str(broken)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "never became ready" in proc.stderr and "no backends are loaded" in proc.stderr


# ---- the model package ----

def test_model_derivation_is_a_fixed_output_fetch_then_a_build_that_calls_our_cli() -> None:
    s = evaluate(REPO / "tests/nix/summary.nix", *nix_args(
        repoId="org/tiny", revision="abc123", hfEndpoint="http://127.0.0.1:9",
        outputHash="sha256-AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="))
    assert s["weightsFixedOutput"] and "HF_TOKEN" in s["weightsImpureEnvVars"]  # type: ignore[operator]
    assert "llama-inference fetch 'org/tiny' --revision 'abc123'" in s["weightsFetches"]  # type: ignore[operator]
    assert "llama-inference convert" not in s["weightsFetches"]  # type: ignore[operator]
    assert not s["buildIsFixedOutput"]
    assert f"ln -s {s['weightsPath']} \"$TMPDIR/tiny\"" in s["buildPhase"]  # type: ignore[operator]
    assert 'llama-inference convert "$TMPDIR/tiny"' in s["buildPhase"]  # type: ignore[operator]
    assert "llama-inference quantize" in s["buildPhase"] and s["modelPath"] == "share/models/tiny.Q8_0.gguf"  # type: ignore[operator]


@dataclass
class TinyRepo:
    hub: Hub
    revision: str
    nar_hash: str


@pytest.fixture(scope="module")
def tiny_repo(tmp_path_factory: pytest.TempPathFactory, tiny_spm: Path) -> Iterator[TinyRepo]:
    repo = tmp_path_factory.mktemp("repo")
    for name in ("config.json", "model.safetensors", "tokenizer.model", "tokenizer_config.json"):
        shutil.copy(tiny_spm / name, repo / name)
    hub = Hub()
    revision = hub.add_repo("org/tiny", repo)
    # The expected hash of stage 1, computed from the repository's files alone (not through our fetch).
    nar_hex = subprocess.run(["nix-hash", "--type", "sha256", str(repo)], capture_output=True, text=True,
                             check=True).stdout.strip()
    with serve_hub(hub):
        yield TinyRepo(hub, revision, "sha256-" + base64.b64encode(bytes.fromhex(nar_hex)).decode())


def build_model(root: Path, tiny: TinyRepo) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_TOKEN": "unused-for-a-public-repo"}
    return subprocess.run(
        ["nix-build", str(root / "tests/nix/model.nix"), "--no-out-link", *NIX_OPTS,
         *nix_args(repoId="org/tiny", revision=tiny.revision, hfEndpoint=tiny.hub.url, outputHash=tiny.nar_hash)],
        capture_output=True, text=True, env=env, timeout=600)


def check_model_output(out: Path) -> None:
    """The package refers to nothing but itself: not the raw weights, not the converter."""
    refs = subprocess.run(["nix-store", "-q", "--references", str(out)], capture_output=True, text=True,
                          check=True).stdout.split()
    assert set(refs) <= {str(out)}, f"the model package refers to {refs}"
    for meta in (out / "share/models").glob("*.json"):
        assert "/nix/store/" not in meta.read_text(), meta


def test_model_derivation_builds_from_a_loopback_hub(tiny_repo: TinyRepo) -> None:
    proc = build_model(REPO, tiny_repo)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = Path(proc.stdout.strip().splitlines()[-1])
    check_model_output(out)
    gguf_path = out / "share/models/tiny.Q8_0.gguf"
    meta = json.loads((out / "share/models/tiny.Q8_0.json").read_text())
    assert meta["revision"] == tiny_repo.revision and meta["quantization"] == "Q8_0"
    assert meta["size_bytes"] == gguf_path.stat().st_size and len(meta["sha256"]) == 64
    assert meta["weights_nar_hash"] == tiny_repo.nar_hash
    llm = Llama(str(gguf_path), n_ctx=64, verbose=False)
    try:
        assert llm.metadata["general.architecture"] == "llama"
        assert len(llm.tokenize(b"The keeper of the light")) > 3
        assert llm.create_completion("The sea", max_tokens=4, temperature=0)["choices"][0]["text"] is not None  # type: ignore[index]
    finally:
        llm.close()


def copy_with(tmp_path: Path, old: str, new: str) -> Path:
    """nix/ and tests/nix/ copied, nix/llama-model.nix with one replacement."""
    root = tmp_path / "repo"
    shutil.copytree(REPO / "nix", root / "nix")
    shutil.copytree(REPO / "tests/nix", root / "tests/nix")
    model = root / "nix/llama-model.nix"
    text = model.read_text()
    assert old in text
    model.write_text(text.replace(old, new, 1))
    return root


WEIGHTS_IN_METADATA = ('"weights_nar_hash": "${outputHash}"}', '"weights": "${weights}"}')


def test_weights_in_the_output_fail_the_build(tmp_path: Path, tiny_repo: TinyRepo) -> None:
    """The store path of the weights written into the package: Nix refuses the build (disallowedReferences)."""
    proc = build_model(copy_with(tmp_path, *WEIGHTS_IN_METADATA), tiny_repo)
    assert proc.returncode != 0
    assert "is not allowed to refer to" in proc.stderr and "-hf-" in proc.stderr, proc.stderr[-3000:]


def test_weights_in_the_output_are_caught_by_the_references_check(tmp_path: Path, tiny_repo: TinyRepo) -> None:
    """Without disallowedReferences, the same mistake builds; `nix-store -q --references` on the result shows it."""
    root = copy_with(tmp_path, *WEIGHTS_IN_METADATA)
    model = root / "nix/llama-model.nix"
    model.write_text(model.read_text().replace("disallowedReferences = [ weights llama-inference ];", ""))
    proc = build_model(root, tiny_repo)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with pytest.raises(AssertionError, match="refers to"):
        check_model_output(Path(proc.stdout.strip().splitlines()[-1]))


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
