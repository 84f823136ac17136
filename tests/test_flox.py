"""Flox environments: complete (env.json as Flox writes it), manifests valid against Flox's schema, the runtime
installing what the build publishes, and the runtime's hook and service really starting the server; the router's
environment installing the router package alone.

As in tests/test_k8s.py, each check is a function; the mutation tests break a copy of flox/ and show it failing."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from unittest import mock

import httpx
import jsonschema
import pytest

from benchmarks.planner import EMBEDDING_SHAPES
from server.model_files import embedded_model_path
from server.settings import Settings
from tests.conftest import free_port
from tests.deployment import (
    BUILD_ENV,
    FLOX,
    REPO,
    RUNTIME_ENV,
    built_packages,
    env_pointer,
    is_loopback,
    manifest,
    runnable,
    walkthrough,
)

# The official schema is not copied into the project: it lies in shared/ beside the checkout (as in CI), or where
# FLOX_MANIFEST_SCHEMA says.
SCHEMA = Path(os.environ.get("FLOX_MANIFEST_SCHEMA", REPO.parent / "shared" / "flox" / "manifest-v1.schema.json"))
# The runtime with an embedding model: owner/llama-runtime included, the embedding package and its settings added.
EMBEDDINGS_ENV = FLOX / "llama-runtime-embeddings"
RUNTIMES = [RUNTIME_ENV, EMBEDDINGS_ENV]
# The router pod's (k8s/overlays/vllm-router): vllm-router alone.
ROUTER_ENV = FLOX / "llama-router"
ENVS = [BUILD_ENV, *RUNTIMES, ROUTER_ENV]
needs_schema = pytest.mark.skipif(
    not SCHEMA.is_file(),
    reason=f"Flox's manifest schema is not at {SCHEMA} (it lives in ../shared/flox/ in CI; set FLOX_MANIFEST_SCHEMA "
    "to a copy of flox/flox's cli/schemas/manifest-v1.schema.json)")


def merged_manifest(env_dir: Path) -> dict[str, Any]:
    """The manifest Flox locks and activates for ``env_dir``: with its [include] environments merged in, as Flox's
    composition does (flox.dev, "Composing environments"): each included manifest, then the composing one, wins
    over what came before it in [install], [vars] and [services], key by key; hook and profile scripts are
    appended in that order; [options] is the composing environment's. ``remote = "owner/NAME"`` is the
    environment that `flox push` publishes from flox/NAME, beside this one."""
    own = manifest(env_dir)
    merged: dict[str, Any] = {"version": own.get("version", 1)}
    for included in own.get("include", {}).get("environments", []):
        assert "remote" in included, f"{env_dir.name} includes a local environment, which FloxHub refuses: {included}"
        layers = merged_manifest(env_dir.parent / included["remote"].split("/", 1)[1])
        _merge(merged, layers)
    _merge(merged, {k: v for k, v in own.items() if k != "include"})
    return merged


def _merge(into: dict[str, Any], layer: dict[str, Any]) -> None:
    for table in ("install", "vars", "services"):
        if table in layer:
            into.setdefault(table, {}).update(layer[table])
    for table in ("hook", "profile"):
        for name, script in layer.get(table, {}).items():
            before = into.setdefault(table, {}).get(name)
            into[table][name] = script if before is None else before.rstrip("\n") + "\n" + script
    if "options" in layer:
        into["options"] = layer["options"]


# ---- the checks ----

def check_environment(env_dir: Path) -> None:
    """`.flox/env.json` as Flox writes it for a path environment (flox's PathPointer: a name and version 1),
    named after its folder, beside `.flox/env/manifest.toml`."""
    assert (env_dir / ".flox" / "env.json").is_file(), f"{env_dir}: no .flox/env.json, so not a Flox environment"
    pointer = env_pointer(env_dir)
    assert pointer == {"name": env_dir.name, "version": 1}, pointer
    assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", pointer["name"])
    assert (env_dir / ".flox" / "env" / "manifest.toml").is_file()


def check_runtime_installs_what_the_build_publishes(runtime: Path, build: Path) -> None:
    """Every package of the runtime environment is owner/<a package `flox build` defines>, one owner for all."""
    published = built_packages(build)
    paths = [spec["pkg-path"] for spec in merged_manifest(runtime)["install"].values()]
    assert len({p.split("/")[0] for p in paths}) == 1, paths
    missing = [p for p in paths if p.split("/", 1)[1] not in published]
    assert not missing, f"installed but never built: {missing} (builds: {sorted(published)})"
    assert manifest(build)["install"], "flox publish needs at least one package in the build environment"


def check_model_file(runtime: Path, build: Path) -> None:
    """MODEL_FILE is the file the model package installs: <name>.<quant>.gguf of .flox/pkgs/llama-model.nix."""
    expression = (build / ".flox" / "pkgs" / "llama-model.nix").read_text()
    name = re.search(r'^\s*name = "([^"]+)";', expression, re.M)
    quant = re.search(r'^\s*quant = "([^"]+)";', expression, re.M)
    assert name and quant, "llama-model.nix does not set name and quant"
    assert merged_manifest(runtime)["vars"]["MODEL_FILE"] == f"{name[1]}.{quant[1]}.gguf"


def check_embedding_model_file(runtime: Path, build: Path) -> None:
    """EMBEDDING_MODEL_FILE is the file the embedding package installs (<name>.<quant>.gguf of
    .flox/pkgs/llama-embedding-model.nix), the environment installs that package, and the planner knows the
    model by that name (k8s/overlays/embeddings' memory is planned from it)."""
    expression = (build / ".flox" / "pkgs" / "llama-embedding-model.nix").read_text()
    name = re.search(r'^\s*name = "([^"]+)";', expression, re.M)
    quant = re.search(r'^\s*quant = "([^"]+)";', expression, re.M)
    assert name and quant, "llama-embedding-model.nix does not set name and quant"
    m = merged_manifest(runtime)
    assert m["vars"]["EMBEDDING_MODEL_FILE"] == f"{name[1]}.{quant[1]}.gguf", m["vars"].get("EMBEDDING_MODEL_FILE")
    assert "owner/llama-embedding-model" in {spec["pkg-path"] for spec in m["install"].values()}
    assert EMBEDDING_SHAPES[name[1]].quant == quant[1]


def check_router_environment(router: Path, build: Path) -> None:
    """The router's environment installs one package, the router `flox build vllm-router` makes, and nothing of the
    server's: no model, no settings, hook or service (the router's settings are its Deployment's arguments)."""
    check_runtime_installs_what_the_build_publishes(router, build)
    m = manifest(router)
    assert [spec["pkg-path"].split("/", 1)[1] for spec in m["install"].values()] == ["vllm-router"], m["install"]
    assert "vllm-router" in built_packages(build)
    assert set(m) <= {"version", "install", "options"}, sorted(m)


# What a caller's environment could set that decides who may connect; the activations here start without them.
ACCESS = ("HOST", "API_KEY", "API_KEY_FILE", "ALLOW_UNAUTHENTICATED")
# The caller's embedding settings, left out too unless a test passes them.
EMBEDDING_VARS = ("EMBEDDING_MODEL_PATH", "EMBEDDING_MODEL_FILE", "EMBEDDING_POOLING", "EMBEDDING_BATCH_SIZE")


def activation(runtime: Path, flox_env: Path, cache: Path, **extra: str) -> tuple[str, dict[str, str]]:
    """What `flox activate --start-services` runs, as a script and its environment: the caller's variables
    (``extra``), [vars] exported over them, the on-activate hook, then the service's command. The manifest's
    address (loopback), 2 threads, a free port."""
    m = merged_manifest(runtime)
    env = {k: v for k, v in os.environ.items() if k not in ("MODEL_PATH", *EMBEDDING_VARS, *ACCESS)}
    env.update(extra)
    env.update(m["vars"])
    env.update({"PATH": f"{REPO / '.venv/bin'}:{os.environ['PATH']}", "FLOX_ENV": str(flox_env),
                "FLOX_ENV_CACHE": str(cache), "N_THREADS": "2", "PORT": str(free_port())})
    script = m.get("hook", {}).get("on-activate", "") + "\n" + m["services"]["llama-server"]["command"]
    return script, env


def flox_env_with_model(tmp_path: Path, runtime: Path) -> Path:
    """$FLOX_ENV as the model packages lay it out: share/models/$MODEL_FILE, and $EMBEDDING_MODEL_FILE where the
    environment has an embedding package (the embedded model stands in for both)."""
    models = tmp_path / "flox-env" / "share" / "models"
    models.mkdir(parents=True)
    env_vars = merged_manifest(runtime)["vars"]
    for var in ("MODEL_FILE", "EMBEDDING_MODEL_FILE"):
        if var in env_vars:
            (models / env_vars[var]).symlink_to(embedded_model_path())
    return tmp_path / "flox-env"


@contextmanager
def service(runtime: Path, tmp_path: Path, **extra: str) -> Iterator[tuple[str, dict[str, str]]]:
    """The runtime's service running on the model package's file, as (its URL, its environment), until SIGTERM,
    which must drain it to exit 0. Loopback only: a manifest that would listen beyond it is not started here.
    Where the embedded model stands in for an embedding package, the caller pools it by mean, as all-MiniLM-L6-v2's
    GGUF says for itself (the stand-in's names no pooling)."""
    if "EMBEDDING_MODEL_FILE" in merged_manifest(runtime)["vars"]:
        extra = {"EMBEDDING_POOLING": "mean", **extra}
    script, env = activation(runtime, flox_env_with_model(tmp_path, runtime), tmp_path / "cache", **extra)
    host = env.get("HOST", Settings.model_fields["host"].default)
    assert is_loopback(host), f"the service would listen on {host}"
    errors = tmp_path / "service.stderr"
    with errors.open("wb") as err:
        proc = subprocess.Popen(["bash", "-c", script], env=env, cwd=tmp_path, stderr=err)
    url = f"http://127.0.0.1:{env['PORT']}"
    try:
        deadline, ready = time.monotonic() + 60, None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                ready = httpx.get(url + "/ready", timeout=1)
                if ready.status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        log = tmp_path / "cache/logs/llama-server.log"
        assert ready is not None and ready.status_code == 200, errors.read_text() + (
            log.read_text()[-2000:] if log.exists() else "")
        yield url, env
    finally:
        proc.terminate()
        code = proc.wait(30)
    assert code == 0  # SIGTERM drains and exits 0


def check_service_serves(runtime: Path, tmp_path: Path) -> None:
    """The hook finds the model package's file and the service serves it, with the manifest's settings: on
    loopback, with no key, to `curl localhost:8000` (the Host that `kubectl port-forward` passes on too)."""
    with service(runtime, tmp_path) as (url, env):
        assert httpx.get(url + "/ready").json()["slots"] == int(env["PARALLEL"])
        answer = httpx.post(url + "/generate", json={"prompt": "The capital of France is", "max_length": 4},
                            headers={"Host": f"localhost:{env['PORT']}"}, timeout=60)
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] >= 1, answer.text
    log = (tmp_path / "cache/logs/llama-server.log").read_text()
    # LOG_JSON from the manifest's [vars]; the address from its HOST.
    assert f'"message": "Uvicorn running on http://127.0.0.1:{env["PORT"]}' in log, log[-2000:]


def check_service_takes_the_callers_key(runtime: Path, tmp_path: Path) -> None:
    """The caller's API_KEY_FILE reaches the server through the activation (flox/README.md, serving other
    machines): generation needs a key of that file."""
    key = os.urandom(32).hex()
    (tmp_path / "keys").write_text(key + "\n")
    with service(runtime, tmp_path, API_KEY_FILE=str(tmp_path / "keys")) as (url, _):
        body = {"prompt": "The capital of France is", "max_length": 2}
        assert httpx.post(url + "/generate", json=body, timeout=60).status_code == 401
        answer = httpx.post(url + "/generate", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=60)
        assert answer.status_code == 200, answer.text


def check_service_serves_embeddings(runtime: Path, tmp_path: Path, **extra: str) -> None:
    """The embedding model reaches the server through the activation: the manifest's EMBEDDING_MODEL_FILE (through
    the hook) or the caller's EMBEDDING_MODEL_PATH, with the rest of its embedding settings, and /v1/embeddings
    answers from that file. The embedded model stands in for all-MiniLM-L6-v2, pooled by mean as the caller says
    (its GGUF names no pooling); the log names the embedding model's path and the batch from the settings."""
    with service(runtime, tmp_path, **{"EMBEDDING_POOLING": "mean", **extra}) as (url, env):
        expected = extra.get("EMBEDDING_MODEL_PATH") or f"{env['FLOX_ENV']}/share/models/{env['EMBEDDING_MODEL_FILE']}"
        answer = httpx.post(url + "/v1/embeddings", json={"input": ["the keeper of the light", "a lamp"]},
                            headers={"Host": f"localhost:{env['PORT']}"}, timeout=60)
        assert answer.status_code == 200, answer.text
        vectors = [item["embedding"] for item in answer.json()["data"]]
        assert len(vectors) == 2 and len(vectors[0]) > 0
    log = (tmp_path / "cache/logs/llama-server.log").read_text()
    batch = env.get("EMBEDDING_BATCH_SIZE", str(Settings.model_fields["embedding_batch_size"].default))
    assert f"embedding model: {expected} (mean pooling" in log and f"{batch} tokens a decode" in log, log[-3000:]


def check_service_refuses_a_missing_embedding_model(runtime: Path, tmp_path: Path) -> None:
    """An embedding file that is not there: the service stops at once with one line naming EMBEDDING_MODEL_PATH."""
    script, env = activation(runtime, flox_env_with_model(tmp_path, runtime), tmp_path / "cache",
                             EMBEDDING_MODEL_PATH=str(tmp_path / "absent-embedder.gguf"))
    proc = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "EMBEDDING_MODEL_PATH does not name a file" in proc.stderr and "absent-embedder.gguf" in proc.stderr, \
        proc.stderr
    assert not (tmp_path / "cache" / "logs" / "llama-server.log").exists()


def check_runtime_closed(runtime: Path, tmp_path: Path) -> None:
    """Activated by a caller who set nothing, the environment listens on loopback unless it also configures a key,
    and nothing in it opts out of authentication (ALLOW_UNAUTHENTICATED); the service's command adds no address
    of its own. The pod in k8s/ passes its address and key as flags (tests/test_k8s.py checks them)."""
    m = merged_manifest(runtime)
    seen = tmp_path / "access"
    env = {"PATH": os.environ["PATH"], "FLOX_ENV": str(tmp_path / "flox-env"), "SEEN": str(seen), **m["vars"]}
    report = " ".join(f'"{name}=${{{name}:-}}"' for name in ACCESS)
    script = m.get("hook", {}).get("on-activate", "") + f'\nprintf "%s\\n" {report} > "$SEEN"'
    subprocess.run(["bash", "-euc", script], env=env, capture_output=True, check=True, timeout=30)
    access = dict(line.split("=", 1) for line in seen.read_text().splitlines())
    host = access["HOST"] or Settings.model_fields["host"].default
    assert is_loopback(host) or access["API_KEY"] or access["API_KEY_FILE"], f"listens on {host} without a key"
    assert not access["ALLOW_UNAUTHENTICATED"], "the runtime environment opts out of authentication"
    command = m["services"]["llama-server"]["command"]
    assert not re.search(r"--host\b|allow[-_]unauthenticated", command, re.I), command


def check_service_refuses_a_missing_model(runtime: Path, tmp_path: Path) -> None:
    """No model file: the service stops at once with one line naming MODEL_PATH, before starting the server."""
    script, env = activation(runtime, tmp_path / "empty-env", tmp_path / "cache",
                             MODEL_PATH=str(tmp_path / "absent.gguf"))
    proc = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "MODEL_PATH does not name a file" in proc.stderr and "absent.gguf" in proc.stderr, proc.stderr
    assert not (tmp_path / "cache" / "logs" / "llama-server.log").exists()


# ---- the real files pass ----

@pytest.mark.parametrize("env_dir", ENVS, ids=lambda p: p.name)
def test_environment_is_complete(env_dir: Path) -> None:
    check_environment(env_dir)


@needs_schema
@pytest.mark.parametrize("env_dir", ENVS, ids=lambda p: p.name)
def test_manifest_validates_against_the_flox_schema(env_dir: Path) -> None:
    jsonschema.validate(manifest(env_dir), json.loads(SCHEMA.read_text()))


@needs_schema
def test_a_broken_manifest_is_caught_by_the_schema() -> None:
    broken = manifest(RUNTIME_ENV)
    broken["services"]["llama-server"]["comand"] = "typo"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, json.loads(SCHEMA.read_text()))


