"""Flox environments: manifests valid against the official schema; the runtime service really starts the server."""

from __future__ import annotations

import json
import os
import subprocess
import time
import tomllib
from pathlib import Path

import httpx
import jsonschema
import pytest

from server.model_files import embedded_model_path
from tests.conftest import REPO, free_port

# The official schema is not copied into the project: it lies in shared/ beside the checkout (as in CI), or where
# FLOX_MANIFEST_SCHEMA says.
SCHEMA = Path(os.environ.get("FLOX_MANIFEST_SCHEMA", REPO.parent / "shared" / "flox" / "manifest-v1.schema.json"))
MANIFESTS = [REPO / "flox/llama-build/.flox/env/manifest.toml", REPO / "flox/llama-runtime/.flox/env/manifest.toml"]
RUNTIME = MANIFESTS[1]


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.parts[-4])
def test_manifest_validates_against_the_flox_schema(path: Path) -> None:
    schema = json.loads(SCHEMA.read_text())
    jsonschema.validate(tomllib.loads(path.read_text()), schema)


def test_a_broken_manifest_is_caught_by_the_schema() -> None:
    schema = json.loads(SCHEMA.read_text())
    manifest = tomllib.loads(RUNTIME.read_text())
    manifest["services"]["llama-server"]["comand"] = "typo"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(manifest, schema)


def service_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    manifest = tomllib.loads(RUNTIME.read_text())
    env = {k: v for k, v in os.environ.items() if k not in manifest["vars"]}
    env.update(manifest["vars"])
    env.update({"PATH": f"{REPO / '.venv/bin'}:{os.environ['PATH']}", "FLOX_ENV_CACHE": str(tmp_path / "cache"),
                "HOST": "127.0.0.1", "N_THREADS": "2"})
    env.update(extra)
    return env


def test_runtime_service_starts_the_server_on_the_model(tmp_path: Path) -> None:
    command = tomllib.loads(RUNTIME.read_text())["services"]["llama-server"]["command"]
    port = free_port()
    env = service_env(tmp_path, MODEL_PATH=str(embedded_model_path()), PORT=str(port))
    proc = subprocess.Popen(["bash", "-c", command], env=env, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 60
        ready = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                ready = httpx.get(f"http://127.0.0.1:{port}/ready", timeout=1)
                if ready.status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        assert ready is not None and ready.status_code == 200, (tmp_path / "cache/logs/llama-server.log").read_text()
        assert ready.json()["slots"] == int(env["PARALLEL"])
    finally:
        proc.terminate()
        code = proc.wait(30)
    assert code == 0  # SIGTERM drains and exits 0
    log = (tmp_path / "cache/logs/llama-server.log").read_text()
    assert '"message": "Uvicorn running on' in log  # LOG_JSON from the manifest's [vars]


def test_runtime_service_refuses_a_missing_model(tmp_path: Path) -> None:
    command = tomllib.loads(RUNTIME.read_text())["services"]["llama-server"]["command"]
    env = service_env(tmp_path, MODEL_PATH=str(tmp_path / "absent.gguf"), PORT=str(free_port()))
    proc = subprocess.run(["bash", "-c", command], env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0
    assert "MODEL_PATH does not name a file" in proc.stderr and "absent.gguf" in proc.stderr
