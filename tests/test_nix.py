"""nix/*.nix: they parse, evaluate against a stand-in for nixpkgs (tests/nix/stand-in.nix says what it does and
does not prove), and really build: the server package runs its install check (serve a GGUF, generate), the model
package fetches from a loopback Hub, is checked against its hash, converts and quantizes, and its output refers
to no other store path (`nix-store -q --references`); the router package (vllm-router) pins the wheels PyPI serves,
by URL and sha256, compared with what `pip download` fetches, and builds from them into a router that starts."""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from llama_cpp import Llama

from tests.conftest import REPO, free_port
from tests.hub_fixture import Hub, serve_hub
from tests.test_bench import StandInWorker, stand_in_workers

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
    assert s["attributes"] == ["llama-model", "llama-server", "vllm-router"] and s["mainProgram"] == "llama-inference"


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


# ---- the router package (vllm-router, the router pod's: flox/llama-router, k8s/overlays/vllm-router) ----

ROUTER_SUMMARY = REPO / "tests/nix/router-summary.nix"
PIP = [sys.executable, "-m", "pip", "--disable-pip-version-check"]


def router_summary() -> dict[str, object]:
    return evaluate(ROUTER_SUMMARY, "--arg", "venv", VENV)


def pinned_router() -> str:
    """vllm-router's version in pyproject.toml's test extra: the router tests/test_fleet.py runs."""
    extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["test"]
    return next(d.split("==")[1] for d in extra if d.startswith("vllm-router=="))


def platform_tag(wheel: str) -> str:
    """The platform tag of a wheel's file name (name-version-python-abi-platform.whl)."""
    return wheel.removesuffix(".whl").split("-")[-1]


@dataclass
class RouterWheel:
    path: Path  # as `pip download` fetched it
    url: str  # where PyPI's index says the file is
    pypi_sha256: str  # the digest PyPI's index lists for it


@pytest.fixture(scope="module")
def router_wheels(tmp_path_factory: pytest.TempPathFactory) -> dict[str, RouterWheel]:
    """Each system's wheel of the pinned vllm-router as pip finds it on PyPI: the file `pip download` fetches (for
    that wheel's platform), and the URL and digest of pip's resolution report."""
    directory = tmp_path_factory.mktemp("router-wheels")
    wheels = router_summary()["wheels"]
    assert isinstance(wheels, dict)
    out: dict[str, RouterWheel] = {}
    for system, wheel in sorted(wheels.items()):
        requirement = f"vllm-router=={pinned_router()}"
        platform = ["--only-binary=:all:", "--platform", platform_tag(Path(wheel["url"]).name)]
        report = subprocess.run([*PIP, "install", "--quiet", "--dry-run", "--no-deps", "--ignore-installed",
                                 "--target", str(directory / "unused"), "--report", "-", *platform, requirement],
                                capture_output=True, text=True, timeout=300)
        download = subprocess.run([*PIP, "download", "--quiet", "--no-deps", "-d", str(directory / system), *platform,
                                   requirement], capture_output=True, text=True, timeout=600)
        if report.returncode != 0 or download.returncode != 0:
            pytest.skip(f"pip could not fetch {requirement} for {system} from PyPI (needs network): "
                        f"{(report.stderr + download.stderr)[-500:]}")
        info = json.loads(report.stdout)["install"][0]["download_info"]
        (path,) = (directory / system).glob("*.whl")
        out[system] = RouterWheel(path, info["url"], info["archive_info"]["hashes"]["sha256"])
    return out


def test_router_package_is_the_pinned_router_with_its_command() -> None:
    s = router_summary()
    assert s["pname"] == "vllm-router" and s["version"] == pinned_router() == importlib.metadata.version("vllm-router")
    assert s["format"] == "wheel" and s["mainProgram"] == "vllm-router" and s["doCheck"] is True
    assert s["floxBuildIsTheSame"], "flox/llama-build/.flox/pkgs/vllm-router.nix builds another router"
    wheels = s["wheels"]
    assert isinstance(wheels, dict) and sorted(wheels) == sorted(s["platforms"])  # type: ignore[arg-type]
    # Every system the router's Flox environment is for has a wheel.
    systems = tomllib.loads((REPO / "flox/llama-router/.flox/env/manifest.toml").read_text())["options"]["systems"]
    assert set(systems) <= set(wheels), (systems, sorted(wheels))
    for system, wheel in wheels.items():
        name = Path(wheel["url"]).name
        assert wheel["url"].startswith("https://files.pythonhosted.org/packages/"), wheel["url"]
        assert name.startswith(f"vllm_router-{pinned_router()}-") and name.endswith(".whl"), name
        assert system.split("-")[0] in platform_tag(name), (system, name)
        assert re.fullmatch(r"[0-9a-f]{64}", wheel["sha256"]), wheel["sha256"]