@pytest.mark.parametrize("runtime", RUNTIMES, ids=lambda p: p.name)
def test_runtime_installs_what_the_build_publishes(runtime: Path) -> None:
    check_runtime_installs_what_the_build_publishes(runtime, BUILD_ENV)
    check_model_file(runtime, BUILD_ENV)
    assert built_packages() == {"llama-server", "llama-model", "llama-embedding-model", "vllm-router"}


def test_router_environment_installs_the_router_alone() -> None:
    check_router_environment(ROUTER_ENV, BUILD_ENV)


def test_the_embedding_runtime_is_the_runtime_with_an_embedding_model() -> None:
    """llama-runtime-embeddings includes owner/llama-runtime from FloxHub and adds only the embedding package and
    the embedding settings: the server, the chat model, the hook, the service and every other setting stay in
    llama-runtime's manifest, and none of its settings is overridden."""
    check_embedding_model_file(EMBEDDINGS_ENV, BUILD_ENV)
    own, base = manifest(EMBEDDINGS_ENV), manifest(RUNTIME_ENV)
    assert own["include"]["environments"] == [{"remote": f"owner/{env_pointer(RUNTIME_ENV)['name']}"}]
    assert set(own) <= {"version", "include", "install", "vars", "options"}, sorted(own)
    assert all(name.startswith("EMBEDDING_") for name in own["vars"]) and not set(own["vars"]) & set(base["vars"])
    assert not set(own["install"]) & set(base["install"])
    merged = merged_manifest(EMBEDDINGS_ENV)
    assert merged["services"] == base["services"] and merged["hook"] == base["hook"]
    # As the server reads them: the merged [vars] give valid settings, with embeddings on once the hook has run.
    with mock.patch.dict(os.environ, {**{k: v for k, v in merged["vars"].items() if k.upper() in
                                         {n.upper() for n in Settings.model_fields}},
                                      "EMBEDDING_MODEL_PATH": "/flox-env/share/models/x.gguf"}):
        settings = Settings()
    assert settings.embeddings_on and settings.embedding_batch_size == int(merged["vars"]["EMBEDDING_BATCH_SIZE"])


