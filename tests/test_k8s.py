"""Kubernetes manifests: schema-valid (strict), lint-clean, and consistent with the real application."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import httpx
import kubernetes_validate
import pytest
import yaml

from server.settings import Settings
from tests.conftest import REPO, start_server, stop_server
from tests.kustomize_lite import render

K8S = REPO / "k8s"
BASE_FILES = sorted((K8S / "base").glob("*.yaml"))
OVERLAYS = ["base", "overlays/staging", "overlays/production"]
K8S_VERSION = kubernetes_validate.latest_version()


def manifests(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d and "apiVersion" in d and d.get("kind") !=
            "Kustomization"]


def deployment(overlay: str = "base") -> dict[str, Any]:
    return next(d for d in render(K8S / overlay) if d["kind"] == "Deployment")


def test_yamllint_is_clean() -> None:
    proc = subprocess.run([sys.executable, "-m", "yamllint", "--strict", "-c", str(REPO / ".yamllint.yaml"),
                           str(K8S)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("path", BASE_FILES, ids=lambda p: p.name)
def test_each_manifest_validates_strictly(path: Path) -> None:
    for doc in manifests(path):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_rendered_overlay_validates_strictly(overlay: str) -> None:
    docs = render(K8S / overlay)
    assert {d["kind"] for d in docs} == {"RuntimeClass", "Deployment", "Service", "HorizontalPodAutoscaler",
                                         "PodDisruptionBudget"}
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_production_pins_a_generation_and_staging_follows_the_latest() -> None:
    key = "flox.dev/environment"
    prod = deployment("overlays/production")["spec"]["template"]["metadata"]["annotations"][key]
    staging = deployment("overlays/staging")["spec"]["template"]["metadata"]["annotations"][key]
    assert prod.startswith("owner/llama-runtime@") and prod.rsplit("@", 1)[1].isdigit()
    assert staging == "owner/llama-runtime"
    assert deployment("overlays/production")["metadata"]["namespace"] == "llama-production"


def test_deployment_runs_our_command_with_settings_the_server_knows() -> None:
    dep = deployment()
    spec = dep["spec"]["template"]["spec"]
    assert spec["runtimeClassName"] == "flox"
    container = spec["containers"][0]
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert container["command"][0] in scripts and container["command"][1:] == ["serve"]
    env = {e["name"]: e["value"] for e in container["env"]}
    known = {name.upper() for name in Settings.model_fields}
    assert set(env) - {"HOME"} <= known, set(env) - known
    settings = Settings(**{k.lower(): v for k, v in env.items() if k.upper() in known})  # the values parse
    assert settings.host == "0.0.0.0" and settings.port == container["ports"][0]["containerPort"]
    assert spec["terminationGracePeriodSeconds"] > settings.drain_timeout_s


def test_probes_answer_as_expected_on_a_running_server(tmp_path: Path) -> None:
    container = deployment()["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"]}
    # The pod's own settings, but on loopback and with the embedded model instead of LLaMA 2 7B.
    overrides = {k: v for k, v in env.items() if k not in ("MODEL_PATH", "HOST", "PORT", "HOME", "N_THREADS")}
    server = start_server(tmp_path, env=overrides)
    try:
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            get = container[probe]["httpGet"]
            assert get["port"] in ports
            resp = httpx.get(server.url + get["path"], timeout=container[probe]["timeoutSeconds"])
            assert resp.status_code == 200, (probe, resp.text)
        assert httpx.get(server.url + "/ready").json()["slots"] == int(env["PARALLEL"])
        scrape = deployment()["spec"]["template"]["metadata"]["annotations"]
        metrics = httpx.get(server.url + scrape["prometheus.io/path"])
        assert metrics.status_code == 200 and "llama_slots_total 2.0" in metrics.text
    finally:
        stop_server(server)