def test_router_package_pins_the_wheels_pip_downloads(router_wheels: dict[str, RouterWheel]) -> None:
    """The .nix's URL and sha256 for each system are PyPI's for the pinned version: the sha256 of the very file
    `pip download` fetched, the digest PyPI lists, and the URL pip resolves to."""
    wheels = router_summary()["wheels"]
    assert isinstance(wheels, dict)
    for system, wheel in router_wheels.items():
        pinned = wheels[system]
        assert wheel.path.name == Path(pinned["url"]).name
        assert hashlib.sha256(wheel.path.read_bytes()).hexdigest() == pinned["sha256"] == wheel.pypi_sha256
        assert wheel.url == pinned["url"]


def test_router_package_depends_on_what_the_wheel_requires(router_wheels: dict[str, RouterWheel]) -> None:
    """nixpkgs' runtime-dependency check fails a wheel whose Requires-Dist the package does not list: each is."""
    with zipfile.ZipFile(router_wheels["x86_64-linux"].path) as wheel:
        metadata = wheel.read(f"vllm_router-{pinned_router()}.dist-info/METADATA").decode()
    required = {re.split(r"[=<>!; \[]", line.split(":", 1)[1].strip(), maxsplit=1)[0].lower()
                for line in metadata.splitlines() if line.startswith("Requires-Dist:") and "extra ==" not in line}
    listed = router_summary()["dependencyNames"]
    assert isinstance(listed, list) and required == {str(n).lower() for n in listed}, (required, listed)


def build_router(root: Path, wheel_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["nix-build", str(root / "tests/nix/vllm-router.nix"), "--no-out-link", *NIX_OPTS,
                           "--arg", "venv", VENV, "--argstr", "wheelDir", str(wheel_dir)],
                          capture_output=True, text=True, timeout=600)


def test_router_package_builds_from_the_pinned_wheel_and_starts(router_wheels: dict[str, RouterWheel]) -> None:
    """The wheel fetched at the pinned sha256 (Nix checks it), installed, its command's install check passed; the
    installed router is the one the fleet tests run (the same Rust extension, byte for byte), and it starts and
    relays a streamed chat completion from one of two workers named on its command line (stand-ins)."""
    system = next(s for s in router_wheels if s.startswith(os.uname().machine))
    proc = build_router(REPO, router_wheels[system].path.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = Path(proc.stdout.strip().splitlines()[-1])
    command = out / "bin/vllm-router"
    assert os.access(command, os.X_OK)
    (extension,) = out.glob("lib/python*/site-packages/vllm_router_rs.abi3.so")
    record = importlib.metadata.distribution("vllm-router").read_text("RECORD") or ""
    listed = next(line.split(",")[1] for line in record.splitlines() if line.startswith("vllm_router_rs.abi3.so,"))
    digest = base64.urlsafe_b64encode(hashlib.sha256(extension.read_bytes()).digest()).rstrip(b"=").decode()
    assert listed == f"sha256={digest}", "the package's router is not the one the venv's vllm-router installed"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with stand_in_workers(2) as workers:
        router = subprocess.Popen([str(command), "--host", "127.0.0.1", "--port", str(port), "--policy",
                                   "sticky_least_loaded", "--worker-urls", *workers],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "HOME": "/tmp"})
        try:
            deadline, ready = time.monotonic() + 30, False
            while time.monotonic() < deadline and router.poll() is None and not ready:
                try:
                    ready = httpx.get(url + "/readiness", timeout=1).status_code == 200
                except httpx.TransportError:
                    time.sleep(0.2)
            assert ready, router.stderr.read().decode()[-2000:] if router.poll() is not None else "not ready"  # type: ignore[union-attr]
            assert httpx.get(url + "/liveness", timeout=5).status_code == 200
            with httpx.stream("POST", url + "/v1/chat/completions", json={
                    "model": "m", "stream": True, "messages": [{"role": "user", "content": "Hi"}]}, timeout=30) as resp:
                events = [line for line in resp.iter_lines() if line.startswith("data:")]
            assert resp.status_code == 200 and len(events) == StandInWorker.CHUNKS + 1 and events[-1] == "data: [DONE]"
        finally:
            router.terminate()
            router.wait(10)
            if router.stderr:
                router.stderr.close()


def test_a_wrong_wheel_hash_fails_the_build(tmp_path: Path, router_wheels: dict[str, RouterWheel]) -> None:
    """A wheel that is not the pinned one (here: the pin changed, the file not): Nix refuses it."""
    system = next(s for s in router_wheels if s.startswith(os.uname().machine))
    root = tmp_path / "repo"
    for part in ("nix", "tests/nix", "flox/llama-build/.flox/pkgs"):
        shutil.copytree(REPO / part, root / part)
    expression = root / "nix/vllm-router.nix"
    pinned = router_summary()["wheels"][system]["sha256"]  # type: ignore[index]
    expression.write_text(expression.read_text().replace(pinned, "0" * 64, 1))
    proc = build_router(root, router_wheels[system].path.parent)
    assert proc.returncode != 0
    assert "hash mismatch" in proc.stderr, proc.stderr[-3000:]