def test_runtime_service_starts_the_server_on_the_model_package(tmp_path: Path) -> None:
    check_service_serves(RUNTIME_ENV, tmp_path)


def test_embedding_runtime_serves_embeddings_from_its_package(tmp_path: Path) -> None:
    check_service_serves_embeddings(EMBEDDINGS_ENV, tmp_path)


def test_runtime_passes_the_callers_embedding_model_to_the_server(tmp_path: Path) -> None:
    check_service_serves_embeddings(RUNTIME_ENV, tmp_path, EMBEDDING_MODEL_PATH=str(embedded_model_path()),
                                    EMBEDDING_BATCH_SIZE="256")


@pytest.mark.parametrize("runtime", RUNTIMES, ids=lambda p: p.name)
def test_runtime_listens_on_loopback_unless_given_a_key(tmp_path: Path, runtime: Path) -> None:
    check_runtime_closed(runtime, tmp_path)
    check_service_takes_the_callers_key(runtime, tmp_path)


def test_runtime_service_refuses_a_missing_model(tmp_path: Path) -> None:
    check_service_refuses_a_missing_model(RUNTIME_ENV, tmp_path)


@pytest.mark.parametrize("runtime", RUNTIMES, ids=lambda p: p.name)
def test_runtime_service_refuses_a_missing_embedding_model(tmp_path: Path, runtime: Path) -> None:
    check_service_refuses_a_missing_embedding_model(runtime, tmp_path)


def test_readme_publishes_one_package_per_call_and_marks_what_needs_flox() -> None:
    commands = walkthrough(FLOX / "README.md")
    publishes = [c.split("#")[0].split() for c in commands if c.startswith("flox publish")]
    published = [args[-1] for args in publishes]
    assert all(len([a for a in args[2:] if not a.startswith("-")]) == 2 for args in publishes)  # -o owner + 1
    assert sorted(published) == sorted(built_packages())
    for command in runnable(commands):  # the rest run here, as written
        proc = subprocess.run(["bash", "-euo", "pipefail", "-c", command], cwd=REPO, capture_output=True, text=True)
        assert proc.returncode == 0, (command, proc.stderr)
    readme = (FLOX / "README.md").read_text()
    assert "## Lock policy" in readme and "manifest.lock" in readme


# ---- mutations ----

def mutated(tmp_path: Path, path: str, old: str | None, new: str = "") -> Path:
    """A copy of flox/ with one replacement in one file (old=None: the file deleted)."""
    root = tmp_path / "flox"
    shutil.copytree(FLOX, root)
    target = root / path
    if old is None:
        target.unlink()
    else:
        text = target.read_text()
        assert old in text, f"{old!r} not in {path}"
        target.write_text(text.replace(old, new, 1))
    return root


RUNTIME_MANIFEST = "llama-runtime/.flox/env/manifest.toml"
ROUTER_MANIFEST = "llama-router/.flox/env/manifest.toml"
EMBEDDINGS_MANIFEST = "llama-runtime-embeddings/.flox/env/manifest.toml"
MUTATIONS: dict[str, tuple[str, str | None, str, Callable[[Path, Path], None]]] = {
    "missing env.json": ("llama-runtime/.flox/env.json", None, "",
                         lambda r, t: check_environment(r / "llama-runtime")),
    "env.json of another environment": ("llama-build/.flox/env.json", '"llama-build"', '"llama-runtime"',
                                        lambda r, t: check_environment(r / "llama-build")),
    "a package name the build does not define": (
        RUNTIME_MANIFEST, '"owner/llama-model"', '"owner/llama-2-7b-model"',
        lambda r, t: check_runtime_installs_what_the_build_publishes(r / "llama-runtime", r / "llama-build")),
    "model file the package does not install": (
        RUNTIME_MANIFEST, 'MODEL_FILE = "llama-2-7b.Q4_K_M.gguf"', 'MODEL_FILE = "llama-2-7b.Q5_K_M.gguf"',
        lambda r, t: check_model_file(r / "llama-runtime", r / "llama-build")),
    "service hook removed": (
        RUNTIME_MANIFEST, 'export MODEL_PATH="${MODEL_PATH:-$FLOX_ENV/share/models/$MODEL_FILE}"', "true",
        lambda r, t: check_service_serves(r / "llama-runtime", t)),
    "listening on every address without a key": (
        RUNTIME_MANIFEST, 'HOST = "127.0.0.1"', 'HOST = "0.0.0.0"',
        lambda r, t: check_runtime_closed(r / "llama-runtime", t)),
    "the hook opens the address": (
        RUNTIME_MANIFEST, "  export MODEL_PATH=", "  export HOST=0.0.0.0\n  export MODEL_PATH=",
        lambda r, t: check_runtime_closed(r / "llama-runtime", t)),
    "the service opens the address": (
        RUNTIME_MANIFEST, "exec llama-inference serve >>", "exec llama-inference serve --host 0.0.0.0 >>",
        lambda r, t: check_runtime_closed(r / "llama-runtime", t)),
    "opted out of authentication": (
        RUNTIME_MANIFEST, 'LOG_JSON = "true"', 'LOG_JSON = "true"\nALLOW_UNAUTHENTICATED = "true"',
        lambda r, t: check_runtime_closed(r / "llama-runtime", t)),
    "a key file in [vars], over the caller's": (
        RUNTIME_MANIFEST, 'LOG_JSON = "true"', 'LOG_JSON = "true"\nAPI_KEY_FILE = "/etc/llama-inference-keys"',
        lambda r, t: check_service_takes_the_callers_key(r / "llama-runtime", t)),
    "loopback names refused": (
        RUNTIME_MANIFEST, """ALLOWED_HOSTS = '["localhost", "127.0.0.1", "[::1]", """, "ALLOWED_HOSTS = '[",
        lambda r, t: check_service_serves(r / "llama-runtime", t)),
    "MODEL_PATH check removed": (
        RUNTIME_MANIFEST, 'if [ -z "${MODEL_PATH:-}" ] || [ ! -f "$MODEL_PATH" ]; then', "if false; then",
        lambda r, t: check_service_refuses_a_missing_model(r / "llama-runtime", t)),
    # The embedding model: its file, through the hook, checked by the service, from the package installed.
    "embedding hook removed": (
        RUNTIME_MANIFEST, 'export EMBEDDING_MODEL_PATH="${EMBEDDING_MODEL_PATH:-$FLOX_ENV/share/models/'
        '$EMBEDDING_MODEL_FILE}"', "true",
        lambda r, t: check_service_serves_embeddings(r / "llama-runtime-embeddings", t)),
    "EMBEDDING_MODEL_PATH check removed": (
        RUNTIME_MANIFEST, 'if [ -n "${EMBEDDING_MODEL_PATH:-}" ] && [ ! -f "$EMBEDDING_MODEL_PATH" ]; then',
        "if false; then", lambda r, t: check_service_refuses_a_missing_embedding_model(r / "llama-runtime", t)),
    "embedding file the package does not install": (
        EMBEDDINGS_MANIFEST, 'EMBEDDING_MODEL_FILE = "all-minilm-l6-v2.F16.gguf"',
        'EMBEDDING_MODEL_FILE = "all-minilm-l6-v2.Q8_0.gguf"',
        lambda r, t: check_embedding_model_file(r / "llama-runtime-embeddings", r / "llama-build")),
    "embedding package not installed": (
        EMBEDDINGS_MANIFEST, 'llama-embedding-model.pkg-path = "owner/llama-embedding-model"\n', "",
        lambda r, t: check_embedding_model_file(r / "llama-runtime-embeddings", r / "llama-build")),
    "a package of another owner included": (
        EMBEDDINGS_MANIFEST, '"owner/llama-embedding-model"', '"someone/llama-embedding-model"',
        lambda r, t: check_runtime_installs_what_the_build_publishes(r / "llama-runtime-embeddings",
                                                                     r / "llama-build")),
    # The router's environment: the router package, alone.
    "router package never built": (
        "llama-build/.flox/pkgs/vllm-router.nix", None, "",
        lambda r, t: check_router_environment(r / "llama-router", r / "llama-build")),
    "the model in the router's environment": (
        ROUTER_MANIFEST, 'vllm-router.pkg-path = "owner/vllm-router"\n',
        'vllm-router.pkg-path = "owner/vllm-router"\nllama-model.pkg-path = "owner/llama-model"\n',
        lambda r, t: check_router_environment(r / "llama-router", r / "llama-build")),
    "the server's settings in the router's environment": (
        ROUTER_MANIFEST, "[options]", '[vars]\nHOST = "0.0.0.0"\n\n[options]',
        lambda r, t: check_router_environment(r / "llama-router", r / "llama-build")),
}


@pytest.mark.parametrize("mutation", MUTATIONS)
def test_each_mutation_is_caught(tmp_path: Path, mutation: str) -> None:
    path, old, new, check = MUTATIONS[mutation]
    root = mutated(tmp_path, path, old, new)
    with pytest.raises(AssertionError):
        check(root, tmp_path)
